//! The reporting views over one seeded scenario of four releases:
//!
//! - v0.9 (D): promoted long ago (34 days), then rolled back after an incident;
//! - v1.0 (A): G1..G3 passed, staged, promoted, G4 passed within the SLA;
//! - v1.1 (B): a failing build check and a QA rejection: failed;
//! - v1.2 (C): G1/G2 passed, G3 bypassed by an active exception, next to an
//!   expired and a scheduled one; not staged yet.
//!
//! Every time is relative to one clock reading (`t0`), so what the views
//! judge against the real now() is known.

mod common;

use chrono::Duration;
use common::seed::{self, Ts, at};
use common::*;
use sqlx::PgPool;
use uuid::Uuid;

const HOUR_US: i64 = 3_600_000_000;
const MINUTE_US: i64 = 60_000_000;

struct Scenario {
    t0: Ts,
    a: Uuid,
    b: Uuid,
    c: Uuid,
    d: Uuid,
    a_staging_failed: Uuid,
    a_staging: Uuid,
    a_prod: Uuid,
    d_staging: Uuid,
    d_prod: Uuid,
    d_rollback: Uuid,
    c_active: Uuid,
    c_expired: Uuid,
    c_scheduled: Uuid,
}

/// A production-targeted release created at `created_at`.
async fn release_created_at(
    pool: &PgPool,
    name: &str,
    initiator: &str,
    source_ref: &str,
    created_at: Ts,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor,
                                   created_at, created_by)
         VALUES ('acme/odoo', $1, 'production', $2, $3, $4, $3) RETURNING release_id",
    )
    .bind(name)
    .bind(source_ref)
    .bind(initiator)
    .bind(created_at)
    .fetch_one(pool)
    .await
    .expect("insert release")
}

/// Evidence linked to one gate (not only to the release).
async fn gate_evidence(pool: &PgPool, release_id: Uuid, code: &str, artifact_type: &str) {
    sqlx::query(
        "INSERT INTO ops.evidence_artifacts (gate_id, artifact_type, source_system, artifact_url, created_by)
         SELECT gate_id, $3::ops.ops_artifact_type, 'github_actions', 'https://ci.example/' || $3, 'ci'
         FROM ops.release_gates WHERE release_id = $1 AND gate_code = $2::ops.ops_gate_code",
    )
    .bind(release_id)
    .bind(code)
    .bind(artifact_type)
    .execute(pool)
    .await
    .expect("insert gate evidence");
}

async fn rollback_deployment(
    pool: &PgPool,
    release_id: Uuid,
    rollback_of: Uuid,
    source_ref: &str,
    deployed_at: Ts,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, rollback_of,
                                      deployed_at, created_by)
         VALUES ($1, 'production', 'sre-1', $2, 'succeeded', $3, $4, 'sre-1')
         RETURNING deployment_id",
    )
    .bind(release_id)
    .bind(source_ref)
    .bind(rollback_of)
    .bind(deployed_at)
    .fetch_one(pool)
    .await
    .expect("insert rollback deployment")
}

async fn incident(
    pool: &PgPool,
    deployment_id: Uuid,
    severity: &str,
    title: &str,
    detected_at: Ts,
    resolved_at: Option<Ts>,
) {
    sqlx::query(
        "INSERT INTO ops.incidents (deployment_id, release_id, severity, title, detected_at, resolved_at, created_by)
         SELECT $1, release_id, $2::ops.ops_incident_severity, $3, $4, $5, 'sre-1'
         FROM ops.deployments WHERE deployment_id = $1",
    )
    .bind(deployment_id)
    .bind(severity)
    .bind(title)
    .bind(detected_at)
    .bind(resolved_at)
    .execute(pool)
    .await
    .expect("insert incident");
}

