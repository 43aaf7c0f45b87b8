//! Gate logic in the database: derived gate state, eligibility, separation of
//! duties, the hard rule on G3, and sweeps with a controlled clock.

mod common;

use chrono::{Duration, Utc};
use common::seed::{self, at};
use common::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use uuid::Uuid;

const SHA: &str = "abc123";

async fn release(db: &TestDb) -> Uuid {
    seed::release(&db.pool, "dev-1").await
}

async fn staging_deploy(db: &TestDb, release_id: Uuid) {
    seed::deployment(&db.pool, release_id, "staging", "succeeded", SHA, at(10)).await;
}

// --- The four T4 cases ------------------------------------------------------

#[tokio::test]
async fn all_gates_passed_is_eligible_for_staging_and_production() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    seed::pass_g3(&db.pool, r).await;
    assert!(seed::eligible(&db.pool, r, "staging", None).await);
    // Production also needs the same source_ref to have succeeded in staging.
    assert!(!seed::eligible(&db.pool, r, "production", None).await);
    assert_eq!(
        seed::blockers(&db.pool, r, "production").await,
        vec![format!(
            "no succeeded staging deployment of {SHA} (linear promotion)"
        )]
    );
    staging_deploy(&db, r).await;
    assert!(seed::eligible(&db.pool, r, "production", None).await);
    assert_eq!(
        seed::gate_statuses(&db.pool, r).await[..3],
        [
            ("G1".into(), "passed".into()),
            ("G2".into(), "passed".into()),
            ("G3".into(), "passed".into())
        ]
    );
}

#[tokio::test]
async fn g2_failed_is_not_eligible_for_staging_or_production() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    seed::pass_g3(&db.pool, r).await;
    staging_deploy(&db, r).await;
    // A later rejection from the same role overrides the approval.
    seed::approval(&db.pool, r, "G2", "qa-2", "qa_tester", "rejected", at(5)).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G2").await, "failed");
    assert!(!seed::eligible(&db.pool, r, "staging", None).await);
    assert!(!seed::eligible(&db.pool, r, "production", None).await);
    let blockers = seed::blockers(&db.pool, r, "staging").await;
    assert_eq!(blockers.len(), 1, "{blockers:?}");
    assert!(
        blockers[0].contains("G2 Validation Readiness is failed: rejected by qa-2"),
        "{blockers:?}"
    );
}

#[tokio::test]
async fn g3_bypassed_by_an_active_exception_is_eligible_and_not_once_it_expired() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    staging_deploy(&db, r).await;
    assert!(!seed::eligible(&db.pool, r, "production", None).await);

    let now = Utc::now();
    let expires = now + Duration::hours(1);
    let exception = seed::exception(&db.pool, r, &["G3"], "rm-1", now - Duration::hours(1), expires).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");
    let bypass: Option<Uuid> = sqlx::query_scalar(
        "SELECT exception_id FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G3'",
    )
    .bind(r)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(bypass, Some(exception));
    assert!(seed::eligible(&db.pool, r, "production", None).await);

    // The same exception, expired: not eligible, with or without the sweep.
    let after = expires + Duration::seconds(1);
    assert!(!seed::eligible(&db.pool, r, "production", Some(after)).await);
    sqlx::query("SELECT ops.sweep_expired_exceptions($1)")
        .bind(after)
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(!seed::eligible(&db.pool, r, "production", None).await);
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "pending");
}

/// Eligibility trusts a stored `passed` only while a policy change would
/// re-derive it: a promoted release keeps its gates as decided, so a new
/// promotion of it is judged by evaluating them under the policy of now.
#[tokio::test]
async fn a_promoted_release_is_judged_by_the_policy_of_now_for_another_promotion() {
    let db = TestDb::new().await;
    let promoted = release(&db).await;
    let current = release(&db).await;
    for r in [promoted, current] {
        seed::pass_g1_g2(&db.pool, r).await;
        seed::pass_g3(&db.pool, r).await;
        staging_deploy(&db, r).await;
        assert!(seed::eligible(&db.pool, r, "production", None).await);
    }
    seed::deployment(&db.pool, promoted, "production", "succeeded", SHA, at(20)).await;

    sqlx::query(
        "UPDATE ops.gate_policies SET evidence_all_of = evidence_all_of || 'uat_summary'::ops.ops_artifact_type
         WHERE gate_code = 'G3' AND environment = 'production'",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    // Stored as decided, but not eligible again under the new policy.
    assert_eq!(seed::gate_status(&db.pool, promoted, "G3").await, "passed");
    // Re-derived by the policy change.
    assert_eq!(seed::gate_status(&db.pool, current, "G3").await, "in_progress");
    for r in [promoted, current] {
        let blockers = seed::blockers(&db.pool, r, "production").await;
        assert_eq!(blockers.len(), 1, "{blockers:?}");
        assert!(
            blockers[0].contains("missing evidence: uat_summary"),
            "{blockers:?}"
        );
    }
}

/// A deployment's facts re-derive the G4 of the deployments they name; a
/// deleted one is named too, and has nothing left to derive.
#[tokio::test]
async fn deleting_a_deployment_re_derives_the_release_without_it() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let staging = seed::deployment(&db.pool, r, "staging", "succeeded", SHA, at(10)).await;
    let production = seed::deployment(&db.pool, r, "production", "succeeded", SHA, at(20)).await;
    seed::health_check(&db.pool, r, production, "pass", at(21)).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G4").await, "passed");

    sqlx::query("DELETE FROM ops.deployments WHERE deployment_id = $1")
        .bind(staging)
        .execute(&db.pool)
        .await
        .expect("delete a deployment nothing refers to");
    let g4: String =
        sqlx::query_scalar("SELECT g4_status::text FROM ops.deployments WHERE deployment_id = $1")
            .bind(production)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(g4, "passed");
    assert_eq!(seed::gate_status(&db.pool, r, "G4").await, "passed");
}

