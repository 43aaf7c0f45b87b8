-- Gate logic: facts in, state derived.
--
-- Checks, approvals, evidence, exceptions, deployments and health checks are
-- facts. release_gates.status, deployments.g4_status and releases.status are
-- derived from them by one evaluation (ops.refresh_release), which triggers
-- re-run whenever a fact arrives, by whatever path. "Latest" always means
-- latest by the time the producer observed it (observed_at / decided_at), so
-- facts arriving in any order converge to the same state.

-- ---------------------------------------------------------------------------
-- Policy as data
-- ---------------------------------------------------------------------------
CREATE TABLE ops.gate_policies (
    gate_code            ops.ops_gate_code NOT NULL,
    -- G1..G3: the release's environment_target; G4: the deployment's environment.
    environment          ops.ops_environment NOT NULL,
    -- Checks whose latest result is pass or warning needed; a latest fail
    -- always fails the gate, a latest skipped neither counts nor blocks.
    min_passing_checks   integer NOT NULL DEFAULT 0 CHECK (min_passing_checks >= 0),
    -- Each role needs an approved decision (its latest decision counts).
    approver_roles       ops.ops_persona_role[] NOT NULL DEFAULT '{}',
    -- At least one artifact of any of these types...
    evidence_any_of      ops.ops_artifact_type[] NOT NULL DEFAULT '{}',
    -- ...and one of each of these.
    evidence_all_of      ops.ops_artifact_type[] NOT NULL DEFAULT '{}',
    -- Gates that must be satisfied (passed, or bypassed by an active exception).
    requires_gates       ops.ops_gate_code[] NOT NULL DEFAULT '{}',
    -- Approvers must be neither the release's initiator nor an approver of a required gate.
    separation_of_duties boolean NOT NULL DEFAULT false,
    -- G4: minutes after deployed_at within which a health check must pass.
    sla_minutes          integer CHECK (sla_minutes > 0),
    -- G4 past its SLA: 'fail' sets g4_status failed, 'flag' only flags it.
    overdue_action       text NOT NULL DEFAULT 'fail' CHECK (overdue_action IN ('fail', 'flag')),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    updated_by           text NOT NULL DEFAULT ops.acting_identity(),
    created_at           timestamptz NOT NULL DEFAULT now(),
    created_by           text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    PRIMARY KEY (gate_code, environment),
    CONSTRAINT gate_policies_g4_has_sla CHECK (gate_code <> 'G4' OR sla_minutes IS NOT NULL),
    CONSTRAINT gate_policies_no_self_requirement CHECK (NOT (gate_code = ANY (requires_gates)))
);

-- The defaults of the specs (config/gate_policies.toml mirrors them; see
-- `opsgate policy apply`).
INSERT INTO ops.gate_policies
    (gate_code, environment, min_passing_checks, approver_roles, evidence_any_of, evidence_all_of,
     requires_gates, separation_of_duties, sla_minutes, overdue_action, created_by, updated_by)
SELECT p.gate_code::ops.ops_gate_code, e.environment::ops.ops_environment, p.min_checks,
       p.roles::ops.ops_persona_role[], p.any_of::ops.ops_artifact_type[], p.all_of::ops.ops_artifact_type[],
       p.requires::ops.ops_gate_code[], p.sod,
       CASE WHEN p.gate_code = 'G4' THEN CASE e.environment WHEN 'production' THEN 30 ELSE 60 END END,
       CASE WHEN p.gate_code = 'G4' AND e.environment <> 'production' THEN 'flag' ELSE 'fail' END,
       'migration', 'migration'
FROM (VALUES
    ('G1', 1, '{}', '{}', '{}', '{}', false),
    ('G2', 0, '{qa_tester}', '{test_result,uat_summary}', '{}', '{}', false),
    ('G3', 0, '{release_manager}', '{}', '{rollback_plan}', '{G1,G2}', true),
    ('G4', 1, '{}', '{}', '{}', '{}', false)
) AS p (gate_code, min_checks, roles, any_of, all_of, requires, sod)
CROSS JOIN (VALUES ('dev'), ('staging'), ('production')) AS e (environment);

-- ---------------------------------------------------------------------------
-- Derived-state columns
-- ---------------------------------------------------------------------------
ALTER TABLE ops.release_gates ADD COLUMN explanation jsonb NOT NULL DEFAULT '{}';
-- Set by the overdue sweep when the policy only flags an overdue G4.
ALTER TABLE ops.deployments ADD COLUMN g4_overdue_at timestamptz;

-- ---------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------
CREATE FUNCTION ops.gate_label(p_code ops.ops_gate_code) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_code::text || ' ' || CASE p_code
        WHEN 'G1' THEN 'Build Integrity'
        WHEN 'G2' THEN 'Validation Readiness'
        WHEN 'G3' THEN 'Promotion Readiness'
        WHEN 'G4' THEN 'Post-Deploy Operational Confirmation'
    END
$$;

-- (Hot helpers are PL/pgSQL rather than SQL functions: PL/pgSQL keeps its
-- query plans for the session, a non-inlined SQL function re-plans per query.)

