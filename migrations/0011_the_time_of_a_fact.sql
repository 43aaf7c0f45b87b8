-- The time of a fact is when it is written, not when its transaction began.
--
-- now() is the start of the transaction. The worker applies several
-- deliveries in one transaction, and takes its release locks inside it, so
-- a transaction may start well before its writes:
-- - a deployment and an exception written in one transaction had the same
--   created_at, so an exception granted after a promotion counted as granted
--   before it (0007 keeps a bypass on record only for promotions after the
--   grant);
-- - a transaction that waited for a release lock derived gates as of before
--   the wait (an exception that expired meanwhile still bypassed).
-- created_at of deployments and exceptions is now the clock at the insert,
-- an exception must have been granted strictly before the promotion it
-- explains, and the derivation a fact triggers, and the guard on gate
-- status, evaluate as of the statement that wrote the fact.

CREATE OR REPLACE FUNCTION ops.stamp_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.created_at := clock_timestamp();
    IF TG_TABLE_NAME = 'deployments' THEN
        NEW.g4_status := 'pending';
        NEW.g4_resolved_at := NULL;
        NEW.g4_overdue_at := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION ops.bypassing_exception(p_release_id uuid, p_gate_code ops.ops_gate_code, p_now timestamptz)
RETURNS ops.exceptions
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    chosen   ops.exceptions;
    promoted timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ops.exceptions e
                   WHERE e.release_id = p_release_id AND p_gate_code = ANY (e.impacted_gates)) THEN
        RETURN NULL;
    END IF;
    promoted := ops.release_promoted_at(p_release_id);
    SELECT e.* INTO chosen
    FROM ops.exceptions e
    WHERE e.release_id = p_release_id
      AND p_gate_code = ANY (e.impacted_gates)
      AND (
          ops.exception_active(e, p_now)
          OR (promoted IS NOT NULL
              AND e.created_at < promoted
              AND e.effective_from <= promoted
              AND promoted < e.expires_at
              AND (e.expired_at IS NULL OR promoted < e.expired_at))
      )
    ORDER BY e.expires_at DESC, e.exception_id
    LIMIT 1;
    RETURN chosen;
END
$$;

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

CREATE OR REPLACE FUNCTION ops.check_gate_status_change(p_op text, p_gate_id uuid, p_release_id uuid,
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
        SELECT * INTO ev FROM ops.evaluate_gate(p_gate_id, statement_timestamp(), true);
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
        exc := ops.bypassing_exception(p_release_id, p_gate_code, statement_timestamp());
        IF exc.exception_id IS NULL OR exc.exception_id IS DISTINCT FROM p_exception_id THEN
            RAISE EXCEPTION '% of release % cannot be bypassed: no active exception % covers it',
                ops.gate_label(p_gate_code), p_release_id, coalesce(p_exception_id::text, '')
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
END
$$;
