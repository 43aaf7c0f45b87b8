//! The worker through the real queue: every outcome with its ledger row and
//! dead-letter headers, replies, and exactly-once under concurrency.

mod common;

use common::seed;
use common::worker::*;
use common::*;
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

async fn release_count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops.releases")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn accepted_then_duplicate_with_the_original_result_and_no_second_effect() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let release = release_created(fresh_release(), "v1");
    let (first, _) = producer.request(&release).await;
    assert_eq!(first["status"], "accepted");
    assert_eq!(first["code"], 200);
    assert_eq!(first["result"]["release_name"], "v1");

    let (second, _) = producer.request(&release).await;
    assert_eq!(second["status"], "duplicate");
    assert_eq!(second["code"], 200);
    assert_eq!(
        second["result"], first["result"],
        "a duplicate carries the original result"
    );

    assert_eq!(release_count(&db).await, 1);
    assert_eq!(
        ledger(&db.pool, &key_of(&release)).await,
        vec![("accepted".to_owned(), 200), ("duplicate".to_owned(), 200)]
    );
    worker.stop().await;
    producer.finish().await;
}

/// Publishes `body` and returns the dead letter's code header and error.
async fn rejected(producer: &Producer, body: &[u8]) -> (i64, String) {
    producer.publish_bare(body, "whatever").await;
    let (dead_body, headers) = producer.next_dead_letter(SECS_10).await;
    assert_eq!(dead_body, body, "the dead letter is the original body");
    assert_eq!(
        header_str(&headers, "x-opsgate-status").as_deref(),
        Some("rejected")
    );
    assert!(header_str(&headers, "x-opsgate-failed-at").is_some());
    assert_eq!(header_i64(&headers, "x-opsgate-attempt"), Some(1));
    (
        header_i64(&headers, "x-opsgate-code").expect("code header"),
        header_str(&headers, "x-opsgate-error").expect("error header"),
    )
}

