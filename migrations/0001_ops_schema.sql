-- The ops schema: every release-governance table of the PRD (FR-1..FR-10) plus
-- ops.builds (platform constitution §5.3, §6.1). Integrity rules live here, not
-- only in the worker, because people with SQL roles write to these tables too.
-- Runs on PostgreSQL 15+ and on Supabase: no extensions are required
-- (gen_random_uuid() is built in since PostgreSQL 13).

CREATE SCHEMA IF NOT EXISTS ops;

-- ---------------------------------------------------------------------------
-- Closed vocabularies
-- ---------------------------------------------------------------------------
CREATE TYPE ops.ops_gate_code AS ENUM ('G1', 'G2', 'G3', 'G4');
CREATE TYPE ops.ops_release_status AS ENUM ('draft', 'in_progress', 'promoted', 'rolled_back', 'failed');
CREATE TYPE ops.ops_gate_status AS ENUM ('pending', 'in_progress', 'passed', 'failed', 'bypassed');
CREATE TYPE ops.ops_decision_type AS ENUM ('approved', 'rejected', 'request_changes');
CREATE TYPE ops.ops_processing_status AS ENUM ('accepted', 'duplicate', 'rejected', 'error');
CREATE TYPE ops.ops_check_status AS ENUM ('pass', 'fail', 'warning', 'skipped');
CREATE TYPE ops.ops_persona_role AS ENUM ('developer', 'qa_tester', 'release_manager', 'sre');
CREATE TYPE ops.ops_artifact_type AS ENUM (
    'build_log', 'test_result', 'uat_summary', 'approval_record', 'rollback_plan',
    'health_check', 'restore_drill', 'incident_report', 'reference'
);
CREATE TYPE ops.ops_environment AS ENUM ('dev', 'staging', 'production');
CREATE TYPE ops.ops_deployment_status AS ENUM ('in_progress', 'succeeded', 'failed', 'rolled_back');
CREATE TYPE ops.ops_g4_status AS ENUM ('pending', 'passed', 'failed');
CREATE TYPE ops.ops_post_review_status AS ENUM ('pending', 'complete', 'waived');
CREATE TYPE ops.ops_approval_scope AS ENUM ('release', 'gate', 'exception');
CREATE TYPE ops.ops_incident_severity AS ENUM ('sev1', 'sev2', 'sev3', 'sev4');
CREATE TYPE ops.ops_postmortem_status AS ENUM ('not_required', 'pending', 'in_progress', 'complete');
CREATE TYPE ops.ops_drill_outcome AS ENUM ('succeeded', 'partial', 'failed');

-- ---------------------------------------------------------------------------
-- Provenance (NR-7)
-- ---------------------------------------------------------------------------
-- The identity a row is attributed to when the writer names nobody, and
-- what "own" means to row-level security: on Supabase-style connections the
-- JWT subject that PostgREST puts in request.jwt.claims, trusted only when
-- the session logged in as PostgREST's `authenticator` role (anyone else
-- could set that setting themselves); otherwise the database user.
CREATE FUNCTION ops.acting_identity() RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(
        CASE WHEN session_user = 'authenticator' THEN
            nullif(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub', '')
        END,
        current_user::text
    )
$$;

-- A sha256 column holds 64 hex characters or NULL.
CREATE DOMAIN ops.sha256_hex AS text CHECK (VALUE ~ '^[0-9a-fA-F]{64}$');

-- ---------------------------------------------------------------------------
-- FR-1 releases
-- ---------------------------------------------------------------------------
CREATE TABLE ops.releases (
    release_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project             text NOT NULL CHECK (btrim(project) <> ''),
    release_name        text NOT NULL CHECK (btrim(release_name) <> ''),
    environment_target  ops.ops_environment NOT NULL,
    source_ref          text NOT NULL CHECK (btrim(source_ref) <> ''),
    scope_metadata      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(scope_metadata) = 'object'),
    initiating_actor    text NOT NULL CHECK (btrim(initiating_actor) <> ''),
    status              ops.ops_release_status NOT NULL DEFAULT 'draft',
    status_changed_at   timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    created_by          text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    UNIQUE (project, release_name)
);