-- When the release first reached its target (its first succeeded deployment
-- there was recorded), or NULL. A bypass that was valid then stays on record
-- afterwards. The database's own created_at counts, not the producer's
-- deployed_at, so a backdated deployment cannot revive an expired exception.
CREATE FUNCTION ops.release_promoted_at(p_release_id uuid) RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (
        SELECT min(d.created_at)
        FROM ops.deployments d
        JOIN ops.releases r ON r.release_id = d.release_id
        WHERE d.release_id = p_release_id
          AND d.environment = r.environment_target
          AND d.status IN ('succeeded', 'rolled_back')
    );
END
$$;

-- An exception authorizes at p_at when effective_from <= p_at < expires_at
-- and the sweep has not expired it.
CREATE FUNCTION ops.exception_active(e ops.exceptions, p_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT e.expired_at IS NULL AND e.effective_from <= p_at AND p_at < e.expires_at
$$;

-- The exception that bypasses p_gate_code of p_release_id at p_now, if any:
-- active now, or active when the release was promoted.
CREATE FUNCTION ops.bypassing_exception(p_release_id uuid, p_gate_code ops.ops_gate_code, p_now timestamptz)
RETURNS ops.exceptions
LANGUAGE plpgsql STABLE
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
              AND e.effective_from <= promoted
              AND promoted < e.expires_at
              AND (e.expired_at IS NULL OR promoted < e.expired_at))
      )
    ORDER BY e.expires_at DESC, e.exception_id
    LIMIT 1;
    RETURN chosen;
END
$$;

-- ---------------------------------------------------------------------------
-- G4 of one deployment
-- ---------------------------------------------------------------------------
CREATE FUNCTION ops.derive_g4(p_deployment_id uuid, p_now timestamptz DEFAULT now())
RETURNS TABLE (g4_status ops.ops_g4_status, g4_resolved_at timestamptz, detail text, deadline timestamptz)
LANGUAGE plpgsql STABLE
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
    JOIN ops.release_gates g ON g.gate_id = c.gate_id AND g.gate_code = 'G4'
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
    ELSIF p_now >= deadline AND pol.overdue_action = 'fail' AND d.status = 'succeeded' THEN
        RETURN QUERY SELECT 'failed'::ops.ops_g4_status, deadline,
            format('no passing health check within the %s min SLA (deadline %s)', pol.sla_minutes, deadline),
            deadline;
    ELSE
        RETURN QUERY SELECT 'pending'::ops.ops_g4_status, NULL::timestamptz,
            format('waiting for a passing health check before %s', deadline), deadline;
    END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Gate evaluation
-- ---------------------------------------------------------------------------
-- status: the derived status; own_status: what the facts alone give, before
-- any exception; explanation: every requirement, met or not, and why.
-- Required gates are evaluated afresh, or, with p_stored_requirements (the
-- refresh, which derives gates in order), read from their stored status.
CREATE FUNCTION ops.evaluate_gate(p_gate_id uuid, p_now timestamptz DEFAULT now(),
                                  p_stored_requirements boolean DEFAULT false)
RETURNS TABLE (status ops.ops_gate_status, own_status ops.ops_gate_status, exception_id uuid,
               resolved_by text, explanation jsonb)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    g            ops.release_gates;
    r            ops.releases;
    pol          ops.gate_policies;
    reqs         jsonb := '[]';
    any_fact     boolean := false;
    has_failure  boolean := false;
    all_met      boolean := true;
    actor        text;
    rec          record;
    v_role       ops.ops_persona_role;
    art          ops.ops_artifact_type;
    req_code     ops.ops_gate_code;
    req_status   ops.ops_gate_status;
    failing      text[];
    skipped      text[];
    passing      integer;
    conflicted   text[];
    ignored      text[];
    d            record;
    g4           record;
    exc          ops.exceptions;
    check_actor  text;
    found_it     boolean;