async fn scenario(pool: &PgPool) -> Scenario {
    let t0 = seed::now();
    let h = Duration::hours;
    let m = Duration::minutes;
    let days = Duration::days;

    // D (v0.9): G1..G3 passed, staged and promoted 34 days ago; its health
    // check failed, an incident followed, and a rollback restored service.
    let d = release_created_at(pool, "v0.9", "dev-2", "sha-d", t0 - days(40)).await;
    seed::pass_g1_g2(pool, d).await;
    seed::pass_g3(pool, d).await;
    let d_staging = seed::deployment(pool, d, "staging", "succeeded", "sha-d", t0 - days(35)).await;
    let d_at = t0 - days(34);
    let d_prod = seed::deployment(pool, d, "production", "succeeded", "sha-d", d_at).await;
    seed::health_check(pool, d, d_prod, "fail", d_at + m(5)).await;
    incident(
        pool,
        d_prod,
        "sev2",
        "checkout returns 500",
        d_at + m(10),
        Some(d_at + m(55)),
    )
    .await;
    incident(pool, d_prod, "sev4", "slow reports", d_at + m(20), None).await;
    let d_rollback = rollback_deployment(pool, d, d_prod, "sha-0", d_at + m(40)).await;
    seed::health_check(pool, d, d_rollback, "pass", d_at + m(45)).await;
    sqlx::query("UPDATE ops.deployments SET status = 'rolled_back' WHERE deployment_id = $1")
        .bind(d_prod)
        .execute(pool)
        .await
        .unwrap();

    // A (v1.0): G1..G3 passed (plus a skipped check and gate-linked evidence),
    // a failed then a succeeded staging deployment, production within the SLA.
    let a = release_created_at(pool, "v1.0", "dev-1", "sha-a", t0 - h(10)).await;
    seed::pass_g1_g2(pool, a).await;
    seed::check(pool, a, "G1", "lint", "skipped", at(1)).await;
    gate_evidence(pool, a, "G1", "build_log").await;
    seed::pass_g3(pool, a).await;
    let a_staging_failed = seed::deployment(pool, a, "staging", "failed", "sha-a", t0 - h(3) - m(30)).await;
    let a_staging = seed::deployment(pool, a, "staging", "succeeded", "sha-a", t0 - h(3)).await;
    let a_prod = seed::deployment(pool, a, "production", "succeeded", "sha-a", t0 - h(2)).await;
    seed::health_check(pool, a, a_prod, "pass", t0 - h(2) + m(10)).await;

    // B (v1.1): the build check passed, then failed; QA rejected; no evidence.
    let b = release_created_at(pool, "v1.1", "dev-1", "sha-b", t0 - h(5)).await;
    seed::check(pool, b, "G1", "unit_tests", "pass", at(0)).await;
    seed::check(pool, b, "G1", "unit_tests", "fail", at(1)).await;
    seed::approval(pool, b, "G2", "qa-1", "qa_tester", "rejected", at(2)).await;

    // C (v1.2): G1/G2 passed, G3 bypassed; an expired (and reviewed) and a
    // scheduled exception next to the active one.
    let c = release_created_at(pool, "v1.2", "dev-1", "sha-c", t0 - h(4)).await;
    seed::pass_g1_g2(pool, c).await;
    let c_expired = seed::exception(pool, c, &["G3"], "rm-2", t0 - h(3), t0 - h(2)).await;
    let c_active = seed::exception(pool, c, &["G3"], "rm-2", t0 - h(1), t0 + h(1)).await;
    let c_scheduled = seed::exception(pool, c, &["G4"], "rm-3", t0 + h(2), t0 + h(3)).await;
    sqlx::query("UPDATE ops.exceptions SET post_review_status = 'complete' WHERE exception_id = $1")
        .bind(c_expired)
        .execute(pool)
        .await
        .unwrap();

    Scenario {
        t0,
        a,
        b,
        c,
        d,
        a_staging_failed,
        a_staging,
        a_prod,
        d_staging,
        d_prod,
        d_rollback,
        c_active,
        c_expired,
        c_scheduled,
    }
}

async fn release_statuses(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT release_name, status::text FROM ops.releases ORDER BY release_name")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_scenario_derives_the_expected_release_states() {
    let db = TestDb::new().await;
    let s = scenario(&db.pool).await;
    assert_eq!(
        release_statuses(&db.pool).await,
        [
            ("v0.9".into(), "rolled_back".into()),
            ("v1.0".into(), "promoted".into()),
            ("v1.1".into(), "failed".into()),
            ("v1.2".into(), "in_progress".into()),
        ]
    );
    assert_eq!(seed::gate_status(&db.pool, s.a, "G4").await, "passed");
    assert_eq!(seed::gate_status(&db.pool, s.b, "G1").await, "failed");
    assert_eq!(seed::gate_status(&db.pool, s.c, "G3").await, "bypassed");
    assert_eq!(seed::gate_status(&db.pool, s.d, "G4").await, "passed");
}