-- ---------------------------------------------------------------------------
-- FR-6 exceptions (before release_gates, which reference them)
-- ---------------------------------------------------------------------------
CREATE TABLE ops.exceptions (
    exception_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    release_id            uuid NOT NULL REFERENCES ops.releases (release_id),
    exception_type        text NOT NULL CHECK (btrim(exception_type) <> ''),
    impacted_gates        ops.ops_gate_code[] NOT NULL
                          CHECK (cardinality(impacted_gates) > 0 AND array_position(impacted_gates, NULL) IS NULL),
    reason                text NOT NULL CHECK (btrim(reason) <> ''),
    risk_statement        text NOT NULL CHECK (btrim(risk_statement) <> ''),
    approver_id           text NOT NULL CHECK (btrim(approver_id) <> ''),
    effective_from        timestamptz NOT NULL DEFAULT now(),
    expires_at            timestamptz NOT NULL,
    compensating_controls jsonb NOT NULL DEFAULT '{}',
    post_review_status    ops.ops_post_review_status NOT NULL DEFAULT 'pending',
    -- Set once by the expiry sweep; an exception past expires_at never
    -- authorizes anything whether or not the sweep has run.
    expired_at            timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    created_by            text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    CONSTRAINT exceptions_window_is_forward CHECK (expires_at > effective_from),
    UNIQUE (exception_id, release_id)
);
CREATE INDEX exceptions_release_idx ON ops.exceptions (release_id);

-- ---------------------------------------------------------------------------
-- FR-2 release_gates
-- ---------------------------------------------------------------------------
CREATE TABLE ops.release_gates (
    gate_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    release_id    uuid NOT NULL REFERENCES ops.releases (release_id),
    gate_code     ops.ops_gate_code NOT NULL,
    -- Derived from gate_code, never free text.
    gate_name     text GENERATED ALWAYS AS (
                      CASE gate_code
                          WHEN 'G1' THEN 'Build Integrity'
                          WHEN 'G2' THEN 'Validation Readiness'
                          WHEN 'G3' THEN 'Promotion Readiness'
                          WHEN 'G4' THEN 'Post-Deploy Operational Confirmation'
                      END
                  ) STORED,
    status        ops.ops_gate_status NOT NULL DEFAULT 'pending',
    entered_at    timestamptz,
    resolved_at   timestamptz,
    resolved_by   text,
    exception_id  uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    UNIQUE (release_id, gate_code),
    UNIQUE (gate_id, release_id),
    -- A bypass names an exception of the same release.
    FOREIGN KEY (exception_id, release_id) REFERENCES ops.exceptions (exception_id, release_id),
    CONSTRAINT release_gates_bypass_names_exception CHECK (status <> 'bypassed' OR exception_id IS NOT NULL)
);

-- ---------------------------------------------------------------------------
-- FR-7 deployments
-- ---------------------------------------------------------------------------
CREATE TABLE ops.deployments (
    deployment_id   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    release_id      uuid NOT NULL REFERENCES ops.releases (release_id),
    environment     ops.ops_environment NOT NULL CHECK (environment IN ('staging', 'production')),
    deployed_at     timestamptz NOT NULL DEFAULT now(),
    deployed_by     text NOT NULL CHECK (btrim(deployed_by) <> ''),
    source_ref      text NOT NULL CHECK (btrim(source_ref) <> ''),
    status          ops.ops_deployment_status NOT NULL DEFAULT 'in_progress',
    rollback_of     uuid REFERENCES ops.deployments (deployment_id),
    g4_status       ops.ops_g4_status NOT NULL DEFAULT 'pending',
    g4_resolved_at  timestamptz,
    metadata        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    CONSTRAINT deployments_rollback_not_self CHECK (rollback_of IS DISTINCT FROM deployment_id),
    CONSTRAINT deployments_g4_resolution CHECK ((g4_status = 'pending') = (g4_resolved_at IS NULL))
);
CREATE INDEX deployments_release_idx ON ops.deployments (release_id, environment);
CREATE INDEX deployments_rollback_of_idx ON ops.deployments (rollback_of) WHERE rollback_of IS NOT NULL;
-- Linear promotion asks whether a source_ref succeeded in staging.
CREATE INDEX deployments_source_ref_idx ON ops.deployments (source_ref, environment) WHERE status = 'succeeded';

-- ---------------------------------------------------------------------------
-- FR-3 gate_checks
-- ---------------------------------------------------------------------------
CREATE TABLE ops.gate_checks (
    check_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    gate_id        uuid NOT NULL REFERENCES ops.release_gates (gate_id),
    check_name     text NOT NULL CHECK (btrim(check_name) <> ''),
    source_system  text NOT NULL CHECK (btrim(source_system) <> ''),
    status         ops.ops_check_status NOT NULL,
    artifact_ref   text,
    -- The deployment a post-deploy (G4) check observed.
    deployment_id  uuid REFERENCES ops.deployments (deployment_id),
    -- When the producer observed the result; "latest result" means latest
    -- observed, so facts arriving out of order converge to the same state.
    observed_at    timestamptz NOT NULL DEFAULT now(),
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> '')
);
CREATE INDEX gate_checks_gate_idx ON ops.gate_checks (gate_id, check_name, observed_at);
CREATE INDEX gate_checks_deployment_idx ON ops.gate_checks (deployment_id) WHERE deployment_id IS NOT NULL;