#[tokio::test]
async fn malformed_messages_are_rejected_with_400_and_dead_lettered() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let valid = release_created(fresh_release(), "v1");
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    for field in [
        "schema_version",
        "idempotency_key",
        "event_type",
        "source_system",
        "release_id",
        "payload",
        "emitted_at",
    ] {
        let mut envelope = valid.clone();
        envelope.as_object_mut().unwrap().remove(field);
        envelope["idempotency_key"] = json!(format!("missing-{field}-{}", Uuid::new_v4()));
        if field == "idempotency_key" {
            envelope.as_object_mut().unwrap().remove(field);
        }
        cases.push((
            format!("missing {field}"),
            serde_json::to_vec(&envelope).unwrap(),
            field,
        ));
    }
    let wrong_types: [(&str, Value); 8] = [
        ("schema_version", json!(1.0)),
        ("idempotency_key", json!(7)),
        ("source_system", json!({"ci": "github"})),
        ("release_id", json!(42)),
        ("payload", json!("text")),
        ("event_type", json!(["release_created"])),
        ("emitted_at", json!("yesterday")),
        ("gate_code", json!("G5")),
    ];
    for (field, value) in wrong_types {
        let mut envelope = valid.clone();
        envelope["idempotency_key"] = json!(format!("wrong-{field}-{}", Uuid::new_v4()));
        envelope[field] = value;
        cases.push((
            format!("ill-typed {field}"),
            serde_json::to_vec(&envelope).unwrap(),
            field,
        ));
    }
    let mut unknown = valid.clone();
    unknown["event_type"] = json!("release_deleted");
    cases.push((
        "unknown event type".into(),
        serde_json::to_vec(&unknown).unwrap(),
        "event_type",
    ));
    cases.push(("not JSON".into(), b"{not json".to_vec(), "not JSON"));
    cases.push((
        "JSON but not an object".into(),
        b"[]".to_vec(),
        "not a JSON object",
    ));
    cases.push(("not UTF-8".into(), vec![0xff, 0xfe, 0x7b], "UTF-8"));
    let mut nul = valid.clone();
    nul["payload"]["release_name"] = json!("v1\u{0}");
    cases.push(("NUL character".into(), serde_json::to_vec(&nul).unwrap(), "NUL"));
    // Refused for the NUL in its key, and still recorded (with the key as
    // PostgreSQL can store it).
    let mut nul_key = valid.clone();
    nul_key["idempotency_key"] = json!(format!("nul-\u{0}-{}", Uuid::new_v4()));
    cases.push((
        "NUL character in the key".into(),
        serde_json::to_vec(&nul_key).unwrap(),
        "NUL",
    ));

    for (case, body, mention) in &cases {
        let (code, error) = rejected(&producer, body).await;
        assert_eq!(code, 400, "{case}: {error}");
        assert!(error.contains(mention), "{case}: {error}");
    }
    let rows: Vec<(i16, String)> = sqlx::query_as(
        "SELECT response_code, error_detail FROM ops.event_ingest_log WHERE processing_status = 'rejected'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), cases.len(), "every attempt leaves a ledger row");
    assert!(rows.iter().all(|(code, _)| *code == 400));
    assert_eq!(release_count(&db).await, 0);
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn a_huge_bad_field_is_dead_lettered_with_a_short_error() {
    // The error quotes the field; a dead letter's headers must fit in one
    // AMQP frame (128 KiB), or RabbitMQ closes the worker's connection.
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let mut huge = release_created(fresh_release(), "v1");
    huge["release_id"] = json!("x".repeat(150_000));
    let (code, error) = rejected(&producer, &serde_json::to_vec(&huge).unwrap()).await;
    assert_eq!(code, 400, "{error}");
    assert!(error.starts_with("release_id \"xxx"), "{error}");
    assert!(error.contains("(150000 bytes) is not a UUID"), "{error}");
    assert!(error.len() < 1024, "{} bytes", error.len());
    let stored: Vec<String> = sqlx::query_scalar("SELECT error_detail FROM ops.event_ingest_log")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, vec![error], "one attempt, one ledger row");

    // The worker is still connected and consuming.
    let next = release_created(fresh_release(), "v2");
    let (reply, _) = producer.request(&next).await;
    assert_eq!(reply["status"], "accepted");
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn a_closed_publishing_channel_makes_the_worker_reconnect() {
    // Publishing to a missing exchange makes RabbitMQ close the worker's
    // publishing channel for good; the consuming channel stays open. The
    // worker must notice, reconnect and redeclare, not retry forever.
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let (reply, _) = producer.request(&release_created(fresh_release(), "v1")).await;
    assert_eq!(reply["status"], "accepted", "the worker is up");

    let channel = producer.connection.create_channel().await.unwrap();
    channel
        .exchange_delete(
            producer.topology.dead_letter_exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let (code, error) = rejected(&producer, b"{not json").await;
    assert_eq!(code, 400, "{error}");

    // Replies flow again too.
    let (reply, _) = producer.request(&release_created(fresh_release(), "v2")).await;
    assert_eq!(reply["status"], "accepted");
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_rejected_with_413() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__MAX_BODY_BYTES", "2048")]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let mut big = release_created(fresh_release(), "v1");
    big["payload"]["scope_metadata"] = json!({"notes": "x".repeat(4096)});
    let (code, error) = rejected(&producer, &serde_json::to_vec(&big).unwrap()).await;
    assert_eq!(code, 413, "{error}");
    assert_eq!(ledger(&db.pool, &key_of(&big)).await, vec![]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.event_ingest_log WHERE response_code = 413")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn unknown_schema_version_and_a_reused_key_are_rejected_with_422() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let mut future = release_created(fresh_release(), "v1");
    future["schema_version"] = json!("v2.0");
    let (code, error) = rejected(&producer, &serde_json::to_vec(&future).unwrap()).await;
    assert_eq!(code, 422, "{error}");
    assert_eq!(
        ledger(&db.pool, &key_of(&future)).await,
        vec![("rejected".to_owned(), 422)]
    );

    let original = release_created(fresh_release(), "v2");
    let (reply, _) = producer.request(&original).await;
    assert_eq!(reply["status"], "accepted");
    let mut reused = release_created(fresh_release(), "v3");
    reused["idempotency_key"] = original["idempotency_key"].clone();
    let (reply, _) = producer.request(&reused).await;
    assert_eq!(
        (reply["status"].as_str(), reply["code"].as_i64()),
        (Some("rejected"), Some(422))
    );
    assert!(
        reply["error"].as_str().unwrap().contains("different payload"),
        "{reply}"
    );
    let (_, headers) = producer.next_dead_letter(SECS_10).await;
    assert_eq!(header_i64(&headers, "x-opsgate-code"), Some(422));
    assert_eq!(
        ledger(&db.pool, &key_of(&original)).await,
        vec![("accepted".to_owned(), 200), ("rejected".to_owned(), 422)]
    );
    assert_eq!(release_count(&db).await, 1);
    worker.stop().await;
    producer.finish().await;
}

fn check_for(release_id: Uuid) -> Value {
    envelope(
        "check_result",
        release_id,
        Some("G1"),
        json!({"check_name": "unit_tests", "status": "pass"}),
    )
}

#[tokio::test]
async fn an_unknown_release_is_retried_then_dead_lettered_with_409() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]); // retries after 1 s and 1 s
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let orphan = check_for(fresh_release());
    producer.publish(&orphan).await;
    let (_, headers) = producer.next_dead_letter(SECS_20).await;
    assert_eq!(header_i64(&headers, "x-opsgate-code"), Some(409));
    assert_eq!(header_i64(&headers, "x-opsgate-attempt"), Some(3));
    assert!(
        header_str(&headers, "x-opsgate-error")
            .unwrap()
            .contains("retries exhausted")
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&orphan)).await,
        vec![
            ("error".to_owned(), 409),
            ("error".to_owned(), 409),
            ("rejected".to_owned(), 409)
        ]
    );
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn a_release_created_arriving_during_the_retries_rescues_the_event() {
    let db = TestDb::new().await;
    // The release_created has at least 4.8 s (6 s less the jitter) to be
    // applied before the retry comes.
    let settings = settings_for(&db, &[("OPSGATE__RETRY__SCHEDULE_SECS", "6,6")]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let release_id = fresh_release();
    let early = check_for(release_id);
    producer.publish(&early).await;
    let rows = wait_for_status(&db.pool, &key_of(&early), "error", SECS_10).await;
    assert_eq!(rows, vec![("error".to_owned(), 409)]);

    let (reply, _) = producer.request(&release_created(release_id, "v1")).await;
    assert_eq!(reply["status"], "accepted");
    let rows = wait_for_status(&db.pool, &key_of(&early), "accepted", SECS_20).await;
    assert_eq!(
        rows,
        vec![("error".to_owned(), 409), ("accepted".to_owned(), 200)]
    );
    let status: String = sqlx::query_scalar(
        "SELECT status::text FROM ops.release_gates WHERE release_id = $1 AND gate_code = 'G1'",
    )
    .bind(release_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(status, "passed");
    assert_eq!(producer.dead_letter_count().await, 0);
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn the_same_key_delivered_to_two_consumers_at_once_is_accepted_exactly_once() {
    let db = TestDb::new().await;
    // One message at a time each, so RabbitMQ hands the copies out in turn.
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__AMQP__PREFETCH", "1"),
            ("OPSGATE__WORKER__MAX_IN_FLIGHT", "1"),
        ],
    );
    let producer = Producer::new(&settings).await;
    // Two workers (two connections, two consumers), both consuming before
    // the copies arrive, race for the same key.
    let first = start_worker(&settings);
    let second = start_worker(&settings);
    producer.wait_for_consumers(2, SECS_10).await;
    let release = release_created(fresh_release(), "v1");
    for _ in 0..20 {
        producer.publish(&release).await;
    }
    let count = wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.event_ingest_log WHERE processing_status IN ('accepted', 'duplicate')",
        20,
        SECS_20,
    )
    .await;
    assert_eq!(count, 20);
    let rows = ledger(&db.pool, &key_of(&release)).await;
    assert_eq!(
        rows.iter().filter(|(s, _)| s == "accepted").count(),
        1,
        "{rows:?}"
    );
    assert_eq!(
        rows.iter().filter(|(s, _)| s == "duplicate").count(),
        19,
        "{rows:?}"
    );
    assert_eq!(release_count(&db).await, 1);
    first.stop().await;
    second.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn a_message_without_any_properties_is_accepted() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let release = release_created(fresh_release(), "v1");
    producer
        .publish_bare(&serde_json::to_vec(&release).unwrap(), "release_created")
        .await;
    let rows = wait_for_status(&db.pool, &key_of(&release), "accepted", SECS_10).await;
    assert_eq!(rows, vec![("accepted".to_owned(), 200)]);
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn the_worker_declares_its_topology_and_drains_what_was_waiting() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let releases: Vec<Value> = (0..30)
        .map(|i| release_created(fresh_release(), &format!("v{i}")))
        .collect();
    for release in &releases {
        producer.publish(release).await;
    }
    let worker = start_worker(&settings);
    let count = wait_for_count(&db.pool, "SELECT count(*) FROM ops.releases", 30, SECS_20).await;
    assert_eq!(count, 30);
    worker.stop().await;
    producer.finish().await;
}

