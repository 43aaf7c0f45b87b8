-- Access control (PRD "RLS Access Boundaries", constitution "Security &
-- Access Principles", task T5).
--
-- * Group roles for the personas and a login-less opsgate_worker role for the
--   ingest path; people and services log in with their own roles and are
--   granted membership (GRANT qa_tester TO alice).
-- * Table and column privileges give each role exactly the PRD's table;
--   row-level security (enabled and forced on every ops table) narrows "own"
--   rows: created_by = ops.acting_identity(), which is the JWT subject on
--   Supabase-style connections and the database user otherwise.
-- * The derivation (triggers, evaluation, sweeps) runs as SECURITY DEFINER
--   functions owned by the migration role, so a fact written by a narrow role
--   still re-derives state it may not write itself.
-- * Sensitive fields: evidence artifact_url and metadata, and gate check
--   artifact_ref and metadata, are withheld by column privileges from
--   ci_service_role, qa_tester and developer; the view
--   ops.v_evidence_artifacts_masked shows them evidence with internal URLs and
--   secret-like metadata keys masked. release_manager, sre (for what it
--   reads), audit_reader and opsgate_worker read the tables unmasked.

-- ---------------------------------------------------------------------------
-- Roles, created idempotently (roles are cluster-wide; several databases of
-- one server may run this migration at the same time)
-- ---------------------------------------------------------------------------
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['ci_service_role', 'release_manager', 'qa_tester', 'sre', 'developer',
                                     'audit_reader', 'opsgate_worker'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- Nothing for PUBLIC
-- ---------------------------------------------------------------------------
REVOKE ALL ON SCHEMA ops FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA ops FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA ops FROM PUBLIC;
DO $$
DECLARE
    type_name text;
BEGIN
    FOR type_name IN
        SELECT format('%I.%I', n.nspname, t.typname)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'ops' AND t.typtype IN ('e', 'd')
    LOOP
        EXECUTE format('REVOKE USAGE ON TYPE %s FROM PUBLIC', type_name);
        EXECUTE format('GRANT USAGE ON TYPE %s TO ci_service_role, release_manager, qa_tester, sre, developer, '
                       'audit_reader, opsgate_worker', type_name);
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA ops TO ci_service_role, release_manager, qa_tester, sre, developer, audit_reader, opsgate_worker;

-- ---------------------------------------------------------------------------
-- Derivation runs with the owner's rights
-- ---------------------------------------------------------------------------
DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN
        SELECT p.oid::regprocedure
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'ops'
          AND p.proname IN ('release_promoted_at', 'bypassing_exception', 'derive_g4', 'evaluate_gate',
                            'derive_release_status', 'refresh_release', 'guard_gate_status',
                            'create_release_gates', 'link_evidence_release', 'refresh_on_fact',
                            'refresh_on_policy', 'promotion_blockers', 'is_eligible_for_promotion',
                            'sweep_expired_exceptions', 'sweep_overdue_g4', 'run_sweeps')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', fn);
    END LOOP;
END
$$;

-- Anyone with an ops role may ask about gates and eligibility; the worker
-- (and SREs by hand) may run the sweeps.
GRANT EXECUTE ON FUNCTION ops.acting_identity(), ops.all_sha256(jsonb), ops.gate_label(ops.ops_gate_code),
    ops.evaluate_gate(uuid, timestamptz, boolean), ops.derive_g4(uuid, timestamptz),
    ops.promotion_blockers(uuid, text, timestamptz), ops.is_eligible_for_promotion(uuid, text, timestamptz)
    TO ci_service_role, release_manager, qa_tester, sre, developer, audit_reader, opsgate_worker;
GRANT EXECUTE ON FUNCTION ops.sweep_expired_exceptions(timestamptz), ops.sweep_overdue_g4(timestamptz),
    ops.run_sweeps(timestamptz)
    TO opsgate_worker, sre;

-- ---------------------------------------------------------------------------
-- Helpers for policies
-- ---------------------------------------------------------------------------
-- Whether a gate belongs to a release `p_actor` initiated (developer:
-- "gate_checks (own release)"). Definer, because developers cannot read
-- release_gates themselves; the caller passes ops.acting_identity(), which
-- inside a definer function would name the owner instead.
CREATE FUNCTION ops.is_release_gate_of(p_gate_id uuid, p_actor text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1 FROM ops.release_gates g JOIN ops.releases r ON r.release_id = g.release_id
        WHERE g.gate_id = p_gate_id AND r.initiating_actor = p_actor
    )
$$;
REVOKE EXECUTE ON FUNCTION ops.is_release_gate_of(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ops.is_release_gate_of(uuid, text) TO developer;

-- An exception is never granted by the release's initiator, whoever writes it.
CREATE FUNCTION ops.guard_exception_approver() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM ops.releases r
               WHERE r.release_id = NEW.release_id AND r.initiating_actor = NEW.approver_id) THEN
        RAISE EXCEPTION 'exception for release % cannot be approved by %, who initiated the release (separation of duties)',
            NEW.release_id, NEW.approver_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER exceptions_separation_of_duties
    BEFORE INSERT OR UPDATE OF approver_id, release_id ON ops.exceptions
    FOR EACH ROW EXECUTE FUNCTION ops.guard_exception_approver();

-- ---------------------------------------------------------------------------
-- Masking
-- ---------------------------------------------------------------------------
-- Internal URLs: loopback, private and link-local addresses, single-label
-- hosts and internal-looking domains (.internal, .local, .lan, .corp,
-- .intranet, .svc). Credentials in any URL are masked too.
CREATE FUNCTION ops.mask_url(p_url text) RETURNS text
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
    FROM (SELECT lower(substring(p_url FROM '^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/]*@)?(\[[^\]]+\]|[^:/?#]+)')) AS host) h
$$;

-- Values of keys named like secret, token, password, credential or api key,
-- at any depth, replaced by "***".
CREATE FUNCTION ops.mask_secrets(p_value jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE jsonb_typeof(p_value)
        WHEN 'object' THEN (
            SELECT coalesce(jsonb_object_agg(key, CASE
                WHEN key ~* '(secret|token|passw|credential|api[_-]?key|private[_-]?key)' THEN '"***"'::jsonb
                ELSE ops.mask_secrets(value) END), '{}'::jsonb)
            FROM jsonb_each(p_value))
        WHEN 'array' THEN (
            SELECT coalesce(jsonb_agg(ops.mask_secrets(value) ORDER BY ordinality), '[]'::jsonb)
            FROM jsonb_array_elements(p_value) WITH ORDINALITY)
        ELSE p_value
    END
$$;
GRANT EXECUTE ON FUNCTION ops.mask_url(text), ops.mask_secrets(jsonb)
    TO ci_service_role, release_manager, qa_tester, sre, developer, audit_reader, opsgate_worker;

-- Evidence for the roles that may not see it raw. The view reads with its
-- owner's rights, so it shows every artifact, masked.
CREATE VIEW ops.v_evidence_artifacts_masked WITH (security_barrier) AS
SELECT artifact_id, release_id, gate_id, check_id, deployment_id, approval_id, exception_id, environment,
       artifact_type, source_system, ops.mask_url(artifact_url) AS artifact_url, sha256,
       ops.mask_secrets(metadata) AS metadata, created_at, created_by
FROM ops.evidence_artifacts;

-- ---------------------------------------------------------------------------
-- Privileges: exactly the PRD's table (plus what the ingest path needs)
-- ---------------------------------------------------------------------------
-- audit_reader: everything, read-only.
GRANT SELECT ON ALL TABLES IN SCHEMA ops TO audit_reader;

-- release_manager: reads all; writes approvals, exceptions (and their review),
-- and gate status (which the guard trigger holds to the facts).
GRANT SELECT ON ALL TABLES IN SCHEMA ops TO release_manager;
GRANT INSERT ON ops.approvals, ops.exceptions TO release_manager;
GRANT UPDATE (post_review_status) ON ops.exceptions TO release_manager;
GRANT UPDATE (status, exception_id) ON ops.release_gates TO release_manager;

-- ci_service_role: reads releases, gates, checks; writes the ledger, checks,
-- environment events and build manifests (platform constitution §6.1).
GRANT SELECT ON ops.releases, ops.release_gates TO ci_service_role;
GRANT SELECT (check_id, gate_id, check_name, source_system, status, deployment_id, observed_at, created_at,
              created_by) ON ops.gate_checks TO ci_service_role;
GRANT INSERT ON ops.event_ingest_log, ops.gate_checks, ops.environment_events, ops.builds TO ci_service_role;

-- qa_tester: reads releases, checks and (masked) evidence; writes own
-- approvals and own evidence.
GRANT SELECT ON ops.releases TO qa_tester;
GRANT SELECT (check_id, gate_id, check_name, source_system, status, deployment_id, observed_at, created_at,
              created_by) ON ops.gate_checks TO qa_tester;
GRANT SELECT (artifact_id, release_id, gate_id, check_id, deployment_id, approval_id, exception_id, environment,
              artifact_type, source_system, sha256, created_at, created_by) ON ops.evidence_artifacts TO qa_tester;
GRANT INSERT ON ops.approvals, ops.evidence_artifacts TO qa_tester;
GRANT UPDATE (sha256) ON ops.evidence_artifacts TO qa_tester;

-- sre: reads deployments, environment events, drills; writes own deployments
-- and own drills.
GRANT SELECT ON ops.deployments, ops.environment_events, ops.recovery_drills TO sre;
GRANT INSERT ON ops.deployments, ops.recovery_drills TO sre;
GRANT UPDATE (status, metadata) ON ops.deployments TO sre;
GRANT UPDATE (outcome, restore_validated, metadata) ON ops.recovery_drills TO sre;

-- developer: reads releases and checks of own releases; writes own checks.
GRANT SELECT ON ops.releases TO developer;
GRANT SELECT (check_id, gate_id, check_name, source_system, status, deployment_id, observed_at, created_at,
              created_by) ON ops.gate_checks TO developer;
GRANT INSERT ON ops.gate_checks TO developer;

GRANT SELECT ON ops.v_evidence_artifacts_masked TO ci_service_role, qa_tester, developer, release_manager,
    audit_reader;

-- opsgate_worker: what the handlers write, and nothing else. No DELETE
-- anywhere, no UPDATE of environment events; ledger rows only while the
-- writing transaction is open (trigger ops.guard_ingest_log).
GRANT SELECT ON ALL TABLES IN SCHEMA ops TO opsgate_worker;
GRANT INSERT ON ops.releases, ops.gate_checks, ops.approvals, ops.evidence_artifacts, ops.exceptions,
    ops.deployments, ops.environment_events, ops.event_ingest_log, ops.incidents, ops.recovery_drills,
    ops.builds TO opsgate_worker;
GRANT UPDATE (post_review_status) ON ops.exceptions TO opsgate_worker;
GRANT UPDATE (status, metadata) ON ops.deployments TO opsgate_worker;
GRANT UPDATE (result) ON ops.event_ingest_log TO opsgate_worker;
GRANT UPDATE (resolved_at, root_cause, postmortem_status) ON ops.incidents TO opsgate_worker;

-- ---------------------------------------------------------------------------
-- Row-level security on every table, forced for the owner too
-- ---------------------------------------------------------------------------
DO $$
DECLARE
    tbl text;
BEGIN
    FOR tbl IN
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'ops' AND c.relkind = 'r'
    LOOP
        EXECUTE format('ALTER TABLE ops.%I ENABLE ROW LEVEL SECURITY', tbl);
        EXECUTE format('ALTER TABLE ops.%I FORCE ROW LEVEL SECURITY', tbl);
        -- The owner (the migration role) runs the derivation functions.
        EXECUTE format('CREATE POLICY owner_all ON ops.%I TO %I USING (true) WITH CHECK (true)', tbl, current_user);
        -- Readers of the whole table; privileges decide who reads at all.
        EXECUTE format('CREATE POLICY read_all ON ops.%I FOR SELECT TO release_manager, audit_reader, opsgate_worker '
                       'USING (true)', tbl);
        -- The ingest path writes on behalf of producers.
        EXECUTE format('CREATE POLICY worker_insert ON ops.%I FOR INSERT TO opsgate_worker WITH CHECK (true)', tbl);
        EXECUTE format('CREATE POLICY worker_update ON ops.%I FOR UPDATE TO opsgate_worker USING (true) '
                       'WITH CHECK (true)', tbl);
    END LOOP;
END
$$;

-- Reads narrower than "everything".
CREATE POLICY ci_read ON ops.releases FOR SELECT TO ci_service_role, qa_tester, developer USING (true);
CREATE POLICY ci_read ON ops.release_gates FOR SELECT TO ci_service_role USING (true);
CREATE POLICY team_read ON ops.gate_checks FOR SELECT TO ci_service_role, qa_tester USING (true);
CREATE POLICY developer_read_own_release ON ops.gate_checks FOR SELECT TO developer
    USING (ops.is_release_gate_of(gate_id, ops.acting_identity()));
CREATE POLICY qa_read ON ops.evidence_artifacts FOR SELECT TO qa_tester USING (true);
CREATE POLICY sre_read ON ops.deployments FOR SELECT TO sre USING (true);
CREATE POLICY sre_read ON ops.environment_events FOR SELECT TO sre USING (true);
CREATE POLICY sre_read ON ops.recovery_drills FOR SELECT TO sre USING (true);

-- Writes in one's own name only.
CREATE POLICY ci_insert_own ON ops.event_ingest_log FOR INSERT TO ci_service_role
    WITH CHECK (created_by = ops.acting_identity());
CREATE POLICY ci_insert_own ON ops.gate_checks FOR INSERT TO ci_service_role
    WITH CHECK (created_by = ops.acting_identity());
CREATE POLICY ci_insert_own ON ops.environment_events FOR INSERT TO ci_service_role
    WITH CHECK (created_by = ops.acting_identity());
CREATE POLICY ci_insert_own ON ops.builds FOR INSERT TO ci_service_role
    WITH CHECK (created_by = ops.acting_identity());

CREATE POLICY developer_insert_own ON ops.gate_checks FOR INSERT TO developer
    WITH CHECK (created_by = ops.acting_identity() AND ops.is_release_gate_of(gate_id, ops.acting_identity()));

-- Approvals: one's own decision, in one's own persona.
CREATE POLICY qa_insert_own ON ops.approvals FOR INSERT TO qa_tester
    WITH CHECK (approver_id = ops.acting_identity() AND created_by = ops.acting_identity()
                AND persona_role = 'qa_tester');
CREATE POLICY release_manager_insert_own ON ops.approvals FOR INSERT TO release_manager
    WITH CHECK (approver_id = ops.acting_identity() AND created_by = ops.acting_identity()
                AND persona_role = 'release_manager');

CREATE POLICY qa_insert_own ON ops.evidence_artifacts FOR INSERT TO qa_tester
    WITH CHECK (created_by = ops.acting_identity());
CREATE POLICY qa_update_own ON ops.evidence_artifacts FOR UPDATE TO qa_tester
    USING (created_by = ops.acting_identity()) WITH CHECK (created_by = ops.acting_identity());

-- Exceptions: granted in one's own name; reviewed by any release manager.
CREATE POLICY release_manager_insert_own ON ops.exceptions FOR INSERT TO release_manager
    WITH CHECK (approver_id = ops.acting_identity() AND created_by = ops.acting_identity());
CREATE POLICY release_manager_review ON ops.exceptions FOR UPDATE TO release_manager
    USING (true) WITH CHECK (true);

-- Gate status: release managers may set it (the guard trigger keeps it true to the facts).
CREATE POLICY release_manager_status ON ops.release_gates FOR UPDATE TO release_manager
    USING (true) WITH CHECK (true);

CREATE POLICY sre_insert_own ON ops.deployments FOR INSERT TO sre
    WITH CHECK (created_by = ops.acting_identity() AND deployed_by = ops.acting_identity());
CREATE POLICY sre_update_own ON ops.deployments FOR UPDATE TO sre
    USING (created_by = ops.acting_identity()) WITH CHECK (created_by = ops.acting_identity());
CREATE POLICY sre_insert_own ON ops.recovery_drills FOR INSERT TO sre
    WITH CHECK (created_by = ops.acting_identity() AND executed_by = ops.acting_identity());
CREATE POLICY sre_update_own ON ops.recovery_drills FOR UPDATE TO sre
    USING (created_by = ops.acting_identity()) WITH CHECK (created_by = ops.acting_identity());

-- The reporting views read with their owner's rights; everyone who works on
-- releases may read them (audit_reader, release_manager and the worker read
-- every table already).
GRANT SELECT ON ops.v_release_gate_summary, ops.v_promotion_eligibility, ops.v_evidence_completeness,
    ops.v_exception_status, ops.v_deployment_history, ops.v_dora_metrics
    TO ci_service_role, qa_tester, sre, developer;

-- Functions created above are not executable by PUBLIC either. (PostgreSQL
-- grants EXECUTE to PUBLIC on every new function: each later migration must
-- revoke it; tests/access_control.rs checks that nothing in ops is PUBLIC.)
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA ops FROM PUBLIC;