/// Evidence attached to a gate is a fact of that gate even when its policy
/// asks for no evidence of that type: the gate is re-derived, and leaves
/// pending; and evidence a policy asks for re-derives the gates that ask.
#[tokio::test]
async fn evidence_re_derives_the_gate_it_is_attached_to_and_the_gates_that_ask_for_it() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    sqlx::query(
        "INSERT INTO ops.evidence_artifacts (release_id, gate_id, artifact_type, source_system, artifact_url, created_by)
         SELECT $1, gate_id, 'build_log', 'ci', 'https://ci.example/build/1', 'ci-bot'
         FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G1'",
    )
    .bind(r)
    .execute(&db.pool)
    .await
    .expect("attach a build log to G1");
    let statuses = seed::gate_statuses(&db.pool, r).await;
    assert_eq!(statuses[0], ("G1".into(), "in_progress".into()), "{statuses:?}");
    assert_eq!(statuses[1], ("G2".into(), "pending".into()), "{statuses:?}");

    // Not attached to a gate: G2's policy asks for one of these, so G2's
    // explanation now counts it (G2 stays pending until a fact of its own).
    let g2_evidence = || {
        sqlx::query_scalar::<_, bool>(
            "SELECT (req ->> 'met')::boolean
             FROM ops.release_gates, jsonb_array_elements(explanation -> 'requirements') req
             WHERE release_id = $1 AND gate_code = 'G2' AND req ->> 'requirement' = 'evidence:any'",
        )
        .bind(r)
        .fetch_optional(&db.pool)
    };
    assert_ne!(g2_evidence().await.unwrap(), Some(true));
    seed::evidence(&db.pool, r, "test_result").await;
    assert_eq!(g2_evidence().await.unwrap(), Some(true));
}