/// On a namespace nobody has declared, the worker declares the whole
/// topology itself: quorum queues with the configured delivery limit, the
/// retry tiers, the dead letters; and producers' messages are routed and
/// processed.
#[tokio::test]
async fn the_worker_declares_the_topology_on_a_fresh_namespace() {
    let db = TestDb::new().await;
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__AMQP__DELIVERY_LIMIT", "7"),
            ("OPSGATE__RETRY__SCHEDULE_SECS", "1,3"),
        ],
    );
    let topology = topology(&settings);
    let worker = start_worker(&settings);
    let connection = opsgate::broker::connect(&settings.amqp, "opsgate-test-inspector")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + SECS_10;
    while passive_declare(&connection, &topology.ingest_queue).await != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker consumes its queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut queues = vec![topology.dead_queue.clone()];
    queues.extend(topology.retry_queues().into_iter().map(|(name, _)| name));
    for queue in &queues {
        assert!(
            passive_declare(&connection, queue).await.is_some(),
            "{queue} exists"
        );
    }
    // RabbitMQ refuses a declaration whose arguments differ from the
    // queue's: the same topology is accepted (quorum queues, TTLs, dead
    // lettering as declared), another delivery limit is not.
    let channel = connection.create_channel().await.unwrap();
    topology
        .declare(&channel)
        .await
        .expect("the worker declared exactly this topology");
    let other_limit =
        opsgate::broker::Topology::new(&settings.amqp.namespace, topology.retry_delays.clone(), 8);
    let channel = connection.create_channel().await.unwrap();
    let refused = other_limit
        .declare(&channel)
        .await
        .expect_err("the delivery limit is 7, not 8");
    assert!(refused.to_string().contains(&topology.ingest_queue), "{refused}");

    // Mandatory publishing through the exchange: unroutable would fail.
    let producer = Producer::new(&settings).await;
    let release = release_created(fresh_release(), "v1");
    producer.publish(&release).await;
    let rows = wait_for_status(&db.pool, &key_of(&release), "accepted", SECS_10).await;
    assert_eq!(rows, vec![("accepted".to_owned(), 200)]);
    let _ = connection.close(200, "test done".into()).await;
    worker.stop().await;
    producer.finish().await;
}

/// The consumer count of `queue`, or `None` when it does not exist.
async fn passive_declare(connection: &lapin::Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "inspected".into()).await;
    Some(declared.consumer_count())
}

async fn eligible(db: &TestDb, release_id: Uuid, env: &str) -> bool {
    sqlx::query_scalar("SELECT ops.is_eligible_for_promotion($1, $2)")
        .bind(release_id)
        .bind(env)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn gates(db: &TestDb, release_id: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT status::text FROM ops.release_gates WHERE release_id = $1 ORDER BY gate_code")
        .bind(release_id)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

async fn release_status(db: &TestDb, release_id: Uuid) -> String {
    sqlx::query_scalar("SELECT status::text FROM ops.releases WHERE release_id = $1")
        .bind(release_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Publishes and expects the worker to accept.
async fn accept(producer: &Producer, envelope: Value) -> Value {
    let (reply, _) = producer.request(&envelope).await;
    assert_eq!(reply["status"], "accepted", "{envelope}\n-> {reply}");
    reply["result"].clone()
}

#[tokio::test]
async fn a_whole_release_goes_from_g1_to_g4_through_the_queue() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let r = fresh_release();

    accept(&producer, release_created(r, "v2026.02.4")).await;
    assert_eq!(gates(&db, r).await, ["pending", "pending", "pending", "pending"]);
    assert_eq!(release_status(&db, r).await, "draft");
    assert!(!eligible(&db, r, "staging").await);

    // G1: CI build.
    let sha = "a".repeat(40);
    let build = accept(
        &producer,
        envelope(
            "build_complete",
            r,
            Some("G1"),
            json!({"status": "pass", "git_sha": sha, "branch": "main", "commit_message": "release", "author": "dev-1",
                   "build_log_url": "https://ci.example/run/1/log", "image_digest": format!("sha256:{}", "b".repeat(64))}),
        ),
    )
    .await;
    assert_eq!(build["gate_status"], "passed");
    assert!(eligible(&db, r, "dev").await, "G1 is all dev asks for");
    assert!(!eligible(&db, r, "staging").await, "G2 still missing");

    // G2: QA evidence and signoff (n8n agent).
    accept(
        &producer,
        envelope(
            "evidence_attached",
            r,
            Some("G2"),
            json!({"artifact_type": "uat_summary", "artifact_url": "https://qa.example/uat/1"}),
        ),
    )
    .await;
    let signoff = accept(
        &producer,
        envelope(
            "gate_signoff",
            r,
            Some("G2"),
            json!({"approver_id": "qa-1", "persona_role": "qa_tester", "decision": "approved"}),
        ),
    )
    .await;
    assert_eq!(signoff["gate_status"], "passed");
    assert!(eligible(&db, r, "staging").await);
    assert!(!eligible(&db, r, "production").await);

    // Staging deployment and its health.
    let staging = Uuid::new_v4();
    for status in ["in_progress", "succeeded"] {
        accept(
            &producer,
            envelope(
                "deployment_event",
                r,
                None,
                json!({"deployment_id": staging, "environment": "staging", "status": status, "deployed_by": "ci"}),
            ),
        )
        .await;
    }
    assert!(!eligible(&db, r, "production").await, "G3 still missing");

    // G3: rollback plan and the release manager's signoff.
    accept(
        &producer,
        envelope(
            "evidence_attached",
            r,
            Some("G3"),
            json!({"artifact_type": "rollback_plan", "artifact_url": "https://wiki.example/rollback"}),
        ),
    )
    .await;
    let g3 = accept(
        &producer,
        envelope(
            "gate_signoff",
            r,
            Some("G3"),
            json!({"approver_id": "rm-1", "persona_role": "release_manager", "decision": "approved"}),
        ),
    )
    .await;
    assert_eq!(g3["gate_status"], "passed");
    assert!(eligible(&db, r, "production").await);

    // Production deployment: eligible, so no policy violation.
    let production = Uuid::new_v4();
    let deployed = accept(
        &producer,
        envelope(
            "deployment_event",
            r,
            None,
            json!({"deployment_id": production, "environment": "production", "status": "succeeded", "deployed_by": "ci"}),
        ),
    )
    .await;
    assert_eq!(deployed["policy_violation"], false);
    assert_eq!(release_status(&db, r).await, "promoted");
    assert_eq!(gates(&db, r).await, ["passed", "passed", "passed", "in_progress"]);

    // G4: monitoring confirms within the SLA.
    let health = accept(
        &producer,
        envelope(
            "health_check",
            r,
            Some("G4"),
            json!({"deployment_id": production, "status": "pass"}),
        ),
    )
    .await;
    assert_eq!(health["g4_status"], "passed");
    assert_eq!(gates(&db, r).await, ["passed", "passed", "passed", "passed"]);
    assert_eq!(release_status(&db, r).await, "promoted");
    assert!(eligible(&db, r, "production").await, "confirmed in production");

    // The chain is reconstructible from ops.* alone.
    let ledger_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops.event_ingest_log WHERE release_id = $1 AND processing_status = 'accepted'",
    )
    .bind(r)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(ledger_rows, 10);
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.builds WHERE release_id = $1")
        .bind(r)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(builds, 1);
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn the_worker_runs_the_sweeps_on_its_interval() {
    let db = TestDb::new().await;
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__SWEEPS__ENABLED", "true"),
            ("OPSGATE__SWEEPS__INTERVAL_SECS", "1"),
        ],
    );
    let release_id = seed::release(&db.pool, "dev-1").await;
    let now = seed::now();
    // Recorded while active, expired by the time the worker runs.
    let exception = seed::exception(
        &db.pool,
        release_id,
        &["G3"],
        "rm-1",
        now - chrono::Duration::hours(1),
        now + chrono::Duration::milliseconds(300),
    )
    .await;
    let worker = start_worker(&settings);
    let expired = wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.exceptions WHERE expired_at IS NOT NULL",
        1,
        SECS_10,
    )
    .await;
    assert_eq!(expired, 1);
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops.environment_events WHERE event_type = 'exception_expired' AND payload ->> 'exception_id' = $1",
    )
    .bind(exception.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(events, 1);
    worker.stop().await;
    // The worker declared the namespace; remove it.
    Producer::new(&settings).await.finish().await;
}

