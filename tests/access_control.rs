//! Access control against the real database, as each role: the whole
//! permission matrix, own-row rules, masking, and no grants to PUBLIC.

mod common;

use common::*;
use sqlx::{Connection, Executor, PgConnection, Row};
use uuid::Uuid;

const ROLES: [&str; 7] = [
    "ci_service_role",
    "release_manager",
    "qa_tester",
    "sre",
    "developer",
    "audit_reader",
    "opsgate_worker",
];

const TABLES: [&str; 14] = [
    "releases",
    "release_gates",
    "gate_checks",
    "approvals",
    "evidence_artifacts",
    "exceptions",
    "deployments",
    "environment_events",
    "event_ingest_log",
    "incidents",
    "recovery_drills",
    "builds",
    "gate_policies",
    "change_log",
];

/// The permission matrix: for each role, the operations allowed on each
/// table, as "SIUD" letters (SELECT, INSERT, UPDATE, DELETE). A table not
/// listed allows nothing. UPDATE is tried on a row the role owns where the
/// rule is "own". Nobody deletes governance records.
const MATRIX: [(&str, &[(&str, &str)]); 7] = [
    (
        "ci_service_role",
        &[
            ("releases", "S"),
            ("release_gates", "S"),
            ("gate_checks", "SI"),
            ("environment_events", "I"),
            ("event_ingest_log", "I"),
            ("builds", "I"),
        ],
    ),
    (
        "release_manager",
        &[
            ("releases", "S"),
            ("release_gates", "SU"),
            ("gate_checks", "S"),
            ("approvals", "SI"),
            ("evidence_artifacts", "S"),
            ("exceptions", "SIU"),
            ("deployments", "S"),
            ("environment_events", "S"),
            ("event_ingest_log", "S"),
            ("incidents", "S"),
            ("recovery_drills", "S"),
            ("builds", "S"),
            ("gate_policies", "S"),
            ("change_log", "S"),
        ],
    ),
    (
        "qa_tester",
        &[
            ("releases", "S"),
            ("gate_checks", "S"),
            ("approvals", "I"),
            ("evidence_artifacts", "SIU"),
        ],
    ),
    (
        "sre",
        &[
            ("deployments", "SIU"),
            ("environment_events", "S"),
            ("recovery_drills", "SIU"),
        ],
    ),
    ("developer", &[("releases", "S"), ("gate_checks", "SI")]),
    (
        "audit_reader",
        &[
            ("releases", "S"),
            ("release_gates", "S"),
            ("gate_checks", "S"),
            ("approvals", "S"),
            ("evidence_artifacts", "S"),
            ("exceptions", "S"),
            ("deployments", "S"),
            ("environment_events", "S"),
            ("event_ingest_log", "S"),
            ("incidents", "S"),
            ("recovery_drills", "S"),
            ("builds", "S"),
            ("gate_policies", "S"),
            ("change_log", "S"),
        ],
    ),
    (
        "opsgate_worker",
        &[
            ("releases", "SI"),
            ("release_gates", "S"),
            ("gate_checks", "SI"),
            ("approvals", "SI"),
            ("evidence_artifacts", "SI"),
            ("exceptions", "SIU"),
            ("deployments", "SIU"),
            ("environment_events", "SI"),
            // UPDATE is granted for the accepted row's result, but only inside the
            // transaction that wrote it: a committed row cannot be changed.
            ("event_ingest_log", "SI"),
            ("incidents", "SIU"),
            ("recovery_drills", "SI"),
            ("builds", "SI"),
            ("gate_policies", "S"),
        ],
    ),
];

fn expected(role: &str, table: &str, op: char) -> bool {
    MATRIX
        .iter()
        .find(|(r, _)| *r == role)
        .and_then(|(_, tables)| tables.iter().find(|(t, _)| *t == table))
        .is_some_and(|(_, ops)| ops.contains(op))
}

/// Ids of the seeded rows the statements aim at.
struct Seed {
    own_release: Uuid,
    other_release: Uuid,
    own_release_g1: Uuid,
    other_g1: Uuid,
    other_g2: Uuid,
    developer_check: Uuid,
    qa_evidence: Uuid,
    exception: Uuid,
    sre_deployment: Uuid,
    event: Uuid,
    ingest: Uuid,
    incident: Uuid,
    sre_drill: Uuid,
    build: Uuid,
}