-- ---------------------------------------------------------------------------
-- FR-4 approvals
-- ---------------------------------------------------------------------------
CREATE TABLE ops.approvals (
    approval_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    release_id           uuid NOT NULL REFERENCES ops.releases (release_id),
    gate_id              uuid,
    exception_id         uuid,
    approver_id          text NOT NULL CHECK (btrim(approver_id) <> ''),
    persona_role         ops.ops_persona_role NOT NULL,
    decision             ops.ops_decision_type NOT NULL,
    scope                ops.ops_approval_scope NOT NULL,
    rationale_structured jsonb NOT NULL DEFAULT '{}',
    rationale_text       text,
    -- When the decision was made (see gate_checks.observed_at).
    decided_at           timestamptz NOT NULL DEFAULT now(),
    created_at           timestamptz NOT NULL DEFAULT now(),
    created_by           text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    -- The gate or exception decided on belongs to the same release.
    FOREIGN KEY (gate_id, release_id) REFERENCES ops.release_gates (gate_id, release_id),
    FOREIGN KEY (exception_id, release_id) REFERENCES ops.exceptions (exception_id, release_id),
    CONSTRAINT approvals_scope_target CHECK (
        (scope <> 'gate' OR gate_id IS NOT NULL) AND (scope <> 'exception' OR exception_id IS NOT NULL)
    )
);
CREATE INDEX approvals_gate_idx ON ops.approvals (gate_id, decided_at);
CREATE INDEX approvals_release_idx ON ops.approvals (release_id);

-- ---------------------------------------------------------------------------
-- FR-5 evidence_artifacts
-- ---------------------------------------------------------------------------
CREATE TABLE ops.evidence_artifacts (
    artifact_id    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    release_id     uuid REFERENCES ops.releases (release_id),
    gate_id        uuid REFERENCES ops.release_gates (gate_id),
    check_id       uuid REFERENCES ops.gate_checks (check_id),
    deployment_id  uuid REFERENCES ops.deployments (deployment_id),
    approval_id    uuid REFERENCES ops.approvals (approval_id),
    exception_id   uuid REFERENCES ops.exceptions (exception_id),
    environment    ops.ops_environment,
    artifact_type  ops.ops_artifact_type NOT NULL,
    source_system  text NOT NULL CHECK (btrim(source_system) <> ''),
    artifact_url   text NOT NULL CHECK (btrim(artifact_url) <> ''),
    sha256         ops.sha256_hex,
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    -- Integrity rule 4: no orphan evidence except explicit references.
    CONSTRAINT evidence_artifacts_not_orphan CHECK (
        artifact_type = 'reference'
        OR num_nonnulls(release_id, gate_id, check_id, deployment_id) > 0
    )
);
CREATE INDEX evidence_release_idx ON ops.evidence_artifacts (release_id, artifact_type);
CREATE INDEX evidence_gate_idx ON ops.evidence_artifacts (gate_id) WHERE gate_id IS NOT NULL;

-- ---------------------------------------------------------------------------
-- FR-8 environment_events (append-only)
-- ---------------------------------------------------------------------------
CREATE TABLE ops.environment_events (
    event_id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    environment      ops.ops_environment NOT NULL,
    event_type       text NOT NULL CHECK (btrim(event_type) <> ''),
    source_system    text NOT NULL CHECK (btrim(source_system) <> ''),
    release_id       uuid REFERENCES ops.releases (release_id),
    deployment_id    uuid REFERENCES ops.deployments (deployment_id),
    payload          jsonb NOT NULL DEFAULT '{}',
    idempotency_key  text NOT NULL UNIQUE CHECK (btrim(idempotency_key) <> ''),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> '')
);
CREATE INDEX environment_events_env_idx ON ops.environment_events (environment, created_at);

CREATE FUNCTION ops.reject_modification() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER environment_events_append_only
    BEFORE UPDATE OR DELETE ON ops.environment_events
    FOR EACH ROW EXECUTE FUNCTION ops.reject_modification();
CREATE TRIGGER environment_events_no_truncate
    BEFORE TRUNCATE ON ops.environment_events
    FOR EACH STATEMENT EXECUTE FUNCTION ops.reject_modification();

-- ---------------------------------------------------------------------------
-- FR-9 event_ingest_log: one row per delivery attempt
-- ---------------------------------------------------------------------------
CREATE TABLE ops.event_ingest_log (
    ingest_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Envelope fields are NULL when the message was too broken to read them.
    source_system      text,
    event_type         text,
    idempotency_key    text,
    schema_version     text,
    release_id         uuid,
    payload_hash       ops.sha256_hex NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT now(),
    processing_status  ops.ops_processing_status NOT NULL,
    response_code      smallint NOT NULL CHECK (response_code BETWEEN 100 AND 599),
    error_detail       text,
    -- The result of the accepted processing; duplicates repeat it.
    result             jsonb,
    attempt            integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    -- The transaction that wrote the row: it may finish the row, nobody later.
    written_in_xact    xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_by         text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    CONSTRAINT ingest_accepted_has_key CHECK (processing_status <> 'accepted' OR idempotency_key IS NOT NULL),
    CONSTRAINT ingest_failure_has_detail CHECK (
        processing_status IN ('accepted', 'duplicate') OR error_detail IS NOT NULL
    )
);
-- Integrity rule 5: at most one accepted outcome per idempotency key; other
-- attempts with the same key are kept as their own rows.
CREATE UNIQUE INDEX event_ingest_log_one_accepted
    ON ops.event_ingest_log (idempotency_key) WHERE processing_status = 'accepted';