#[tokio::test]
async fn a_message_committed_but_never_acked_is_a_duplicate_when_redelivered() {
    use lapin::options::{BasicGetOptions, BasicRecoverOptions};

    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let release = release_created(fresh_release(), "v1");
    producer.publish(&release).await;

    // A "worker" that takes the message, commits its effect, and dies before
    // the ack: the channel goes away with the delivery unacked.
    let channel = producer.connection.create_channel().await.unwrap();
    let message = channel
        .basic_get(
            producer.topology.ingest_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("the message is queued");
    let options = opsgate::ingest::IngestOptions {
        max_body_bytes: 1 << 20,
        writer: "crashed-worker".into(),
    };
    let outcome = opsgate::ingest::process(&db.pool, &message.delivery.data, 1, true, &options)
        .await
        .unwrap();
    assert_eq!(outcome.status, opsgate::ingest::Status::Accepted);
    let _ = channel.basic_recover(BasicRecoverOptions { requeue: true }).await;
    channel.close(200, "crash".into()).await.unwrap();

    // The real worker gets the redelivery and answers it as a duplicate.
    let worker = start_worker(&settings);
    let rows = wait_for_status(&db.pool, &key_of(&release), "duplicate", SECS_10).await;
    assert_eq!(
        rows,
        vec![("accepted".to_owned(), 200), ("duplicate".to_owned(), 200)]
    );
    assert_eq!(release_count(&db).await, 1, "exactly one effect");
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn deliveries_already_queued_are_applied_in_batches_of_at_most_batch_size() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__BATCH_SIZE", "4")]);
    let producer = Producer::new(&settings).await;
    for n in 0..40 {
        producer
            .publish(&release_created(fresh_release(), &format!("v{n}")))
            .await;
    }
    let worker = start_worker(&settings);
    let done = wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'accepted'",
        40,
        SECS_20,
    )
    .await;
    assert_eq!(done, 40);
    // Ledger rows written by one transaction share their xmin.
    let sizes: Vec<i64> =
        sqlx::query_scalar("SELECT count(*) FROM ops.event_ingest_log GROUP BY xmin::text ORDER BY 1 DESC")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        sizes[0] > 1,
        "a backlog is applied several messages per transaction: {sizes:?}"
    );
    assert!(
        sizes[0] <= 4,
        "never more than worker.batch_size per transaction: {sizes:?}"
    );
    assert_eq!(release_count(&db).await, 40);
    worker.stop().await;
    producer.finish().await;
}

/// A producer, a running worker and one release it has applied.
async fn start_with_a_release(
    db: &TestDb,
    settings: &opsgate::config::Settings,
) -> (Producer, RunningWorker, Uuid) {
    let producer = Producer::new(settings).await;
    let worker = start_worker(settings);
    let release = fresh_release();
    producer.publish(&release_created(release, "blocked")).await;
    wait_for_count(&db.pool, "SELECT count(*) FROM ops.releases", 1, SECS_10).await;
    (producer, worker, release)
}

#[tokio::test]
async fn a_batch_is_put_together_when_a_transaction_slot_frees_up() {
    let db = TestDb::new().await;
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__WORKER__MAX_TRANSACTIONS", "1"),
            ("OPSGATE__WORKER__BATCH_SIZE", "8"),
        ],
    );
    let (producer, worker, blocked) = start_with_a_release(&db, &settings).await;
    // Hold the release lock the worker takes, so that the only transaction
    // slot stays busy with the next event of that release.
    let holder = hold_release_lock(&db, blocked).await;
    producer
        .publish(&envelope(
            "check_result",
            blocked,
            Some("G1"),
            json!({"check_name": "lint", "status": "pass"}),
        ))
        .await;
    // The check is in the slot, waiting for the lock, before the others come.
    wait_for_lock_waits(&db, 1, SECS_10).await;
    for n in 0..6 {
        producer
            .publish(&release_created(fresh_release(), &format!("v{n}")))
            .await;
    }
    // All six delivered to the worker (none ready in the queue), then a
    // moment more in which nothing may start.
    let deadline = std::time::Instant::now() + SECS_10;
    while producer.ready_count().await > 0 {
        assert!(std::time::Instant::now() < deadline, "the worker takes the six");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        release_count(&db).await,
        1,
        "nothing else starts while the one transaction slot is busy"
    );

    free_release_lock(holder, blocked).await;
    let done = wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'accepted'",
        8,
        SECS_10,
    )
    .await;
    assert_eq!(done, 8);
    // The six that waited went together, in one transaction.
    let waited: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM ops.event_ingest_log WHERE event_type = 'release_created' AND release_id <> $1
         GROUP BY xmin::text",
    )
    .bind(blocked)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(waited, vec![6], "one batch for the deliveries that waited");
    worker.stop().await;
    producer.finish().await;
}