async fn id(conn: &mut PgConnection, sql: &str) -> Uuid {
    conn.fetch_one(sqlx::AssertSqlSafe(sql.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("seed {sql}: {e}"))
        .get(0)
}

/// Seeds, as the owner, one row of every kind; "own" rows belong to the
/// role that the matrix lets write them.
async fn seed(conn: &mut PgConnection) -> Seed {
    let own_release = id(
        conn,
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor)
         VALUES ('acme/odoo', 'own', 'production', 'sha-own', 'developer') RETURNING release_id",
    )
    .await;
    let other_release = id(
        conn,
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor)
         VALUES ('acme/odoo', 'other', 'production', 'sha-other', 'dev-x') RETURNING release_id",
    )
    .await;
    let gate = |release: Uuid, code: &str| {
        format!(
            "SELECT gate_id FROM ops.release_gates WHERE release_id = '{release}' AND gate_code = '{code}'"
        )
    };
    let own_release_g1 = id(conn, &gate(own_release, "G1")).await;
    let other_g1 = id(conn, &gate(other_release, "G1")).await;
    let other_g2 = id(conn, &gate(other_release, "G2")).await;
    let developer_check = id(
        conn,
        &format!(
            "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, created_by)
             VALUES ('{own_release_g1}', 'unit', 'manual', 'pass', 'developer') RETURNING check_id"
        ),
    )
    .await;
    id(
        conn,
        &format!(
            "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, created_by)
             VALUES ('{other_g1}', 'unit', 'github_actions', 'pass', 'ci') RETURNING check_id"
        ),
    )
    .await;
    id(
        conn,
        &format!(
            "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope, created_by)
             VALUES ('{other_release}', '{other_g2}', 'qa_tester', 'qa_tester', 'approved', 'gate', 'qa_tester')
             RETURNING approval_id"
        ),
    )
    .await;
    let qa_evidence = id(
        conn,
        &format!(
            "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url, metadata, created_by)
             VALUES ('{other_release}', 'test_result', 'manual', 'https://ci.example.com/run/1',
                     '{{\"summary\": \"ok\"}}', 'qa_tester') RETURNING artifact_id"
        ),
    )
    .await;
    let exception = id(
        conn,
        &format!(
            "INSERT INTO ops.exceptions (release_id, exception_type, impacted_gates, reason, risk_statement,
                                         approver_id, expires_at, created_by)
             VALUES ('{other_release}', 'gate_bypass', '{{G3}}', 'hotfix', 'low', 'release_manager',
                     now() + interval '1 hour', 'release_manager') RETURNING exception_id"
        ),
    )
    .await;
    let sre_deployment = id(
        conn,
        &format!(
            "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, created_by)
             VALUES ('{other_release}', 'staging', 'sre', 'sha-other', 'sre') RETURNING deployment_id"
        ),
    )
    .await;
    let event = id(
        conn,
        "INSERT INTO ops.environment_events (environment, event_type, source_system, idempotency_key, created_by)
         VALUES ('production', 'alert_fired', 'monitoring', 'seed/1', 'monitoring') RETURNING event_id",
    )
    .await;
    let ingest = id(
        conn,
        &format!(
            "INSERT INTO ops.event_ingest_log (idempotency_key, payload_hash, processing_status, response_code,
                                               result, created_by)
             VALUES ('seed/1', '{}', 'accepted', 200, '{{}}', 'opsgate-worker') RETURNING ingest_id",
            "0".repeat(64)
        ),
    )
    .await;
    let incident = id(
        conn,
        &format!(
            "INSERT INTO ops.incidents (release_id, severity, title, detected_at, created_by)
             VALUES ('{other_release}', 'sev3', 'slow', now(), 'sre') RETURNING incident_id"
        ),
    )
    .await;
    let sre_drill = id(
        conn,
        "INSERT INTO ops.recovery_drills (environment, drill_type, executed_by, executed_at, outcome, created_by)
         VALUES ('staging', 'restore', 'sre', now(), 'succeeded', 'sre') RETURNING drill_id",
    )
    .await;
    let build = id(
        conn,
        &format!(
            "INSERT INTO ops.builds (release_id, git_sha, branch, commit_message, author, built_at, created_by)
             VALUES ('{other_release}', '{}', 'main', 'm', 'dev-x', now(), 'ci_service_role') RETURNING build_id",
            "a".repeat(40)
        ),
    )
    .await;
    Seed {
        own_release,
        other_release,
        own_release_g1,
        other_g1,
        other_g2,
        developer_check,
        qa_evidence,
        exception,
        sre_deployment,
        event,
        ingest,
        incident,
        sre_drill,
        build,
    }
}