BEGIN
    SELECT * INTO g FROM ops.release_gates WHERE gate_id = p_gate_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'gate % does not exist', p_gate_id USING ERRCODE = 'no_data_found';
    END IF;
    SELECT * INTO r FROM ops.releases WHERE release_id = g.release_id;
    SELECT * INTO pol FROM ops.gate_policies WHERE gate_code = g.gate_code AND environment = r.environment_target;
    IF NOT FOUND THEN
        reqs := reqs || jsonb_build_object('requirement', 'policy', 'met', false,
            'detail', format('no policy for %s in %s', g.gate_code, r.environment_target));
        all_met := false;
    END IF;

    IF g.gate_code = 'G4' THEN
        -- The latest deployment of the release to its target decides G4.
        SELECT * INTO d FROM ops.deployments
        WHERE release_id = r.release_id AND environment = r.environment_target
          AND deployments.status IN ('succeeded', 'rolled_back')
        ORDER BY deployed_at DESC, deployment_id
        LIMIT 1;
        IF NOT FOUND THEN
            reqs := reqs || jsonb_build_object('requirement', 'health_check', 'met', false,
                'detail', format('no succeeded %s deployment yet', r.environment_target));
            all_met := false;
        ELSE
            any_fact := true;
            SELECT * INTO g4 FROM ops.derive_g4(d.deployment_id, p_now);
            reqs := reqs || jsonb_build_object('requirement', 'health_check', 'met', g4.g4_status = 'passed',
                'detail', g4.detail, 'deployment_id', d.deployment_id);
            all_met := all_met AND g4.g4_status = 'passed';
            has_failure := g4.g4_status = 'failed';
            actor := d.deployed_by;
        END IF;
    ELSIF pol.gate_code IS NOT NULL THEN
        -- Checks: the latest result per check name (a fail wins a tie).
        SELECT coalesce(array_agg(l.check_name ORDER BY l.check_name) FILTER (WHERE l.status = 'fail'), '{}'),
               coalesce(array_agg(l.check_name ORDER BY l.check_name) FILTER (WHERE l.status = 'skipped'), '{}'),
               count(*) FILTER (WHERE l.status IN ('pass', 'warning')),
               (array_agg(l.source_system ORDER BY l.observed_at DESC, l.check_name))[1]
        INTO failing, skipped, passing, check_actor
        FROM (
            SELECT DISTINCT ON (c.check_name) c.check_name, c.status, c.observed_at, c.source_system
            FROM ops.gate_checks c
            WHERE c.gate_id = g.gate_id
            ORDER BY c.check_name, c.observed_at DESC, (c.status = 'fail') DESC
        ) l;
        IF check_actor IS NOT NULL THEN
            any_fact := true;
            actor := check_actor;
        END IF;
        IF pol.min_passing_checks > 0 OR cardinality(failing) > 0 THEN
            reqs := reqs || jsonb_build_object(
                'requirement', 'checks',
                'met', cardinality(failing) = 0 AND passing >= pol.min_passing_checks,
                'detail', CASE
                    WHEN cardinality(failing) > 0 THEN 'failing checks: ' || array_to_string(failing, ', ')
                    WHEN passing < pol.min_passing_checks THEN
                        format('%s passing check(s), %s required', passing, pol.min_passing_checks)
                    ELSE format('%s check(s) passing', passing)
                END
                || CASE WHEN cardinality(skipped) > 0
                        THEN ' (skipped, not counted: ' || array_to_string(skipped, ', ') || ')' ELSE '' END);
            all_met := all_met AND cardinality(failing) = 0 AND passing >= pol.min_passing_checks;
            has_failure := has_failure OR cardinality(failing) > 0;
        END IF;

        -- Required gates, evaluated now rather than read from stored state.
        FOREACH req_code IN ARRAY pol.requires_gates LOOP
            IF p_stored_requirements THEN
                SELECT rg.status INTO req_status
                FROM ops.release_gates rg
                WHERE rg.release_id = r.release_id AND rg.gate_code = req_code;
            ELSE
                SELECT e.status INTO req_status
                FROM ops.release_gates rg, ops.evaluate_gate(rg.gate_id, p_now) e
                WHERE rg.release_id = r.release_id AND rg.gate_code = req_code;
            END IF;
            reqs := reqs || jsonb_build_object('requirement', 'gate:' || req_code,
                'met', req_status IN ('passed', 'bypassed'),
                'detail', format('%s is %s', ops.gate_label(req_code), coalesce(req_status::text, 'missing')));
            all_met := all_met AND coalesce(req_status IN ('passed', 'bypassed'), false);
        END LOOP;

        -- Approvals: per role, the latest decision counts; with separation of
        -- duties, approvals by the initiator or by a required gate's approver
        -- do not count.
        FOREACH v_role IN ARRAY pol.approver_roles LOOP
            conflicted := ARRAY[]::text[];
            IF pol.separation_of_duties THEN
                SELECT array_agg(DISTINCT a.approver_id) INTO conflicted
                FROM ops.approvals a
                JOIN ops.release_gates rg ON rg.gate_id = a.gate_id
                WHERE a.release_id = r.release_id AND a.decision = 'approved'
                  AND rg.gate_code = ANY (pol.requires_gates);
                conflicted := coalesce(conflicted, ARRAY[]::text[]) || r.initiating_actor;
            END IF;

            SELECT coalesce(array_agg(DISTINCT format('approval by %s ignored: %s (separation of duties)',
                       a.approver_id,
                       CASE WHEN a.approver_id = r.initiating_actor THEN 'they initiated the release'
                            ELSE 'they approved a required gate' END)), '{}')
            INTO ignored
            FROM ops.approvals a
            WHERE a.gate_id = g.gate_id AND a.persona_role = v_role AND a.decision = 'approved'
              AND a.approver_id = ANY (conflicted);

            SELECT a.approver_id, a.decision, a.decided_at INTO rec
            FROM ops.approvals a
            WHERE a.gate_id = g.gate_id AND a.persona_role = v_role
              AND NOT (a.decision = 'approved' AND a.approver_id = ANY (conflicted))
            ORDER BY a.decided_at DESC, (a.decision <> 'approved') DESC, a.approver_id
            LIMIT 1;
            found_it := FOUND;

            IF found_it OR cardinality(ignored) > 0 THEN
                any_fact := true;
            END IF;
            IF found_it AND rec.decision = 'approved' THEN
                reqs := reqs || jsonb_build_object('requirement', 'approval:' || v_role, 'met', true,
                    'detail', format('approved by %s', rec.approver_id));
                actor := rec.approver_id;
            ELSE
                reqs := reqs || jsonb_build_object('requirement', 'approval:' || v_role, 'met', false,
                    'detail', concat_ws('; ',
                        CASE
                            WHEN NOT found_it THEN format('missing approval: %s', v_role)
                            WHEN rec.decision = 'rejected' THEN format('rejected by %s (%s)', rec.approver_id, v_role)
                            ELSE format('changes requested by %s (%s)', rec.approver_id, v_role)
                        END,
                        nullif(array_to_string(ignored, '; '), '')));
                all_met := false;
                IF found_it AND rec.decision = 'rejected' THEN
                    has_failure := true;
                    actor := rec.approver_id;
                END IF;
            END IF;
        END LOOP;

        -- Evidence of the release (release-wide or on this gate).
        IF cardinality(pol.evidence_any_of) > 0 THEN
            PERFORM 1 FROM ops.evidence_artifacts ea
            WHERE ea.release_id = r.release_id AND ea.artifact_type = ANY (pol.evidence_any_of);
            reqs := reqs || jsonb_build_object('requirement', 'evidence:any', 'met', FOUND,
                'detail', CASE WHEN FOUND THEN 'evidence present'
                    ELSE 'missing evidence: one of ' || array_to_string(pol.evidence_any_of, ', ') END);
            all_met := all_met AND FOUND;
        END IF;
        FOREACH art IN ARRAY pol.evidence_all_of LOOP
            PERFORM 1 FROM ops.evidence_artifacts ea
            WHERE ea.release_id = r.release_id AND ea.artifact_type = art;
            reqs := reqs || jsonb_build_object('requirement', 'evidence:' || art, 'met', FOUND,
                'detail', CASE WHEN FOUND THEN format('%s present', art) ELSE format('missing evidence: %s', art) END);
            all_met := all_met AND FOUND;
        END LOOP;
        PERFORM 1 FROM ops.evidence_artifacts ea WHERE ea.gate_id = g.gate_id;
        any_fact := any_fact OR FOUND;
    END IF;

    own_status := CASE
        WHEN has_failure THEN 'failed'
        WHEN all_met AND jsonb_array_length(reqs) > 0 THEN 'passed'
        WHEN any_fact THEN 'in_progress'
        ELSE 'pending'
    END;
    status := own_status;
    resolved_by := CASE WHEN own_status IN ('passed', 'failed') THEN actor END;

    IF own_status <> 'passed' THEN
        exc := ops.bypassing_exception(r.release_id, g.gate_code, p_now);
        IF exc.exception_id IS NOT NULL THEN
            status := 'bypassed';
            exception_id := exc.exception_id;
            resolved_by := exc.approver_id;
        END IF;
    END IF;

    explanation := jsonb_build_object(
        'gate', g.gate_code,
        'gate_name', g.gate_name,
        'status', status,
        'own_status', own_status,
        'requirements', reqs,
        'exception', CASE WHEN exception_id IS NOT NULL THEN jsonb_build_object(
            'exception_id', exc.exception_id, 'approver_id', exc.approver_id,
            'effective_from', exc.effective_from, 'expires_at', exc.expires_at) END
    );
    RETURN NEXT;
