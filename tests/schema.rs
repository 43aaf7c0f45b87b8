//! The integrity rules of the ops schema, enforced by the database itself.

mod common;

use common::seed;

use common::*;
use sqlx::Row;

const TABLES: [&str; 13] = [
    "approvals",
    "builds",
    "change_log",
    "deployments",
    "environment_events",
    "event_ingest_log",
    "evidence_artifacts",
    "exceptions",
    "gate_checks",
    "incidents",
    "recovery_drills",
    "release_gates",
    "releases",
];

#[tokio::test]
async fn migrations_create_every_table_on_an_empty_database_and_rerun_as_a_no_op() {
    let settings = fresh_database_settings();
    let first = opsgate::database::migrate(&settings).await.expect("first run");
    assert!(first.created_database);
    assert_eq!(first.applied.len(), opsgate::database::MIGRATOR.iter().count());

    let second = opsgate::database::migrate(&settings).await.expect("second run");
    assert!(!second.created_database);
    assert!(
        second.applied.is_empty(),
        "second run applied {:?}",
        second.applied
    );

    let pool = opsgate::database::connect(&settings).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'ops' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for table in TABLES {
        assert!(
            tables.iter().any(|t| t == table),
            "ops.{table} missing from {tables:?}"
        );
    }
    pool.close().await;
    drop_database(&database_name(&settings)).await;
}

#[tokio::test]
async fn orphan_evidence_is_rejected_but_a_reference_artifact_is_accepted() {
    let db = TestDb::new().await;
    let orphan = sqlx::query(
        "INSERT INTO ops.evidence_artifacts (artifact_type, source_system, artifact_url, created_by)
         VALUES ('test_result', 'manual', 'https://ci.example/1', 'qa')",
    )
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(orphan), CHECK_VIOLATION);

    sqlx::query(
        "INSERT INTO ops.evidence_artifacts (artifact_type, source_system, artifact_url, created_by)
         VALUES ('reference', 'manual', 'https://wiki.example/runbook', 'qa')",
    )
    .execute(&db.pool)
    .await
    .expect("a reference artifact needs no link");

    // Evidence linked to a release, or to a deployment only, is fine.
    let release_id = seed::release(&db.pool, "dev-1").await;
    sqlx::query(
        "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url, created_by)
         VALUES ($1, 'test_result', 'manual', 'https://ci.example/2', 'qa')",
    )
    .bind(release_id)
    .execute(&db.pool)
    .await
    .expect("linked evidence");
    let deployment_id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, created_by)
         VALUES ($1, 'staging', 'ci', 'abc123', 'ci') RETURNING deployment_id",
    )
    .bind(release_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO ops.evidence_artifacts (deployment_id, artifact_type, source_system, artifact_url, created_by)
         VALUES ($1, 'health_check', 'monitoring', 'https://mon.example/3', 'mon')",
    )
    .bind(deployment_id)
    .execute(&db.pool)
    .await
    .expect("evidence linked to a deployment only");
}

#[tokio::test]
async fn exceptions_need_an_expiry_after_their_start() {
    let db = TestDb::new().await;
    let release_id = seed::release(&db.pool, "dev-1").await;
    let insert = |expires: Option<&'static str>| {
        sqlx::query(
            "INSERT INTO ops.exceptions (release_id, exception_type, impacted_gates, reason, risk_statement,
                                         approver_id, effective_from, expires_at, created_by)
             VALUES ($1, 'gate_bypass', '{G3}', 'hotfix', 'low', 'rm-1', '2026-01-01T00:00:00Z', $2::timestamptz, 'rm-1')",
        )
        .bind(release_id)
        .bind(expires)
        .execute(&db.pool)
    };
    assert_eq!(sqlstate(insert(None).await), NOT_NULL_VIOLATION);
    assert_eq!(
        sqlstate(insert(Some("2025-12-31T23:59:59Z")).await),
        CHECK_VIOLATION
    );
    assert_eq!(
        sqlstate(insert(Some("2026-01-01T00:00:00Z")).await),
        CHECK_VIOLATION
    );
    insert(Some("2026-01-01T00:00:01Z"))
        .await
        .expect("a forward window is accepted");
}