/// The statement that tries `op` on `table`. Values that name a person use
/// current_user, so each role writes in its own name.
fn statement(seed: &Seed, table: &str, op: char) -> String {
    let s = seed;
    let zeros = "0".repeat(64);
    let sha = "b".repeat(40);
    match op {
        'S' => format!("SELECT count(*) FROM ops.{table}"),
        'D' => {
            let (key, value) = key_of(seed, table);
            format!("DELETE FROM ops.{table} WHERE {key} = '{value}'")
        }
        'I' => match table {
            "releases" => "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor)
                           VALUES ('acme/odoo', 'm-' || gen_random_uuid(), 'production', 'sha', current_user)".to_owned(),
            "release_gates" => format!("INSERT INTO ops.release_gates (release_id, gate_code) VALUES ('{}', 'G1')", s.other_release),
            "gate_checks" => format!(
                "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status)
                 VALUES ('{}', 'matrix', 'manual', 'pass')",
                s.own_release_g1
            ),
            "approvals" => format!(
                "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope)
                 VALUES ('{}', '{}', current_user,
                         CASE current_user WHEN 'release_manager' THEN 'release_manager' ELSE 'qa_tester' END::ops.ops_persona_role,
                         'approved', 'gate')",
                s.other_release, s.other_g2
            ),
            "evidence_artifacts" => format!(
                "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url)
                 VALUES ('{}', 'uat_summary', 'manual', 'https://qa.example.com/uat')",
                s.other_release
            ),
            "exceptions" => format!(
                "INSERT INTO ops.exceptions (release_id, exception_type, impacted_gates, reason, risk_statement,
                                             approver_id, expires_at)
                 VALUES ('{}', 'gate_bypass', '{{G2}}', 'r', 'r', current_user, now() + interval '1 hour')",
                s.other_release
            ),
            "deployments" => format!(
                "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref)
                 VALUES ('{}', 'staging', current_user, 'sha-other')",
                s.other_release
            ),
            "environment_events" => "INSERT INTO ops.environment_events (environment, event_type, source_system, idempotency_key)
                                     VALUES ('staging', 'backup_complete', 'manual', 'm/' || gen_random_uuid())".to_owned(),
            "event_ingest_log" => format!(
                "INSERT INTO ops.event_ingest_log (payload_hash, processing_status, response_code, error_detail)
                 VALUES ('{zeros}', 'rejected', 400, 'matrix')"
            ),
            "incidents" => format!(
                "INSERT INTO ops.incidents (release_id, severity, title, detected_at) VALUES ('{}', 'sev4', 't', now())",
                s.other_release
            ),
            "recovery_drills" => "INSERT INTO ops.recovery_drills (environment, drill_type, executed_by, executed_at, outcome)
                                  VALUES ('staging', 'restore', current_user, now(), 'succeeded')".to_owned(),
            "builds" => format!(
                "INSERT INTO ops.builds (release_id, git_sha, branch, commit_message, author, built_at)
                 VALUES ('{}', '{sha}', 'main', 'm', 'a', now())",
                s.other_release
            ),
            "gate_policies" => "INSERT INTO ops.gate_policies (gate_code, environment) VALUES ('G1', 'dev')".to_owned(),
            "change_log" => "INSERT INTO ops.change_log (table_name, row_key, changes, changed_by)
                             VALUES ('releases', 'forged', '{}', current_user)".to_owned(),
            other => panic!("no INSERT for {other}"),
        },
        'U' => {
            let column = match table {
                "releases" => "scope_metadata",
                "release_gates" => "status",
                "gate_checks" => "check_name",
                "approvals" => "rationale_text",
                "evidence_artifacts" => "sha256",
                "exceptions" => "post_review_status",
                "deployments" => "status",
                "environment_events" => "payload",
                "event_ingest_log" => "result",
                "incidents" => "root_cause",
                "recovery_drills" => "outcome",
                "builds" => "branch",
                "gate_policies" => "min_passing_checks",
                "change_log" => "changed_by",
                other => panic!("no UPDATE for {other}"),
            };
            let (key, value) = key_of(seed, table);
            format!("UPDATE ops.{table} SET {column} = {column} WHERE {key} = '{value}'")
        }
        other => panic!("unknown operation {other}"),
    }
}

