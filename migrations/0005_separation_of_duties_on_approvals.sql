-- Separation of duties re-derived only when approvals change.
--
-- A gate whose policy has separation of duties ignores approvals by whoever
-- approved a gate it requires (and by the release's initiator). 0004
-- re-derived such a gate whenever a gate it requires was asked for, so every
-- check and every piece of evidence of G1 or G2 evaluated G3 as well, the
-- most expensive gate to evaluate. What G3 reads of G1 and G2 is their
-- stored status (a change of it re-derives G3 already) and their approvals,
-- so the widening now happens where the fact is known: ops.refresh_on_fact
-- adds those gates for approvals only, and ops.refresh_release re-derives
-- the gates it is asked for and, as before, the gates that require a gate
-- whose status changed. What is derived does not change
-- (benches/derivation.rs shows what it saves).
--
-- The derivation a fact triggers is now as of the statement that wrote it,
-- not of the start of its transaction: the worker applies several deliveries
-- in one transaction and takes its release locks inside it, so a transaction
-- may begin well before its writes (an exception that became active, or
-- expired, while it waited would be judged at the wrong time).
--
-- CREATE OR REPLACE resets a function's attributes, so each one restates
-- them (0003: derivation runs with the owner's rights).

-- Re-derives the gates in p_gates (all when NULL), then the gates that
-- require a gate whose status changed, in gate order; the deployments' G4
-- when G4 is among them; and the release status when a gate status changed,
-- when G4 was asked for, and on a full refresh. Gate rows are written only
-- when something changed. The caller names every gate its change can reach
-- directly (ops.refresh_on_fact: for an approval, the gates that apply
-- separation of duties to it).
CREATE OR REPLACE FUNCTION ops.refresh_release(p_release_id uuid, p_now timestamptz DEFAULT now(),
                                               p_gates ops.ops_gate_code[] DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target       ops.ops_environment;
    todo         ops.ops_gate_code[] := coalesce(p_gates, enum_range(NULL::ops.ops_gate_code));
    code         ops.ops_gate_code;
    cur          record;
    new_by       text;
    changed      boolean := false;
    new_status   ops.ops_release_status;
    ignore       text;
BEGIN
    -- One refresh per release at a time.
    SELECT r.environment_target
    INTO target
    FROM ops.releases r
    WHERE r.release_id = p_release_id
    FOR UPDATE OF r;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    FOREACH code IN ARRAY enum_range(NULL::ops.ops_gate_code) LOOP
        CONTINUE WHEN NOT (code = ANY (todo));

        IF code = 'G4' THEN
            UPDATE ops.deployments d
            SET g4_status = e.g4_status, g4_resolved_at = e.g4_resolved_at
            FROM ops.deployments s CROSS JOIN LATERAL ops.derive_g4(s.deployment_id, p_now) e
            WHERE s.release_id = p_release_id AND d.deployment_id = s.deployment_id
              AND (d.g4_status, d.g4_resolved_at) IS DISTINCT FROM (e.g4_status, e.g4_resolved_at);
        END IF;

        SELECT g.gate_id, g.status AS old_status, g.exception_id AS old_exception_id,
               g.explanation AS old_explanation, g.resolved_by AS old_resolved_by,
               e.status, e.exception_id, e.explanation, e.resolved_by
        INTO cur
        FROM ops.release_gates g CROSS JOIN LATERAL ops.evaluate_gate(g.gate_id, p_now, true) e
        WHERE g.release_id = p_release_id AND g.gate_code = code;
        CONTINUE WHEN NOT FOUND;

        new_by := CASE WHEN cur.status IN ('passed', 'failed', 'bypassed') THEN cur.resolved_by END;
        CONTINUE WHEN (cur.old_status, cur.old_exception_id, cur.old_explanation, cur.old_resolved_by)
                      IS NOT DISTINCT FROM (cur.status, cur.exception_id, cur.explanation, new_by);

        -- See ops.guard_gate_status: this write into passed was just derived.
        IF cur.status = 'passed' THEN
            ignore := set_config('opsgate.refresh_writes_gate', cur.gate_id::text, true);
        END IF;
        UPDATE ops.release_gates g
        SET status = cur.status,
            exception_id = cur.exception_id,
            explanation = cur.explanation,
            resolved_by = new_by,
            entered_at = CASE WHEN cur.status <> 'pending' THEN coalesce(g.entered_at, p_now) END,
            resolved_at = CASE
                WHEN cur.status NOT IN ('passed', 'failed', 'bypassed') THEN NULL
                WHEN g.status = cur.status THEN coalesce(g.resolved_at, p_now)
                ELSE p_now
            END
        WHERE g.gate_id = cur.gate_id
          AND (g.status, g.exception_id, g.explanation, g.resolved_by)
              IS DISTINCT FROM (cur.status, cur.exception_id, cur.explanation, new_by);
        IF cur.status = 'passed' THEN
            ignore := set_config('opsgate.refresh_writes_gate', '', true);
        END IF;

        -- A gate that requires this one reads its status: re-derive it too.
        IF cur.status IS DISTINCT FROM cur.old_status THEN
            changed := true;
            todo := todo || ARRAY(SELECT p.gate_code FROM ops.gate_policies p
                                  WHERE p.environment = target AND code = ANY (p.requires_gates));
        END IF;
    END LOOP;

    -- The release status reads gate statuses and deployments (not g4_status).
    IF changed OR p_gates IS NULL OR 'G4' = ANY (p_gates) THEN
        new_status := ops.derive_release_status(p_release_id);
        UPDATE ops.releases
        SET status = new_status, status_changed_at = p_now
        WHERE release_id = p_release_id AND status IS DISTINCT FROM new_status;
    END IF;
END
$$;

-- Which gates a fact can change: its own gate (checks, approvals), for an
-- approval also the gates that apply separation of duties to it, the gates
-- an exception impacts, for evidence the gates whose policy asks for
-- evidence and the gate it is attached to, G4 for deployments;
-- ops.refresh_release adds the gates that require a gate whose status
-- changed.
CREATE OR REPLACE FUNCTION ops.refresh_on_fact() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    affected uuid[];
    gates ops.ops_gate_code[];
BEGIN
    IF TG_TABLE_NAME IN ('gate_checks', 'approvals') THEN
        SELECT array_agg(DISTINCT rg.release_id), array_agg(DISTINCT rg.gate_code) INTO affected, gates
        FROM ops.release_gates rg
        WHERE rg.gate_id IN (
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.gate_id END,
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.gate_id END);
        -- With separation of duties, a gate ignores approvals by whoever
        -- approved a gate it requires: an approval of G2 can change G3.
        IF TG_TABLE_NAME = 'approvals' THEN
            gates := gates || ARRAY(
                SELECT p.gate_code FROM ops.gate_policies p JOIN ops.releases r ON r.environment_target = p.environment
                WHERE r.release_id = ANY (affected) AND p.requires_gates && gates
                  AND p.separation_of_duties AND cardinality(p.approver_roles) > 0);
        END IF;
    ELSE
        affected := ARRAY[
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.release_id END,
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.release_id END];
        -- (Separate branches: a record field is resolved when its expression runs.)
        IF TG_TABLE_NAME = 'exceptions' AND TG_OP = 'INSERT' THEN
            gates := NEW.impacted_gates;
        ELSIF TG_TABLE_NAME = 'exceptions' AND TG_OP = 'UPDATE' THEN
            gates := NEW.impacted_gates || OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'exceptions' THEN
            gates := OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'evidence_artifacts' THEN
            -- The gates whose policy asks for this type of evidence, and the gate it is attached to.
            SELECT array_agg(p.gate_code) INTO gates
            FROM ops.gate_policies p JOIN ops.releases r ON r.environment_target = p.environment
            WHERE r.release_id = ANY (affected)
              AND (CASE WHEN TG_OP <> 'DELETE' THEN NEW.artifact_type END = ANY (p.evidence_any_of || p.evidence_all_of)
                   OR CASE WHEN TG_OP <> 'INSERT' THEN OLD.artifact_type END = ANY (p.evidence_any_of || p.evidence_all_of));
            gates := coalesce(gates, '{}') || ARRAY(
                SELECT g.gate_code FROM ops.release_gates g
                WHERE g.gate_id IN (CASE WHEN TG_OP <> 'DELETE' THEN NEW.gate_id END,
                                    CASE WHEN TG_OP <> 'INSERT' THEN OLD.gate_id END));
        ELSE
            gates := '{G4}';
        END IF;
    END IF;
    PERFORM ops.refresh_release(id, statement_timestamp(), coalesce(gates, '{}'))
    FROM (SELECT DISTINCT id FROM unnest(affected) AS id WHERE id IS NOT NULL) ids;
    RETURN NULL;
END
$$;