#[tokio::test]
async fn environment_events_are_append_only() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO ops.environment_events (environment, event_type, source_system, idempotency_key, created_by)
         VALUES ('production', 'alert_fired', 'monitoring', 'mon/1', 'mon')",
    )
    .execute(&db.pool)
    .await
    .expect("insert is allowed");

    let update = sqlx::query("UPDATE ops.environment_events SET event_type = 'edited'")
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(update), RESTRICT_VIOLATION);
    let delete = sqlx::query("DELETE FROM ops.environment_events")
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(delete), RESTRICT_VIOLATION);
    let truncate = sqlx::query("TRUNCATE ops.environment_events")
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(truncate), RESTRICT_VIOLATION);

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.environment_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

const HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

async fn ledger_row(
    db: &TestDb,
    key: &str,
    status: &str,
) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    sqlx::query(
        "INSERT INTO ops.event_ingest_log (source_system, event_type, idempotency_key, schema_version,
                                           payload_hash, processing_status, response_code, error_detail, result, created_by)
         VALUES ('github_actions', 'build_complete', $1, 'v1.0', $2, $3::ops.ops_processing_status,
                 CASE WHEN $3 IN ('accepted', 'duplicate') THEN 200 ELSE 400 END,
                 CASE WHEN $3 IN ('accepted', 'duplicate') THEN NULL ELSE 'bad' END, '{}', 'worker')",
    )
    .bind(key)
    .bind(HASH)
    .bind(status)
    .execute(&db.pool)
    .await
}

#[tokio::test]
async fn the_ledger_holds_one_accepted_row_per_key_and_any_number_of_other_attempts() {
    let db = TestDb::new().await;
    ledger_row(&db, "ci/1/build_complete/a", "accepted")
        .await
        .expect("first accepted");
    assert_eq!(
        sqlstate(ledger_row(&db, "ci/1/build_complete/a", "accepted").await),
        UNIQUE_VIOLATION
    );
    for status in ["duplicate", "duplicate", "rejected", "error"] {
        ledger_row(&db, "ci/1/build_complete/a", status)
            .await
            .unwrap_or_else(|e| panic!("{status} row for an accepted key: {e}"));
    }
    ledger_row(&db, "ci/1/build_complete/b", "accepted")
        .await
        .expect("another key");

    // Rows written by an earlier transaction cannot be rewritten or removed.
    let rewrite = sqlx::query("UPDATE ops.event_ingest_log SET result = '{\"forged\": true}'")
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(rewrite), RESTRICT_VIOLATION);
    let delete = sqlx::query("DELETE FROM ops.event_ingest_log")
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(delete), RESTRICT_VIOLATION);
}

#[tokio::test]
async fn gate_codes_are_a_closed_set_and_one_row_per_gate_and_release() {
    let db = TestDb::new().await;
    let release_id = seed::release(&db.pool, "dev-1").await;
    let g5 = sqlx::query(
        "INSERT INTO ops.release_gates (release_id, gate_code, created_by) VALUES ($1, 'G5', 'test')",
    )
    .bind(release_id)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(g5), INVALID_TEXT_REPRESENTATION);

    seed::gate(&db.pool, release_id, "G2").await;
    let second_g2 = sqlx::query(
        "INSERT INTO ops.release_gates (release_id, gate_code, created_by) VALUES ($1, 'G2', 'test')",
    )
    .bind(release_id)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(second_g2), UNIQUE_VIOLATION);
}