fn key_of(s: &Seed, table: &str) -> (&'static str, String) {
    match table {
        "releases" => ("release_id", s.other_release.to_string()),
        "release_gates" => ("gate_id", s.other_g1.to_string()),
        "gate_checks" => ("check_id", s.developer_check.to_string()),
        "approvals" => ("release_id", s.other_release.to_string()),
        "evidence_artifacts" => ("artifact_id", s.qa_evidence.to_string()),
        "exceptions" => ("exception_id", s.exception.to_string()),
        "deployments" => ("deployment_id", s.sre_deployment.to_string()),
        "environment_events" => ("event_id", s.event.to_string()),
        "event_ingest_log" => ("ingest_id", s.ingest.to_string()),
        "incidents" => ("incident_id", s.incident.to_string()),
        "recovery_drills" => ("drill_id", s.sre_drill.to_string()),
        "builds" => ("build_id", s.build.to_string()),
        "gate_policies" => ("gate_code", "G1".to_owned()),
        "change_log" => ("table_name", "release_gates".to_owned()),
        other => panic!("no key for {other}"),
    }
}

/// Runs `sql` as `role` in a transaction that is rolled back. Allowed means:
/// no permission error (insufficient privilege, row-level security, or one of
/// the append-only / immutability triggers), and for SELECT, UPDATE and
/// DELETE at least one row seen or changed.
async fn allowed(conn: &mut PgConnection, role: &str, op: char, sql: &str) -> Result<bool, String> {
    let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
    tx.execute(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
        .await
        .map_err(|e| e.to_string())?;
    let outcome = if op == 'S' {
        tx.fetch_one(sqlx::AssertSqlSafe(sql.to_owned()))
            .await
            .map(|row| row.get::<i64, _>(0) > 0)
    } else {
        tx.execute(sqlx::AssertSqlSafe(sql.to_owned()))
            .await
            .map(|done| op == 'I' || done.rows_affected() > 0)
    };
    let _ = tx.rollback().await;
    match outcome {
        Ok(seen) => Ok(seen),
        Err(sqlx::Error::Database(error))
            if matches!(error.code().as_deref(), Some("42501") | Some("23001")) =>
        {
            Ok(false)
        }
        Err(error) => Err(format!("{role} {op} failed for another reason: {error}\n{sql}")),
    }
}

#[tokio::test]
async fn every_role_has_exactly_the_permissions_of_the_matrix() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let seed = seed(&mut conn).await;
    let mut differences = Vec::new();
    for role in ROLES {
        for table in TABLES {
            for op in ['S', 'I', 'U', 'D'] {
                let sql = statement(&seed, table, op);
                let actual = allowed(&mut conn, role, op, &sql)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let want = expected(role, table, op);
                if actual != want {
                    differences.push(format!("{role} {op} ops.{table}: expected {want}, got {actual}"));
                }
            }
        }
    }
    assert!(
        differences.is_empty(),
        "the matrix differs:\n{}",
        differences.join("\n")
    );
    let _ = seed.own_release;
}

