//! Rows for tests, written with plain SQL the way a person with a role would.
#![allow(dead_code)]

use sqlx::PgPool;
use uuid::Uuid;

pub async fn release(pool: &PgPool, initiator: &str) -> Uuid {
    let name = format!("v{}", Uuid::new_v4().simple());
    release_named(pool, "acme/odoo", &name, initiator, "abc123").await
}

pub async fn release_named(
    pool: &PgPool,
    project: &str,
    name: &str,
    initiator: &str,
    source_ref: &str,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor, created_by)
         VALUES ($1, $2, 'production', $3, $4, $4) RETURNING release_id",
    )
    .bind(project)
    .bind(name)
    .bind(source_ref)
    .bind(initiator)
    .fetch_one(pool)
    .await
    .expect("insert release")
}

/// The gate row of `code` for `release`, created when missing.
pub async fn gate(pool: &PgPool, release_id: Uuid, code: &str) -> Uuid {
    sqlx::query(
        "INSERT INTO ops.release_gates (release_id, gate_code, created_by)
         VALUES ($1, $2::ops.ops_gate_code, 'test') ON CONFLICT (release_id, gate_code) DO NOTHING",
    )
    .bind(release_id)
    .bind(code)
    .execute(pool)
    .await
    .expect("insert gate");
    sqlx::query_scalar(
        "SELECT gate_id FROM ops.release_gates WHERE release_id = $1 AND gate_code = $2::ops.ops_gate_code",
    )
    .bind(release_id)
    .bind(code)
    .fetch_one(pool)
    .await
    .expect("select gate")
}

pub type Ts = chrono::DateTime<chrono::Utc>;

/// Now, at the database's precision (microseconds).
pub fn now() -> Ts {
    use chrono::DurationRound;
    chrono::Utc::now()
        .duration_trunc(chrono::Duration::microseconds(1))
        .unwrap()
}

pub fn at(minutes: i64) -> Ts {
    chrono::DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
        .unwrap()
        .to_utc()
        + chrono::Duration::minutes(minutes)
}

/// A check of the release's gate `code`, written through `executor` (the
/// pool, or a connection inside a transaction).
pub async fn check(
    executor: impl sqlx::PgExecutor<'_>,
    release_id: Uuid,
    code: &str,
    name: &str,
    status: &str,
    observed_at: Ts,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, observed_at, created_by)
         SELECT gate_id, $3, 'github_actions', $4::ops.ops_check_status, $5, 'ci'
         FROM ops.release_gates WHERE release_id = $1 AND gate_code = $2::ops.ops_gate_code
         RETURNING check_id",
    )
    .bind(release_id)
    .bind(code)
    .bind(name)
    .bind(status)
    .bind(observed_at)
    .fetch_one(executor)
    .await
    .expect("insert check")
}

pub async fn approval(
    pool: &PgPool,
    release_id: Uuid,
    code: &str,
    approver: &str,
    role: &str,
    decision: &str,
    decided_at: Ts,
) {
    sqlx::query(
        "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope, decided_at, created_by)
         SELECT $1, gate_id, $3, $4::ops.ops_persona_role, $5::ops.ops_decision_type, 'gate', $6, $3
         FROM ops.release_gates WHERE release_id = $1 AND gate_code = $2::ops.ops_gate_code",
    )
    .bind(release_id)
    .bind(code)
    .bind(approver)
    .bind(role)
    .bind(decision)
    .bind(decided_at)
    .execute(pool)
    .await
    .expect("insert approval");
}

pub async fn evidence(pool: &PgPool, release_id: Uuid, artifact_type: &str) {
    sqlx::query(
        "INSERT INTO ops.evidence_artifacts (release_id, artifact_type, source_system, artifact_url, created_by)
         VALUES ($1, $2::ops.ops_artifact_type, 'manual', 'https://evidence.example/' || $2, 'someone')",
    )
    .bind(release_id)
    .bind(artifact_type)
    .execute(pool)
    .await
    .expect("insert evidence");
}