// --- Order independence -----------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Fact {
    Check(&'static str, &'static str, &'static str, i64),
    Approval(&'static str, &'static str, &'static str, &'static str, i64),
    Evidence(&'static str),
}

async fn insert(db: &TestDb, r: Uuid, fact: Fact) {
    match fact {
        Fact::Check(gate, name, status, t) => {
            seed::check(&db.pool, r, gate, name, status, at(t)).await;
        }
        Fact::Approval(gate, who, role, decision, t) => {
            seed::approval(&db.pool, r, gate, who, role, decision, at(t)).await;
        }
        Fact::Evidence(kind) => seed::evidence(&db.pool, r, kind).await,
    }
}

/// Gate statuses and explanations of a release, for comparison.
async fn derived(db: &TestDb, r: Uuid) -> Vec<(String, String, serde_json::Value)> {
    sqlx::query_as(
        "SELECT gate_code::text, status::text, explanation - 'exception' FROM ops.release_gates
         WHERE release_id = $1 ORDER BY gate_code",
    )
    .bind(r)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn converges(facts: &[Fact], orders: usize, seed: u64) -> Vec<(String, String, serde_json::Value)> {
    let db = TestDb::new().await;
    let reference = release(&db).await;
    for fact in facts {
        insert(&db, reference, *fact).await;
    }
    let expected = derived(&db, reference).await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..orders {
        let mut shuffled = facts.to_vec();
        shuffled.shuffle(&mut rng);
        let r = release(&db).await;
        for fact in &shuffled {
            insert(&db, r, *fact).await;
        }
        assert_eq!(
            derived(&db, r).await,
            expected,
            "seed {seed}, round {round}, order {shuffled:?}"
        );
    }
    expected
}

fn seed_from_env() -> u64 {
    std::env::var("OPSGATE_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_micros() as u64)
}

#[tokio::test]
async fn the_same_facts_in_any_order_give_the_same_gate_statuses() {
    let facts = [
        // A fail, then a pass of the same check: the later observation wins.
        Fact::Check("G1", "unit_tests", "fail", 1),
        Fact::Check("G1", "unit_tests", "pass", 2),
        Fact::Check("G1", "lint", "warning", 3),
        Fact::Check("G1", "docs", "skipped", 4),
        // The approval may arrive before the evidence it needs.
        Fact::Approval("G2", "qa-1", "qa_tester", "approved", 5),
        Fact::Evidence("uat_summary"),
        Fact::Approval("G3", "rm-1", "release_manager", "request_changes", 6),
        Fact::Approval("G3", "rm-2", "release_manager", "approved", 7),
        // Ignored for separation of duties, whatever its position.
        Fact::Approval("G3", "dev-1", "release_manager", "approved", 8),
        Fact::Evidence("rollback_plan"),
    ];
    let seed = seed_from_env();
    let expected = converges(&facts, 12, seed).await;
    let statuses: Vec<&str> = expected.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["passed", "passed", "passed", "pending"]);
}

#[tokio::test]
async fn a_later_fail_or_rejection_wins_in_any_order() {
    let facts = [
        Fact::Check("G1", "unit_tests", "pass", 1),
        Fact::Check("G1", "unit_tests", "fail", 2),
        Fact::Approval("G2", "qa-1", "qa_tester", "approved", 3),
        Fact::Approval("G2", "qa-2", "qa_tester", "rejected", 4),
        Fact::Evidence("test_result"),
    ];
    let expected = converges(&facts, 8, seed_from_env()).await;
    let statuses: Vec<&str> = expected.iter().map(|(_, s, _)| s.as_str()).collect();
    // G3 has no facts of its own yet: pending, whatever G1 and G2 say.
    assert_eq!(statuses, ["failed", "failed", "pending", "pending"]);
}

// --- Separation of duties ---------------------------------------------------

async fn g3_explanation(db: &TestDb, r: Uuid) -> String {
    sqlx::query_scalar::<_, serde_json::Value>(
        "SELECT explanation FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G3'",
    )
    .bind(r)
    .fetch_one(&db.pool)
    .await
    .unwrap()
    .to_string()
}

#[tokio::test]
async fn g3_approved_by_the_initiator_does_not_pass() {
    let db = TestDb::new().await;
    let r = release(&db).await; // initiated by dev-1
    seed::pass_g1_g2(&db.pool, r).await;
    seed::evidence(&db.pool, r, "rollback_plan").await;
    seed::approval(&db.pool, r, "G3", "dev-1", "release_manager", "approved", at(3)).await;
    assert_ne!(seed::gate_status(&db.pool, r, "G3").await, "passed");
    let why = g3_explanation(&db, r).await;
    assert!(
        why.contains("approval by dev-1 ignored: they initiated the release (separation of duties)"),
        "{why}"
    );

    // Another release manager's approval passes it.
    seed::approval(&db.pool, r, "G3", "rm-9", "release_manager", "approved", at(4)).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "passed");
}

#[tokio::test]
async fn g3_approved_by_the_g2_approver_does_not_pass() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await; // G2 approved by qa-1
    seed::evidence(&db.pool, r, "rollback_plan").await;
    seed::approval(&db.pool, r, "G3", "qa-1", "release_manager", "approved", at(3)).await;
    assert_ne!(seed::gate_status(&db.pool, r, "G3").await, "passed");
    let why = g3_explanation(&db, r).await;
    assert!(
        why.contains("approval by qa-1 ignored: they approved a required gate (separation of duties)"),
        "{why}"
    );
    let blockers = seed::blockers(&db.pool, r, "production").await.join("\n");
    assert!(blockers.contains("separation of duties"), "{blockers}");
}

#[tokio::test]
async fn g3_passed_then_its_approver_approves_g2_no_longer_passes() {
    // The approval of G2 leaves G2's status as it was (passed), so only the
    // separation-of-duties link re-derives G3.
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await; // G2 approved by qa-1
    seed::evidence(&db.pool, r, "rollback_plan").await;
    seed::approval(&db.pool, r, "G3", "rm-1", "release_manager", "approved", at(3)).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "passed");

    seed::approval(&db.pool, r, "G2", "rm-1", "qa_tester", "approved", at(4)).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G2").await, "passed");
    assert_ne!(seed::gate_status(&db.pool, r, "G3").await, "passed");
    let why = g3_explanation(&db, r).await;
    assert!(
        why.contains("approval by rm-1 ignored: they approved a required gate (separation of duties)"),
        "{why}"
    );
}

// --- Integrity rule 1 as a hard rule ------------------------------------------

#[tokio::test]
async fn a_direct_update_passing_production_g3_without_facts_raises() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    let update = sqlx::query(
        "UPDATE ops.release_gates SET status = 'passed' WHERE release_id = $1 AND gate_code = 'G3'",
    )
    .bind(r)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(update), CHECK_VIOLATION);

    let bypass = sqlx::query(
        "UPDATE ops.release_gates SET status = 'bypassed' WHERE release_id = $1 AND gate_code = 'G3'",
    )
    .bind(r)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(bypass), CHECK_VIOLATION);
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "pending");

    // With its facts present, the same update is consistent and allowed.
    seed::pass_g3(&db.pool, r).await;
    sqlx::query("UPDATE ops.release_gates SET status = 'passed' WHERE release_id = $1 AND gate_code = 'G3'")
        .bind(r)
        .execute(&db.pool)
        .await
        .expect("passing with approvals and evidence");
}

