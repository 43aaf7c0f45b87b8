//! `opsgate migrate` as a user runs it.

mod common;

use std::process::Command;

use common::*;

fn opsgate(database_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opsgate"));
    command
        .arg("--config-dir")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .arg("migrate")
        .env("OPSGATE__DATABASE__URL", database_url)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    command
}

#[test]
fn migrate_creates_the_schema_then_applies_nothing_the_second_time() {
    let settings = fresh_database_settings();
    let url = settings.url.expose().to_owned();

    let first = opsgate(&url).output().unwrap();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(stdout.contains("created database"), "{stdout}");
    assert!(stdout.contains("applied 1 ops schema"), "{stdout}");

    let second = opsgate(&url).output().unwrap();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success());
    assert!(stdout.contains("no pending migrations"), "{stdout}");
    assert!(!stdout.contains("applied 1"), "{stdout}");

    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(drop_database(&database_name(&settings)));
}

#[test]
fn migrate_without_a_server_fails_in_one_clear_line() {
    // Nothing listens on port 1.
    let output = opsgate("postgres://postgres@127.0.0.1:1/opsgate")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach PostgreSQL at 127.0.0.1:1/opsgate"),
        "{stderr}"
    );
    assert!(stderr.contains("docker compose up -d"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