/// With `worker.batch_linger_ms`, a batch that is not full waits that long
/// for deliveries still on their way: events that arrive a little apart at
/// a steady rate share one transaction instead of one each.
#[tokio::test]
async fn a_batch_lingers_for_deliveries_on_their_way() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__BATCH_LINGER_MS", "1000")]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    producer.wait_for_consumers(1, SECS_10).await;
    for n in 0..3 {
        producer
            .publish(&release_created(fresh_release(), &format!("v{n}")))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'accepted'",
        3,
        SECS_10,
    )
    .await;
    let per_transaction: Vec<i64> =
        sqlx::query_scalar("SELECT count(*) FROM ops.event_ingest_log GROUP BY written_in_xact")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(per_transaction, vec![3], "one transaction for the three");
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn a_delivery_of_a_release_in_another_batch_waits_without_taking_a_transaction_slot() {
    let db = TestDb::new().await;
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__WORKER__MAX_TRANSACTIONS", "2"),
            ("OPSGATE__WORKER__BATCH_SIZE", "1"),
        ],
    );
    let (producer, worker, blocked) = start_with_a_release(&db, &settings).await;
    // The first check of the release takes a transaction slot and waits
    // there for the release lock, held here as another worker would.
    let holder = hold_release_lock(&db, blocked).await;
    for name in ["first", "second"] {
        producer
            .publish(&envelope(
                "check_result",
                blocked,
                Some("G1"),
                json!({"check_name": name, "status": "pass"}),
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The second check waits for the first without taking the other slot,
    // which serves the other releases meanwhile.
    for n in 0..3 {
        producer
            .publish(&release_created(fresh_release(), &format!("v{n}")))
            .await;
    }
    let others = wait_for_count(&db.pool, "SELECT count(*) FROM ops.releases", 4, SECS_10).await;
    assert_eq!(
        others, 4,
        "the other releases are applied while the blocked one waits"
    );

    free_release_lock(holder, blocked).await;
    let done = wait_for_count(&db.pool, "SELECT count(*) FROM ops.gate_checks", 2, SECS_10).await;
    assert_eq!(done, 2);
    // In the order they were published.
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT c.check_name FROM ops.gate_checks c JOIN ops.event_ingest_log l
             ON l.result ->> 'check_id' = c.check_id::text
         ORDER BY l.received_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(order, ["first", "second"]);
    worker.stop().await;
    producer.finish().await;
}

/// A retried or dead-lettered copy is a new message: it keeps the producer's
/// headers, but not RabbitMQ's record of the original's trips, which would
/// mislead whoever reads the dead letter (RabbitMQ 4 no longer updates an
/// `x-death` a publisher sent).
#[tokio::test]
async fn copies_keep_the_producers_headers_but_not_the_brokers_bookkeeping() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]); // retries after 1 s and 1 s
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-trace-id".into(), AMQPValue::LongString("trace-7".into()));
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(7));
    headers.insert(
        "x-first-death-queue".into(),
        AMQPValue::LongString("elsewhere".into()),
    );
    let orphan = check_for(fresh_release());
    producer
        .publish_raw(
            &serde_json::to_vec(&orphan).unwrap(),
            "check_result",
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await;

    // Two trips through the retry tiers, then the dead queue.
    let (_, headers) = producer.next_dead_letter(SECS_20).await;
    assert_eq!(header_i64(&headers, "x-opsgate-attempt"), Some(3));
    assert_eq!(header_str(&headers, "x-trace-id").as_deref(), Some("trace-7"));
    // (x-delivery-count is not checked: the dead queue sets its own on our get.)
    let names: Vec<String> = headers.inner().keys().map(|name| name.to_string()).collect();
    for bookkeeping in ["x-death", "x-first-death-queue", "x-last-death-queue"] {
        assert!(
            !names.iter().any(|name| name == bookkeeping),
            "the dead letter carries {bookkeeping}: {names:?}"
        );
    }
    worker.stop().await;
    producer.finish().await;
}

/// The worker and the sweeps write their own environment events (policy
/// violations, expired exceptions, overdue G4) under `opsgate/…` keys, each
/// only if its key is free: a producer's event under such a key would
/// suppress the real record, so it is refused.
#[tokio::test]
async fn a_key_in_opsgates_own_namespace_is_rejected_with_400() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let release = fresh_release();
    let (created, _) = producer.request(&release_created(release, "v1")).await;
    assert_eq!(created["status"], "accepted");
    let mut forged = envelope(
        "environment_event",
        release,
        None,
        json!({"environment": "production", "event_type": "config_change"}),
    );
    forged["idempotency_key"] = json!(format!("opsgate/policy_violation/{}", Uuid::new_v4()));
    let (reply, _) = producer.request(&forged).await;
    assert_eq!(reply["status"], "rejected", "{reply}");
    assert_eq!(reply["code"], 400);
    assert!(reply["error"].as_str().unwrap().contains("reserved"), "{reply}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.environment_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        events, 0,
        "no environment event was written under the reserved key"
    );
    worker.stop().await;
    producer.finish().await;
}

/// An audit can go from a change of derived state to the event that caused
/// it: the change's transaction is the one that wrote the event's ledger row.
#[tokio::test]
async fn a_gate_change_leads_back_to_the_event_that_caused_it() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let release = fresh_release();
    let (created, _) = producer.request(&release_created(release, "v1")).await;
    assert_eq!(created["status"], "accepted");
    let check = check_for(release);
    let (checked, _) = producer.request(&check).await;
    assert_eq!(checked["status"], "accepted", "{checked}");

    let causes: Vec<(String, String)> = sqlx::query_as(
        "SELECT l.idempotency_key, c.changed_by
         FROM ops.change_log c
         JOIN ops.release_gates g ON g.gate_id::text = c.row_key
         JOIN ops.event_ingest_log l ON l.written_in_xact = c.transaction_id AND l.processing_status = 'accepted'
         WHERE c.table_name = 'release_gates' AND c.release_id = $1 AND g.gate_code = 'G1'
           AND c.changes -> 'status' ->> 'to' = 'passed'",
    )
    .bind(release)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        causes,
        [(key_of(&check), "opsgate_worker".to_owned())],
        "G1 passed in the transaction that accepted the check"
    );
    worker.stop().await;
    producer.finish().await;
}

// --- A misbehaving broker (through `common::proxy`) ---------------------

/// Each session of the worker is two connections, opened one after the
/// other: the consuming one, then the publishing one.
const CONNECTIONS_PER_SESSION: usize = 2;

/// When each of the worker's sessions began (its consuming connection was
/// accepted by the proxy).
fn session_starts(proxy: &proxy::AmqpProxy) -> Vec<std::time::Instant> {
    proxy
        .accepted()
        .into_iter()
        .step_by(CONNECTIONS_PER_SESSION)
        .collect()
}

/// Gaps between the starts of the worker's sessions, once there are `n`.
async fn connection_gaps(proxy: &proxy::AmqpProxy, n: usize, timeout: Duration) -> Vec<Duration> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let started = session_starts(proxy);
        if started.len() >= n {
            return started.windows(2).take(n - 1).map(|w| w[1] - w[0]).collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} sessions within {timeout:?}",
            started.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Settings of a worker that reaches RabbitMQ through `proxy`, with the