#[tokio::test]
async fn the_guard_still_refuses_direct_passes_in_a_transaction_where_refresh_passed_a_gate() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::approval(&db.pool, r, "G2", "qa-1", "qa_tester", "approved", at(2)).await;
    seed::evidence(&db.pool, r, "test_result").await;
    let g3: Uuid = sqlx::query_scalar(
        "SELECT gate_id FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G3'",
    )
    .bind(r)
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    // The refresh this check triggers passes G1 (and, with it, G2) itself.
    sqlx::query(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, observed_at, created_by)
         SELECT gate_id, 'unit_tests', 'github_actions', 'pass', now(), 'ci'
         FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G1'",
    )
    .bind(r)
    .execute(&mut *tx)
    .await
    .unwrap();
    let passed: Vec<String> = sqlx::query_scalar(
        "SELECT gate_code::text FROM ops.release_gates WHERE release_id = $1 AND status = 'passed' ORDER BY 1",
    )
    .bind(r)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(passed, ["G1", "G2"]);

    // Same transaction, a superuser's direct UPDATE of G3: still refused.
    sqlx::query("SAVEPOINT direct").execute(&mut *tx).await.unwrap();
    let direct = sqlx::query("UPDATE ops.release_gates SET status = 'passed' WHERE gate_id = $1")
        .bind(g3)
        .execute(&mut *tx)
        .await;
    assert_eq!(sqlstate(direct), CHECK_VIOLATION);
    sqlx::query("ROLLBACK TO SAVEPOINT direct")
        .execute(&mut *tx)
        .await
        .unwrap();

    // A release manager who forges refresh's marker is refused too.
    sqlx::query("SET LOCAL ROLE release_manager")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT set_config('opsgate.refresh_writes_gate', $1::text, true)")
        .bind(g3)
        .execute(&mut *tx)
        .await
        .unwrap();
    let forged = sqlx::query("UPDATE ops.release_gates SET status = 'passed' WHERE gate_id = $1")
        .bind(g3)
        .execute(&mut *tx)
        .await;
    assert_eq!(sqlstate(forged), CHECK_VIOLATION);
    tx.rollback().await.unwrap();
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "pending");
}

// --- Sweeps with a controlled clock -----------------------------------------

async fn event_count(db: &TestDb, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops.environment_events WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn sweep_exceptions(db: &TestDb, now: seed::Ts) -> i32 {
    sqlx::query_scalar("SELECT ops.sweep_expired_exceptions($1)")
        .bind(now)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_exception_sweep_expires_past_expiry_only_and_only_once() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    let now = seed::now();
    let expires = now + Duration::hours(2);
    let exception = seed::exception(&db.pool, r, &["G3"], "rm-1", now - Duration::hours(1), expires).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");

    // One second before expiry: untouched.
    assert_eq!(sweep_exceptions(&db, expires - Duration::seconds(1)).await, 0);
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");
    assert_eq!(event_count(&db, "exception_expired").await, 0);

    // One second past: expired, bypass revoked, one event.
    assert_eq!(sweep_exceptions(&db, expires + Duration::seconds(1)).await, 1);
    let expired_at: Option<seed::Ts> =
        sqlx::query_scalar("SELECT expired_at FROM ops.exceptions WHERE exception_id = $1")
            .bind(exception)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(expired_at, Some(expires + Duration::seconds(1)));
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "pending");
    assert_eq!(event_count(&db, "exception_expired").await, 1);

    // A second run changes nothing.
    assert_eq!(sweep_exceptions(&db, expires + Duration::seconds(5)).await, 0);
    assert_eq!(event_count(&db, "exception_expired").await, 1);
}

#[tokio::test]
async fn two_concurrent_sweepers_expire_an_exception_once() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let now = Utc::now();
    seed::exception(
        &db.pool,
        r,
        &["G3"],
        "rm-1",
        now - Duration::hours(2),
        now - Duration::hours(1),
    )
    .await;
    let (a, b) = tokio::join!(sweep_exceptions(&db, now), sweep_exceptions(&db, now));
    assert_eq!(a + b, 1);
    assert_eq!(event_count(&db, "exception_expired").await, 1);
}

#[tokio::test]
async fn the_g4_sweep_flags_deployments_past_their_sla_only() {
    let db = TestDb::new().await;
    let late = release(&db).await;
    let on_time = release(&db).await;
    let confirmed = release(&db).await;
    // Deployed five minutes ago: the SLA is still running in real time.
    let deployed = seed::now() - Duration::minutes(5);
    let late_dep = seed::deployment(&db.pool, late, "production", "succeeded", SHA, deployed).await;
    let on_time_dep = seed::deployment(
        &db.pool,
        on_time,
        "production",
        "succeeded",
        SHA,
        deployed + Duration::minutes(10),
    )
    .await;
    let confirmed_dep = seed::deployment(&db.pool, confirmed, "production", "succeeded", SHA, deployed).await;
    seed::health_check(
        &db.pool,
        confirmed,
        confirmed_dep,
        "pass",
        deployed + Duration::minutes(5),
    )
    .await;

    // 30 minutes and one second after the first deployments (production SLA: 30 min).
    let now = deployed + Duration::minutes(30) + Duration::seconds(1);
    let swept: i32 = sqlx::query_scalar("SELECT ops.sweep_overdue_g4($1)")
        .bind(now)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(swept, 1);

    let g4 = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT g4_status::text FROM ops.deployments WHERE deployment_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(g4(late_dep).await, "failed");
    assert_eq!(g4(on_time_dep).await, "pending");
    assert_eq!(g4(confirmed_dep).await, "passed");
    assert_eq!(seed::gate_status(&db.pool, late, "G4").await, "failed");
    assert_eq!(seed::gate_status(&db.pool, confirmed, "G4").await, "passed");
    assert_eq!(event_count(&db, "g4_overdue").await, 1);

    let again: i32 = sqlx::query_scalar("SELECT ops.sweep_overdue_g4($1)")
        .bind(now)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(again, 0);
    assert_eq!(event_count(&db, "g4_overdue").await, 1);
}

