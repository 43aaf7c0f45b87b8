-- NR-7 (constitution): governance-significant writes keep created_at,
-- created_by and their change provenance, so that an audit can reconstruct
-- a release decision from the database alone. Facts (checks, approvals,
-- evidence, events, the ledger) are only ever inserted, but some rows change
-- in place: derived gate and release status, a deployment's status and G4,
-- an exception's review and expiry, an incident's resolution, a drill's
-- outcome, an artifact's hash, a gate policy. Every such change is recorded
-- in ops.change_log: which row, which columns from what to what (a gate's
-- explanation with its status: why it changed), when, by whom and in which
-- transaction. Nobody may change or delete an entry, and only the trigger
-- below writes them.

CREATE TABLE ops.change_log (
    change_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name     text NOT NULL,
    -- The row's key: its id, or gate/environment for a policy.
    row_key        text NOT NULL,
    release_id     uuid,
    -- {"column": {"from": old, "to": new}, ...}: the changed columns only.
    changes        jsonb NOT NULL CHECK (jsonb_typeof(changes) = 'object'),
    changed_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The writer: the role set with SET ROLE (e.g. release_manager,
    -- opsgate_worker), else the login; and the login itself, which tells
    -- apart people who act through one role.
    changed_by     text NOT NULL CHECK (btrim(changed_by) <> ''),
    login          text NOT NULL DEFAULT session_user,
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id()
);
-- A row's history: by release for the rows of a release (most, and the
-- busiest), by key for the rest (policies, drills). Each entry goes into
-- one of them besides the primary key.
CREATE INDEX change_log_release_idx ON ops.change_log (release_id, change_id) WHERE release_id IS NOT NULL;
CREATE INDEX change_log_row_idx ON ops.change_log (table_name, row_key, change_id) WHERE release_id IS NULL;