CREATE INDEX event_ingest_log_key_idx ON ops.event_ingest_log (idempotency_key, received_at);
CREATE INDEX event_ingest_log_received_idx ON ops.event_ingest_log (received_at);

CREATE FUNCTION ops.guard_ingest_log() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.written_in_xact = pg_current_xact_id()
       AND NEW.written_in_xact = OLD.written_in_xact THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'ops.event_ingest_log rows are immutable once written: % of ingest % is not allowed',
        TG_OP, OLD.ingest_id
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER event_ingest_log_immutable
    BEFORE UPDATE OR DELETE ON ops.event_ingest_log
    FOR EACH ROW EXECUTE FUNCTION ops.guard_ingest_log();

-- ---------------------------------------------------------------------------
-- FR-10 incidents and recovery drills
-- ---------------------------------------------------------------------------
CREATE TABLE ops.incidents (
    incident_id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    deployment_id      uuid REFERENCES ops.deployments (deployment_id),
    release_id         uuid REFERENCES ops.releases (release_id),
    environment        ops.ops_environment NOT NULL DEFAULT 'production',
    severity           ops.ops_incident_severity NOT NULL,
    title              text NOT NULL CHECK (btrim(title) <> ''),
    detected_at        timestamptz NOT NULL,
    resolved_at        timestamptz,
    timeline           jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(timeline) = 'array'),
    root_cause         text,
    postmortem_status  ops.ops_postmortem_status NOT NULL DEFAULT 'pending',
    created_at         timestamptz NOT NULL DEFAULT now(),
    created_by         text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> ''),
    CONSTRAINT incidents_resolved_after_detected CHECK (resolved_at IS NULL OR resolved_at >= detected_at)
);
CREATE INDEX incidents_deployment_idx ON ops.incidents (deployment_id);

CREATE TABLE ops.recovery_drills (
    drill_id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    environment           ops.ops_environment NOT NULL,
    drill_type            text NOT NULL CHECK (btrim(drill_type) <> ''),
    executed_by           text NOT NULL CHECK (btrim(executed_by) <> ''),
    executed_at           timestamptz NOT NULL,
    outcome               ops.ops_drill_outcome NOT NULL,
    restore_validated     boolean NOT NULL DEFAULT false,
    evidence_artifact_id  uuid REFERENCES ops.evidence_artifacts (artifact_id),
    metadata              jsonb NOT NULL DEFAULT '{}',
    created_at            timestamptz NOT NULL DEFAULT now(),
    created_by            text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> '')
);

-- ---------------------------------------------------------------------------
-- ops.builds: build manifests (platform constitution §5.3 and §6.1)
-- ---------------------------------------------------------------------------
CREATE TABLE ops.builds (
    build_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    release_id        uuid REFERENCES ops.releases (release_id),
    git_sha           text NOT NULL CHECK (git_sha ~ '^[0-9a-f]{40}$' OR git_sha ~ '^[0-9a-f]{64}$'),
    branch            text NOT NULL CHECK (btrim(branch) <> ''),
    commit_message    text NOT NULL,
    author            text NOT NULL CHECK (btrim(author) <> ''),
    built_at          timestamptz NOT NULL,
    image_digest      text CHECK (image_digest ~ '^sha256:[0-9a-f]{64}$'),
    -- Lock file name -> sha256 of its content.
    lock_file_hashes  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(lock_file_hashes) = 'object'),
    ci_run_url        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    created_by        text NOT NULL DEFAULT ops.acting_identity() CHECK (btrim(created_by) <> '')
);
CREATE INDEX builds_release_idx ON ops.builds (release_id);
CREATE INDEX builds_sha_idx ON ops.builds (git_sha);

-- Every lock-file hash is a sha256.
CREATE FUNCTION ops.all_sha256(hashes jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT coalesce(bool_and(jsonb_typeof(value) = 'string' AND value #>> '{}' ~ '^[0-9a-fA-F]{64}$'), true)
    FROM jsonb_each(hashes)
$$;
ALTER TABLE ops.builds ADD CONSTRAINT builds_lock_file_hashes_sha256 CHECK (ops.all_sha256(lock_file_hashes));