/// Waits until a session of this database running `query_part` waits for a
/// lock.
async fn wait_until_blocked(db: &TestDb, query_part: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
        )
        .bind(query_part)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{query_part} never waited for a lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_sweeps_and_a_worker_transaction_on_the_same_release_wait_for_each_other_without_deadlock() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    // Deployed five minutes ago; the sweeps run as of 31 minutes after (SLA 30).
    let deployed = seed::now() - Duration::minutes(5);
    let dep = seed::deployment(&db.pool, r, "production", "succeeded", SHA, deployed).await;
    let sweep_at = deployed + Duration::minutes(31);

    // A transaction of the worker: the release's lock first, taken as the
    // worker takes it, then a fact of the release, whose derivation locks
    // the release's row.
    let mut worker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT ops.lock_releases(ARRAY[$1]::uuid[])")
        .bind(r)
        .execute(&mut *worker)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, observed_at, created_by)
         SELECT gate_id, 'unit', 'ci', 'pass', now(), 'ci' FROM ops.release_gates
         WHERE release_id = $1 AND gate_code = 'G1'",
    )
    .bind(r)
    .execute(&mut *worker)
    .await
    .unwrap();

    // The sweeps start meanwhile, and find the deployment past its SLA.
    let pool = db.pool.clone();
    let sweeps = tokio::spawn(async move {
        sqlx::query_scalar::<_, serde_json::Value>("SELECT ops.run_sweeps($1)")
            .bind(sweep_at)
            .fetch_one(&pool)
            .await
    });
    wait_until_blocked(&db, "run_sweeps").await;

    // The same transaction then records a passing health check of that
    // deployment, within its SLA.
    let health_check = sqlx::query(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, deployment_id, observed_at, created_by)
         SELECT gate_id, 'http_health', 'monitoring', 'pass', $2, now(), 'monitoring' FROM ops.release_gates
         WHERE release_id = $1 AND gate_code = 'G4'",
    )
    .bind(r)
    .bind(dep)
    .execute(&mut *worker);
    let recorded = tokio::time::timeout(std::time::Duration::from_secs(10), health_check)
        .await
        .expect("the health check is not stuck");
    assert!(recorded.is_ok(), "the worker's transaction failed: {recorded:?}");
    worker.commit().await.unwrap();

    // The sweeps went on with what the transaction committed: G4 confirmed.
    let report = sweeps.await.unwrap().expect("the sweeps did not fail");
    assert_eq!(report["overdue_g4"], 0, "{report}");
    assert_eq!(seed::gate_status(&db.pool, r, "G4").await, "passed");
}

#[tokio::test]
async fn a_sweep_run_acts_on_the_200_releases_due_first_and_the_next_run_on_the_rest() {
    let db = TestDb::new().await;
    // 201 releases, each deployed to production a second apart, the last
    // one first; all within the 30-minute SLA when deployed.
    sqlx::query(
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor, created_by)
         SELECT 'acme/many', 'v' || n, 'production', $1, 'dev-1', 'dev-1' FROM generate_series(0, 200) AS n",
    )
    .bind(SHA)
    .execute(&db.pool)
    .await
    .unwrap();
    let deployed = seed::now() - Duration::minutes(5);
    sqlx::query(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, deployed_at, created_by)
         SELECT release_id, 'production', 'sre-1', source_ref, 'succeeded',
                $1 - make_interval(secs => substr(release_name, 2)::int), 'sre-1'
         FROM ops.releases WHERE project = 'acme/many'",
    )
    .bind(deployed)
    .execute(&db.pool)
    .await
    .unwrap();
    let overdue_at = deployed + Duration::minutes(31);
    let sweep = || async {
        sqlx::query_scalar::<_, serde_json::Value>("SELECT ops.run_sweeps($1)")
            .bind(overdue_at)
            .fetch_one(&db.pool)
            .await
            .unwrap()["overdue_g4"]
            .as_i64()
            .unwrap()
    };

    assert_eq!(sweep().await, 200);
    // The one left is the one deployed last, so due last.
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT r.release_name FROM ops.deployments d JOIN ops.releases r USING (release_id)
         WHERE d.g4_overdue_at IS NULL ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, ["v0"]);
    assert_eq!(sweep().await, 1);
    assert_eq!(sweep().await, 0);
    assert_eq!(event_count(&db, "g4_overdue").await, 201);
}

#[tokio::test]
async fn a_health_check_after_the_sla_does_not_confirm_g4() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let dep = seed::deployment(&db.pool, r, "production", "succeeded", SHA, at(0)).await;
    seed::health_check(&db.pool, r, dep, "pass", at(31)).await;
    let status: String =
        sqlx::query_scalar("SELECT g4_status::text FROM ops.deployments WHERE deployment_id = $1")
            .bind(dep)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // Deployed in the past: the SLA is over and nothing passed within it.
    assert_eq!(status, "failed");
}

