-- Findings of a review, closed in the database (people with the roles of
-- docs/access-control.md may write the tables directly).
--
-- 1. A G4 check counts for a deployment of its own release only. A check
--    naming another release's deployment made that deployment's G4 pass;
--    ops.derive_g4 now ignores such checks and the table refuses them.
-- 2. An exception that is not active now authorizes no new promotion. It
--    still explains, on record, the promotion it covered, but only if it was
--    granted before that promotion (no backdating after the fact), and
--    ops.promotion_blockers (CI's check and the production guard) names it.
-- 3. A rolled-back deployment keeps its G4 deadline: an overdue G4 fails
--    (or is flagged) as for a succeeded one, instead of going back to
--    pending for ever.
-- 4. created_at of exceptions and deployments is the clock at the insert
--    (not the start of the transaction: a deployment and an exception written
--    in one batch must not look simultaneous), and
--    a new deployment starts with G4 pending, not overdue: the derivation
--    relies on both, so a direct insert cannot set them. A deployment's
--    status moves only in_progress -> succeeded | failed and
--    succeeded -> rolled_back, as the worker enforces.
-- 5. ops.mask_url: a host with a trailing dot (localhost.) is the same host.
-- 6. The guard on gate status evaluates as of the statement that writes the
--    gate, like the derivation (0005), so both judge an exception window at
--    the same moment.
--
-- CREATE OR REPLACE resets a function's attributes, so each one restates
-- them (0003: derivation runs with the owner's rights).

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

CREATE OR REPLACE FUNCTION ops.derive_g4(p_deployment_id uuid, p_now timestamptz DEFAULT now())
RETURNS TABLE (g4_status ops.ops_g4_status, g4_resolved_at timestamptz, detail text, deadline timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d        ops.deployments;
    pol      ops.gate_policies;
    latest   record;
BEGIN
    SELECT * INTO d FROM ops.deployments WHERE deployment_id = p_deployment_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'deployment % does not exist', p_deployment_id USING ERRCODE = 'no_data_found';
    END IF;
    SELECT * INTO pol FROM ops.gate_policies WHERE gate_code = 'G4' AND environment = d.environment;
    deadline := d.deployed_at + make_interval(mins => coalesce(pol.sla_minutes, 30));

    IF d.status NOT IN ('succeeded', 'rolled_back') THEN
        RETURN QUERY SELECT 'pending'::ops.ops_g4_status, NULL::timestamptz,
            format('deployment is %s', d.status), deadline;
        RETURN;
    END IF;

    -- The latest health check observed within the SLA decides; on a tie a
    -- fail wins, so the outcome does not depend on arrival order.
    SELECT c.status, c.observed_at, c.check_name INTO latest
    FROM ops.gate_checks c
    JOIN ops.release_gates g ON g.gate_id = c.gate_id AND g.gate_code = 'G4' AND g.release_id = d.release_id
    WHERE c.deployment_id = d.deployment_id
      AND c.status <> 'skipped'
      AND c.observed_at <= deadline
    ORDER BY c.observed_at DESC, (c.status = 'fail') DESC, c.check_name
    LIMIT 1;

    IF FOUND AND latest.status IN ('pass', 'warning') THEN
        RETURN QUERY SELECT 'passed'::ops.ops_g4_status, latest.observed_at,
            format('health check %s passed at %s, within the %s min SLA', latest.check_name,
                   latest.observed_at, pol.sla_minutes), deadline;
    ELSIF FOUND THEN
        RETURN QUERY SELECT 'failed'::ops.ops_g4_status, latest.observed_at,
            format('health check %s failed at %s', latest.check_name, latest.observed_at), deadline;
    ELSIF p_now >= deadline AND pol.overdue_action = 'fail' THEN
        RETURN QUERY SELECT 'failed'::ops.ops_g4_status, deadline,
            format('no passing health check within the %s min SLA (deadline %s)', pol.sla_minutes, deadline),
            deadline;
    ELSE
        RETURN QUERY SELECT 'pending'::ops.ops_g4_status, NULL::timestamptz,
            format('waiting for a passing health check before %s', deadline), deadline;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION ops.sweep_overdue_g4(p_now timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d      record;
    swept  integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('opsgate.sweep_overdue_g4'));
    FOR d IN
        SELECT dep.deployment_id, dep.release_id, dep.environment, dep.deployed_at, p.sla_minutes, p.overdue_action
        FROM ops.deployments dep
        JOIN ops.gate_policies p ON p.gate_code = 'G4' AND p.environment = dep.environment
        WHERE dep.status IN ('succeeded', 'rolled_back') AND dep.g4_status = 'pending' AND dep.g4_overdue_at IS NULL
          AND dep.deployed_at + make_interval(mins => p.sla_minutes) <= p_now
        ORDER BY dep.deployed_at, dep.deployment_id
        FOR UPDATE OF dep
    LOOP
        -- A flag marks the row whatever the policy, so the next run skips it.
        UPDATE ops.deployments SET g4_overdue_at = p_now WHERE deployment_id = d.deployment_id;
        INSERT INTO ops.environment_events
            (environment, event_type, source_system, release_id, deployment_id, payload, idempotency_key, created_by)
        VALUES (d.environment, 'g4_overdue', 'opsgate', d.release_id, d.deployment_id,
                jsonb_build_object('deployed_at', d.deployed_at, 'sla_minutes', d.sla_minutes,
                                   'action', d.overdue_action, 'swept_at', p_now),
                'opsgate/g4_overdue/' || d.deployment_id, 'opsgate')
        ON CONFLICT (idempotency_key) DO NOTHING;
        PERFORM ops.refresh_release(d.release_id, p_now);
        swept := swept + 1;
    END LOOP;
    RETURN swept;
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

CREATE OR REPLACE FUNCTION ops.mask_url(p_url text) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN host IS NULL THEN p_url
        WHEN host = 'localhost'
          OR host ~ '^(127|10)\.[0-9]+\.[0-9]+\.[0-9]+$'
          OR host ~ '^192\.168\.[0-9]+\.[0-9]+$'
          OR host ~ '^172\.(1[6-9]|2[0-9]|3[01])\.[0-9]+\.[0-9]+$'
          OR host ~ '^169\.254\.[0-9]+\.[0-9]+$'
          OR host ~ '^\[(::1|f[cd][0-9a-f]*:[0-9a-f:]*|fe80:[0-9a-f:]*)\]$'
          OR host !~ '[.:]'
          OR host ~ '\.(internal|local|lan|corp|intranet|svc)$'
        THEN '<masked internal url>'
        ELSE regexp_replace(p_url, '^([a-zA-Z][a-zA-Z0-9+.-]*://)[^@/]*@', '\1***@')
    END
    FROM (SELECT rtrim(lower(substring(p_url FROM '^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/]*@)?(\[[^\]]+\]|[^:/?#]+)')), '.') AS host) h
$$;

CREATE FUNCTION ops.check_deployment_of_gate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    gate_release uuid;
    deployment_release uuid;
BEGIN
    IF NEW.deployment_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT release_id INTO gate_release FROM ops.release_gates WHERE gate_id = NEW.gate_id;
    SELECT release_id INTO deployment_release FROM ops.deployments WHERE deployment_id = NEW.deployment_id;
    IF gate_release IS DISTINCT FROM deployment_release THEN
        RAISE EXCEPTION 'check % names deployment %, which is not a deployment of the release of gate %',
            NEW.check_id, NEW.deployment_id, NEW.gate_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.check_deployment_of_gate() FROM PUBLIC;
CREATE TRIGGER gate_checks_deployment_of_gate
    BEFORE INSERT OR UPDATE OF gate_id, deployment_id ON ops.gate_checks
    FOR EACH ROW EXECUTE FUNCTION ops.check_deployment_of_gate();

CREATE FUNCTION ops.stamp_insert() RETURNS trigger
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
REVOKE EXECUTE ON FUNCTION ops.stamp_insert() FROM PUBLIC;
CREATE TRIGGER exceptions_stamp_insert BEFORE INSERT ON ops.exceptions
    FOR EACH ROW EXECUTE FUNCTION ops.stamp_insert();
CREATE TRIGGER deployments_stamp_insert BEFORE INSERT ON ops.deployments
    FOR EACH ROW EXECUTE FUNCTION ops.stamp_insert();

CREATE FUNCTION ops.guard_deployment_status() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF (OLD.status, NEW.status) IN (('in_progress', 'succeeded'), ('in_progress', 'failed'),
                                    ('succeeded', 'rolled_back')) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'cannot move deployment % from % to %', OLD.deployment_id, OLD.status, NEW.status
        USING ERRCODE = 'check_violation',
              HINT = 'A deployment moves in_progress -> succeeded | failed, and succeeded -> rolled_back.';
END
$$;
REVOKE EXECUTE ON FUNCTION ops.guard_deployment_status() FROM PUBLIC;
CREATE TRIGGER deployments_guard_status BEFORE UPDATE OF status ON ops.deployments
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION ops.guard_deployment_status();

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
