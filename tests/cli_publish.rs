//! `opsgate publish` against a running worker.

mod common;

use std::process::{Command, Output};

use common::worker::*;
use common::*;

fn publish(settings: &opsgate::config::Settings, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .arg("publish")
        .args(args)
        .envs(env_of(settings))
        .env_remove("RUST_LOG")
        .output()
        .expect("run opsgate publish")
}

const RELEASE: &str = r#"{"project": "acme/odoo", "release_name": "v2026.02.4", "environment_target": "production",
                          "source_ref": "abc123", "initiating_actor": "dev-1"}"#;

// Multi-threaded: the CLI runs as a blocking subprocess while the worker runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_prints_accepted_then_duplicate_and_exits_2_when_rejected() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let args = [
        "--event",
        "release_created",
        "--source",
        "github_actions",
        "--payload",
        RELEASE,
        "--wait",
    ];
    let first = publish(&settings, &args);
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let reply: serde_json::Value = serde_json::from_slice(&first.stdout).expect("JSON reply");
    assert_eq!(reply["status"], "accepted");
    let release_id = opsgate::publish::release_id_for("acme/odoo", "v2026.02.4");
    assert_eq!(reply["result"]["release_id"], release_id.to_string());

    // A retried CI job publishes the very same event: same release, same key.
    let again = publish(&settings, &args);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    let reply_again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(reply_again["status"], "duplicate");
    assert_eq!(reply_again["idempotency_key"], reply["idempotency_key"]);
    assert_eq!(reply_again["result"], reply["result"]);

    let bad = publish(
        &settings,
        &[
            "--event",
            "check_result",
            "--release",
            &release_id.to_string(),
            "--gate",
            "G1",
            "--payload",
            "{}",
            "--wait",
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let rejected: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["code"], 400);
    assert!(rejected["error"].as_str().unwrap().contains("check_name"));

    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn publish_to_a_namespace_nobody_declared_exits_3() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    // No producer or worker declared this namespace: the exchange is missing.
    let output = publish(&settings, &["--event", "release_created", "--payload", RELEASE]);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");

    // Declared but without a binding for nothing: unroutable with mandatory -> 3.
    let producer = Producer::new(&settings).await;
    let channel = producer.connection.create_channel().await.unwrap();
    channel
        .queue_unbind(
            producer.topology.ingest_queue.as_str().into(),
            producer.topology.exchange.as_str().into(),
            "#".into(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let output = publish(&settings, &["--event", "release_created", "--payload", RELEASE]);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    producer.finish().await;
}

#[tokio::test]
async fn publish_envelope_sends_the_given_bytes_unchanged() {
    // A dead letter saved and replayed must be the same message: key order,
    // spacing and large numbers as given.
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let given = format!(
        r#"{{"schema_version": "1.0", "release_id": "{}", "idempotency_key": "ci/replay/1",
  "event_type": "release_created", "source_system": "ci", "emitted_at": "2026-11-24T10:00:00Z",
  "payload": {{"project": "acme/odoo", "release_name": "v1", "environment_target": "production",
               "source_ref": "abc", "initiating_actor": "dev-1",
               "scope_metadata": {{"build": 12345678901234567890123, "ratio": 0.1000000000000000055511}}}}}}"#,
        fresh_release()
    );
    let output = publish(&settings, &["--envelope", &given]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");

    let channel = producer.connection.create_channel().await.unwrap();
    let message = channel
        .basic_get(
            producer.topology.ingest_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the published message");
    assert_eq!(String::from_utf8_lossy(&message.delivery.data), given);
    assert_eq!(message.delivery.routing_key.as_str(), "release_created");
    producer.finish().await;
}

/// A broker (or a load balancer) that accepts the connection and never
/// answers must not hang a CI step: the attempt fails after
/// `amqp.connect_timeout_secs`, with exit 1.
#[test]
fn publish_gives_up_on_a_broker_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a silent listener");
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Accept and hold every connection, saying nothing.
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .args(["publish", "--event", "check_result", "--gate", "G1"])
        .args(["--release", &uuid::Uuid::new_v4().to_string()])
        .args(["--payload", r#"{"check_name": "lint", "status": "pass"}"#])
        .env(
            "OPSGATE__AMQP__URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )
        .env("OPSGATE__AMQP__CONNECT_TIMEOUT_SECS", "1")
        .env_remove("AMQP_URL")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run opsgate publish");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("opsgate publish still waits for a silent broker after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no answer within 1s"), "{stderr}");
}

/// The event is published whoever reads the report: `opsgate publish … |
/// true` exits 0, not with a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_exits_0_when_nobody_reads_its_output() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .args(["publish", "--event", "release_created", "--payload", RELEASE])
        .envs(env_of(&settings))
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run opsgate publish");
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // And it was published.
    let channel = producer.publisher.channel();
    let queued = channel
        .queue_declare(
            producer.topology.ingest_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(queued.message_count(), 1);
    producer.finish().await;
}

/// A payload given beside a whole envelope would be silently ignored: it is
/// a usage error instead. A payload from stdin that is not text says so.
#[test]
fn publish_refuses_a_payload_beside_an_envelope_and_names_stdin() {
    let both = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .args(["publish", "--envelope", "{}", "--payload", r#"{"a": 1}"#])
        .env_remove("RUST_LOG")
        .output()
        .expect("run opsgate publish");
    assert_eq!(both.status.code(), Some(64), "{both:?}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .args([
            "publish",
            "--event",
            "check_result",
            "--gate",
            "G1",
            "--payload",
            "-",
        ])
        .args(["--release", &uuid::Uuid::new_v4().to_string()])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run opsgate publish");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &[0xff, 0xfe]).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read payload from standard input"),
        "{stderr}"
    );
}
