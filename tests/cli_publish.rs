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
        .env_remove("OPSGATE_SOURCE_SYSTEM")
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

    // A wait of no time would always time out, after publishing.
    let no_wait = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .args([
            "publish",
            "--event",
            "release_created",
            "--payload",
            RELEASE,
            "--wait",
            "--timeout",
            "0",
        ])
        .env_remove("RUST_LOG")
        .output()
        .expect("run opsgate publish");
    assert_eq!(no_wait.status.code(), Some(64), "{no_wait:?}");
    assert!(
        String::from_utf8_lossy(&no_wait.stderr).contains("--timeout"),
        "{no_wait:?}"
    );

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

/// Like `publish`, with `stdin` as the standard input.
fn publish_with_stdin(settings: &opsgate::config::Settings, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .arg("publish")
        .args(args)
        .envs(env_of(settings))
        .env_remove("RUST_LOG")
        .env_remove("OPSGATE_SOURCE_SYSTEM")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run opsgate publish");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// The next message on the ingest queue: its envelope and routing key.
async fn take_published(producer: &Producer) -> (serde_json::Value, String) {
    let channel = producer.publisher.channel();
    let message = channel
        .basic_get(
            producer.topology.ingest_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a published message on the ingest queue");
    let envelope = serde_json::from_slice(&message.delivery.data).expect("a JSON envelope");
    (envelope, message.delivery.routing_key.to_string())
}

/// `published <key>`, the report of a publish without `--wait`.
fn published_key(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    stdout
        .trim_end()
        .strip_prefix("published ")
        .unwrap_or_else(|| panic!("unexpected report {stdout:?}"))
        .to_owned()
}

/// Canonical JSON as the contract defines it (sorted keys, no whitespace),
/// written out here rather than taken from serde_json's own ordering.
fn canonical_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::Value::from(k.as_str()),
                        canonical_json(&map[k])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        scalar => scalar.to_string(),
    }
}

/// The default key per the producer contract §9: `<source>/<release>/<event>/`
/// + first 16 hex of SHA-256 over canonical `{"gate_code", "payload"}`.
fn documented_key(
    source: &str,
    release: uuid::Uuid,
    event: &str,
    gate: Option<&str>,
    payload: &str,
) -> String {
    let payload: serde_json::Value = serde_json::from_str(payload).unwrap();
    let hashed = serde_json::json!({"gate_code": gate, "payload": payload});
    let digest = <sha2::Sha256 as sha2::Digest>::digest(canonical_json(&hashed).as_bytes());
    format!("{source}/{release}/{event}/{}", &hex::encode(digest)[..16])
}

/// The release id per the producer contract §8.1: UUIDv5 in the documented
/// namespace of `"<project>/<release_name>"`.
fn documented_release_id(project: &str, release_name: &str) -> uuid::Uuid {
    let namespace = uuid::Uuid::parse_str("6f707367-6174-6552-656c-656173654964").unwrap();
    uuid::Uuid::new_v5(&namespace, format!("{project}/{release_name}").as_bytes())
}

