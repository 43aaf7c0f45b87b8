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
--    the deployment as soon as it succeeded.
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

    -- The latest health check observed within the SLA (from deployed_at to
    -- the deadline) decides; on a tie a fail wins, so the outcome does not
    -- depend on arrival order. A check observed before the deployment
    -- cannot confirm it.
    SELECT c.status, c.observed_at, c.check_name INTO latest
    FROM ops.gate_checks c
    JOIN ops.release_gates g ON g.gate_id = c.gate_id AND g.gate_code = 'G4' AND g.release_id = d.release_id
    WHERE c.deployment_id = d.deployment_id
      AND c.status <> 'skipped'
      AND c.observed_at >= d.deployed_at
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