/// Runs `sql` as `role` and returns the error code, if any.
async fn as_role(conn: &mut PgConnection, role: &str, sql: &str) -> Result<u64, String> {
    let mut tx = conn.begin().await.unwrap();
    tx.execute(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
        .await
        .unwrap();
    let result = tx.execute(sqlx::AssertSqlSafe(sql.to_owned())).await;
    match result {
        Ok(done) => {
            tx.commit().await.unwrap();
            Ok(done.rows_affected())
        }
        Err(sqlx::Error::Database(error)) => Err(error.code().unwrap_or_default().into_owned()),
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn ci_cannot_claim_a_key_or_take_the_workers_event_keys() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let zeros = "0".repeat(64);
    // A forged accepted row would make the real event a duplicate.
    let claim = format!(
        "INSERT INTO ops.event_ingest_log (idempotency_key, payload_hash, processing_status, response_code, result)
         VALUES ('n8n/r/gate_signoff/1', '{zeros}', 'accepted', 200, '{{}}')"
    );
    assert_eq!(
        as_role(&mut conn, "ci_service_role", &claim).await,
        Err("42501".into())
    );
    let attempt = format!(
        "INSERT INTO ops.event_ingest_log (payload_hash, processing_status, response_code, error_detail)
         VALUES ('{zeros}', 'rejected', 400, 'its own attempt')"
    );
    assert_eq!(as_role(&mut conn, "ci_service_role", &attempt).await, Ok(1));

    let taken = "INSERT INTO ops.environment_events (environment, event_type, source_system, idempotency_key)
                 VALUES ('production', 'note', 'ci', 'opsgate/policy_violation/' || gen_random_uuid())";
    assert_eq!(
        as_role(&mut conn, "ci_service_role", taken).await,
        Err("42501".into())
    );
    let own = "INSERT INTO ops.environment_events (environment, event_type, source_system, idempotency_key)
               VALUES ('production', 'note', 'ci', 'ci/' || gen_random_uuid())";
    assert_eq!(as_role(&mut conn, "ci_service_role", own).await, Ok(1));
}

#[tokio::test]
async fn qa_writes_evidence_only_in_its_own_name() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let seed = seed(&mut conn).await;
    let r = seed.other_release;

    let own = format!(
        "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url)
         VALUES ('{r}', 'uat_summary', 'manual', 'https://qa.example.com/1')"
    );
    assert_eq!(as_role(&mut conn, "qa_tester", &own).await, Ok(1));
    let in_another_name = format!(
        "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url, created_by)
         VALUES ('{r}', 'uat_summary', 'manual', 'https://qa.example.com/2', 'qa-someone-else')"
    );
    assert_eq!(
        as_role(&mut conn, "qa_tester", &in_another_name).await,
        Err("42501".into())
    );

    // Another person's evidence is invisible to UPDATE: nothing changes.
    let theirs: Uuid = sqlx::query_scalar(
        "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url, created_by)
         VALUES ($1, 'test_result', 'manual', 'https://qa.example.com/3', 'qa-2') RETURNING artifact_id",
    )
    .bind(r)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let sha = "c".repeat(64);
    let update_theirs =
        format!("UPDATE ops.evidence_artifacts SET sha256 = '{sha}' WHERE artifact_id = '{theirs}'");
    assert_eq!(as_role(&mut conn, "qa_tester", &update_theirs).await, Ok(0));
    let update_own = format!(
        "UPDATE ops.evidence_artifacts SET sha256 = '{sha}' WHERE artifact_id = '{}'",
        seed.qa_evidence
    );
    assert_eq!(as_role(&mut conn, "qa_tester", &update_own).await, Ok(1));
    let stored: Option<String> =
        sqlx::query_scalar("SELECT sha256 FROM ops.evidence_artifacts WHERE artifact_id = $1")
            .bind(theirs)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(stored, None);
}

#[tokio::test]
async fn nobody_approves_or_grants_an_exception_in_another_persons_name() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let seed = seed(&mut conn).await;
    let (r, g2) = (seed.other_release, seed.other_g2);
    let approval = |approver: &str, role: &str| {
        format!(
            "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope)
             VALUES ('{r}', '{g2}', '{approver}', '{role}', 'approved', 'gate')"
        )
    };
    assert_eq!(
        as_role(&mut conn, "qa_tester", &approval("qa_tester", "qa_tester")).await,
        Ok(1)
    );
    assert_eq!(
        as_role(&mut conn, "qa_tester", &approval("qa-2", "qa_tester")).await,
        Err("42501".into())
    );
    // Nor in another persona.
    assert_eq!(
        as_role(&mut conn, "qa_tester", &approval("qa_tester", "release_manager")).await,
        Err("42501".into())
    );
    assert_eq!(
        as_role(&mut conn, "release_manager", &approval("rm-2", "release_manager")).await,
        Err("42501".into())
    );

    let exception = |approver: &str| {
        format!(
            "INSERT INTO ops.exceptions (release_id, exception_type, impacted_gates, reason, risk_statement, approver_id, expires_at)
             VALUES ('{r}', 'gate_bypass', '{{G3}}', 'r', 'r', '{approver}', now() + interval '1 hour')"
        )
    };
    assert_eq!(
        as_role(&mut conn, "release_manager", &exception("release_manager")).await,
        Ok(1)
    );
    assert_eq!(
        as_role(&mut conn, "release_manager", &exception("rm-2")).await,
        Err("42501".into())
    );
    // Whatever the path, the release's initiator never grants its exception.
    assert_eq!(
        as_role(&mut conn, "opsgate_worker", &exception("dev-x")).await,
        Err("23514".into())
    );
}