#[tokio::test]
async fn a_health_check_from_before_the_deployment_does_not_confirm_g4() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let dep = seed::deployment(&db.pool, r, "production", "succeeded", SHA, at(0)).await;
    // Observed five minutes before the deployment: it describes what ran then.
    seed::health_check(&db.pool, r, dep, "pass", at(-5)).await;
    // Deployed in the past: the SLA is over and nothing passed within it.
    assert_eq!(g4_of(&db, dep).await, "failed");

    seed::health_check(&db.pool, r, dep, "pass", at(5)).await;
    assert_eq!(g4_of(&db, dep).await, "passed");
}

/// "Health checks green" (PRD): each health check's latest result counts,
/// not only the latest result of any check.
#[tokio::test]
async fn g4_needs_every_health_check_green() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    // Deployed two minutes ago, so the SLA is still running.
    let deployed_at = seed::now() - chrono::Duration::minutes(2);
    let dep = seed::deployment(&db.pool, r, "production", "succeeded", SHA, deployed_at).await;
    // Observed `tens` × 10 s after the deployment.
    let report = |name: &'static str, status: &'static str, tens: i64| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, deployment_id, observed_at,
                                              created_by)
                 SELECT gate_id, $2, 'monitoring', $3::ops.ops_check_status, $4, $5, 'monitoring'
                 FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G4'",
            )
            .bind(r)
            .bind(name)
            .bind(status)
            .bind(dep)
            .bind(deployed_at + chrono::Duration::seconds(10 * tens))
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    report("error_rate", "fail", 1).await;
    report("http_probe", "pass", 2).await;
    assert_eq!(g4_of(&db, dep).await, "failed", "the error rate is still failing");
    report("error_rate", "pass", 3).await;
    assert_eq!(g4_of(&db, dep).await, "passed", "both green now");

    // A latest `skipped` neither counts nor blocks, as for G1-G3: the check
    // that failed and was then skipped no longer fails G4.
    report("http_probe", "fail", 4).await;
    assert_eq!(g4_of(&db, dep).await, "failed");
    report("http_probe", "skipped", 5).await;
    assert_eq!(
        g4_of(&db, dep).await,
        "passed",
        "error_rate is green, http_probe skipped"
    );
}

/// FR-2: a gate records who resolved it. G4 is resolved by the health check
/// that decided it, or by opsgate when the SLA ran out, not by the deployer.
#[tokio::test]
async fn g4_is_resolved_by_its_health_check_or_by_the_sla() {
    let db = TestDb::new().await;
    let resolver = |release: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT resolved_by FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G4'",
            )
            .bind(release)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let confirmed = release(&db).await;
    let dep = seed::deployment(&db.pool, confirmed, "production", "succeeded", SHA, at(0)).await;
    seed::health_check(&db.pool, confirmed, dep, "pass", at(5)).await;
    assert_eq!(g4_of(&db, dep).await, "passed");
    assert_eq!(resolver(confirmed).await.as_deref(), Some("monitoring"));

    let overdue = release(&db).await;
    let dep = seed::deployment(&db.pool, overdue, "production", "succeeded", SHA, at(0)).await;
    assert_eq!(
        g4_of(&db, dep).await,
        "failed",
        "deployed in the past, nothing passed"
    );
    assert_eq!(resolver(overdue).await.as_deref(), Some("opsgate"));
}

// --- Direct writes that must not move derived state (migration 0007) --------

async fn g4_of(db: &TestDb, deployment: Uuid) -> String {
    sqlx::query_scalar("SELECT g4_status::text FROM ops.deployments WHERE deployment_id = $1")
        .bind(deployment)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_health_check_cannot_name_another_releases_deployment() {
    let db = TestDb::new().await;
    let a = release(&db).await;
    let b = release(&db).await;
    let a_production = seed::deployment(&db.pool, a, "production", "succeeded", "sha-a", seed::now()).await;
    let b_g4 = seed::gate(&db.pool, b, "G4").await;
    let forged = sqlx::query(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, deployment_id, created_by)
         VALUES ($1, 'fake', 'dev', 'pass', $2, 'dev')",
    )
    .bind(b_g4)
    .bind(a_production)
    .execute(&db.pool)
    .await;
    assert_eq!(sqlstate(forged), CHECK_VIOLATION);
    assert_eq!(g4_of(&db, a_production).await, "pending");
}