-- Who is writing, seen from inside a SECURITY DEFINER function (where
-- current_user is the owner): the role set with SET ROLE, else the login;
-- behind PostgREST (Supabase), the JWT's subject, as ops.acting_identity.
-- Without a SET clause, so that it is inlined into its callers, the
-- trigger functions below, which fix the search_path.
CREATE FUNCTION ops.writer_identity() RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(
        CASE WHEN session_user = 'authenticator' THEN
            nullif(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub', '')
        END,
        nullif(current_setting('role'), 'none'),
        session_user::text
    )
$$;
REVOKE EXECUTE ON FUNCTION ops.writer_identity() FROM PUBLIC;

-- AFTER UPDATE of a governance table. TG_ARGV[0] names the key column;
-- further arguments name columns left out of the record.
CREATE FUNCTION ops.record_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    old_row jsonb := to_jsonb(OLD);
    new_row jsonb := to_jsonb(NEW);
    diff    jsonb;
BEGIN
    SELECT jsonb_object_agg(n.key, jsonb_build_object('from', old_row -> n.key, 'to', n.value))
    INTO diff
    FROM jsonb_each(new_row) n
    WHERE n.value IS DISTINCT FROM old_row -> n.key
      AND n.key <> ALL (TG_ARGV[1:TG_NARGS - 1]);
    IF diff IS NOT NULL THEN
        INSERT INTO ops.change_log (table_name, row_key, release_id, changes, changed_by)
        VALUES (TG_TABLE_NAME,
                CASE WHEN TG_ARGV[0] = 'gate_code/environment'
                     THEN (new_row ->> 'gate_code') || '/' || (new_row ->> 'environment')
                     ELSE new_row ->> TG_ARGV[0] END,
                (new_row ->> 'release_id')::uuid,
                diff,
                ops.writer_identity());
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.record_change() FROM PUBLIC;

-- `{"column": {"from": old, "to": new}}`, or '{}' when they are the same.
CREATE FUNCTION ops.change_of(p_column text, p_old anyelement, p_new anyelement) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_old IS DISTINCT FROM p_new
                THEN jsonb_build_object(p_column, jsonb_build_object('from', p_old, 'to', p_new))
                ELSE '{}'::jsonb END
$$;
REVOKE EXECUTE ON FUNCTION ops.change_of(text, anyelement, anyelement) FROM PUBLIC;

-- Releases, gates and deployments change with the facts the derivation
-- sees, so their records are built column by column, which costs a
-- fraction of comparing whole rows as jsonb (ops.record_change). A gate's
-- record carries the explanation it now has: why its status, exception or
-- resolver changed.
CREATE FUNCTION ops.record_hot_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    diff    jsonb;
    row_key text;
    release uuid;
BEGIN
    IF TG_TABLE_NAME = 'release_gates' THEN
        diff := ops.change_of('status', OLD.status, NEW.status)
             || ops.change_of('exception_id', OLD.exception_id, NEW.exception_id)
             || ops.change_of('resolved_by', OLD.resolved_by, NEW.resolved_by)
             || ops.change_of('entered_at', OLD.entered_at, NEW.entered_at)
             || ops.change_of('resolved_at', OLD.resolved_at, NEW.resolved_at)
             || ops.change_of('release_id', OLD.release_id, NEW.release_id)
             || ops.change_of('gate_code', OLD.gate_code, NEW.gate_code)
             || ops.change_of('created_at', OLD.created_at, NEW.created_at)
             || ops.change_of('created_by', OLD.created_by, NEW.created_by)
             || jsonb_build_object('explanation', jsonb_build_object('to', NEW.explanation));
        row_key := NEW.gate_id::text;
        release := NEW.release_id;
    ELSIF TG_TABLE_NAME = 'releases' THEN
        diff := ops.change_of('status', OLD.status, NEW.status)
             || ops.change_of('status_changed_at', OLD.status_changed_at, NEW.status_changed_at)
             || ops.change_of('project', OLD.project, NEW.project)
             || ops.change_of('release_name', OLD.release_name, NEW.release_name)
             || ops.change_of('environment_target', OLD.environment_target, NEW.environment_target)
             || ops.change_of('source_ref', OLD.source_ref, NEW.source_ref)
             || ops.change_of('scope_metadata', OLD.scope_metadata, NEW.scope_metadata)
             || ops.change_of('initiating_actor', OLD.initiating_actor, NEW.initiating_actor)
             || ops.change_of('created_at', OLD.created_at, NEW.created_at)
             || ops.change_of('created_by', OLD.created_by, NEW.created_by);
        row_key := NEW.release_id::text;
        release := NEW.release_id;
    ELSE -- deployments
        diff := ops.change_of('status', OLD.status, NEW.status)
             || ops.change_of('g4_status', OLD.g4_status, NEW.g4_status)
             || ops.change_of('g4_resolved_at', OLD.g4_resolved_at, NEW.g4_resolved_at)
             || ops.change_of('g4_overdue_at', OLD.g4_overdue_at, NEW.g4_overdue_at)
             || ops.change_of('metadata', OLD.metadata, NEW.metadata)
             || ops.change_of('release_id', OLD.release_id, NEW.release_id)
             || ops.change_of('environment', OLD.environment, NEW.environment)
             || ops.change_of('deployed_at', OLD.deployed_at, NEW.deployed_at)
             || ops.change_of('deployed_by', OLD.deployed_by, NEW.deployed_by)
             || ops.change_of('source_ref', OLD.source_ref, NEW.source_ref)
             || ops.change_of('rollback_of', OLD.rollback_of, NEW.rollback_of)
             || ops.change_of('created_at', OLD.created_at, NEW.created_at)
             || ops.change_of('created_by', OLD.created_by, NEW.created_by);
        row_key := NEW.deployment_id::text;
        release := NEW.release_id;
    END IF;
    IF diff <> '{}'::jsonb THEN
        INSERT INTO ops.change_log (table_name, row_key, release_id, changes, changed_by)
        VALUES (TG_TABLE_NAME, row_key, release, diff, ops.writer_identity());
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.record_hot_change() FROM PUBLIC;

CREATE TRIGGER releases_change_log AFTER UPDATE ON ops.releases
    FOR EACH ROW EXECUTE FUNCTION ops.record_hot_change();
-- A gate's explanation changes with every fact; it is recorded with a change
-- of any other column (status, exception, resolver above all), which it
-- explains.
CREATE TRIGGER release_gates_change_log AFTER UPDATE ON ops.release_gates
    FOR EACH ROW WHEN ((OLD.status, OLD.exception_id, OLD.resolved_by, OLD.entered_at, OLD.resolved_at,
                        OLD.release_id, OLD.gate_code, OLD.created_at, OLD.created_by)
                       IS DISTINCT FROM (NEW.status, NEW.exception_id, NEW.resolved_by, NEW.entered_at,
                                         NEW.resolved_at, NEW.release_id, NEW.gate_code, NEW.created_at,
                                         NEW.created_by))
    EXECUTE FUNCTION ops.record_hot_change();
CREATE TRIGGER deployments_change_log AFTER UPDATE ON ops.deployments
    FOR EACH ROW EXECUTE FUNCTION ops.record_hot_change();
CREATE TRIGGER exceptions_change_log AFTER UPDATE ON ops.exceptions
    FOR EACH ROW EXECUTE FUNCTION ops.record_change('exception_id');
CREATE TRIGGER incidents_change_log AFTER UPDATE ON ops.incidents
    FOR EACH ROW EXECUTE FUNCTION ops.record_change('incident_id');
CREATE TRIGGER recovery_drills_change_log AFTER UPDATE ON ops.recovery_drills
    FOR EACH ROW EXECUTE FUNCTION ops.record_change('drill_id');
CREATE TRIGGER evidence_artifacts_change_log AFTER UPDATE ON ops.evidence_artifacts
    FOR EACH ROW EXECUTE FUNCTION ops.record_change('artifact_id');
CREATE TRIGGER gate_policies_change_log AFTER UPDATE ON ops.gate_policies
    FOR EACH ROW EXECUTE FUNCTION ops.record_change('gate_code/environment');

-- Append-only for every role, the owner included: no UPDATE, DELETE or
-- TRUNCATE, and an entry is written only from the triggers above (nested in
-- the UPDATE they record), with its time, transaction and login set here.
CREATE TRIGGER change_log_append_only BEFORE UPDATE OR DELETE ON ops.change_log
    FOR EACH ROW EXECUTE FUNCTION ops.reject_modification();
CREATE TRIGGER change_log_no_truncate BEFORE TRUNCATE ON ops.change_log
    FOR EACH STATEMENT EXECUTE FUNCTION ops.reject_modification();

CREATE FUNCTION ops.guard_change_log_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'ops.change_log is written only by the triggers that record changes'
            USING ERRCODE = 'restrict_violation';
    END IF;
    NEW.changed_at := clock_timestamp();
    NEW.transaction_id := pg_current_xact_id();
    NEW.login := session_user;
    RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.guard_change_log_insert() FROM PUBLIC;
CREATE TRIGGER change_log_written_by_triggers BEFORE INSERT ON ops.change_log
    FOR EACH ROW EXECUTE FUNCTION ops.guard_change_log_insert();

-- Read by those who read everything; written by the trigger alone.
ALTER TABLE ops.change_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE ops.change_log FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    EXECUTE format('CREATE POLICY owner_all ON ops.change_log TO %I USING (true) WITH CHECK (true)', current_user);
END
$$;
CREATE POLICY read_all ON ops.change_log FOR SELECT TO release_manager, audit_reader USING (true);
REVOKE ALL ON ops.change_log FROM PUBLIC;
GRANT SELECT ON ops.change_log TO release_manager, audit_reader;