// --- v_release_gate_summary -------------------------------------------------

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct GateSummary {
    release_name: String,
    gate_code: String,
    gate_name: String,
    release_status: String,
    gate_status: String,
    exception_id: Option<Uuid>,
    checks: Vec<i64>,
    approvals: i64,
    evidence: i64,
    resolved_by: Option<String>,
    entered: bool,
    resolved: bool,
}

#[allow(clippy::too_many_arguments)]
fn summary(
    release_name: &str,
    gate_code: &str,
    release_status: &str,
    gate_status: &str,
    exception_id: Option<Uuid>,
    checks: [i64; 4],
    approvals: i64,
    evidence: i64,
    resolved_by: Option<&str>,
) -> GateSummary {
    let gate_name = match gate_code {
        "G1" => "Build Integrity",
        "G2" => "Validation Readiness",
        "G3" => "Promotion Readiness",
        _ => "Post-Deploy Operational Confirmation",
    };
    let resolved = matches!(gate_status, "passed" | "failed" | "bypassed");
    GateSummary {
        release_name: release_name.into(),
        gate_code: gate_code.into(),
        gate_name: gate_name.into(),
        release_status: release_status.into(),
        gate_status: gate_status.into(),
        exception_id,
        checks: checks.to_vec(),
        approvals,
        evidence,
        resolved_by: resolved_by.map(Into::into),
        entered: gate_status != "pending",
        resolved,
    }
}