#[tokio::test]
async fn gate_name_is_derived_from_gate_code() {
    let db = TestDb::new().await;
    let release_id = seed::release(&db.pool, "dev-1").await;
    let gate_id = seed::gate(&db.pool, release_id, "G3").await;
    let name: String = sqlx::query_scalar("SELECT gate_name FROM ops.release_gates WHERE gate_id = $1")
        .bind(gate_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(name, "Promotion Readiness");

    let free_text = sqlx::query("UPDATE ops.release_gates SET gate_name = 'Whatever' WHERE gate_id = $1")
        .bind(gate_id)
        .execute(&db.pool)
        .await;
    assert!(free_text.is_err(), "gate_name must not be writable");
}

#[tokio::test]
async fn a_rollback_points_at_a_deployment_of_its_own_release() {
    let db = TestDb::new().await;
    let mine = seed::release(&db.pool, "dev-1").await;
    let other = seed::release(&db.pool, "dev-1").await;
    let target = seed::deployment(&db.pool, mine, "production", "succeeded", "abc", seed::at(0)).await;
    let rollback = |release_id: uuid::Uuid| {
        sqlx::query(
            "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, rollback_of, created_by)
             VALUES ($1, 'production', 'sre-1', 'previous', 'succeeded', $2, 'sre-1')",
        )
        .bind(release_id)
        .bind(target)
        .execute(&db.pool)
    };
    assert_eq!(sqlstate(rollback(other).await), FOREIGN_KEY_VIOLATION);
    rollback(mine)
        .await
        .expect("a rollback of the release's own deployment");
    let status: String = sqlx::query_scalar("SELECT status::text FROM ops.releases WHERE release_id = $1")
        .bind(mine)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, "rolled_back");
}

#[tokio::test]
async fn blank_means_any_whitespace_and_identities_are_trimmed() {
    let db = TestDb::new().await;
    let release = |project: &str, initiator: &str| {
        sqlx::query(
            "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor)
             VALUES ($1, 'v1', 'production', 'abc', $2)",
        )
        .bind(project.to_owned())
        .bind(initiator.to_owned())
        .execute(&db.pool)
    };
    assert_eq!(sqlstate(release("\t\n", "dev-1").await), CHECK_VIOLATION);
    assert_eq!(sqlstate(release("acme/odoo", "dev-1 ").await), CHECK_VIOLATION);
    release("acme/odoo", "dev-1").await.expect("a plain release");

    let r = seed::release(&db.pool, "alice").await;
    let g3 = seed::gate(&db.pool, r, "G3").await;
    let approval = sqlx::query(
        "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope)
         VALUES ($1, $2, ' alice', 'release_manager', 'approved', 'gate')",
    )
    .bind(r)
    .bind(g3)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(approval), CHECK_VIOLATION);
    let check = sqlx::query(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status) VALUES ($1, E'\t', 'ci', 'pass')",
    )
    .bind(g3)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(check), CHECK_VIOLATION);
}

#[tokio::test]
async fn gate_policies_cannot_require_each_other_in_a_cycle() {
    let db = TestDb::new().await;
    let cycle = sqlx::query(
        "UPDATE ops.gate_policies SET requires_gates = '{G3}'
         WHERE gate_code = 'G1' AND environment = 'production'",
    )
    .execute(&db.pool)
    .await;
    // G3 requires G1 and G2 by default: G1 -> G3 -> G1.
    let error = cycle.expect_err("a cycle");
    assert!(
        error
            .to_string()
            .contains("gate policies of production require each other in a cycle"),
        "{error}"
    );
    // A requirement without a cycle is fine.
    sqlx::query("UPDATE ops.gate_policies SET requires_gates = '{G1}' WHERE gate_code = 'G2' AND environment = 'production'")
        .execute(&db.pool)
        .await
        .expect("G2 requiring G1");
}

#[tokio::test]
async fn sha256_columns_hold_64_hex_characters_or_null() {
    let db = TestDb::new().await;
    let release_id = seed::release(&db.pool, "dev-1").await;
    let insert = |sha: Option<String>| {
        sqlx::query(
            "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url, sha256, created_by)
             VALUES ($1, 'build_log', 'github_actions', 'https://ci.example/log', $2, 'ci')",
        )
        .bind(release_id)
        .bind(sha)
        .execute(&db.pool)
    };
    for bad in ["abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65)] {
        assert_eq!(
            sqlstate(insert(Some(bad.to_owned())).await),
            CHECK_VIOLATION,
            "{bad}"
        );
    }
    insert(Some("ab".repeat(32))).await.expect("64 hex characters");
    insert(None).await.expect("NULL");

    let bad_ledger_hash = sqlx::query(
        "INSERT INTO ops.event_ingest_log (payload_hash, processing_status, response_code, error_detail, created_by)
         VALUES ('nothex', 'rejected', 400, 'bad', 'worker')",
    )
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(bad_ledger_hash), CHECK_VIOLATION);
}

