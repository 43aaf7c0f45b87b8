-- Cheaper derivation: the same derived state from fewer SQL statements.
--
-- Every fact re-derives its release (ops.refresh_on_fact -> ops.refresh_release
-- -> ops.evaluate_gate per gate). The cost is dominated by the number of
-- statements the PL/pgSQL runs (executor start-up per statement), so this
-- migration runs fewer of them; what is derived does not change.
--
-- Signatures stay as they were, so grants and callers stay valid; CREATE OR
-- REPLACE resets a function's attributes, so each one restates them.

-- ---------------------------------------------------------------------------
-- The guard on gate status
-- ---------------------------------------------------------------------------
-- The check itself, unchanged from 0002: a change into passed needs the facts,
-- a change into bypassed an exception that authorizes it. With the owner's
-- rights, like the rest of the derivation.
CREATE FUNCTION ops.check_gate_status_change(p_op text, p_gate_id uuid, p_release_id uuid,
                                             p_gate_code ops.ops_gate_code, p_status ops.ops_gate_status,
                                             p_exception_id uuid) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ev    record;
    exc   ops.exceptions;
    unmet text;
BEGIN
    IF p_status = 'passed' THEN
        IF p_op = 'INSERT' THEN
            RAISE EXCEPTION '% cannot be created as passed: gates start pending and pass from their facts',
                ops.gate_label(p_gate_code) USING ERRCODE = 'check_violation';
        END IF;
        -- Required gates are read as stored: they passed this same guard.
        SELECT * INTO ev FROM ops.evaluate_gate(p_gate_id, now(), true);
        IF ev.own_status <> 'passed' THEN
            SELECT string_agg(req ->> 'detail', '; ') INTO unmet
            FROM jsonb_array_elements(ev.explanation -> 'requirements') req
            WHERE NOT (req ->> 'met')::boolean;
            RAISE EXCEPTION '% of release % cannot be passed: %', ops.gate_label(p_gate_code), p_release_id,
                coalesce(unmet, 'its requirements are not met')
                USING ERRCODE = 'check_violation',
                      HINT = 'Record the missing approvals and evidence, or grant a time-bounded exception.';
        END IF;
    ELSIF p_status = 'bypassed' THEN
        exc := ops.bypassing_exception(p_release_id, p_gate_code, now());
        IF exc.exception_id IS NULL OR exc.exception_id IS DISTINCT FROM p_exception_id THEN
            RAISE EXCEPTION '% of release % cannot be bypassed: no active exception % covers it',
                ops.gate_label(p_gate_code), p_release_id, coalesce(p_exception_id::text, '')
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.check_gate_status_change(text, uuid, uuid, ops.ops_gate_code, ops.ops_gate_status, uuid)
    FROM PUBLIC;
-- The guard below runs as the writer; release managers are the only role that
-- may write gate status (0003).
GRANT EXECUTE ON FUNCTION ops.check_gate_status_change(text, uuid, uuid, ops.ops_gate_code, ops.ops_gate_status, uuid)
    TO release_manager;

-- The trigger function runs with the WRITER's rights (no SECURITY DEFINER),
-- for one reason: it must see who writes. ops.refresh_release has just
-- evaluated the gate it writes as passed, so evaluating it again here is pure
-- cost; refresh marks that one write with a transaction-local setting and
-- clears it right after. A setting alone proves nothing (anyone can set it),
-- so the skip also needs current_user to be the table's owner, which it is
-- inside the SECURITY DEFINER refresh and never is for another role (inside a
-- SECURITY DEFINER guard current_user would always be the owner, so the check
-- would be worthless there). The owner could disable this trigger anyway.
-- Every other write into passed or bypassed is checked as before, by any
-- role including superusers.
CREATE OR REPLACE FUNCTION ops.guard_gate_status() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Only a change into passed or bypassed needs proof; re-deriving an
    -- explanation of a gate that stays passed does not.
    IF NEW.status NOT IN ('passed', 'bypassed')
       OR (TG_OP = 'UPDATE' AND NEW.status = OLD.status
           AND NEW.exception_id IS NOT DISTINCT FROM OLD.exception_id) THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.status = 'passed'
       AND current_setting('opsgate.refresh_writes_gate', true) = NEW.gate_id::text
       AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = TG_RELID AND pg_get_userbyid(c.relowner) = current_user) THEN
        RETURN NEW;
    END IF;
    PERFORM ops.check_gate_status_change(TG_OP, NEW.gate_id, NEW.release_id, NEW.gate_code, NEW.status,
                                         NEW.exception_id);
    RETURN NEW;
END
$$;

-- ---------------------------------------------------------------------------
-- Refresh
-- ---------------------------------------------------------------------------
-- As in 0002, but a gate that requires another one is re-derived only when it
-- can change: when the required gate's stored status changed in this refresh
-- (dependents read required gates as stored), or, for a policy with
-- separation of duties, when the required gate was asked for (its approvals,
-- which decide whose approval is ignored, may have changed). Gates are
-- derived in gate order, so requirements come first. Gate rows are written
-- only when something changed. The release status is re-derived when a gate
-- status changed, when G4 (deployments) was asked for, and on a full refresh.
--
-- What 0002 did beyond this only mattered for state that was already stale:
-- a gate whose status a person set directly (the release status and the
-- gates that require it caught up at the next refresh of any gate that
-- widened to them; now at the next refresh that reaches them), and a
-- dependent gate whose exception window opened or closed since it was last
-- derived (the exception sweep re-derives those releases in full).
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
    SELECT r.environment_target,
           todo || ARRAY(SELECT p.gate_code FROM ops.gate_policies p
                         WHERE p.environment = r.environment_target AND p.requires_gates && todo
                           AND p.separation_of_duties AND cardinality(p.approver_roles) > 0)
    INTO target, todo
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
