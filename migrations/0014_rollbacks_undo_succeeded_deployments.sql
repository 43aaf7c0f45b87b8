-- A rollback undoes a deployment that went live: the deployment it names
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