#[tokio::test]
async fn no_role_can_update_or_delete_environment_events() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let seed = seed(&mut conn).await;
    for role in ROLES {
        for sql in [
            format!(
                "UPDATE ops.environment_events SET payload = '{{\"x\": 1}}' WHERE event_id = '{}'",
                seed.event
            ),
            format!(
                "DELETE FROM ops.environment_events WHERE event_id = '{}'",
                seed.event
            ),
            "TRUNCATE ops.environment_events".to_owned(),
        ] {
            let result = as_role(&mut conn, role, &sql).await;
            assert!(
                matches!(
                    result.as_ref().map_err(String::as_str),
                    Err("42501") | Err("23001")
                ),
                "{role}: {sql} -> {result:?}"
            );
        }
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.environment_events")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn developers_see_checks_of_their_own_releases_only() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let seed = seed(&mut conn).await;
    let mut tx = conn.begin().await.unwrap();
    tx.execute("SET LOCAL ROLE developer").await.unwrap();
    let gates: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT gate_id FROM ops.gate_checks")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(gates, vec![seed.own_release_g1]);
    // And writes checks only there.
    let foreign = sqlx::query(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status) VALUES ($1, 'x', 'manual', 'pass')",
    )
    .bind(seed.other_g1)
    .execute(&mut *tx)
    .await;
    assert_eq!(sqlstate(foreign), "42501");
}

#[tokio::test]
async fn sensitive_fields_are_masked_for_developers_and_visible_to_auditors() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let seed = seed(&mut conn).await;
    let artifact: Uuid = sqlx::query_scalar(
        "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url, metadata, created_by)
         VALUES ($1, 'build_log', 'github_actions', 'http://jenkins.corp/job/7/console',
                 '{\"api_token\": \"t0k3n\", \"nested\": {\"db_password\": \"pw\", \"note\": \"fine\"}, \"count\": 3}', 'ci')
         RETURNING artifact_id",
    )
    .bind(seed.other_release)
    .fetch_one(&mut *conn)
    .await
    .unwrap();

    let read = |role: &'static str, sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            tx.execute(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
                .await
                .unwrap();
            let row: (String, serde_json::Value) = sqlx::query_as(sql)
                .bind(artifact)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            row
        }
    };
    let (url, metadata) = read(
        "developer",
        "SELECT artifact_url, metadata FROM ops.v_evidence_artifacts_masked WHERE artifact_id = $1",
    )
    .await;
    assert_eq!(url, "<masked internal url>");
    assert_eq!(
        metadata,
        serde_json::json!({"api_token": "***", "nested": {"db_password": "***", "note": "fine"}, "count": 3})
    );

    let (url, metadata) = read(
        "audit_reader",
        "SELECT artifact_url, metadata FROM ops.evidence_artifacts WHERE artifact_id = $1",
    )
    .await;
    assert_eq!(url, "http://jenkins.corp/job/7/console");
    assert_eq!(metadata["api_token"], "t0k3n");

    // The raw columns are out of a developer's or QA tester's reach.
    for role in ["developer", "qa_tester"] {
        let mut tx = conn.begin().await.unwrap();
        tx.execute(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
            .await
            .unwrap();
        let raw = sqlx::query("SELECT artifact_url FROM ops.evidence_artifacts")
            .fetch_all(&mut *tx)
            .await;
        assert_eq!(sqlstate(raw), "42501", "{role}");
    }
    // Public URLs stay readable when masked.
    let public: String = sqlx::query_scalar("SELECT ops.mask_url('https://ci.example.com/run/1')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(public, "https://ci.example.com/run/1");
    for (url, masked) in [
        (
            "https://user:secret@ci.example.com/x",
            "https://***@ci.example.com/x",
        ),
        ("https://fdroid.org/app", "https://fdroid.org/app"),
        ("https://localhost.example.com/", "https://localhost.example.com/"),
        ("http://10.1.2.3:8080/metrics", "<masked internal url>"),
        ("http://localhost:9090/", "<masked internal url>"),
        ("https://vault.internal/secret", "<masked internal url>"),
        // A trailing dot names the same host.
        ("http://localhost.:8069/web", "<masked internal url>"),
        ("https://odoo.internal./x", "<masked internal url>"),
        ("http://10.0.0.1./", "<masked internal url>"),
        ("docs/runbook.md", "docs/runbook.md"),
    ] {
        let got: String = sqlx::query_scalar("SELECT ops.mask_url($1)")
            .bind(url)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(got, masked, "{url}");
    }
}

#[tokio::test]
async fn nothing_in_ops_is_granted_to_public_and_the_worker_has_no_ddl() {
    let db = TestDb::new().await;
    let public_grants: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a
                 WHERE c.relnamespace = 'ops'::regnamespace AND a.grantee = 0)
              + (SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                 WHERE p.pronamespace = 'ops'::regnamespace AND a.grantee = 0)
              + (SELECT count(*) FROM pg_namespace n, aclexplode(n.nspacl) a WHERE n.nspname = 'ops' AND a.grantee = 0)
              + (SELECT count(*) FROM pg_type t, aclexplode(coalesce(t.typacl, acldefault('T', t.typowner))) a
                 WHERE t.typnamespace = 'ops'::regnamespace AND t.typtype IN ('e', 'd') AND a.grantee = 0)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(public_grants, 0);

    let forced: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'ops'::regnamespace AND relkind = 'r'
         AND NOT (relrowsecurity AND relforcerowsecurity)",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(forced.is_empty(), "tables without forced RLS: {forced:?}");

    let mut conn = db.pool.acquire().await.unwrap();
    for ddl in [
        "CREATE TABLE ops.worker_table (x int)",
        "ALTER TABLE ops.environment_events DISABLE TRIGGER environment_events_append_only",
        "DROP TABLE ops.event_ingest_log",
    ] {
        assert_eq!(
            as_role(&mut conn, "opsgate_worker", ddl).await,
            Err("42501".into()),
            "{ddl}"
        );
    }
}

