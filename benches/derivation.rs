//! What gate and release derivation costs per fact, in PostgreSQL alone.
//!
//!   cargo bench --bench derivation -- [--releases N] [--rounds R]
//!
//! The end-to-end benchmark (`ingest`) shares two cores between RabbitMQ,
//! PostgreSQL, the worker and itself, so a change of a few percent in the
//! derivation drowns in its noise. This one takes the queue and the worker
//! away: it walks N releases through a release's life one step at a time,
//! each step one `INSERT … SELECT` that writes one fact per release (so the
//! row triggers run N derivations, exactly as N events would), and times
//! the statement and its commit. It does the same in a second database whose
//! derivation triggers are disabled; the difference is what derivation costs
//! per fact. A third series runs each step as the worker's transactions do,
//! with `opsgate.derive_at_end` on and `ops.derive_pending()` before the
//! commit: with one fact per release per transaction it derives as often as
//! the first, so the difference is what deriving at the end adds per fact.
//! Each round uses new releases; the median of the rounds is printed.
//!
//! Both databases are created for the run and dropped at its end.

mod common;

use std::time::Instant;

use opsgate::config::{DatabaseSettings, SecretUrl};
use sqlx::{Executor, PgPool};
use uuid::Uuid;

struct Args {
    releases: usize,
    rounds: usize,
}

fn args() -> Args {
    let mut args = Args {
        releases: 500,
        rounds: 5,
    };
    let raw: Vec<String> = std::env::args().collect();
    for pair in raw.windows(2) {
        let value = pair[1].parse::<usize>().ok().filter(|v| *v > 0);
        match (pair[0].as_str(), value) {
            ("--releases", Some(v)) => args.releases = v,
            ("--rounds", Some(v)) => args.rounds = v,
            _ => {}
        }
    }
    args
}

/// The steps of a release's life, in order. `$1` is the round's project:
/// every statement writes one row per release of that round.
const STEPS: &[(&str, &str)] = &[
    (
        "release_created (four pending gates)",
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor)
         SELECT $1, 'v' || n, 'production', $1 || '-' || n, 'dev-1' FROM generate_series(1, $2) AS n",
    ),
    (
        "G1 check, the first (G1 passes)",
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, created_by)
         SELECT g.gate_id, 'build', 'ci', 'pass', 'ci'
         FROM ops.releases r JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = 'G1'
         WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "G1 check, another (G1 stays passed)",
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, created_by)
         SELECT g.gate_id, 'lint', 'ci', 'warning', 'ci'
         FROM ops.releases r JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = 'G1'
         WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "G2 evidence test_result (G2 in progress)",
        "INSERT INTO ops.evidence_artifacts (release_id, gate_id, artifact_type, source_system, artifact_url, created_by)
         SELECT r.release_id, g.gate_id, 'test_result', 'ci', 'https://ci.example/tests', 'ci'
         FROM ops.releases r JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = 'G2'
         WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "G2 approval by QA (G2 passes)",
        "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope, created_by)
         SELECT r.release_id, g.gate_id, 'qa-1', 'qa_tester', 'approved', 'gate', 'n8n'
         FROM ops.releases r JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = 'G2'
         WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "staging deployment, succeeded",
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, created_by)
         SELECT r.release_id, 'staging', 'ci', r.source_ref, 'succeeded', 'ci'
         FROM ops.releases r WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "G3 evidence rollback_plan",
        "INSERT INTO ops.evidence_artifacts (release_id, gate_id, artifact_type, source_system, artifact_url, created_by)
         SELECT r.release_id, g.gate_id, 'rollback_plan', 'ci', 'https://wiki.example/rollback', 'ci'
         FROM ops.releases r JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = 'G3'
         WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "G3 approval by the release manager (G3 passes)",
        "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope, created_by)
         SELECT r.release_id, g.gate_id, 'rm-1', 'release_manager', 'approved', 'gate', 'n8n'
         FROM ops.releases r JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = 'G3'
         WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "production deployment, succeeded",
        "INSERT INTO ops.deployments (release_id, environment, deployed_by, source_ref, status, created_by)
         SELECT r.release_id, 'production', 'ci', r.source_ref, 'succeeded', 'ci'
         FROM ops.releases r WHERE r.project = $1 AND $2 > 0",
    ),
    (
        "G4 health check of production (G4 passes)",
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, deployment_id, created_by)
         SELECT g.gate_id, 'http', 'monitoring', 'pass', d.deployment_id, 'monitoring'
         FROM ops.releases r
         JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = 'G4'
         JOIN ops.deployments d ON d.release_id = r.release_id AND d.environment = 'production'
         WHERE r.project = $1 AND $2 > 0",
    ),
];