#[tokio::test]
async fn publish_wait_without_a_worker_times_out_after_timeout_and_exits_3() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    // Topology declared, nobody consuming.
    let producer = Producer::new(&settings).await;
    let release = fresh_release().to_string();
    let started = std::time::Instant::now();
    let output = publish(
        &settings,
        &[
            "--event",
            "check_result",
            "--gate",
            "G1",
            "--release",
            &release,
            "--payload",
            r#"{"check_name": "lint", "status": "pass"}"#,
            "--wait",
            "--timeout",
            "1",
        ],
    );
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    // --timeout is honoured, not the default 30 s.
    assert!(elapsed < std::time::Duration::from_secs(20), "took {elapsed:?}");
    // It was delivered (not a NO_ROUTE exit 3), only never answered.
    assert_eq!(producer.ready_count().await, 1);
    let (envelope, _) = take_published(&producer).await;
    let key = envelope["idempotency_key"].as_str().unwrap();
    assert!(
        stderr.contains(&format!("no reply for {key} within 1s")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{output:?}");
    producer.finish().await;
}

#[tokio::test]
async fn publish_reads_the_payload_from_a_file() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let release = fresh_release();
    let text = "{\n  \"check_name\": \"from-file\",\n  \"status\": \"warning\",\n  \"details\": {\"n\": [1, 2]}\n}\n";
    let path = std::env::temp_dir().join(format!("opsgate-payload-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    let argument = format!("@{}", path.display());
    let output = publish(
        &settings,
        &[
            "--event",
            "check_result",
            "--gate",
            "G1",
            "--release",
            &release.to_string(),
            "--payload",
            &argument,
        ],
    );
    std::fs::remove_file(&path).unwrap();
    let key = published_key(&output);

    let (envelope, routing_key) = take_published(&producer).await;
    let expected: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(envelope["payload"], expected);
    assert_eq!(envelope["idempotency_key"], key.as_str());
    assert_eq!(envelope["release_id"], release.to_string());
    assert_eq!(envelope["gate_code"], "G1");
    assert_eq!(routing_key, "check_result");

    // A file that cannot be read publishes nothing.
    let missing = format!("@{}", path.display());
    let output = publish(
        &settings,
        &[
            "--event",
            "check_result",
            "--release",
            &release.to_string(),
            "--payload",
            &missing,
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot read payload file"),
        "{output:?}"
    );
    assert_eq!(producer.ready_count().await, 0);
    producer.finish().await;
}

#[tokio::test]
async fn publish_reads_the_payload_from_stdin() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let release = fresh_release();
    let text = r#"{"check_name": "from-stdin", "status": "fail", "details": {"exit": 2}}"#;
    let output = publish_with_stdin(
        &settings,
        &[
            "--event",
            "check_result",
            "--gate",
            "G3",
            "--release",
            &release.to_string(),
            "--payload",
            "-",
        ],
        text.as_bytes(),
    );
    let key = published_key(&output);

    let (envelope, routing_key) = take_published(&producer).await;
    let expected: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(envelope["payload"], expected);
    assert_eq!(envelope["idempotency_key"], key.as_str());
    assert_eq!(envelope["release_id"], release.to_string());
    assert_eq!(envelope["gate_code"], "G3");
    assert_eq!(routing_key, "check_result");
    producer.finish().await;
}

#[tokio::test]
async fn publish_uses_a_given_key_unchanged() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let release = fresh_release().to_string();
    // Nothing like the default format: spaces, upper case, non-ASCII, trailing slash.
    let given = format!("CI Run/{}/ÄÖ 42/", uuid::Uuid::new_v4().simple());
    let output = publish(
        &settings,
        &[
            "--event",
            "check_result",
            "--gate",
            "G1",
            "--release",
            &release,
            "--key",
            &given,
            "--payload",
            r#"{"check_name": "lint", "status": "pass"}"#,
        ],
    );
    assert_eq!(published_key(&output), given);
    let (envelope, _) = take_published(&producer).await;
    assert_eq!(envelope["idempotency_key"], given.as_str());
    producer.finish().await;
}

#[tokio::test]
async fn publish_default_key_is_source_release_event_and_the_documented_payload_hash() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let release = fresh_release();
    let release_text = release.to_string();
    let publish_check = |gate: &str, payload: &str| {
        published_key(&publish(
            &settings,
            &[
                "--event",
                "check_result",
                "--source",
                "ci_keys",
                "--gate",
                gate,
                "--release",
                &release_text,
                "--payload",
                payload,
            ],
        ))
    };
    // Unsorted keys, spacing and nesting: the hash is over canonical JSON.
    let payload = r#"{ "status" : "pass", "check_name": "e2e", "details": {"z": [3, {"b": 1, "a": null}], "a": true} }"#;
    let reordered = r#"{"check_name":"e2e","details":{"a":true,"z":[3,{"a":null,"b":1}]},"status":"pass"}"#;
    let other = r#"{"check_name": "e2e", "status": "fail"}"#;

    let key = publish_check("G2", payload);
    assert_eq!(
        key,
        documented_key("ci_keys", release, "check_result", Some("G2"), payload)
    );
    let (envelope, _) = take_published(&producer).await;
    assert_eq!(envelope["idempotency_key"], key.as_str());

    assert_eq!(publish_check("G2", reordered), key, "same payload, same key");
    let other_key = publish_check("G2", other);
    assert_ne!(other_key, key, "different payload, different key");
    assert_eq!(
        other_key,
        documented_key("ci_keys", release, "check_result", Some("G2"), other)
    );
    let g3_key = publish_check("G3", payload);
    assert_ne!(g3_key, key, "same payload for another gate, another key");
    assert_eq!(
        g3_key,
        documented_key("ci_keys", release, "check_result", Some("G3"), payload)
    );

    // Without --gate the hash covers a null gate_code; the default source is `manual`.
    let created = r#"{"project": "acme/keys", "release_name": "v1", "environment_target": "dev",
                      "source_ref": "abc", "initiating_actor": "dev-1"}"#;
    let key = published_key(&publish(
        &settings,
        &["--event", "release_created", "--payload", created],
    ));
    let derived = documented_release_id("acme/keys", "v1");
    assert_eq!(
        key,
        documented_key("manual", derived, "release_created", None, created)
    );
    producer.finish().await;
}

#[tokio::test]
async fn publish_release_created_derives_the_documented_uuidv5_release_id() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let project = format!("acme/{}", uuid::Uuid::new_v4().simple());
    let created = |name: &str, source_ref: &str| {
        serde_json::json!({
            "project": project, "release_name": name, "environment_target": "staging",
            "source_ref": source_ref, "initiating_actor": "dev-1",
        })
        .to_string()
    };
    let mut release_ids = Vec::new();
    // The same project and name twice (other fields differing), then another name.
    for (name, source_ref) in [("v1.0", "abc"), ("v1.0", "def"), ("v1.1", "abc")] {
        let payload = created(name, source_ref);
        let output = publish(&settings, &["--event", "release_created", "--payload", &payload]);
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        let (envelope, _) = take_published(&producer).await;
        let release_id: uuid::Uuid = envelope["release_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(release_id, documented_release_id(&project, name), "{name}");
        assert_eq!(
            envelope["release_id"],
            release_id.to_string(),
            "hyphenated, lowercase"
        );
        release_ids.push(release_id);
    }
    assert_eq!(release_ids[0], release_ids[1]);
    assert_ne!(release_ids[0], release_ids[2]);
    producer.finish().await;
}
