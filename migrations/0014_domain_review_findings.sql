-- 1. A rollback undoes a deployment that went live: the deployment it names
-- must have succeeded (it is succeeded, or rolled_back, which only a
-- succeeded deployment becomes). A rollback is exempt from the production
-- guard and turns its release rolled_back; pointing at a failed or
-- unfinished deployment would let any deployment call itself a rollback.

CREATE FUNCTION ops.guard_rollback_target() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_status ops.ops_deployment_status;
BEGIN
    SELECT d.status INTO target_status FROM ops.deployments d WHERE d.deployment_id = NEW.rollback_of;
    -- A missing target is the foreign key's to report.
    IF FOUND AND target_status NOT IN ('succeeded', 'rolled_back') THEN
        RAISE EXCEPTION 'rollback_of % is %: only a deployment that succeeded can be rolled back',
            NEW.rollback_of, target_status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.guard_rollback_target() FROM PUBLIC;
CREATE TRIGGER deployments_rollback_of_succeeded BEFORE INSERT OR UPDATE OF rollback_of ON ops.deployments
    FOR EACH ROW WHEN (NEW.rollback_of IS NOT NULL)
    EXECUTE FUNCTION ops.guard_rollback_target();

-- 2. G4 counts only health checks observed from the deployment on: one
--    observed before deployed_at describes what ran before, and confirmed
--    the deployment as soon as it succeeded. And it needs every health
--    check green, as the PRD says: the latest result of each check name
--    counts, where the single latest result of any check used to decide (a
--    failing error-rate check was passed over by a passing probe a minute
--    later).
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

    -- "Health checks green" (PRD): the latest result of each health check
    -- observed within the SLA, from deployed_at to the deadline, counts; a
    -- failing one fails G4, and G4 passes when all of them are green. A
    -- latest `skipped` neither counts nor blocks, as for G1-G3. On a tie a
    -- fail wins, so the outcome does not depend on arrival order. A check
    -- observed before the deployment cannot confirm it. (ops.evaluate_gate
    -- finds the deciding check's source with the same choice.)
    SELECT count(*) FILTER (WHERE l.status <> 'skipped') AS checks,
           count(*) FILTER (WHERE l.status = 'fail') AS failing,
           max(l.observed_at) FILTER (WHERE l.status <> 'skipped') AS last_at,
           max(l.observed_at) FILTER (WHERE l.status = 'fail') AS failed_at,
           (array_agg(l.check_name ORDER BY l.observed_at DESC, l.check_name)
                FILTER (WHERE l.status = 'fail'))[1] AS failed_name,
           string_agg(l.check_name, ', ' ORDER BY l.check_name) FILTER (WHERE l.status <> 'skipped') AS names
    INTO latest
    FROM (
        SELECT DISTINCT ON (c.check_name) c.check_name, c.status, c.observed_at
        FROM ops.gate_checks c
        JOIN ops.release_gates g ON g.gate_id = c.gate_id AND g.gate_code = 'G4' AND g.release_id = d.release_id
        WHERE c.deployment_id = d.deployment_id
          AND c.observed_at >= d.deployed_at
          AND c.observed_at <= deadline
        ORDER BY c.check_name, c.observed_at DESC, (c.status = 'fail') DESC
    ) l;

    IF latest.failing > 0 THEN
        RETURN QUERY SELECT 'failed'::ops.ops_g4_status, latest.failed_at,
            format('health check %s failed at %s', latest.failed_name, latest.failed_at), deadline;
    ELSIF latest.checks > 0 THEN
        RETURN QUERY SELECT 'passed'::ops.ops_g4_status, latest.last_at,
            format('health checks green (%s), the last at %s, within the %s min SLA', latest.names,
                   latest.last_at, pol.sla_minutes), deadline;
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

-- 3. An exception's post-review (an approval of scope 'exception') checks
--    the grant: neither the exception's approver nor the release's
--    initiator may give it (separation of duties), whoever writes it.
CREATE FUNCTION ops.guard_exception_reviewer() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    granted_by text;
    initiator  text;
BEGIN
    SELECT e.approver_id, r.initiating_actor INTO granted_by, initiator
    FROM ops.exceptions e JOIN ops.releases r ON r.release_id = e.release_id
    WHERE e.exception_id = NEW.exception_id;
    IF NEW.approver_id = granted_by THEN
        RAISE EXCEPTION 'exception % cannot be reviewed by %, who approved it (separation of duties)',
            NEW.exception_id, NEW.approver_id
            USING ERRCODE = 'check_violation';
    ELSIF NEW.approver_id = initiator THEN
        RAISE EXCEPTION 'exception % cannot be reviewed by %, who initiated the release (separation of duties)',
            NEW.exception_id, NEW.approver_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.guard_exception_reviewer() FROM PUBLIC;
CREATE TRIGGER approvals_exception_reviewer BEFORE INSERT OR UPDATE OF approver_id, exception_id, scope ON ops.approvals
    FOR EACH ROW WHEN (NEW.scope = 'exception')
    EXECUTE FUNCTION ops.guard_exception_reviewer();

-- 4. G4 is resolved by the health check that decided it (its source_system,
--    e.g. monitoring), or, when the SLA ran out, by opsgate; it used to name
--    the deployer. ops.evaluate_gate as in 0002, but for that.
CREATE OR REPLACE FUNCTION ops.evaluate_gate(p_gate_id uuid, p_now timestamptz DEFAULT now(),
                                  p_stored_requirements boolean DEFAULT false)
RETURNS TABLE (status ops.ops_gate_status, own_status ops.ops_gate_status, exception_id uuid,
               resolved_by text, explanation jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
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
            -- Resolved by the health check that decided it (its source, e.g.
            -- monitoring), or by the SLA running out: opsgate's verdict.
            -- The same choice as ops.derive_g4: each check's latest result
            -- within the SLA; the failing one, or the last to turn green.
            IF g4.g4_status IN ('passed', 'failed') THEN
                SELECT l.source_system INTO actor
                FROM (
                    SELECT DISTINCT ON (c.check_name) c.check_name, c.status, c.observed_at, c.source_system
                    FROM ops.gate_checks c
                    WHERE c.gate_id = p_gate_id AND c.deployment_id = d.deployment_id
                      AND c.observed_at >= d.deployed_at AND c.observed_at <= g4.deadline
                    ORDER BY c.check_name, c.observed_at DESC, (c.status = 'fail') DESC
                ) l
                WHERE l.observed_at = g4.g4_resolved_at
                  AND CASE WHEN g4.g4_status = 'failed' THEN l.status = 'fail'
                           ELSE l.status IN ('pass', 'warning') END
                ORDER BY l.check_name
                LIMIT 1;
                actor := coalesce(actor, 'opsgate');
            END IF;
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

-- 5. Eligibility for an environment beyond the release's target is refused:
--    its gates were judged by its target's policies. The worker flagged such
--    a production deployment, but CI's check (release eligible, the view)
--    said eligible. ops.promotion_blockers as in 0011, but for that.
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

    -- A release's gates are judged by the policies of its own target: they
    -- say nothing about an environment beyond it.
    IF array_position(ARRAY['dev', 'staging', 'production'], p_target_env)
       > array_position(ARRAY['dev', 'staging', 'production'], r.environment_target::text) THEN
        RETURN NEXT format('the release targets %s: its gates were not judged for %s',
                           r.environment_target, p_target_env);
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

-- 6. Stored G4 state was derived by the rules before this migration: derive
--    it again for every release with a deployment (and the release status
--    with it), as a policy change would.
SELECT ops.refresh_release(r.release_id, now(), ARRAY['G4']::ops.ops_gate_code[])
FROM ops.releases r
WHERE EXISTS (SELECT 1 FROM ops.deployments d WHERE d.release_id = r.release_id);

-- 7. The same rule for whoever sets an exception's post_review_status
--    directly (a release manager may): not the exception's approver, not
--    the release's initiator. It runs as the writer, to know who writes;
--    every role that may update the column may read both rows.
CREATE FUNCTION ops.guard_exception_review_status() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    writer text := ops.acting_identity();
BEGIN
    IF writer = NEW.approver_id
       OR writer = (SELECT r.initiating_actor FROM ops.releases r WHERE r.release_id = NEW.release_id) THEN
        RAISE EXCEPTION 'exception % cannot be reviewed by %, who approved it or initiated the release (separation of duties)',
            NEW.exception_id, writer
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.guard_exception_review_status() FROM PUBLIC;
CREATE TRIGGER exceptions_review_separation_of_duties BEFORE UPDATE OF post_review_status ON ops.exceptions
    FOR EACH ROW WHEN (OLD.post_review_status IS DISTINCT FROM NEW.post_review_status)
    EXECUTE FUNCTION ops.guard_exception_review_status();