#[tokio::test]
async fn jwt_claims_count_only_behind_the_postgrest_authenticator() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    tx.execute("SET LOCAL ROLE qa_tester").await.unwrap();
    tx.execute("SELECT set_config('request.jwt.claims', '{\"sub\": \"bob\"}', true)")
        .await
        .unwrap();
    let identity: String = sqlx::query_scalar("SELECT ops.acting_identity()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        identity, "qa_tester",
        "a session cannot name itself bob by setting the claims"
    );
}

#[tokio::test]
async fn the_worker_pool_connects_as_opsgate_worker() {
    let db = TestDb::new().await;
    let settings = common::worker::settings_for(&db, &[]);
    assert_eq!(settings.worker.database_role, "opsgate_worker");
    let pool = opsgate::worker::pool(&settings).unwrap();
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(role, "opsgate_worker");
    pool.close().await;
}

/// A release manager may set an exception's post-review status directly,
/// but not for an exception they approved (separation of duties), as
/// through `exception_reviewed`.
#[tokio::test]
async fn a_release_manager_cannot_post_review_their_own_exception_directly() {
    let db = TestDb::new().await;
    let release = common::seed::release(&db.pool, "dev-1").await;
    let exception = |approver: &str| {
        let pool = db.pool.clone();
        let approver = approver.to_owned();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>(
                "INSERT INTO ops.exceptions (release_id, exception_type, impacted_gates, reason, risk_statement,
                                             approver_id, expires_at, created_by)
                 VALUES ($1, 'gate_bypass', '{G3}', 'hotfix', 'low', $2, now() + interval '1 hour', $2)
                 RETURNING exception_id",
            )
            .bind(release)
            .bind(approver)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // Under SET ROLE, the acting identity is the role's name.
    let own = exception("release_manager").await;
    let other = exception("rm-1").await;
    let mut conn = db.pool.acquire().await.unwrap();
    let review = |id: uuid::Uuid| {
        format!("UPDATE ops.exceptions SET post_review_status = 'complete' WHERE exception_id = '{id}'")
    };
    assert_eq!(
        as_role(&mut conn, "release_manager", &review(own)).await,
        Err("23514".into())
    );
    assert_eq!(as_role(&mut conn, "release_manager", &review(other)).await, Ok(1));
}
