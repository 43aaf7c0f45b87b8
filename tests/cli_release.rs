//! `opsgate release`, `opsgate sweep` and `opsgate policy` as CI and people run them.

mod common;

use std::process::{Command, Output};

use common::seed::{self, at};
use common::*;

/// `opsgate <args>` on the test's database.
fn command(db: &TestDb, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opsgate"));
    command
        .arg("--config-dir")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .args(args)
        .env("OPSGATE__DATABASE__URL", db.settings.url.expose())
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    command
}

fn opsgate(db: &TestDb, args: &[&str]) -> Output {
    command(db, args).output().expect("run opsgate")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn eligible_exits_1_with_readable_blockers_and_0_when_eligible() {
    let db = TestDb::new().await;
    let blocked = seed::release_named(&db.pool, "acme/odoo", "v1.0", "dev-1", "sha-1").await;
    seed::check(&db.pool, blocked, "G1", "unit_tests", "fail", at(1)).await;

    let output = opsgate(
        &db,
        &["release", "eligible", "acme/odoo/v1.0", "--env", "production"],
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(
        text.contains("acme/odoo/v1.0 is NOT eligible for production:"),
        "{text}"
    );
    assert!(
        text.contains("  - G1 Build Integrity is failed: failing checks: unit_tests"),
        "{text}"
    );
    assert!(
        text.contains("  - G2 Validation Readiness is pending: missing approval: qa_tester"),
        "{text}"
    );
    assert!(text.contains("missing evidence: rollback_plan"), "{text}");
    assert!(
        text.contains("no succeeded staging deployment of sha-1 (linear promotion)"),
        "{text}"
    );

    let ready = seed::release_named(&db.pool, "acme/odoo", "v1.1", "dev-1", "sha-2").await;
    seed::pass_g1_g2(&db.pool, ready).await;
    seed::pass_g3(&db.pool, ready).await;
    seed::deployment(&db.pool, ready, "staging", "succeeded", "sha-2", at(5)).await;
    let output = opsgate(
        &db,
        &["release", "eligible", &ready.to_string(), "--env", "production"],
    );
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(stdout(&output).contains("is eligible for production"));

    // Not being able to decide is not "not eligible".
    let unknown = opsgate(
        &db,
        &["release", "eligible", "acme/odoo/v9", "--env", "production"],
    );
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("release acme/odoo/v9 does not exist"));
    let bad_env = opsgate(&db, &["release", "eligible", "acme/odoo/v1.0", "--env", "prod"]);
    assert_eq!(bad_env.status.code(), Some(2), "{bad_env:?}");
    let no_settings = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .args(["--config-dir", "no-such-config-dir"])
        .args(["release", "eligible", "acme/odoo/v1.0", "--env", "production"])
        .output()
        .expect("run opsgate");
    assert_eq!(no_settings.status.code(), Some(2), "{no_settings:?}");
    assert!(String::from_utf8_lossy(&no_settings.stderr).starts_with("error: "));

    let output = opsgate(
        &db,
        &[
            "release",
            "eligible",
            "acme/odoo/v1.0",
            "--env",
            "staging",
            "--json",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(answer["eligible"], false);
    assert_eq!(answer["target_env"], "staging");
    assert_eq!(answer["blockers"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn show_prints_each_gate_with_its_explanation() {
    let db = TestDb::new().await;
    let r = seed::release_named(&db.pool, "acme/odoo", "v2.0", "dev-1", "sha-3").await;
    seed::pass_g1_g2(&db.pool, r).await;
    let output = opsgate(&db, &["release", "show", "acme/odoo/v2.0"]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("G1 Build Integrity"), "{text}");
    assert!(text.contains("[x] approved by qa-1"), "{text}");
    assert!(text.contains("[ ] missing evidence: rollback_plan"), "{text}");

    let output = opsgate(&db, &["release", "show", &r.to_string(), "--json"]);
    let release: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let statuses: Vec<&str> = release["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["passed", "passed", "pending", "pending"]);

    let missing = opsgate(&db, &["release", "show", "acme/odoo/v9"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "error: release acme/odoo/v9 does not exist"
    );
}

#[tokio::test]
async fn sweep_once_runs_the_sweeps_as_of_the_given_time() {
    let db = TestDb::new().await;
    let r = seed::release(&db.pool, "dev-1").await;
    let now = seed::now();
    seed::exception(
        &db.pool,
        r,
        &["G3"],
        "rm-1",
        now - chrono::Duration::hours(1),
        now + chrono::Duration::hours(1),
    )
    .await;
    let later = (now + chrono::Duration::hours(2)).to_rfc3339();
    let output = opsgate(&db, &["sweep", "--once", "--now", &later]);
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["expired_exceptions"], 1);
    let again = opsgate(&db, &["sweep", "--once", "--now", &later]);
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["expired_exceptions"], 0);
}

#[tokio::test]
async fn policy_apply_changes_what_a_gate_needs() {
    let db = TestDb::new().await;
    // The shipped file is what the migration seeded.
    let output = opsgate(&db, &["policy", "apply"]);
    assert!(stdout(&output).contains("12 policies"), "{output:?}");

    let r = seed::release(&db.pool, "dev-1").await;
    seed::check(&db.pool, r, "G1", "unit_tests", "pass", at(1)).await;
    assert_eq!(seed::gate_status(&db.pool, r, "G1").await, "passed");

    let dir = std::env::temp_dir().join(format!("opsgate-policy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policies.toml");
    std::fs::write(
        &file,
        "[[policy]]\ngate = \"G1\"\nenvironment = \"production\"\nmin_passing_checks = 2\n",
    )
    .unwrap();
    let output = opsgate(&db, &["policy", "apply", "--file", file.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("updated policy G1/production"));
    // Re-evaluated at once: one passing check is no longer enough.
    assert_eq!(seed::gate_status(&db.pool, r, "G1").await, "in_progress");

    std::fs::write(&file, "[[policy]]\ngate = \"G5\"\nenvironment = \"production\"\n").unwrap();
    let output = opsgate(&db, &["policy", "apply", "--file", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("policy G5/production was refused by the database"),
        "{stderr}"
    );

    // One line, each cause once.
    let missing = dir.join("missing.toml");
    let output = opsgate(&db, &["policy", "apply", "--file", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `opsgate` with stdout on a pipe whose reader has gone, as in
/// `opsgate release eligible … | true` under `set -o pipefail`.
fn opsgate_into_a_closed_pipe(db: &TestDb, args: &[&str]) -> std::process::ExitStatus {
    let mut child = command(db, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run opsgate");
    // Closed before the command has connected to the database, let alone printed.
    drop(child.stdout.take());
    child.wait().expect("wait for opsgate")
}

#[tokio::test]
async fn eligible_answers_by_its_exit_code_when_nobody_reads_its_output() {
    let db = TestDb::new().await;
    let blocked = seed::release_named(&db.pool, "acme/odoo", "v1.0", "dev-1", "sha-1").await;
    seed::check(&db.pool, blocked, "G1", "unit_tests", "fail", at(1)).await;
    for format in [&[][..], &["--json"][..]] {
        let mut args = vec!["release", "eligible", "acme/odoo/v1.0", "--env", "production"];
        args.extend_from_slice(format);
        let status = opsgate_into_a_closed_pipe(&db, &args);
        assert_eq!(status.code(), Some(1), "{args:?}: not eligible, whoever reads");
    }
    let fresh = seed::release_named(&db.pool, "acme/odoo", "v2.0", "dev-1", "sha-2").await;
    seed::check(&db.pool, fresh, "G1", "unit_tests", "pass", at(1)).await;
    let status = opsgate_into_a_closed_pipe(&db, &["release", "eligible", "acme/odoo/v2.0", "--env", "dev"]);
    assert_eq!(status.code(), Some(0), "eligible for dev, whoever reads");
    // `release show … | head -1` is not an error either.
    let status = opsgate_into_a_closed_pipe(&db, &["release", "show", "acme/odoo/v2.0"]);
    assert_eq!(status.code(), Some(0), "release show into a closed pipe");
}

/// An answer that could not be written is no answer (2), not "not
/// eligible" (1).
#[tokio::test]
async fn eligible_exits_2_when_it_cannot_write_its_answer() {
    let db = TestDb::new().await;
    let release = seed::release_named(&db.pool, "acme/odoo", "v1.0", "dev-1", "sha-1").await;
    seed::check(&db.pool, release, "G1", "unit_tests", "pass", at(1)).await;
    for format in [&[][..], &["--json"][..]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full");
        let mut args = vec!["release", "eligible", "acme/odoo/v1.0", "--env", "dev"];
        args.extend_from_slice(format);
        let status = command(&db, &args)
            .stdout(full)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run opsgate");
        assert_eq!(status.code(), Some(2), "{format:?}");
    }
}

/// A release's gates are judged by its own target's policies: CI's check
/// does not call it eligible for an environment beyond that target.
#[tokio::test]
async fn eligible_refuses_an_environment_beyond_the_releases_target() {
    let db = TestDb::new().await;
    let release: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor, created_by)
         VALUES ('acme/odoo', 'v-dev', 'dev', 'sha-9', 'dev-1', 'dev-1') RETURNING release_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    seed::check(&db.pool, release, "G1", "unit_tests", "pass", at(1)).await;
    let dev = opsgate(&db, &["release", "eligible", "acme/odoo/v-dev", "--env", "dev"]);
    assert_eq!(dev.status.code(), Some(0), "{dev:?}");
    let staging = opsgate(
        &db,
        &["release", "eligible", "acme/odoo/v-dev", "--env", "staging"],
    );
    assert_eq!(staging.status.code(), Some(1), "{staging:?}");
    assert!(
        stdout(&staging).contains("the release targets dev: its gates were not judged for staging"),
        "{}",
        stdout(&staging)
    );
}

/// A release name may hold slashes (`hotfix/login`): `<project>/<name>`
/// still finds it, and a reference two releases could mean is refused.
#[tokio::test]
async fn a_release_name_with_slashes_is_found_and_an_ambiguous_one_refused() {
    let db = TestDb::new().await;
    let create = |project: &'static str, name: &'static str| {
        let pool = db.pool.clone();
        async move { seed::release_named(&pool, project, name, "dev-1", "sha-1").await }
    };
    let hotfix = create("acme/odoo", "hotfix/login").await;
    let shown = opsgate(&db, &["release", "show", "acme/odoo/hotfix/login", "--json"]);
    assert_eq!(shown.status.code(), Some(0), "{shown:?}");
    let release: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(release["release_id"], hotfix.to_string());

    // Two releases that both read as acme/odoo/v1: neither is guessed.
    create("acme", "odoo/v1").await;
    let one = opsgate(&db, &["release", "eligible", "acme/odoo/v1", "--env", "dev"]);
    assert_ne!(one.status.code(), Some(2), "one reading matches: {one:?}");
    create("acme/odoo", "v1").await;
    let ambiguous = opsgate(&db, &["release", "eligible", "acme/odoo/v1", "--env", "dev"]);
    assert_eq!(ambiguous.status.code(), Some(2), "{ambiguous:?}");
    assert!(
        String::from_utf8_lossy(&ambiguous.stderr).contains("names more than one release"),
        "{ambiguous:?}"
    );
}

/// Errors whose text spans lines (TOML's parse errors draw the line and a
/// caret) still reach people as one line, whichever command prints them.
#[tokio::test]
async fn multi_line_errors_are_printed_on_one_line() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("opsgate-one-line-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();

    let broken_policy = dir.join("policy.toml");
    std::fs::write(&broken_policy, "[[policy]\ngate = \"G1\"\n").unwrap();
    let output = opsgate(
        &db,
        &["policy", "apply", "--file", broken_policy.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("line 1"), "{stderr}");

    // The promotion check answers 2 (could not decide) with a broken config.
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("default.toml"), "[database\nurl = 1\n").unwrap();
    let output = command(&db, &["release", "eligible", "acme/odoo/v1.0", "--env", "dev"])
        .arg("--config-dir")
        .arg(&config_dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