#[tokio::test]
async fn deployments_roll_back_existing_deployments_only() {
    let db = TestDb::new().await;
    let release_id = seed::release(&db.pool, "dev-1").await;
    let dangling = sqlx::query(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, rollback_of, created_by)
         VALUES ($1, 'production', 'sre-1', 'abc123', gen_random_uuid(), 'sre-1')",
    )
    .bind(release_id)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(dangling), FOREIGN_KEY_VIOLATION);

    let first: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, created_by)
         VALUES ($1, 'production', 'sre-1', 'abc123', 'sre-1') RETURNING deployment_id",
    )
    .bind(release_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let rollback = || {
        sqlx::query(
            "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, rollback_of, created_by)
             VALUES ($1, 'production', 'sre-1', 'prev999', $2, 'sre-1')",
        )
        .bind(release_id)
        .bind(first)
        .execute(&db.pool)
    };
    // Only a deployment that went live can be undone: a rollback is exempt
    // from the production guard, so naming an unfinished or failed one would
    // let any deployment call itself a rollback.
    assert_eq!(
        sqlstate(rollback().await),
        CHECK_VIOLATION,
        "rollback of an in_progress deployment"
    );
    let set_status = |status: &'static str| {
        sqlx::query(
            "UPDATE ops.deployments SET status = $2::ops.ops_deployment_status WHERE deployment_id = $1",
        )
        .bind(first)
        .bind(status)
        .execute(&db.pool)
    };
    set_status("failed").await.unwrap();
    assert_eq!(
        sqlstate(rollback().await),
        CHECK_VIOLATION,
        "rollback of a failed deployment"
    );

    let second: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, created_by)
         VALUES ($1, 'production', 'sre-1', 'abc123', 'succeeded', 'sre-1') RETURNING deployment_id",
    )
    .bind(release_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, rollback_of, created_by)
         VALUES ($1, 'production', 'sre-1', 'prev999', $2, 'sre-1')",
    )
    .bind(release_id)
    .bind(second)
    .execute(&db.pool)
    .await
    .expect("a rollback of a deployment that succeeded");
}

#[tokio::test]
async fn every_governance_table_records_provenance() {
    let db = TestDb::new().await;
    let rows = sqlx::query(
        "SELECT c.table_name::text AS table_name,
                bool_or(c.column_name = 'created_at' AND c.column_default LIKE 'now()%') AS has_created_at,
                bool_or(c.column_name = 'created_by' AND c.is_nullable = 'NO') AS has_created_by
         FROM information_schema.columns c
         JOIN information_schema.tables t USING (table_schema, table_name)
         WHERE c.table_schema = 'ops' AND t.table_type = 'BASE TABLE'
         GROUP BY c.table_name",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for row in rows {
        let table: String = row.get("table_name");
        if table == "event_ingest_log" {
            // The ledger's time column is the PRD's received_at.
            assert!(row.get::<bool, _>("has_created_by"), "{table}.created_by");
            continue;
        }
        if table == "change_log" {
            // Provenance itself: each entry's changed_at and changed_by.
            continue;
        }
        if table == "pending_derivations" {
            // Bookkeeping of one transaction, empty outside it (migration 0016).
            continue;
        }
        assert!(row.get::<bool, _>("has_created_at"), "{table}.created_at");
        assert!(row.get::<bool, _>("has_created_by"), "{table}.created_by");
    }

    let nameless = sqlx::query(
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor, created_by)
         VALUES ('acme/odoo', 'v1', 'production', 'abc', 'dev-1', NULL)",
    )
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(nameless), NOT_NULL_VIOLATION);
}

// --- Change provenance (NR-7, migration 0015) ----------------------------------