/// reconnect backoff from `min_ms` to `max_ms`.
fn reconnecting_through(
    db: &TestDb,
    proxy: &proxy::AmqpProxy,
    min_ms: u64,
    max_ms: u64,
) -> opsgate::config::Settings {
    let (url, min, max) = (proxy.url(), min_ms.to_string(), max_ms.to_string());
    settings_for(
        db,
        &[
            ("OPSGATE__AMQP__URL", url.as_str()),
            ("OPSGATE__AMQP__RECONNECT_MIN_MS", min.as_str()),
            ("OPSGATE__AMQP__RECONNECT_MAX_MS", max.as_str()),
        ],
    )
}

fn millis(gaps: &[Duration]) -> Vec<u128> {
    gaps.iter().map(Duration::as_millis).collect()
}

/// A broker (or load balancer) that drops every connection soon after
/// accepting it is reconnected to with a growing pause, not at once.
#[tokio::test]
async fn sessions_that_end_soon_after_they_begin_back_off() {
    let db = TestDb::new().await;
    let proxy = proxy::AmqpProxy::start(proxy::Fault::CutAfter(Duration::from_millis(400))).await;
    let settings = reconnecting_through(&db, &proxy, 200, 3200);
    let worker = start_worker(&settings);
    // Each gap is the 400 ms session plus the pause: steps of 200, 400,
    // 800, 1600 and 3200 ms, each shortened by up to half.
    let gaps = connection_gaps(&proxy, 6, Duration::from_secs(30)).await;
    worker.stop().await;
    let ms = millis(&gaps);
    assert!(ms[0] < 1_150, "first pause is short: {ms:?}");
    assert!(ms[3] >= 1_150, "the pause grows: {ms:?}");
    assert!(ms[4] >= 1_950, "up to reconnect_max_ms: {ms:?}");
}

/// A session that lasted reconnect_max_ms or longer was healthy: the
/// reconnect after it is immediate, and the backoff starts over.
#[tokio::test]
async fn a_healthy_session_resets_the_reconnect_backoff() {
    let db = TestDb::new().await;
    // Short sessions long enough for both connections' handshakes on a slow
    // machine: a connection cut before its handshake ends is a failed
    // attempt, not a session, and would shift the count below.
    let short = Duration::from_millis(500);
    let sessions = [short, short, short, Duration::from_secs(3), short];
    // The proxy cuts each connection after its own duration: both of a session alike.
    let connections = sessions
        .iter()
        .flat_map(|duration| [*duration; CONNECTIONS_PER_SESSION])
        .collect();
    let proxy = proxy::AmqpProxy::start(proxy::Fault::CutAfterEach(connections)).await;
    let settings = reconnecting_through(&db, &proxy, 300, 2400);
    let worker = start_worker(&settings);
    let gaps = connection_gaps(&proxy, 6, Duration::from_secs(30)).await;
    worker.stop().await;
    let ms = millis(&gaps);
    // Pauses of 150-300, 300-600 and 600-1200 ms after the short sessions
    // (without growth the third gap would be at most 800 ms); without the
    // reset the next ones would be 1200-2400 ms.
    assert!(ms[2] >= 1_050, "the backoff grew first: {ms:?}");
    assert!(
        ms[3] < 3_000 + 1_000,
        "no pause after the healthy session: {ms:?}"
    );
    assert!(ms[4] < 1_300, "the backoff started over: {ms:?}");
}

/// Shutdown while the broker hangs in the middle of session setup (no
/// answer to `channel.open`) is prompt: nothing is in flight yet.
#[tokio::test]
async fn shutdown_during_session_setup_does_not_wait_for_the_broker() {
    // The first channel is the topology's, the second the consumer's.
    for channel in [1, 2] {
        let db = TestDb::new().await;
        let proxy = proxy::AmqpProxy::start(proxy::Fault::StallAtChannelOpen(channel)).await;
        let url = proxy.url();
        let settings = settings_for(&db, &[("OPSGATE__AMQP__URL", url.as_str())]);
        let worker = start_worker(&settings);
        tokio::time::timeout(SECS_10, proxy.stalled.notified())
            .await
            .expect("the worker opens a channel");
        worker.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), worker.handle)
            .await
            .unwrap_or_else(|_| panic!("the worker stops while channel {channel} hangs"))
            .expect("worker task");
    }
}

/// A message held while PostgreSQL is unreachable cannot be acked once the
/// broker connection is lost (RabbitMQ redelivers it): the worker stops
/// holding it and reconnects once the attempt in progress gives up
/// (database.acquire_timeout_secs), not when the database comes back, even
/// with every transaction slot held, when it is not waiting for a delivery.
#[tokio::test]
async fn a_lost_connection_stops_holding_messages_for_postgresql() {
    let db = TestDb::new().await;
    let proxy = proxy::AmqpProxy::start(proxy::Fault::CutOnDemand).await;
    let url = proxy.url();
    let direct = settings_for(&db, &[]);
    let namespace = direct.amqp.namespace.clone();
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__AMQP__URL", url.as_str()),
            ("OPSGATE__AMQP__NAMESPACE", namespace.as_str()),
            // Nothing listens on port 1: every attempt finds PostgreSQL down.
            (
                "OPSGATE__DATABASE__URL",
                "postgres://postgres@127.0.0.1:1/opsgate",
            ),
            ("OPSGATE__DATABASE__ACQUIRE_TIMEOUT_SECS", "1"),
            ("OPSGATE__WORKER__MAX_TRANSACTIONS", "1"),
            ("OPSGATE__WORKER__SHUTDOWN_TIMEOUT_SECS", "15"),
        ],
    );
    let producer = Producer::new(&direct).await;
    let worker = start_worker(&settings);
    producer.wait_for_consumers(1, SECS_10).await;
    producer.publish(&release_created(fresh_release(), "v1")).await;
    // Delivered (no longer ready in the queue), so held by the worker.
    let deadline = std::time::Instant::now() + SECS_10;
    while producer.ready_count().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker takes the message"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cut_at = std::time::Instant::now();
    proxy.cut();
    let deadline = cut_at + Duration::from_secs(30);
    let reconnected = loop {
        if let Some(at) = session_starts(&proxy).get(1) {
            break *at;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    worker.stop().await;
    producer.finish().await;
    let after = reconnected - cut_at;
    // The attempt in progress gives up after 1 s; the rest is teardown, a
    // backoff pause and a new session, with room for a slow machine.
    assert!(
        after < Duration::from_secs(5),
        "reconnected {after:?} after the cut"
    );
}

// --- Retries ------------------------------------------------------------

/// Received times of a key's ledger rows, in order.
async fn attempt_times(db: &TestDb, key: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar(
        "SELECT received_at FROM ops.event_ingest_log WHERE idempotency_key = $1 ORDER BY received_at",
    )
    .bind(key)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Each retry waits its tier of the schedule (shortened by at most the
/// jitter, 20 % by default), not one fixed delay.
#[tokio::test]
async fn retries_wait_the_delays_of_the_schedule_in_turn() {
    let db = TestDb::new().await;
    // Tiers far enough apart that a slow machine's delays (the attempt, the
    // copy, its expiry and dead-lettering back) cannot blur them.
    let settings = settings_for(&db, &[("OPSGATE__RETRY__SCHEDULE_SECS", "1,5")]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let orphan = check_for(fresh_release());
    producer.publish(&orphan).await;
    let (_, headers) = producer.next_dead_letter(SECS_20).await;
    assert_eq!(header_i64(&headers, "x-opsgate-attempt"), Some(3));
    let times = attempt_times(&db, &key_of(&orphan)).await;
    assert_eq!(times.len(), 3, "{times:?}");
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).num_milliseconds())
        .collect();
    assert!(
        (800..3_500).contains(&gaps[0]),
        "first retry after about 1 s: {gaps:?}"
    );
    assert!(
        (4_000..7_500).contains(&gaps[1]),
        "second retry after about 5 s: {gaps:?}"
    );
    worker.stop().await;
    producer.finish().await;
}

/// A transient fault that lasts longer than the schedule (here a release
/// lock that another session never frees: without worker.lock_timeout_secs
/// the worker would wait for it for ever) is retried, then dead-lettered
/// with 503.
#[tokio::test]
async fn a_transient_fault_that_outlasts_the_retries_is_dead_lettered_with_503() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__LOCK_TIMEOUT_SECS", "1")]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let release_id = fresh_release();
    let (reply, _) = producer.request(&release_created(release_id, "v1")).await;
    assert_eq!(reply["status"], "accepted");

    let holder = hold_release_lock(&db, release_id).await;
    let check = check_for(release_id);
    producer.publish(&check).await;
    let (body, headers) = producer.next_dead_letter(SECS_20).await;
    free_release_lock(holder, release_id).await;
    assert_eq!(body, serde_json::to_vec(&check).unwrap());
    assert_eq!(header_i64(&headers, "x-opsgate-code"), Some(503));
    assert_eq!(header_str(&headers, "x-opsgate-status").as_deref(), Some("error"));
    assert_eq!(header_i64(&headers, "x-opsgate-attempt"), Some(3));
    let error = header_str(&headers, "x-opsgate-error").unwrap();
    assert!(
        error.contains("lock") && error.contains("retries exhausted"),
        "{error}"
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&check)).await,
        vec![("error".to_owned(), 503); 3]
    );
    let checks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.gate_checks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checks, 0, "nothing applied");
    worker.stop().await;
    producer.finish().await;
}

