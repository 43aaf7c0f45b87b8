-- Derivation reads less for the facts the worker writes most.
--
-- 1. A health check re-derives the G4 state of the deployment it names, and
--    a deployment event that of its own deployment, instead of every
--    deployment of the release: ops.derive_g4 of a deployment reads only that
--    deployment, its policy and its own health checks, so the others cannot
--    have changed. (The overdue sweep and a full refresh still re-derive all.)
-- 2. ops.refresh_on_fact finds the environment of the fact's release through
--    the release's primary key. `release_id = ANY (array)` got a sequential
--    scan of ops.releases in the generic plan the worker's sessions use.
-- 3. ops.promotion_blockers does not evaluate the needed gates again when all
--    of them are stored as passed and the release's gates are kept current
--    (it is neither promoted nor rolled back, whose gates a policy change
--    leaves as decided). A stored `passed` is the derivation of the facts as
--    of their last change (every fact re-derives its release, and
--    ops.guard_gate_status proves any other write into passed); a passed
--    gate's own evaluation does not depend on the time, and a passed gate is
--    not bypassed, so evaluating it now could only say passed again. The
--    deployment handler asks this before every production deployment.
--
-- CREATE OR REPLACE resets a function's attributes, so each one restates
-- them (0003: derivation runs with the owner's rights).

DROP FUNCTION ops.refresh_release(uuid, timestamptz, ops.ops_gate_code[]);

-- Re-derives the gates in p_gates (all when NULL), then the gates that
-- require a gate whose status changed, in gate order; when G4 is among them,
-- the G4 state of the deployments in p_deployments (all of the release's
-- when NULL); and the release status when a gate status changed, when G4
-- was asked for, and on a full refresh. Gate rows are written only when
-- something changed. The caller names every gate its change can reach
-- directly (ops.refresh_on_fact: for an approval, the gates that apply
-- separation of duties to it).
CREATE FUNCTION ops.refresh_release(p_release_id uuid, p_now timestamptz DEFAULT now(),
                                    p_gates ops.ops_gate_code[] DEFAULT NULL,
                                    p_deployments uuid[] DEFAULT NULL) RETURNS void
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
            -- Of the deployments named, those that still exist (a deleted one
            -- has no G4); the release's few deployments are read by release.
            UPDATE ops.deployments d
            SET g4_status = e.g4_status, g4_resolved_at = e.g4_resolved_at
            FROM ops.deployments s CROSS JOIN LATERAL ops.derive_g4(s.deployment_id, p_now) e
            WHERE s.release_id = p_release_id
              AND (p_deployments IS NULL OR s.deployment_id = ANY (p_deployments))
              AND d.deployment_id = s.deployment_id
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

REVOKE EXECUTE ON FUNCTION ops.refresh_release(uuid, timestamptz, ops.ops_gate_code[], uuid[]) FROM PUBLIC;

-- Which gates a fact can change: its own gate (checks, approvals), for an
-- approval also the gates that apply separation of duties to it, the gates
-- an exception impacts, for evidence the gates whose policy asks for
-- evidence and the gate it is attached to, G4 for deployments;
-- ops.refresh_release adds the gates that require a gate whose status
-- changed. Which deployments' G4 a fact can change: a deployment's own, a
-- health check's deployment.
CREATE OR REPLACE FUNCTION ops.refresh_on_fact() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    affected    uuid[];
    gates       ops.ops_gate_code[];
    deployments uuid[];
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
        IF TG_TABLE_NAME = 'exceptions' AND TG_OP = 'INSERT' THEN
            gates := NEW.impacted_gates;
        ELSIF TG_TABLE_NAME = 'exceptions' AND TG_OP = 'UPDATE' THEN
            gates := NEW.impacted_gates || OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'exceptions' THEN
            gates := OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'evidence_artifacts' THEN
            -- The gates whose policy asks for this type of evidence, and the gate it is attached to.
            SELECT array_agg(p.gate_code) INTO gates
            FROM unnest(affected) AS a(release_id)
            JOIN ops.releases r ON r.release_id = a.release_id
            JOIN ops.gate_policies p ON p.environment = r.environment_target
            WHERE CASE WHEN TG_OP <> 'DELETE' THEN NEW.artifact_type END = ANY (p.evidence_any_of || p.evidence_all_of)
               OR CASE WHEN TG_OP <> 'INSERT' THEN OLD.artifact_type END = ANY (p.evidence_any_of || p.evidence_all_of);
            gates := coalesce(gates, '{}') || ARRAY(
                SELECT g.gate_code FROM ops.release_gates g
                WHERE g.gate_id IN (CASE WHEN TG_OP <> 'DELETE' THEN NEW.gate_id END,
                                    CASE WHEN TG_OP <> 'INSERT' THEN OLD.gate_id END));
        ELSE
            gates := '{G4}';
        END IF;
    END IF;
    -- The G4 of a deployment reads the deployment and its health checks.
    IF TG_TABLE_NAME IN ('gate_checks', 'deployments') THEN
        deployments := ARRAY(
            SELECT DISTINCT id
            FROM unnest(ARRAY[CASE WHEN TG_OP <> 'DELETE' THEN NEW.deployment_id END,
                              CASE WHEN TG_OP <> 'INSERT' THEN OLD.deployment_id END]) AS id
            WHERE id IS NOT NULL);
    END IF;
    PERFORM ops.refresh_release(id, statement_timestamp(), coalesce(gates, '{}'), deployments)
    FROM (SELECT DISTINCT id FROM unnest(affected) AS id WHERE id IS NOT NULL) ids;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION ops.promotion_blockers(p_release_id uuid, p_target_env text, p_now timestamptz DEFAULT now())
RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r         ops.releases;
    needed    ops.ops_gate_code[];
    ev        record;
    code      ops.ops_gate_code;
    unmet     text;
BEGIN
    IF p_target_env IS NULL OR p_target_env NOT IN ('dev', 'staging', 'production') THEN
        RAISE EXCEPTION 'unknown target environment %: expected dev, staging or production', p_target_env
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO r FROM ops.releases WHERE release_id = p_release_id;
    IF NOT FOUND THEN
        RETURN NEXT format('release %s does not exist', p_release_id);
        RETURN;
    END IF;

    needed := CASE p_target_env
        WHEN 'dev' THEN ARRAY['G1']::ops.ops_gate_code[]
        WHEN 'staging' THEN ARRAY['G1', 'G2']::ops.ops_gate_code[]
        ELSE ARRAY['G1', 'G2', 'G3']::ops.ops_gate_code[]
    END;
    -- Gates stored as passed, of a release whose gates are kept current,
    -- would evaluate as passed again (see the head of this migration).
    IF r.status IN ('promoted', 'rolled_back')
       OR (SELECT count(*) FROM ops.release_gates g
           WHERE g.release_id = p_release_id AND g.gate_code = ANY (needed) AND g.status = 'passed')
          < cardinality(needed) THEN
        FOREACH code IN ARRAY needed LOOP
            SELECT e.* INTO ev
            -- Each needed gate is evaluated now; a gate's own requirements are read
            -- as stored, since every needed gate is checked here in its own right.
            FROM ops.release_gates g, ops.evaluate_gate(g.gate_id, p_now, true) e
            WHERE g.release_id = p_release_id AND g.gate_code = code;
            IF NOT FOUND THEN
                RETURN NEXT format('%s: gate missing', ops.gate_label(code));
            ELSIF ev.status NOT IN ('passed', 'bypassed') THEN
                SELECT string_agg(req ->> 'detail', '; ') INTO unmet
                FROM jsonb_array_elements(ev.explanation -> 'requirements') req
                WHERE NOT (req ->> 'met')::boolean;
                RETURN NEXT format('%s is %s: %s', ops.gate_label(code), ev.status, coalesce(unmet, 'requirements not met'));
            ELSIF ev.status = 'bypassed' AND NOT EXISTS (
                SELECT 1 FROM ops.exceptions e WHERE e.exception_id = ev.exception_id AND ops.exception_active(e, p_now)
            ) THEN
                -- The gate stays bypassed on record for the promotion the
                -- exception covered; a new promotion needs it active now.
                RETURN NEXT format('%s was bypassed by exception %s, which is not active now', ops.gate_label(code),
                                   ev.exception_id);
            END IF;
        END LOOP;
    END IF;

    -- Linear promotion: production only after the same source_ref succeeded in staging.
    IF p_target_env = 'production' AND NOT EXISTS (
        SELECT 1 FROM ops.deployments d
        JOIN ops.releases dr ON dr.release_id = d.release_id
        WHERE dr.project = r.project AND d.source_ref = r.source_ref
          AND d.environment = 'staging' AND d.status = 'succeeded'
    ) THEN
        RETURN NEXT format('no succeeded staging deployment of %s (linear promotion)', r.source_ref);
    END IF;
END
$$;