pub async fn exception(
    conn: impl sqlx::PgExecutor<'_>,
    release_id: Uuid,
    gates: &[&str],
    approver: &str,
    from: Ts,
    expires: Ts,
) -> Uuid {
    let gates: Vec<String> = gates.iter().map(|g| g.to_string()).collect();
    sqlx::query_scalar(
        "INSERT INTO ops.exceptions (release_id, exception_type, impacted_gates, reason, risk_statement,
                                     approver_id, effective_from, expires_at, created_by)
         VALUES ($1, 'gate_bypass', $2::text[]::ops.ops_gate_code[], 'hotfix', 'rollback ready', $3, $4, $5, $3)
         RETURNING exception_id",
    )
    .bind(release_id)
    .bind(gates)
    .bind(approver)
    .bind(from)
    .bind(expires)
    .fetch_one(conn)
    .await
    .expect("insert exception")
}

pub async fn deployment(
    conn: impl sqlx::PgExecutor<'_>,
    release_id: Uuid,
    env: &str,
    status: &str,
    source_ref: &str,
    deployed_at: Ts,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, deployed_at, created_by)
         VALUES ($1, $2::ops.ops_environment, 'sre-1', $3, $4::ops.ops_deployment_status, $5, 'sre-1')
         RETURNING deployment_id",
    )
    .bind(release_id)
    .bind(env)
    .bind(source_ref)
    .bind(status)
    .bind(deployed_at)
    .fetch_one(conn)
    .await
    .expect("insert deployment")
}

pub async fn health_check(
    pool: &PgPool,
    release_id: Uuid,
    deployment_id: Uuid,
    status: &str,
    observed_at: Ts,
) {
    sqlx::query(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, deployment_id, observed_at, created_by)
         SELECT gate_id, 'http_health', 'monitoring', $3::ops.ops_check_status, $2, $4, 'monitoring'
         FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G4'",
    )
    .bind(release_id)
    .bind(deployment_id)
    .bind(status)
    .bind(observed_at)
    .execute(pool)
    .await
    .expect("insert health check");
}

/// Gate code -> status, in gate order.
pub async fn gate_statuses(pool: &PgPool, release_id: Uuid) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT gate_code::text, status::text FROM ops.release_gates WHERE release_id = $1 ORDER BY gate_code",
    )
    .bind(release_id)
    .fetch_all(pool)
    .await
    .expect("gate statuses")
}

pub async fn gate_status(pool: &PgPool, release_id: Uuid, code: &str) -> String {
    sqlx::query_scalar(
        "SELECT status::text FROM ops.release_gates WHERE release_id = $1 AND gate_code = $2::ops.ops_gate_code",
    )
    .bind(release_id)
    .bind(code)
    .fetch_one(pool)
    .await
    .expect("gate status")
}

pub async fn eligible(pool: &PgPool, release_id: Uuid, env: &str, now: Option<Ts>) -> bool {
    sqlx::query_scalar("SELECT ops.is_eligible_for_promotion($1, $2, coalesce($3, now()))")
        .bind(release_id)
        .bind(env)
        .bind(now)
        .fetch_one(pool)
        .await
        .expect("eligibility")
}

pub async fn blockers(pool: &PgPool, release_id: Uuid, env: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT ops.promotion_blockers($1, $2)")
        .bind(release_id)
        .bind(env)
        .fetch_all(pool)
        .await
        .expect("blockers")
}

/// G1 and G2 passed: a passing build check, a QA approval and test evidence.
pub async fn pass_g1_g2(pool: &PgPool, release_id: Uuid) {
    check(pool, release_id, "G1", "unit_tests", "pass", at(1)).await;
    approval(pool, release_id, "G2", "qa-1", "qa_tester", "approved", at(2)).await;
    evidence(pool, release_id, "test_result").await;
}

/// G3 passed by a release manager who is neither initiator nor QA approver.
pub async fn pass_g3(pool: &PgPool, release_id: Uuid) {
    approval(
        pool,
        release_id,
        "G3",
        "rm-1",
        "release_manager",
        "approved",
        at(3),
    )
    .await;
    evidence(pool, release_id, "rollback_plan").await;
}

/// Puts the transaction in the worker's mode: its facts are derived once per
/// release, by `ops.derive_pending()` or at commit (migrations 0016, 0017).
pub async fn derive_at_end(executor: impl sqlx::PgExecutor<'_>) {
    sqlx::query("SELECT set_config('opsgate.derive_at_end', 'on', true)")
        .execute(executor)
        .await
        .expect("derive at the end of the transaction");
}