/// The body is read as JSON whatever the content type says.
#[tokio::test]
async fn an_envelope_labelled_with_another_content_type_is_accepted() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let release = release_created(fresh_release(), "v1");
    producer
        .publish_raw(
            &serde_json::to_vec(&release).unwrap(),
            "release_created",
            lapin::BasicProperties::default().with_content_type("text/plain".into()),
        )
        .await;
    let rows = wait_for_status(&db.pool, &key_of(&release), "accepted", SECS_10).await;
    assert_eq!(rows, vec![("accepted".to_owned(), 200)]);
    worker.stop().await;
    producer.finish().await;
}

// --- Bounds on the work taken ---------------------------------------------

/// RabbitMQ pushes at most amqp.prefetch unacked deliveries: with the
/// database down, the worker holds that many and the rest stay queued.
#[tokio::test]
async fn the_worker_takes_at_most_prefetch_deliveries() {
    let db = TestDb::new().await;
    let direct = settings_for(&db, &[]);
    let namespace = direct.amqp.namespace.clone();
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__AMQP__NAMESPACE", namespace.as_str()),
            (
                "OPSGATE__DATABASE__URL",
                "postgres://postgres@127.0.0.1:1/opsgate",
            ),
            ("OPSGATE__AMQP__PREFETCH", "5"),
            ("OPSGATE__WORKER__MAX_IN_FLIGHT", "5"),
        ],
    );
    let producer = Producer::new(&direct).await;
    for i in 0..20 {
        producer
            .publish(&release_created(fresh_release(), &format!("v{i}")))
            .await;
    }
    let worker = start_worker(&settings);
    producer.wait_for_consumers(1, SECS_10).await;
    let deadline = std::time::Instant::now() + SECS_10;
    while producer.ready_count().await > 15 {
        assert!(std::time::Instant::now() < deadline, "the worker takes its share");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(producer.ready_count().await, 15, "no more than the prefetch");
    worker.stop().await;
    producer.finish().await;
}

/// At most worker.max_in_flight messages are processed at once, whatever
/// the prefetch and the transaction slots would allow.
#[tokio::test]
async fn at_most_max_in_flight_messages_are_processed_at_once() {
    let db = TestDb::new().await;
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__WORKER__MAX_IN_FLIGHT", "2"),
            ("OPSGATE__WORKER__MAX_TRANSACTIONS", "4"),
            ("OPSGATE__WORKER__BATCH_SIZE", "1"),
        ],
    );
    let producer = Producer::new(&settings).await;
    let mut releases = Vec::new();
    let mut holders = Vec::new();
    for _ in 0..4 {
        let release = seed::release(&db.pool, "dev-1").await;
        holders.push(hold_release_lock(&db, release).await);
        releases.push(release);
    }
    let worker = start_worker(&settings);
    for release in &releases {
        producer.publish(&check_for(*release)).await;
    }
    wait_for_lock_waits(&db, 2, SECS_10).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(lock_waits(&db).await, 2, "no more than max_in_flight at once");

    for (holder, release) in holders.into_iter().zip(&releases) {
        free_release_lock(holder, *release).await;
    }
    let applied = wait_for_count(&db.pool, "SELECT count(*) FROM ops.gate_checks", 4, SECS_20).await;
    assert_eq!(applied, 4);
    worker.stop().await;
    producer.finish().await;
}

/// A producer that asked for a reply gets one, with the final outcome: none
/// for the attempts retried on the way.
#[tokio::test]
async fn only_the_final_outcome_is_replied() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]); // retries after 1 s and 1 s
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let orphan = check_for(fresh_release());
    let (reply, _) = producer.request(&orphan).await;
    assert_eq!(reply["status"], "rejected", "{reply}");
    assert_eq!(reply["code"], 409, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("retries exhausted"),
        "{reply}"
    );
    assert_eq!(reply["result"], Value::Null, "{reply}");
    assert_eq!(
        ledger(&db.pool, &key_of(&orphan)).await.len(),
        3,
        "three attempts, one reply"
    );
    worker.stop().await;
    producer.finish().await;
}