/// Every in-place change of a governance row is recorded: which columns from
/// what to what, when, by whom, in which transaction. A gate's status change
/// carries the explanation that says why.
#[tokio::test]
async fn changes_in_place_are_recorded_with_who_when_and_why() {
    let db = TestDb::new().await;
    let release = seed::release(&db.pool, "dev-1").await;
    let check_xact: String = {
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, observed_at, created_by)
             SELECT gate_id, 'unit_tests', 'github_actions', 'pass', $2, 'ci'
             FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G1'",
        )
        .bind(release)
        .bind(seed::at(1))
        .execute(&mut *tx)
        .await
        .unwrap();
        let xact: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        xact
    };
    let g1: (serde_json::Value, String, String) = sqlx::query_as(
        "SELECT l.changes, l.changed_by, l.transaction_id::text
         FROM ops.change_log l JOIN ops.release_gates g ON g.gate_id::text = l.row_key
         WHERE l.table_name = 'release_gates' AND l.release_id = $1 AND g.gate_code = 'G1'",
    )
    .bind(release)
    .fetch_one(&db.pool)
    .await
    .expect("G1's change from pending to passed is recorded");
    assert_eq!(
        g1.0["status"],
        serde_json::json!({"from": "pending", "to": "passed"})
    );
    assert!(g1.0["explanation"]["to"]["requirements"].is_array(), "{}", g1.0);
    assert_eq!(g1.2, check_xact, "the transaction that wrote the fact");
    assert!(!g1.1.is_empty());

    // A release manager's direct write names the release manager.
    sqlx::query("UPDATE ops.gate_policies SET min_passing_checks = 2 WHERE gate_code = 'G1' AND environment = 'production'")
        .execute(&db.pool)
        .await
        .unwrap();
    let policy: serde_json::Value = sqlx::query_scalar(
        "SELECT changes FROM ops.change_log WHERE table_name = 'gate_policies' AND row_key = 'G1/production'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the policy change is recorded");
    assert_eq!(
        policy["min_passing_checks"],
        serde_json::json!({"from": 1, "to": 2})
    );

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE release_manager")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE ops.release_gates SET status = 'failed' WHERE release_id = $1 AND gate_code = 'G2'")
        .bind(release)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let by: String = sqlx::query_scalar(
        "SELECT l.changed_by FROM ops.change_log l JOIN ops.release_gates g ON g.gate_id::text = l.row_key
         WHERE g.release_id = $1 AND g.gate_code = 'G2' ORDER BY l.change_id DESC LIMIT 1",
    )
    .bind(release)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(by, "release_manager");

    // A deployment's move, and the G4 state derived from it.
    let deployment = seed::deployment(
        &db.pool,
        release,
        "production",
        "in_progress",
        "abc123",
        seed::at(0),
    )
    .await;
    sqlx::query("UPDATE ops.deployments SET status = 'succeeded' WHERE deployment_id = $1")
        .bind(deployment)
        .execute(&db.pool)
        .await
        .unwrap();
    let moves: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT changes FROM ops.change_log WHERE table_name = 'deployments' AND row_key = $1::text ORDER BY change_id",
    )
    .bind(deployment)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        moves[0]["status"],
        serde_json::json!({"from": "in_progress", "to": "succeeded"})
    );
    assert!(
        moves.iter().any(|m| m["g4_status"]["to"] == "failed"),
        "deployed long ago with no health check: G4 failed, recorded: {moves:?}"
    );
}

/// Nobody rewrites history, the owner included.
#[tokio::test]
async fn the_change_log_is_append_only() {
    let db = TestDb::new().await;
    let release = seed::release(&db.pool, "dev-1").await;
    seed::check(&db.pool, release, "G1", "unit_tests", "pass", seed::at(1)).await;
    let rewrite = sqlx::query("UPDATE ops.change_log SET changed_by = 'someone else'")
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(rewrite), "23001");
    let erase = sqlx::query("DELETE FROM ops.change_log").execute(&db.pool).await;
    assert_eq!(sqlstate(erase), "23001");
    let wipe = sqlx::query("TRUNCATE ops.change_log").execute(&db.pool).await;
    assert_eq!(sqlstate(wipe), "23001");
    // Only the recording triggers write entries, the owner's hand included.
    let forged = sqlx::query(
        "INSERT INTO ops.change_log (table_name, row_key, changes, changed_by)
         VALUES ('releases', 'forged', '{}', 'someone')",
    )
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(forged), "23001");
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.change_log WHERE login = session_user")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(entries > 0, "each entry names the login that wrote it");
}