END
$$;

-- ---------------------------------------------------------------------------
-- Writing the derived state
-- ---------------------------------------------------------------------------
CREATE FUNCTION ops.derive_release_status(p_release_id uuid) RETURNS ops.ops_release_status
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (
        SELECT CASE
            WHEN EXISTS (
                SELECT 1 FROM ops.deployments d
                WHERE d.release_id = r.release_id AND d.environment = r.environment_target AND d.status = 'rolled_back'
            ) OR EXISTS (
                SELECT 1 FROM ops.deployments d
                JOIN ops.deployments rb ON rb.rollback_of = d.deployment_id
                WHERE d.release_id = r.release_id AND d.environment = r.environment_target AND rb.status = 'succeeded'
            ) THEN 'rolled_back'
            WHEN EXISTS (
                SELECT 1 FROM ops.deployments d
                WHERE d.release_id = r.release_id AND d.environment = r.environment_target AND d.status = 'succeeded'
            ) THEN 'promoted'
            WHEN EXISTS (
                SELECT 1 FROM ops.release_gates g WHERE g.release_id = r.release_id AND g.status = 'failed'
            ) THEN 'failed'
            WHEN EXISTS (
                SELECT 1 FROM ops.release_gates g WHERE g.release_id = r.release_id AND g.status <> 'pending'
            ) OR EXISTS (SELECT 1 FROM ops.deployments d WHERE d.release_id = r.release_id)
            THEN 'in_progress'
            ELSE 'draft'
        END::ops.ops_release_status
        FROM ops.releases r
        WHERE r.release_id = p_release_id
    );
END
$$;