#[tokio::test]
async fn an_exception_no_longer_active_authorizes_no_new_promotion() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    let now = seed::now();
    let expires = now + Duration::hours(1);
    let exception = seed::exception(&db.pool, r, &["G3"], "rm-1", now - Duration::hours(1), expires).await;
    staging_deploy(&db, r).await;
    assert!(seed::eligible(&db.pool, r, "production", Some(now)).await);
    let production = seed::deployment(&db.pool, r, "production", "succeeded", SHA, now).await;
    sqlx::query("UPDATE ops.deployments SET status = 'rolled_back' WHERE deployment_id = $1")
        .bind(production)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(sweep_exceptions(&db, expires + Duration::seconds(1)).await, 1);

    // On record, G3 stays bypassed for the promotion the exception covered;
    // a new promotion is not covered.
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");
    let later = expires + Duration::seconds(2);
    assert!(!seed::eligible(&db.pool, r, "production", Some(later)).await);
    let blockers: Vec<String> = sqlx::query_scalar("SELECT ops.promotion_blockers($1, 'production', $2)")
        .bind(r)
        .bind(later)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        blockers,
        [format!(
            "G3 Promotion Readiness was bypassed by exception {exception}, which is not active now"
        )]
    );
}

#[tokio::test]
async fn an_exception_granted_after_a_promotion_does_not_cover_it() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    let now = seed::now();
    seed::deployment(
        &db.pool,
        r,
        "production",
        "succeeded",
        SHA,
        now - Duration::hours(1),
    )
    .await;
    // Granted after the promotion, its window backdated to cover it.
    let expires = now + Duration::hours(1);
    seed::exception(&db.pool, r, &["G3"], "rm-1", now - Duration::hours(2), expires).await;
    assert_eq!(
        seed::gate_status(&db.pool, r, "G3").await,
        "bypassed",
        "active now"
    );
    assert_eq!(sweep_exceptions(&db, expires + Duration::seconds(1)).await, 1);
    // Once expired, it does not explain the earlier promotion on record.
    assert_ne!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");
}

#[tokio::test]
async fn a_rolled_back_deployment_keeps_its_failed_g4() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let deployed = seed::now() - Duration::hours(2); // production SLA: 30 min, then fail
    let production = seed::deployment(&db.pool, r, "production", "succeeded", "sha-1", deployed).await;
    assert_eq!(g4_of(&db, production).await, "failed");
    sqlx::query("UPDATE ops.deployments SET status = 'rolled_back' WHERE deployment_id = $1")
        .bind(production)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(g4_of(&db, production).await, "failed");
}

#[tokio::test]
async fn a_direct_insert_cannot_preset_what_the_derivation_relies_on() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let (created_at, overdue): (seed::Ts, Option<seed::Ts>) = sqlx::query_as(
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, created_at,
                                      g4_overdue_at, created_by)
         VALUES ($1, 'production', 'sre-1', 'sha-1', 'failed', now() - interval '36 hours',
                 '2000-01-01', 'sre-1')
         RETURNING created_at, g4_overdue_at",
    )
    .bind(r)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(created_at > Utc::now() - Duration::minutes(5), "{created_at}");
    assert_eq!(overdue, None);

    // failed is final.
    let revived = sqlx::query("UPDATE ops.deployments SET status = 'succeeded' WHERE release_id = $1")
        .bind(r)
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(revived), CHECK_VIOLATION);
}

// --- The time of a fact (migrations 0005 and 0007) ---------------------------

#[tokio::test]
async fn an_exception_written_after_a_promotion_in_the_same_transaction_does_not_cover_it() {
    // The worker applies several deliveries in one transaction: a deployment
    // and, after it, an exception of the same release.
    let db = TestDb::new().await;
    let r = release(&db).await;
    seed::pass_g1_g2(&db.pool, r).await;
    let now = seed::now();
    let expires = now + Duration::hours(1);
    let mut tx = db.pool.begin().await.unwrap();
    seed::deployment(&mut *tx, r, "production", "succeeded", SHA, now).await;
    seed::exception(&mut *tx, r, &["G3"], "rm-1", now - Duration::hours(2), expires).await;
    tx.commit().await.unwrap();
    assert_eq!(
        seed::gate_status(&db.pool, r, "G3").await,
        "bypassed",
        "active now"
    );
    assert_eq!(sweep_exceptions(&db, expires + Duration::seconds(1)).await, 1);
    assert_ne!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");
}

#[tokio::test]
async fn a_fact_is_derived_as_of_the_statement_that_wrote_it() {
    // A transaction that began earlier (it waited for a release lock) still
    // derives as of its write: an exception that became active meanwhile
    // bypasses the gate.
    let db = TestDb::new().await;
    let r = release(&db).await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_sleep(1.2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO ops.exceptions (release_id, exception_type, impacted_gates, reason, risk_statement,
                                     approver_id, effective_from, expires_at, created_by)
         VALUES ($1, 'gate_bypass', '{G1}', 'hotfix', 'rollback ready', 'rm-1',
                 clock_timestamp() - interval '500 milliseconds', clock_timestamp() + interval '1 hour', 'rm-1')",
    )
    .bind(r)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seed::gate_status(&db.pool, r, "G1").await, "bypassed");
}

// --- Derivation at the end of a transaction (migration 0016) ------------------