async fn database(name: &str) -> PgPool {
    let settings = DatabaseSettings {
        url: SecretUrl::new(common::server_url()).with_path(&format!("/{name}")),
        max_connections: 1,
        acquire_timeout_secs: 10,
    };
    opsgate::database::migrate(&settings).await.expect("migrate");
    let pool = opsgate::database::connect(&settings).await.expect("connect");
    // As the worker's sessions: generic plans. No fsync wait per step: the
    // commit is not what is measured here.
    pool.execute("SET plan_cache_mode = force_generic_plan; SET synchronous_commit = off")
        .await
        .expect("session settings");
    pool
}

/// How a round's facts are derived.
#[derive(Clone, Copy, PartialEq)]
enum Derivation {
    /// Each fact by its own trigger, at once (direct writers).
    PerFact,
    /// As in the worker's transactions: `opsgate.derive_at_end` on, the
    /// step's releases derived by `ops.derive_pending()`, then the commit
    /// (with whatever it still runs) inside the timing.
    AtEnd,
}

/// Microseconds per fact of each step, one round.
async fn round(pool: &PgPool, releases: usize, derivation: Derivation) -> Vec<f64> {
    let project = format!("bench-{}", Uuid::new_v4().simple());
    let mut per_fact = Vec::with_capacity(STEPS.len());
    for (label, sql) in STEPS {
        let started = Instant::now();
        let mut tx = pool.begin().await.expect("begin");
        if derivation == Derivation::AtEnd {
            sqlx::query("SELECT set_config('opsgate.derive_at_end', 'on', true)")
                .execute(&mut *tx)
                .await
                .expect("derive at the end");
        }
        let written = sqlx::query(*sql)
            .bind(&project)
            .bind(releases as i32)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|error| panic!("step {label:?}: {error}"))
            .rows_affected();
        if derivation == Derivation::AtEnd {
            sqlx::query("SELECT ops.derive_pending()")
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|error| panic!("step {label:?}, derive_pending: {error}"));
        }
        tx.commit()
            .await
            .unwrap_or_else(|error| panic!("step {label:?}, commit: {error}"));
        assert_eq!(
            written, releases as u64,
            "step {label:?} wrote one row per release"
        );
        per_fact.push(started.elapsed().as_secs_f64() * 1e6 / releases as f64);
    }
    // Keep the tables as busy as a worker's would be: no bloat carried over.
    pool.execute("VACUUM (ANALYZE)").await.expect("vacuum");
    per_fact
}

/// One line: per fact, at the end, not derived, and the two differences.
fn print_step(label: &str, [per_fact, at_end, without]: [f64; 3]) {
    println!(
        "  {label:<48} {per_fact:>9.1} {at_end:>11.1} {without:>12.1} {:>11.1} {:>11.1}",
        per_fact - without,
        at_end - without
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let args = args();
    let suffix = Uuid::new_v4().simple().to_string();
    let names = [
        format!("opsgate_derivation_{suffix}"),
        format!("opsgate_derivation_off_{suffix}"),
    ];
    let with = database(&names[0]).await;
    let without = database(&names[1]).await;
    common::disable_derivation(&without).await;

    println!("opsgate derivation benchmark");
    println!(
        "  {} releases per round, {} rounds (median), one session, generic plans",
        args.releases, args.rounds
    );
    // A first round warms the sessions (plans, caches) and is not counted.
    round(&with, args.releases, Derivation::PerFact).await;
    round(&with, args.releases, Derivation::AtEnd).await;
    round(&without, args.releases, Derivation::PerFact).await;
    let (mut per_fact_rounds, mut at_end_rounds, mut without_rounds) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        per_fact_rounds.push(round(&with, args.releases, Derivation::PerFact).await);
        at_end_rounds.push(round(&with, args.releases, Derivation::AtEnd).await);
        without_rounds.push(round(&without, args.releases, Derivation::PerFact).await);
    }

    println!();
    println!(
        "  {:<48} {:>9} {:>11} {:>12} {:>11} {:>11}",
        "step (µs per fact)", "derived", "derived at", "not derived", "derivation", "derivation"
    );
    println!(
        "  {:<48} {:>9} {:>11} {:>12} {:>11} {:>11}",
        "", "per fact", "the end", "", "per fact", "at the end"
    );
    let mut totals = [0.0; 3];
    for (i, (label, _)) in STEPS.iter().enumerate() {
        let figures = [&per_fact_rounds, &at_end_rounds, &without_rounds]
            .map(|rounds| median(rounds.iter().map(|r| r[i]).collect()));
        for (total, figure) in totals.iter_mut().zip(figures) {
            *total += figure;
        }
        print_step(label, figures);
    }
    let steps = STEPS.len() as f64;
    print_step("mean of the steps", totals.map(|total| total / steps));

    with.close().await;
    without.close().await;
    for name in &names {
        common::drop_database(name)
            .await
            .expect("drop the benchmark database");
    }
}