-- Re-derives the gates in p_gates (all when NULL) and the gates that require
-- them, the deployments' G4 when G4 is among them, and the release status.
-- Idempotent: it writes only what changed.
CREATE FUNCTION ops.refresh_release(p_release_id uuid, p_now timestamptz DEFAULT now(),
                                    p_gates ops.ops_gate_code[] DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    dep   record;
    gate  record;
    ev    record;
    new_status ops.ops_release_status;
    target ops.ops_environment;
    gates ops.ops_gate_code[] := coalesce(p_gates, enum_range(NULL::ops.ops_gate_code));
    wider ops.ops_gate_code[];
BEGIN
    -- One refresh per release at a time.
    SELECT environment_target INTO target FROM ops.releases WHERE release_id = p_release_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    -- A gate that requires a changed gate changes with it.
    LOOP
        SELECT array_agg(DISTINCT code ORDER BY code) INTO wider
        FROM (
            SELECT unnest(gates) AS code
            UNION
            SELECT p.gate_code FROM ops.gate_policies p
            WHERE p.environment = target AND p.requires_gates && gates
        ) x;
        EXIT WHEN wider IS NULL OR cardinality(wider) = cardinality(gates);
        gates := wider;
    END LOOP;

    FOR dep IN SELECT deployment_id FROM ops.deployments
               WHERE release_id = p_release_id AND 'G4' = ANY (gates) ORDER BY deployment_id LOOP
        SELECT * INTO ev FROM ops.derive_g4(dep.deployment_id, p_now);
        UPDATE ops.deployments
        SET g4_status = ev.g4_status, g4_resolved_at = ev.g4_resolved_at
        WHERE deployment_id = dep.deployment_id
          AND (g4_status, g4_resolved_at) IS DISTINCT FROM (ev.g4_status, ev.g4_resolved_at);
    END LOOP;

    -- In gate order, so a gate's requirements are derived before it.
    FOR gate IN SELECT gate_id FROM ops.release_gates
                WHERE release_id = p_release_id AND gate_code = ANY (gates) ORDER BY gate_code LOOP
        SELECT * INTO ev FROM ops.evaluate_gate(gate.gate_id, p_now, true);
        UPDATE ops.release_gates g
        SET status = ev.status,
            exception_id = ev.exception_id,
            explanation = ev.explanation,
            resolved_by = CASE WHEN ev.status IN ('passed', 'failed', 'bypassed') THEN ev.resolved_by END,
            entered_at = CASE WHEN ev.status <> 'pending' THEN coalesce(g.entered_at, p_now) END,
            resolved_at = CASE
                WHEN ev.status NOT IN ('passed', 'failed', 'bypassed') THEN NULL
                WHEN g.status = ev.status THEN coalesce(g.resolved_at, p_now)
                ELSE p_now
            END
        WHERE g.gate_id = gate.gate_id
          AND (g.status, g.exception_id, g.explanation, g.resolved_by)
              IS DISTINCT FROM (ev.status, ev.exception_id, ev.explanation,
                                CASE WHEN ev.status IN ('passed', 'failed', 'bypassed') THEN ev.resolved_by END);
    END LOOP;

    new_status := ops.derive_release_status(p_release_id);
    UPDATE ops.releases
    SET status = new_status, status_changed_at = p_now
    WHERE release_id = p_release_id AND status IS DISTINCT FROM new_status;
END
$$;

-- ---------------------------------------------------------------------------
-- Integrity rules 1 and 3 as hard rules: a gate is passed only when its facts
-- say so, and bypassed only under an exception that authorizes it. This holds
-- for every write path, including a direct UPDATE.
-- ---------------------------------------------------------------------------
CREATE FUNCTION ops.guard_gate_status() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    ev   record;
    exc  ops.exceptions;
    unmet text;
BEGIN
    -- Only a change into passed or bypassed needs proof; re-deriving an
    -- explanation of a gate that stays passed does not.
    IF TG_OP = 'UPDATE' AND NEW.status = OLD.status AND NEW.exception_id IS NOT DISTINCT FROM OLD.exception_id THEN
        RETURN NEW;
    END IF;
    IF NEW.status = 'passed' THEN
        IF TG_OP = 'INSERT' THEN
            RAISE EXCEPTION '% cannot be created as passed: gates start pending and pass from their facts',
                ops.gate_label(NEW.gate_code) USING ERRCODE = 'check_violation';
        END IF;
        -- Required gates are read as stored: they passed this same guard.
        SELECT * INTO ev FROM ops.evaluate_gate(NEW.gate_id, now(), true);
        IF ev.own_status <> 'passed' THEN
            SELECT string_agg(req ->> 'detail', '; ') INTO unmet
            FROM jsonb_array_elements(ev.explanation -> 'requirements') req
            WHERE NOT (req ->> 'met')::boolean;
            RAISE EXCEPTION '% of release % cannot be passed: %', ops.gate_label(NEW.gate_code), NEW.release_id,
                coalesce(unmet, 'its requirements are not met')
                USING ERRCODE = 'check_violation',
                      HINT = 'Record the missing approvals and evidence, or grant a time-bounded exception.';
        END IF;
    ELSIF NEW.status = 'bypassed' THEN
        exc := ops.bypassing_exception(NEW.release_id, NEW.gate_code, now());
        IF exc.exception_id IS NULL OR exc.exception_id IS DISTINCT FROM NEW.exception_id THEN
            RAISE EXCEPTION '% of release % cannot be bypassed: no active exception % covers it',
                ops.gate_label(NEW.gate_code), NEW.release_id, coalesce(NEW.exception_id::text, '')
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER release_gates_guard_status
    BEFORE INSERT OR UPDATE OF status, exception_id ON ops.release_gates
    FOR EACH ROW EXECUTE FUNCTION ops.guard_gate_status();

-- ---------------------------------------------------------------------------
-- Facts trigger the evaluation
-- ---------------------------------------------------------------------------
-- A release starts with its four pending gates.
CREATE FUNCTION ops.create_release_gates() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO ops.release_gates (release_id, gate_code, created_by)
    SELECT NEW.release_id, code, NEW.created_by
    FROM unnest(enum_range(NULL::ops.ops_gate_code)) AS code
    ON CONFLICT (release_id, gate_code) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER releases_create_gates
    AFTER INSERT ON ops.releases
    FOR EACH ROW EXECUTE FUNCTION ops.create_release_gates();

-- Evidence names its release, even when linked only to a gate, check or
-- deployment, and every link points into that same release.
CREATE FUNCTION ops.link_evidence_release() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    linked uuid[];
BEGIN
    SELECT array_agg(DISTINCT x) FILTER (WHERE x IS NOT NULL) INTO linked
    FROM unnest(ARRAY[
        NEW.release_id,
        (SELECT release_id FROM ops.release_gates WHERE gate_id = NEW.gate_id),
        (SELECT rg.release_id FROM ops.gate_checks c JOIN ops.release_gates rg USING (gate_id) WHERE c.check_id = NEW.check_id),
        (SELECT release_id FROM ops.deployments WHERE deployment_id = NEW.deployment_id),
        (SELECT release_id FROM ops.approvals WHERE approval_id = NEW.approval_id),
        (SELECT release_id FROM ops.exceptions WHERE exception_id = NEW.exception_id)
    ]) AS x;
    IF cardinality(linked) > 1 THEN
        RAISE EXCEPTION 'evidence % links records of different releases: %', NEW.artifact_id, linked
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.release_id := linked[1];
    RETURN NEW;
END
$$;

CREATE TRIGGER evidence_artifacts_link_release
    BEFORE INSERT OR UPDATE ON ops.evidence_artifacts
    FOR EACH ROW EXECUTE FUNCTION ops.link_evidence_release();

-- Which gates a fact can change: its own gate (checks, approvals), the gates
-- an exception impacts, for evidence the gates whose policy asks for evidence
-- and the gate it is attached to, G4 for deployments; refresh_release adds
-- the gates that require them.
CREATE FUNCTION ops.refresh_on_fact() RETURNS trigger
LANGUAGE plpgsql
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
    PERFORM ops.refresh_release(id, now(), coalesce(gates, '{}'))
    FROM (SELECT DISTINCT id FROM unnest(affected) AS id WHERE id IS NOT NULL) ids;
    RETURN NULL;
END
$$;

CREATE TRIGGER gate_checks_refresh AFTER INSERT OR UPDATE OR DELETE ON ops.gate_checks
    FOR EACH ROW EXECUTE FUNCTION ops.refresh_on_fact();
CREATE TRIGGER approvals_refresh AFTER INSERT OR UPDATE OR DELETE ON ops.approvals
    FOR EACH ROW EXECUTE FUNCTION ops.refresh_on_fact();
CREATE TRIGGER evidence_artifacts_refresh AFTER INSERT OR UPDATE OR DELETE ON ops.evidence_artifacts
    FOR EACH ROW EXECUTE FUNCTION ops.refresh_on_fact();
CREATE TRIGGER exceptions_refresh AFTER INSERT OR UPDATE OR DELETE ON ops.exceptions
    FOR EACH ROW EXECUTE FUNCTION ops.refresh_on_fact();
-- Only the reported columns; refresh itself writes g4_status.
CREATE TRIGGER deployments_refresh
    AFTER INSERT OR DELETE OR UPDATE OF release_id, environment, deployed_at, source_ref, status, rollback_of
    ON ops.deployments
    FOR EACH ROW EXECUTE FUNCTION ops.refresh_on_fact();

-- A new policy re-derives every release it may affect.
CREATE FUNCTION ops.refresh_on_policy() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM ops.refresh_release(r.release_id) FROM ops.releases r WHERE r.status NOT IN ('promoted', 'rolled_back');
    RETURN NULL;
END
$$;

CREATE TRIGGER gate_policies_refresh AFTER INSERT OR UPDATE OR DELETE ON ops.gate_policies
    FOR EACH STATEMENT EXECUTE FUNCTION ops.refresh_on_policy();

-- ---------------------------------------------------------------------------
-- Promotion eligibility
-- ---------------------------------------------------------------------------
CREATE FUNCTION ops.promotion_blockers(p_release_id uuid, p_target_env text, p_now timestamptz DEFAULT now())
RETURNS SETOF text
LANGUAGE plpgsql STABLE
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

CREATE FUNCTION ops.is_eligible_for_promotion(p_release_id uuid, p_target_env text, p_now timestamptz DEFAULT now())
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT NOT EXISTS (SELECT 1 FROM ops.promotion_blockers(p_release_id, p_target_env, p_now))
$$;

-- ---------------------------------------------------------------------------
-- Sweeps. Each takes `now` so tests control the clock, serializes on an
-- advisory lock so concurrent sweepers never double-act, and does nothing the
-- second time.
-- ---------------------------------------------------------------------------
CREATE FUNCTION ops.sweep_expired_exceptions(p_now timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    e      record;
    swept  integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('opsgate.sweep_expired_exceptions'));
    FOR e IN
        SELECT x.exception_id, x.release_id, x.impacted_gates, x.expires_at, r.environment_target
        FROM ops.exceptions x JOIN ops.releases r USING (release_id)
        WHERE x.expired_at IS NULL AND x.expires_at <= p_now
        ORDER BY x.expires_at, x.exception_id
        FOR UPDATE OF x
    LOOP
        UPDATE ops.exceptions SET expired_at = p_now WHERE exception_id = e.exception_id;
        INSERT INTO ops.environment_events
            (environment, event_type, source_system, release_id, payload, idempotency_key, created_by)
        VALUES (e.environment_target, 'exception_expired', 'opsgate', e.release_id,
                jsonb_build_object('exception_id', e.exception_id, 'impacted_gates', e.impacted_gates,
                                   'expires_at', e.expires_at, 'swept_at', p_now),
                'opsgate/exception_expired/' || e.exception_id, 'opsgate')
        ON CONFLICT (idempotency_key) DO NOTHING;
        PERFORM ops.refresh_release(e.release_id, p_now);
        swept := swept + 1;
    END LOOP;

    -- Exceptions whose window has opened since they were recorded bypass now.
    PERFORM ops.refresh_release(x.release_id, p_now)
    FROM (
        SELECT DISTINCT x.release_id
        FROM ops.exceptions x
        JOIN ops.release_gates g ON g.release_id = x.release_id AND g.gate_code = ANY (x.impacted_gates)
        WHERE ops.exception_active(x, p_now) AND g.status NOT IN ('passed', 'bypassed')
    ) x;
    RETURN swept;
END
$$;

CREATE FUNCTION ops.sweep_overdue_g4(p_now timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql
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
        WHERE dep.status = 'succeeded' AND dep.g4_status = 'pending' AND dep.g4_overdue_at IS NULL
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

CREATE FUNCTION ops.run_sweeps(p_now timestamptz DEFAULT now()) RETURNS jsonb
LANGUAGE sql
AS $$
    SELECT jsonb_build_object(
        'expired_exceptions', ops.sweep_expired_exceptions(p_now),
        'overdue_g4', ops.sweep_overdue_g4(p_now))
$$;

-- ---------------------------------------------------------------------------
-- Reporting views (T6)
-- ---------------------------------------------------------------------------
CREATE VIEW ops.v_release_gate_summary AS
SELECT r.release_id, r.project, r.release_name, r.environment_target, r.status AS release_status,
       g.gate_id, g.gate_code, g.gate_name, g.status AS gate_status, g.exception_id,
       coalesce(c.checks_total, 0) AS checks_total,
       coalesce(c.checks_passed, 0) AS checks_passed,
       coalesce(c.checks_failed, 0) AS checks_failed,
       coalesce(c.checks_skipped, 0) AS checks_skipped,
       (SELECT count(*) FROM ops.approvals a WHERE a.gate_id = g.gate_id) AS approvals,
       (SELECT count(*) FROM ops.evidence_artifacts ea WHERE ea.gate_id = g.gate_id) AS evidence,
       g.entered_at, g.resolved_at, g.resolved_by, g.explanation
FROM ops.releases r
JOIN ops.release_gates g ON g.release_id = r.release_id
LEFT JOIN LATERAL (
    SELECT count(*) AS checks_total,
           count(*) FILTER (WHERE l.status IN ('pass', 'warning')) AS checks_passed,
           count(*) FILTER (WHERE l.status = 'fail') AS checks_failed,
           count(*) FILTER (WHERE l.status = 'skipped') AS checks_skipped
    FROM (
        SELECT DISTINCT ON (check_name, deployment_id) status
        FROM ops.gate_checks WHERE gate_id = g.gate_id
        ORDER BY check_name, deployment_id, observed_at DESC, (status = 'fail') DESC
    ) l
) c ON true;

CREATE VIEW ops.v_promotion_eligibility AS
SELECT r.release_id, r.project, r.release_name, r.source_ref, r.status AS release_status, env.target_env,
       NOT EXISTS (SELECT 1 FROM ops.promotion_blockers(r.release_id, env.target_env)) AS eligible,
       ARRAY(SELECT b FROM ops.promotion_blockers(r.release_id, env.target_env) b) AS blockers
FROM ops.releases r
CROSS JOIN (VALUES ('staging'), ('production')) AS env (target_env);

CREATE VIEW ops.v_evidence_completeness AS
SELECT r.release_id, r.project, r.release_name, g.gate_code,
       p.evidence_any_of, p.evidence_all_of,
       ARRAY(SELECT DISTINCT ea.artifact_type FROM ops.evidence_artifacts ea
             WHERE ea.release_id = r.release_id ORDER BY 1) AS present_types,
       (SELECT count(*) FROM ops.evidence_artifacts ea WHERE ea.gate_id = g.gate_id) AS gate_artifacts,
       ARRAY(SELECT t::text FROM unnest(p.evidence_all_of) t
             WHERE NOT EXISTS (SELECT 1 FROM ops.evidence_artifacts ea
                               WHERE ea.release_id = r.release_id AND ea.artifact_type = t)
             ORDER BY 1)
       || CASE WHEN cardinality(p.evidence_any_of) > 0 AND NOT EXISTS (
                   SELECT 1 FROM ops.evidence_artifacts ea
                   WHERE ea.release_id = r.release_id AND ea.artifact_type = ANY (p.evidence_any_of))
               THEN ARRAY['one of ' || array_to_string(p.evidence_any_of, '|')]
               ELSE ARRAY[]::text[] END AS missing,
       (NOT EXISTS (SELECT 1 FROM unnest(p.evidence_all_of) t
                    WHERE NOT EXISTS (SELECT 1 FROM ops.evidence_artifacts ea
                                      WHERE ea.release_id = r.release_id AND ea.artifact_type = t))
        AND (cardinality(p.evidence_any_of) = 0 OR EXISTS (
                 SELECT 1 FROM ops.evidence_artifacts ea
                 WHERE ea.release_id = r.release_id AND ea.artifact_type = ANY (p.evidence_any_of)))) AS complete
FROM ops.releases r
JOIN ops.release_gates g ON g.release_id = r.release_id
LEFT JOIN ops.gate_policies p ON p.gate_code = g.gate_code AND p.environment = r.environment_target;

CREATE VIEW ops.v_exception_status AS
SELECT x.exception_id, x.release_id, r.project, r.release_name, x.exception_type, x.impacted_gates,
       x.approver_id, x.effective_from, x.expires_at, x.expired_at, x.post_review_status,
       CASE
           WHEN x.expired_at IS NOT NULL OR x.expires_at <= now() THEN 'expired'
           WHEN x.effective_from > now() THEN 'scheduled'
           ELSE 'active'
       END AS state,
       x.post_review_status = 'pending' AS pending_review,
       CASE WHEN x.expired_at IS NULL AND x.expires_at > now() THEN x.expires_at - now() END AS time_to_expiry
FROM ops.exceptions x
JOIN ops.releases r USING (release_id);

CREATE VIEW ops.v_deployment_history AS
SELECT d.deployment_id, d.release_id, r.project, r.release_name, d.environment, d.source_ref,
       d.deployed_at, d.deployed_by, d.status, d.rollback_of,
       (SELECT rb.deployment_id FROM ops.deployments rb
        WHERE rb.rollback_of = d.deployment_id AND rb.status = 'succeeded'
        ORDER BY rb.deployed_at DESC LIMIT 1) AS rolled_back_by,
       d.rollback_of IS NOT NULL AS is_rollback,
       d.g4_status, d.g4_resolved_at, d.g4_overdue_at,
       d.deployed_at + make_interval(mins => p.sla_minutes) AS g4_deadline
FROM ops.deployments d
JOIN ops.releases r ON r.release_id = d.release_id
LEFT JOIN ops.gate_policies p ON p.gate_code = 'G4' AND p.environment = d.environment;

-- DORA metrics per environment: deployment frequency (last 30 days), lead
-- time from release creation to its first succeeded deployment there, change
-- failure rate (deployments followed by an incident or a succeeded rollback)
-- and time to restore (incident detection to resolution, per the incident's
-- environment).
CREATE VIEW ops.v_dora_metrics AS
WITH deps AS (
    SELECT d.*, r.created_at AS release_created_at,
           EXISTS (SELECT 1 FROM ops.incidents i WHERE i.deployment_id = d.deployment_id)
           OR d.status = 'rolled_back'
           OR EXISTS (SELECT 1 FROM ops.deployments rb
                      WHERE rb.rollback_of = d.deployment_id AND rb.status = 'succeeded') AS caused_failure
    FROM ops.deployments d
    JOIN ops.releases r ON r.release_id = d.release_id
    WHERE d.status IN ('succeeded', 'rolled_back') AND d.rollback_of IS NULL
),
first_deploys AS (
    SELECT DISTINCT ON (environment, release_id) environment, deployed_at - release_created_at AS lead_time
    FROM deps ORDER BY environment, release_id, deployed_at
),
restores AS (
    SELECT i.environment, i.resolved_at - i.detected_at AS time_to_restore
    FROM ops.incidents i
    WHERE i.resolved_at IS NOT NULL
)
SELECT e.environment,
       (SELECT count(*) FROM deps WHERE deps.environment = e.environment) AS deployments_total,
       (SELECT count(*) FROM deps WHERE deps.environment = e.environment
                                    AND deps.deployed_at > now() - interval '30 days') AS deployments_last_30d,
       round((SELECT count(*) FROM deps WHERE deps.environment = e.environment
                                          AND deps.deployed_at > now() - interval '30 days') / 30.0, 3)
           AS deployments_per_day_30d,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lead_time)
        FROM first_deploys f WHERE f.environment = e.environment) AS lead_time_median,
       (SELECT round(count(*) FILTER (WHERE caused_failure)::numeric / nullif(count(*), 0), 3)
        FROM deps WHERE deps.environment = e.environment) AS change_failure_rate,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY time_to_restore)
        FROM restores WHERE restores.environment = e.environment) AS time_to_restore_median
FROM (VALUES ('staging'::ops.ops_environment), ('production'::ops.ops_environment)) AS e (environment);