async fn g1_status_in(conn: &mut sqlx::PgConnection, release_id: Uuid) -> String {
    sqlx::query_scalar(
        "SELECT status::text FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G1'",
    )
    .bind(release_id)
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn g1_status_changes(db: &TestDb, release_id: Uuid) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "SELECT l.changes -> 'status' FROM ops.change_log l
         JOIN ops.release_gates g ON g.gate_id::text = l.row_key
         WHERE l.table_name = 'release_gates' AND l.release_id = $1 AND g.gate_code = 'G1'
           AND l.changes ? 'status'
         ORDER BY l.changed_at, l.change_id",
    )
    .bind(release_id)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_transaction_deriving_at_its_end_derives_each_release_once_after_its_facts() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let mut tx = db.pool.begin().await.unwrap();
    seed::derive_at_end(&mut *tx).await;
    seed::check(&mut *tx, r, "G1", "unit_tests", "pass", at(1)).await;
    seed::check(&mut *tx, r, "G1", "lint", "fail", at(1)).await;
    assert_eq!(g1_status_in(&mut tx, r).await, "pending", "not derived per fact");

    let derived: i32 = sqlx::query_scalar("SELECT ops.derive_pending()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(derived, 1, "one derivation for the release's two facts");
    assert_eq!(g1_status_in(&mut tx, r).await, "failed");
    let again: i32 = sqlx::query_scalar("SELECT ops.derive_pending()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(again, 0, "nothing left pending");
    tx.commit().await.unwrap();

    // The change log holds the committed change only: never `passed`.
    assert_eq!(
        g1_status_changes(&db, r).await,
        vec![serde_json::json!({"from": "pending", "to": "failed"})]
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.pending_derivations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn facts_left_pending_are_derived_at_commit_even_with_the_setting_turned_off() {
    let db = TestDb::new().await;
    let (left_pending, switched_off) = (release(&db).await, release(&db).await);

    let mut tx = db.pool.begin().await.unwrap();
    seed::derive_at_end(&mut *tx).await;
    seed::check(&mut *tx, left_pending, "G1", "unit_tests", "pass", at(1)).await;
    tx.commit().await.unwrap();
    assert_eq!(seed::gate_status(&db.pool, left_pending, "G1").await, "passed");

    // Turning the setting off after the fact does not skip its derivation.
    let mut tx = db.pool.begin().await.unwrap();
    seed::derive_at_end(&mut *tx).await;
    seed::check(&mut *tx, switched_off, "G1", "unit_tests", "pass", at(1)).await;
    sqlx::query("SELECT set_config('opsgate.derive_at_end', 'off', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seed::gate_status(&db.pool, switched_off, "G1").await, "passed");

    // Without the setting, a fact is derived at once, inside its transaction.
    let r = release(&db).await;
    let mut tx = db.pool.begin().await.unwrap();
    seed::check(&mut *tx, r, "G1", "unit_tests", "pass", at(1)).await;
    assert_eq!(g1_status_in(&mut tx, r).await, "passed");
    tx.rollback().await.unwrap();
}

/// How often `ops.derive_pending` has run in this database, by the server's
/// function statistics (the session must have `track_functions` on).
async fn derive_pending_calls(conn: &mut sqlx::PgConnection) -> i64 {
    // A backend sends its statistics at most once a second unless told to;
    // the flush happens when the session next goes idle.
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions
         WHERE schemaname = 'ops' AND funcname = 'derive_pending'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn what_is_left_pending_is_derived_at_commit_once_not_once_per_fact() {
    let db = TestDb::new().await;
    let (first, second) = (release(&db).await, release(&db).await);
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET track_functions = 'pl'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let before = derive_pending_calls(&mut conn).await;

    // Five facts of two releases, nothing derived before the commit.
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    seed::derive_at_end(&mut *tx).await;
    for name in ["unit_tests", "lint", "sast"] {
        seed::check(&mut *tx, first, "G1", name, "pass", at(1)).await;
    }
    seed::check(&mut *tx, second, "G1", "unit_tests", "pass", at(1)).await;
    seed::check(&mut *tx, second, "G1", "lint", "fail", at(1)).await;
    tx.commit().await.unwrap();

    assert_eq!(seed::gate_status(&db.pool, first, "G1").await, "passed");
    assert_eq!(seed::gate_status(&db.pool, second, "G1").await, "failed");
    assert_eq!(
        derive_pending_calls(&mut conn).await - before,
        1,
        "one derivation pass at commit for the transaction, not one per fact"
    );

    // A transaction that derived before its commit leaves nothing to do then.
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    seed::derive_at_end(&mut *tx).await;
    seed::check(&mut *tx, first, "G1", "e2e", "fail", at(2)).await;
    seed::check(&mut *tx, first, "G1", "docs", "pass", at(2)).await;
    sqlx::query("SELECT ops.derive_pending()")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seed::gate_status(&db.pool, first, "G1").await, "failed");
    assert_eq!(
        derive_pending_calls(&mut conn).await - before,
        2,
        "the worker's own call only"
    );
}

#[tokio::test]
async fn nobody_but_the_derivation_touches_the_pending_derivations() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    for role in [
        "opsgate_worker",
        "ci_service_role",
        "release_manager",
        "audit_reader",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET ROLE {role}")))
            .execute(&mut *conn)
            .await
            .unwrap();
        for statement in [
            "SELECT count(*) FROM ops.pending_derivations",
            "DELETE FROM ops.pending_derivations",
        ] {
            let refused = sqlx::query(statement).execute(&mut *conn).await;
            assert_eq!(sqlstate(refused), "42501", "{role}: {statement}");
        }
        sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    }
}
