-- A fact that is inserted calls ops.refresh_release directly.
--
-- Nearly every fact the worker writes is an INSERT of one row, and its
-- trigger found what the fact reaches with statements written for the
-- general case (an UPDATE can move a fact from one gate or release to
-- another): two aggregates with DISTINCT over NEW and OLD, and a call of
-- ops.refresh_release from a query over the distinct releases. Each one is a
-- statement with its own executor start-up. For an INSERT there is one row,
-- one release and no OLD: the lookups become single-row reads into
-- variables, and the call a plain expression. What is derived does not
-- change: the same release, gates and deployments reach ops.refresh_release.
-- UPDATE and DELETE keep the general path of 0011.
--
-- CREATE OR REPLACE resets a function's attributes, so they are restated
-- (0003: derivation runs with the owner's rights).

CREATE OR REPLACE FUNCTION ops.refresh_on_fact() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    affected    uuid[];
    gates       ops.ops_gate_code[];
    deployments uuid[];
    fact_release uuid;
    target      ops.ops_environment;
    code        ops.ops_gate_code;
BEGIN
    -- Which gates a fact can change: its own gate (checks, approvals), for an
    -- approval also the gates that apply separation of duties to it, the
    -- gates an exception impacts, for evidence the gates whose policy asks
    -- for evidence and the gate it is attached to, G4 for deployments;
    -- ops.refresh_release adds the gates that require a gate whose status
    -- changed. Which deployments' G4 a fact can change: a deployment's own,
    -- a health check's deployment.
    IF TG_OP = 'INSERT' THEN
        IF TG_TABLE_NAME = 'gate_checks' THEN
            SELECT rg.release_id, rg.gate_code INTO fact_release, code
            FROM ops.release_gates rg WHERE rg.gate_id = NEW.gate_id;
            gates := ARRAY[code];
            deployments := CASE WHEN NEW.deployment_id IS NULL THEN '{}'::uuid[] ELSE ARRAY[NEW.deployment_id] END;
        ELSIF TG_TABLE_NAME = 'approvals' THEN
            SELECT rg.release_id, rg.gate_code, r.environment_target INTO fact_release, code, target
            FROM ops.release_gates rg JOIN ops.releases r ON r.release_id = rg.release_id
            WHERE rg.gate_id = NEW.gate_id;
            -- With separation of duties, a gate ignores approvals by whoever
            -- approved a gate it requires: an approval of G2 can change G3.
            gates := ARRAY[code] || ARRAY(
                SELECT p.gate_code FROM ops.gate_policies p
                WHERE p.environment = target AND code = ANY (p.requires_gates)
                  AND p.separation_of_duties AND cardinality(p.approver_roles) > 0);
        ELSIF TG_TABLE_NAME = 'evidence_artifacts' THEN
            fact_release := NEW.release_id;
            gates := ARRAY(
                SELECT p.gate_code
                FROM ops.releases r
                JOIN ops.gate_policies p ON p.environment = r.environment_target
                WHERE r.release_id = fact_release
                  AND NEW.artifact_type = ANY (p.evidence_any_of || p.evidence_all_of));
            IF NEW.gate_id IS NOT NULL THEN
                SELECT g.gate_code INTO code FROM ops.release_gates g WHERE g.gate_id = NEW.gate_id;
                IF FOUND THEN
                    gates := gates || code;
                END IF;
            END IF;
        ELSIF TG_TABLE_NAME = 'exceptions' THEN
            fact_release := NEW.release_id;
            gates := NEW.impacted_gates;
        ELSE
            fact_release := NEW.release_id;
            gates := '{G4}';
            deployments := ARRAY[NEW.deployment_id];
        END IF;
        IF fact_release IS NOT NULL THEN
            PERFORM ops.refresh_release(fact_release, statement_timestamp(), coalesce(gates, '{}'), deployments);
        END IF;
        RETURN NULL;
    END IF;

    IF TG_TABLE_NAME IN ('gate_checks', 'approvals') THEN
        SELECT array_agg(DISTINCT rg.release_id), array_agg(DISTINCT rg.gate_code) INTO affected, gates
        FROM ops.release_gates rg
        WHERE rg.gate_id IN (
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.gate_id END,
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.gate_id END);
        IF TG_TABLE_NAME = 'approvals' THEN
            gates := gates || ARRAY(
                SELECT p.gate_code
                FROM unnest(affected) AS a(release_id)
                JOIN ops.releases r ON r.release_id = a.release_id
                JOIN ops.gate_policies p ON p.environment = r.environment_target
                WHERE p.requires_gates && gates
                  AND p.separation_of_duties AND cardinality(p.approver_roles) > 0);
        END IF;
    ELSE
        affected := ARRAY[
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.release_id END,
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.release_id END];
        -- (Separate branches: a record field is resolved when its expression runs.)
        IF TG_TABLE_NAME = 'exceptions' AND TG_OP = 'UPDATE' THEN
            gates := NEW.impacted_gates || OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'exceptions' THEN
            gates := OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'evidence_artifacts' THEN
            SELECT array_agg(p.gate_code) INTO gates
            FROM unnest(affected) AS a(release_id)
            JOIN ops.releases r ON r.release_id = a.release_id
            JOIN ops.gate_policies p ON p.environment = r.environment_target
            WHERE CASE WHEN TG_OP <> 'DELETE' THEN NEW.artifact_type END = ANY (p.evidence_any_of || p.evidence_all_of)
               OR OLD.artifact_type = ANY (p.evidence_any_of || p.evidence_all_of);
            gates := coalesce(gates, '{}') || ARRAY(
                SELECT g.gate_code FROM ops.release_gates g
                WHERE g.gate_id IN (CASE WHEN TG_OP <> 'DELETE' THEN NEW.gate_id END, OLD.gate_id));
        ELSE
            gates := '{G4}';
        END IF;
    END IF;
    IF TG_TABLE_NAME IN ('gate_checks', 'deployments') THEN
        deployments := ARRAY(
            SELECT DISTINCT id
            FROM unnest(ARRAY[CASE WHEN TG_OP <> 'DELETE' THEN NEW.deployment_id END, OLD.deployment_id]) AS id
            WHERE id IS NOT NULL);
    END IF;
    PERFORM ops.refresh_release(id, statement_timestamp(), coalesce(gates, '{}'), deployments)
    FROM (SELECT DISTINCT id FROM unnest(affected) AS id WHERE id IS NOT NULL) ids;
    RETURN NULL;
END
$$;