/// A retry the broker cannot route (its tier was deleted) is not confirmed,
/// so the original is not acked: it comes back and is forwarded again once
/// the tier is there, and nothing is lost.
#[tokio::test]
async fn a_retry_that_cannot_be_routed_leaves_the_original_in_the_queue() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]); // one tier: retries after 1 s and 1 s
    let producer = Producer::new(&settings).await;
    let tier = producer.topology.retry_queue(0);
    let channel = producer.connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            tier.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let worker = start_worker(&settings);
    producer.wait_for_consumers(1, SECS_10).await;
    // The worker declared the topology again when it started: delete the
    // tier once more, now that it is consuming.
    channel
        .queue_delete(
            tier.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();

    let orphan = check_for(fresh_release());
    producer.publish(&orphan).await;
    let first_attempts = "SELECT count(*) FROM ops.event_ingest_log WHERE attempt = 1";
    let seen = wait_for_count(&db.pool, first_attempts, 2, SECS_10).await;
    assert!(seen >= 2, "the first attempt came back: {seen}");
    assert_eq!(
        producer.dead_letter_count().await,
        0,
        "not dead-lettered meanwhile"
    );

    let declare = producer.connection.create_channel().await.unwrap();
    producer.topology.declare(&declare).await.unwrap();
    let (_, headers) = producer.next_dead_letter(SECS_20).await;
    assert_eq!(header_i64(&headers, "x-opsgate-code"), Some(409));
    assert_eq!(
        header_i64(&headers, "x-opsgate-attempt"),
        Some(3),
        "every retry ran"
    );
    worker.stop().await;
    producer.finish().await;
}

/// A database that answers but takes no writes (a read-only server after a
/// failover, a full disk) is as good as down for every message: they are
/// held, no retry is spent and nothing is dead-lettered. Once the database
/// takes writes again (here: new sessions after a "failover" ends the old
/// ones), each is processed once.
#[tokio::test]
async fn a_read_only_database_holds_messages_instead_of_spending_their_retries() {
    let db = TestDb::new().await;
    let alter = |setting: &str| sqlx::AssertSqlSafe(format!("ALTER DATABASE \"{}\" {setting}", db.name()));
    // A session of its own, opened before: later ones start read-only.
    let mut admin = db.pool.acquire().await.unwrap();
    sqlx::query(alter("SET default_transaction_read_only = on"))
        .execute(&mut *admin)
        .await
        .unwrap();
    let settings = settings_for(&db, &[]); // retries after 1 s and 1 s
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let created = release_created(fresh_release(), "v1");
    producer.publish(&created).await;

    // Well past the whole retry schedule.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(producer.dead_letter_count().await, 0, "dead-lettered");
    assert_eq!(
        producer.ready_count().await,
        0,
        "held by the worker, not requeued"
    );
    assert_eq!(ledger(&db.pool, &key_of(&created)).await, vec![]);

    sqlx::query(alter("RESET default_transaction_read_only"))
        .execute(&mut *admin)
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut *admin)
    .await
    .unwrap();
    drop(admin);
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'accepted'",
        1,
        SECS_20,
    )
    .await;
    assert_eq!(
        ledger(&db.pool, &key_of(&created)).await,
        vec![("accepted".to_owned(), 200)]
    );
    assert_eq!(producer.dead_letter_count().await, 0);
    worker.stop().await;
    producer.finish().await;
}

/// A privilege the worker's role lacks (a grant revoked by mistake, or a
/// binary newer than the migrations) fails every message of its kind alike:
/// they are held as for a database that is down, instead of spending their
/// retries and filling the dead-letter queue. Once the grant is back, each
/// is processed once.
#[tokio::test]
async fn a_missing_privilege_holds_messages_instead_of_spending_their_retries() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]); // retries after 1 s and 1 s
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let release_id = fresh_release();
    let (reply, _) = producer.request(&release_created(release_id, "v1")).await;
    assert_eq!(reply["status"], "accepted");
    sqlx::query("REVOKE INSERT ON ops.gate_checks FROM opsgate_worker")
        .execute(&db.pool)
        .await
        .unwrap();
    let check = check_for(release_id);
    producer.publish(&check).await;

    // Well past the whole retry schedule.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(producer.dead_letter_count().await, 0, "dead-lettered");
    assert_eq!(
        ledger(&db.pool, &key_of(&check)).await,
        vec![],
        "an attempt was spent"
    );

    sqlx::query("GRANT INSERT ON ops.gate_checks TO opsgate_worker")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_for_status(&db.pool, &key_of(&check), "accepted", SECS_20).await;
    assert_eq!(
        ledger(&db.pool, &key_of(&check)).await,
        vec![("accepted".to_owned(), 200)]
    );
    let checks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.gate_checks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checks, 1);
    assert_eq!(producer.dead_letter_count().await, 0);
    worker.stop().await;
    producer.finish().await;
}

/// A dead letter is the producer's message plus about a kilobyte of our
/// headers. When the producer's headers already fill nearly all of an AMQP
/// frame (128 KiB), the copy would not fit, and RabbitMQ would close the
/// worker's connection on every try: the copy leaves the producer's headers
/// out instead, and says so.
#[tokio::test]
async fn a_dead_letter_leaves_out_producer_headers_that_would_not_fit_in_a_frame() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);

    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-big".into(), AMQPValue::LongString("a".repeat(130_950).into()));
    producer
        .publish_raw(
            b"not json",
            "check_result",
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await;
    let (body, headers) = producer.next_dead_letter(SECS_20).await;
    assert_eq!(body, b"not json");
    assert_eq!(header_i64(&headers, "x-opsgate-code"), Some(400));
    assert!(header_str(&headers, "x-big").is_none());
    assert!(
        header_i64(&headers, "x-opsgate-headers-left-out").is_some_and(|bytes| bytes > 130_950),
        "{headers:?}"
    );

    // The worker is still connected and consuming.
    let (reply, _) = producer.request(&release_created(fresh_release(), "v1")).await;
    assert_eq!(reply["status"], "accepted");
    worker.stop().await;
    producer.finish().await;
}

/// The ingest queue deleted under the worker (by an operator, or a policy
/// gone wrong): RabbitMQ cancels the consumer; the worker declares the
/// topology again and consumes the new queue.
#[tokio::test]
async fn an_ingest_queue_deleted_under_the_worker_is_declared_again() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    let (first, _) = producer.request(&release_created(fresh_release(), "v1")).await;
    assert_eq!(first["status"], "accepted");

    let channel = producer.connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            producer.topology.ingest_queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    // Declared again, with its binding, and consumed.
    let deadline = std::time::Instant::now() + SECS_20;
    loop {
        let declared = producer.try_queue_state(&producer.topology.ingest_queue).await;
        if declared.is_some_and(|queue| queue.consumer_count() == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ingest queue came back, consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (next, _) = producer.request(&release_created(fresh_release(), "v2")).await;
    assert_eq!(next["status"], "accepted");
    worker.stop().await;
    producer.finish().await;
}