#[tokio::test]
async fn release_gate_summary_counts_latest_checks_approvals_and_gate_evidence() {
    let db = TestDb::new().await;
    let s = scenario(&db.pool).await;
    let rows: Vec<GateSummary> = sqlx::query_as(
        "SELECT release_name, gate_code::text, gate_name, release_status::text, gate_status::text, exception_id,
                ARRAY[checks_total, checks_passed, checks_failed, checks_skipped] AS checks,
                approvals, evidence, resolved_by,
                entered_at IS NOT NULL AS entered, resolved_at IS NOT NULL AS resolved
         FROM ops.v_release_gate_summary ORDER BY release_name, gate_code",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let ci = Some("github_actions");
    #[rustfmt::skip]
    let expected = vec![
        summary("v0.9", "G1", "rolled_back", "passed", None, [1, 1, 0, 0], 0, 0, ci),
        summary("v0.9", "G2", "rolled_back", "passed", None, [0, 0, 0, 0], 1, 0, Some("qa-1")),
        summary("v0.9", "G3", "rolled_back", "passed", None, [0, 0, 0, 0], 1, 0, Some("rm-1")),
        // One latest health check per deployment: the failed original and the
        // rollback. G4 is resolved by the health check's source, not the deployer.
        summary("v0.9", "G4", "rolled_back", "passed", None, [2, 1, 1, 0], 0, 0, Some("monitoring")),
        summary("v1.0", "G1", "promoted", "passed", None, [2, 1, 0, 1], 0, 1, ci),
        summary("v1.0", "G2", "promoted", "passed", None, [0, 0, 0, 0], 1, 0, Some("qa-1")),
        summary("v1.0", "G3", "promoted", "passed", None, [0, 0, 0, 0], 1, 0, Some("rm-1")),
        summary("v1.0", "G4", "promoted", "passed", None, [1, 1, 0, 0], 0, 0, Some("monitoring")),
        // The later fail of unit_tests supersedes its earlier pass.
        summary("v1.1", "G1", "failed", "failed", None, [1, 0, 1, 0], 0, 0, ci),
        summary("v1.1", "G2", "failed", "failed", None, [0, 0, 0, 0], 1, 0, Some("qa-1")),
        summary("v1.1", "G3", "failed", "pending", None, [0, 0, 0, 0], 0, 0, None),
        summary("v1.1", "G4", "failed", "pending", None, [0, 0, 0, 0], 0, 0, None),
        summary("v1.2", "G1", "in_progress", "passed", None, [1, 1, 0, 0], 0, 0, ci),
        summary("v1.2", "G2", "in_progress", "passed", None, [0, 0, 0, 0], 1, 0, Some("qa-1")),
        summary("v1.2", "G3", "in_progress", "bypassed", Some(s.c_active), [0, 0, 0, 0], 0, 0, Some("rm-2")),
        summary("v1.2", "G4", "in_progress", "pending", None, [0, 0, 0, 0], 0, 0, None),
    ];
    assert_eq!(rows, expected);

    // The explanation is the stored one of the gate.
    let explanation: serde_json::Value = sqlx::query_scalar(
        "SELECT explanation FROM ops.v_release_gate_summary WHERE release_id = $1 AND gate_code = 'G3'",
    )
    .bind(s.c)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(explanation["status"], "bypassed");
    assert_eq!(explanation["own_status"], "pending");
    assert_eq!(explanation["exception"]["exception_id"], s.c_active.to_string());
}

// --- v_promotion_eligibility ------------------------------------------------

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Eligibility {
    release_name: String,
    source_ref: String,
    release_status: String,
    target_env: String,
    eligible: bool,
    blockers: Vec<String>,
}

fn eligibility(
    release_name: &str,
    source_ref: &str,
    release_status: &str,
    target_env: &str,
    blockers: &[&str],
) -> Eligibility {
    Eligibility {
        release_name: release_name.into(),
        source_ref: source_ref.into(),
        release_status: release_status.into(),
        target_env: target_env.into(),
        eligible: blockers.is_empty(),
        blockers: blockers.iter().map(|b| b.to_string()).collect(),
    }
}

async fn eligibility_rows(pool: &PgPool) -> Vec<Eligibility> {
    sqlx::query_as(
        "SELECT release_name, source_ref, release_status::text, target_env, eligible, blockers
         FROM ops.v_promotion_eligibility ORDER BY release_name, target_env",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn promotion_eligibility_lists_every_blocker_per_target() {
    let db = TestDb::new().await;
    let s = scenario(&db.pool).await;
    let g1_failed = "G1 Build Integrity is failed: failing checks: unit_tests";
    let g2_failed = "G2 Validation Readiness is failed: rejected by qa-1 (qa_tester); \
                     missing evidence: one of test_result, uat_summary";
    let g3_pending = "G3 Promotion Readiness is pending: G1 Build Integrity is failed; \
                      G2 Validation Readiness is failed; missing approval: release_manager; \
                      missing evidence: rollback_plan";
    let mut expected = vec![
        eligibility("v0.9", "sha-d", "rolled_back", "production", &[]),
        eligibility("v0.9", "sha-d", "rolled_back", "staging", &[]),
        eligibility("v1.0", "sha-a", "promoted", "production", &[]),
        eligibility("v1.0", "sha-a", "promoted", "staging", &[]),
        eligibility(
            "v1.1",
            "sha-b",
            "failed",
            "production",
            &[
                g1_failed,
                g2_failed,
                g3_pending,
                "no succeeded staging deployment of sha-b (linear promotion)",
            ],
        ),
        eligibility("v1.1", "sha-b", "failed", "staging", &[g1_failed, g2_failed]),
        eligibility(
            "v1.2",
            "sha-c",
            "in_progress",
            "production",
            &["no succeeded staging deployment of sha-c (linear promotion)"],
        ),
        eligibility("v1.2", "sha-c", "in_progress", "staging", &[]),
    ];
    assert_eq!(eligibility_rows(&db.pool).await, expected);

    // Once sha-c succeeded in staging, C (G3 bypassed) may go to production.
    seed::deployment(
        &db.pool,
        s.c,
        "staging",
        "succeeded",
        "sha-c",
        s.t0 - Duration::minutes(30),
    )
    .await;
    expected[6] = eligibility("v1.2", "sha-c", "in_progress", "production", &[]);
    assert_eq!(eligibility_rows(&db.pool).await, expected);

    // The view agrees with the function it is built on.
    for (release, env) in [(s.a, "production"), (s.b, "staging"), (s.c, "production")] {
        let from_view: bool = sqlx::query_scalar(
            "SELECT eligible FROM ops.v_promotion_eligibility WHERE release_id = $1 AND target_env = $2",
        )
        .bind(release)
        .bind(env)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(from_view, seed::eligible(&db.pool, release, env, None).await);
    }
}

// --- v_evidence_completeness ------------------------------------------------

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Completeness {
    release_name: String,
    gate_code: String,
    evidence_any_of: Vec<String>,
    evidence_all_of: Vec<String>,
    present_types: Vec<String>,
    gate_artifacts: i64,
    missing: Vec<String>,
    complete: bool,
}

fn completeness(
    release_name: &str,
    gate_code: &str,
    present: &[&str],
    gate_artifacts: i64,
    missing: &[&str],
) -> Completeness {
    let strings = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (any_of, all_of): (&[&str], &[&str]) = match gate_code {
        "G2" => (&["test_result", "uat_summary"], &[]),
        "G3" => (&[], &["rollback_plan"]),
        _ => (&[], &[]),
    };
    Completeness {
        release_name: release_name.into(),
        gate_code: gate_code.into(),
        evidence_any_of: strings(any_of),
        evidence_all_of: strings(all_of),
        present_types: strings(present),
        gate_artifacts,
        missing: strings(missing),
        complete: missing.is_empty(),
    }
}

#[tokio::test]
async fn evidence_completeness_names_what_is_missing_per_gate() {
    let db = TestDb::new().await;
    scenario(&db.pool).await;
    let rows: Vec<Completeness> = sqlx::query_as(
        "SELECT release_name, gate_code::text, evidence_any_of::text[], evidence_all_of::text[],
                present_types::text[], gate_artifacts, missing, complete
         FROM ops.v_evidence_completeness ORDER BY release_name, gate_code",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // Present types are release-wide, in the enum's order.
    let a: &[&str] = &["build_log", "test_result", "rollback_plan"];
    let c: &[&str] = &["test_result"];
    let d: &[&str] = &["test_result", "rollback_plan"];
    let expected = vec![
        completeness("v0.9", "G1", d, 0, &[]),
        completeness("v0.9", "G2", d, 0, &[]),
        completeness("v0.9", "G3", d, 0, &[]),
        completeness("v0.9", "G4", d, 0, &[]),
        completeness("v1.0", "G1", a, 1, &[]),
        completeness("v1.0", "G2", a, 0, &[]),
        completeness("v1.0", "G3", a, 0, &[]),
        completeness("v1.0", "G4", a, 0, &[]),
        completeness("v1.1", "G1", &[], 0, &[]),
        completeness("v1.1", "G2", &[], 0, &["one of test_result|uat_summary"]),
        completeness("v1.1", "G3", &[], 0, &["rollback_plan"]),
        completeness("v1.1", "G4", &[], 0, &[]),
        completeness("v1.2", "G1", c, 0, &[]),
        completeness("v1.2", "G2", c, 0, &[]),
        // Bypassed by an exception, but the evidence is still missing.
        completeness("v1.2", "G3", c, 0, &["rollback_plan"]),
        completeness("v1.2", "G4", c, 0, &[]),
    ];
    assert_eq!(rows, expected);
}

// --- v_exception_status -----------------------------------------------------

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct ExceptionStatus {
    exception_id: Uuid,
    release_name: String,
    exception_type: String,
    impacted_gates: Vec<String>,
    approver_id: String,
    effective_from: Ts,
    expires_at: Ts,
    expired_at: Option<Ts>,
    post_review_status: String,
    state: String,
    pending_review: bool,
    time_to_expiry_us: Option<i64>,
}

async fn exception_rows(pool: &PgPool) -> Vec<ExceptionStatus> {
    sqlx::query_as(
        "SELECT exception_id, release_name, exception_type, impacted_gates::text[], approver_id,
                effective_from, expires_at, expired_at, post_review_status::text, state, pending_review,
                (extract(epoch FROM time_to_expiry) * 1000000)::bigint AS time_to_expiry_us
         FROM ops.v_exception_status ORDER BY expires_at",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The rows with time_to_expiry checked to be `expected` (a little less, as
/// the view measures from the database's now(), read after t0) and removed.
fn without_time_to_expiry(rows: Vec<ExceptionStatus>, expected: &[Option<i64>]) -> Vec<ExceptionStatus> {
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    rows.into_iter()
        .zip(expected)
        .map(|(row, want)| {
            match (row.time_to_expiry_us, want) {
                (None, None) => {}
                (Some(got), Some(want)) => assert!(
                    got <= *want + 1_000_000 && got > *want - 2 * MINUTE_US,
                    "time_to_expiry of {} is {got} us, expected about {want} us",
                    row.exception_id
                ),
                (got, want) => panic!(
                    "time_to_expiry of {} is {got:?}, expected {want:?}",
                    row.exception_id
                ),
            }
            ExceptionStatus {
                time_to_expiry_us: None,
                ..row
            }
        })
        .collect()
}

#[tokio::test]
async fn exception_status_shows_expired_active_and_scheduled_exceptions() {
    let db = TestDb::new().await;
    let s = scenario(&db.pool).await;
    let h = Duration::hours;
    let row = |id, gates: &[&str], approver: &str, from, to, review: &str, state: &str| ExceptionStatus {
        exception_id: id,
        release_name: "v1.2".into(),
        exception_type: "gate_bypass".into(),
        impacted_gates: gates.iter().map(|g| g.to_string()).collect(),
        approver_id: approver.into(),
        effective_from: from,
        expires_at: to,
        expired_at: None,
        post_review_status: review.into(),
        state: state.into(),
        pending_review: review == "pending",
        time_to_expiry_us: None,
    };
    let t0 = s.t0;
    let mut expected = vec![
        row(
            s.c_expired,
            &["G3"],
            "rm-2",
            t0 - h(3),
            t0 - h(2),
            "complete",
            "expired",
        ),
        row(
            s.c_active,
            &["G3"],
            "rm-2",
            t0 - h(1),
            t0 + h(1),
            "pending",
            "active",
        ),
        row(
            s.c_scheduled,
            &["G4"],
            "rm-3",
            t0 + h(2),
            t0 + h(3),
            "pending",
            "scheduled",
        ),
    ];
    let ttes = [None, Some(HOUR_US), Some(3 * HOUR_US)];
    assert_eq!(
        without_time_to_expiry(exception_rows(&db.pool).await, &ttes),
        expected
    );

    // The sweep stamps the expired one; nothing else changes.
    let swept_at = t0 + Duration::minutes(1);
    let swept: i32 = sqlx::query_scalar("SELECT ops.sweep_expired_exceptions($1)")
        .bind(swept_at)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    expected[0].expired_at = Some(swept_at);
    assert_eq!(
        without_time_to_expiry(exception_rows(&db.pool).await, &ttes),
        expected
    );
    assert_eq!(seed::gate_status(&db.pool, s.c, "G3").await, "bypassed");
}

// --- v_deployment_history ---------------------------------------------------

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct History {
    deployment_id: Uuid,
    release_name: String,
    environment: String,
    source_ref: String,
    deployed_at: Ts,
    deployed_by: String,
    status: String,
    rollback_of: Option<Uuid>,
    rolled_back_by: Option<Uuid>,
    is_rollback: bool,
    g4_status: String,
    g4_resolved_at: Option<Ts>,
    g4_overdue_at: Option<Ts>,
    g4_deadline: Ts,
}

async fn history_rows(pool: &PgPool) -> Vec<History> {
    sqlx::query_as(
        "SELECT deployment_id, release_name, environment::text, source_ref, deployed_at, deployed_by,
                status::text, rollback_of, rolled_back_by, is_rollback, g4_status::text, g4_resolved_at,
                g4_overdue_at, g4_deadline
         FROM ops.v_deployment_history ORDER BY deployed_at",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn deployment_history_links_rollbacks_and_shows_g4() {
    let db = TestDb::new().await;
    let s = scenario(&db.pool).await;
    let (t0, h, m, days) = (s.t0, Duration::hours, Duration::minutes, Duration::days);
    let d_at = t0 - days(34);
    let dep = |id, name: &str, env: &str, sha: &str, at: Ts, status: &str, g4: &str| History {
        deployment_id: id,
        release_name: name.into(),
        environment: env.into(),
        source_ref: sha.into(),
        deployed_at: at,
        deployed_by: "sre-1".into(),
        status: status.into(),
        rollback_of: None,
        rolled_back_by: None,
        is_rollback: false,
        g4_status: g4.into(),
        g4_resolved_at: None,
        g4_overdue_at: None,
        // The G4 SLA: 60 minutes in staging, 30 in production.
        g4_deadline: at + if env == "staging" { h(1) } else { m(30) },
    };
    let mut expected = vec![
        // Staging only flags an overdue G4: still pending 35 days later.
        dep(
            s.d_staging,
            "v0.9",
            "staging",
            "sha-d",
            t0 - days(35),
            "succeeded",
            "pending",
        ),
        History {
            rolled_back_by: Some(s.d_rollback),
            g4_resolved_at: Some(d_at + m(5)),
            ..dep(
                s.d_prod,
                "v0.9",
                "production",
                "sha-d",
                d_at,
                "rolled_back",
                "failed",
            )
        },
        History {
            rollback_of: Some(s.d_prod),
            is_rollback: true,
            g4_resolved_at: Some(d_at + m(45)),
            ..dep(
                s.d_rollback,
                "v0.9",
                "production",
                "sha-0",
                d_at + m(40),
                "succeeded",
                "passed",
            )
        },
        dep(
            s.a_staging_failed,
            "v1.0",
            "staging",
            "sha-a",
            t0 - h(3) - m(30),
            "failed",
            "pending",
        ),
        dep(
            s.a_staging,
            "v1.0",
            "staging",
            "sha-a",
            t0 - h(3),
            "succeeded",
            "pending",
        ),
        History {
            g4_resolved_at: Some(t0 - h(2) + m(10)),
            ..dep(
                s.a_prod,
                "v1.0",
                "production",
                "sha-a",
                t0 - h(2),
                "succeeded",
                "passed",
            )
        },
    ];
    assert_eq!(history_rows(&db.pool).await, expected);

    // The overdue sweep flags the two succeeded staging deployments past their
    // deadline (not the failed one); their G4 stays pending.
    let swept_at = t0 + m(1);
    let swept: i32 = sqlx::query_scalar("SELECT ops.sweep_overdue_g4($1)")
        .bind(swept_at)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(swept, 2);
    expected[0].g4_overdue_at = Some(swept_at);
    expected[4].g4_overdue_at = Some(swept_at);
    assert_eq!(history_rows(&db.pool).await, expected);
}

// --- v_dora_metrics ---------------------------------------------------------

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Dora {
    environment: String,
    deployments_total: i64,
    deployments_last_30d: i64,
    deployments_per_day_30d: String,
    lead_time_median_us: Option<i64>,
    change_failure_rate: Option<String>,
    time_to_restore_median_us: Option<i64>,
}

#[tokio::test]
async fn dora_metrics_per_environment() {
    let db = TestDb::new().await;
    scenario(&db.pool).await;
    let rows: Vec<Dora> = sqlx::query_as(
        "SELECT environment::text, deployments_total, deployments_last_30d,
                deployments_per_day_30d::text,
                (extract(epoch FROM lead_time_median) * 1000000)::bigint AS lead_time_median_us,
                change_failure_rate::text,
                (extract(epoch FROM time_to_restore_median) * 1000000)::bigint AS time_to_restore_median_us
         FROM ops.v_dora_metrics m ORDER BY m.environment",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let day = 24 * HOUR_US;
    assert_eq!(
        rows,
        [
            // Succeeded staging deployments: D 35 days ago (5 days after it
            // was created) and A 3 hours ago (7 hours after); A's failed
            // staging deployment does not count.
            Dora {
                environment: "staging".into(),
                deployments_total: 2,
                deployments_last_30d: 1,
                deployments_per_day_30d: "0.033".into(),
                lead_time_median_us: Some((5 * day + 7 * HOUR_US) / 2),
                change_failure_rate: Some("0.000".into()),
                time_to_restore_median_us: None,
            },
            // Production: D 34 days ago (6 days after creation; an incident
            // and a rollback followed it) and A 2 hours ago (8 hours after).
            // The rollback deployment itself is not a change; the incident
            // left unresolved does not count towards time to restore.
            Dora {
                environment: "production".into(),
                deployments_total: 2,
                deployments_last_30d: 1,
                deployments_per_day_30d: "0.033".into(),
                lead_time_median_us: Some((6 * day + 8 * HOUR_US) / 2),
                change_failure_rate: Some("0.500".into()),
                time_to_restore_median_us: Some(45 * MINUTE_US),
            },
        ]
    );
}
