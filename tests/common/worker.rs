//! Running the worker against the real RabbitMQ in tests: each test gets its
//! own namespace (`test.<uuid>.events`: exchange, queues, retry tiers, dead
//! letters) on top of its own database.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use opsgate::broker::{self, Publisher, Topology};
use opsgate::config::Settings;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::TestDb;

pub fn amqp_url() -> String {
    std::env::var("OPSGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// Settings for a worker on `db` with a namespace of its own, a short retry
/// schedule (1 s, 1 s) and no sweeps, plus `overrides` (OPSGATE__... = value).
pub fn settings_for(db: &TestDb, overrides: &[(&str, &str)]) -> Settings {
    let namespace = format!("test.{}.events", Uuid::new_v4().simple());
    let mut env: HashMap<String, String> = HashMap::from([
        (
            "OPSGATE__DATABASE__URL".to_owned(),
            db.settings.url.expose().to_owned(),
        ),
        ("OPSGATE__AMQP__URL".to_owned(), amqp_url()),
        ("OPSGATE__AMQP__NAMESPACE".to_owned(), namespace),
        ("OPSGATE__AMQP__RECONNECT_MIN_MS".to_owned(), "200".to_owned()),
        ("OPSGATE__AMQP__RECONNECT_MAX_MS".to_owned(), "1000".to_owned()),
        ("OPSGATE__RETRY__SCHEDULE_SECS".to_owned(), "1,1".to_owned()),
        ("OPSGATE__SWEEPS__ENABLED".to_owned(), "false".to_owned()),
        (
            "OPSGATE__WORKER__SHUTDOWN_TIMEOUT_SECS".to_owned(),
            "10".to_owned(),
        ),
        (
            "OPSGATE__WORKER__DATABASE_RETRY_MAX_MS".to_owned(),
            "500".to_owned(),
        ),
    ]);
    for (key, value) in overrides {
        env.insert((*key).to_owned(), (*value).to_owned());
    }
    opsgate::config::load_from(&config_dir(), &env).expect("test settings")
}

/// The settings as environment variables, for opsgate run as a subprocess
/// (whose own environment should be cleared, so that nothing of the test
/// runner's `OPSGATE__*` or `ODOO_STAGE` reaches it).
pub fn env_of(settings: &Settings) -> Vec<(String, String)> {
    let schedule = settings
        .retry
        .schedule_secs
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (database, amqp, worker) = (&settings.database, &settings.amqp, &settings.worker);
    [
        ("DATABASE__URL", database.url.expose().to_owned()),
        ("DATABASE__MAX_CONNECTIONS", database.max_connections.to_string()),
        (
            "DATABASE__ACQUIRE_TIMEOUT_SECS",
            database.acquire_timeout_secs.to_string(),
        ),
        ("AMQP__URL", amqp.url.expose().to_owned()),
        ("AMQP__NAMESPACE", amqp.namespace.clone()),
        ("AMQP__PREFETCH", amqp.prefetch.to_string()),
        ("AMQP__DELIVERY_LIMIT", amqp.delivery_limit.to_string()),
        ("AMQP__RECONNECT_MIN_MS", amqp.reconnect_min_ms.to_string()),
        ("AMQP__RECONNECT_MAX_MS", amqp.reconnect_max_ms.to_string()),
        (
            "AMQP__CONFIRM_TIMEOUT_SECS",
            amqp.confirm_timeout_secs.to_string(),
        ),
        (
            "AMQP__CONNECT_TIMEOUT_SECS",
            amqp.connect_timeout_secs.to_string(),
        ),
        ("RETRY__SCHEDULE_SECS", schedule),
        ("RETRY__JITTER", settings.retry.jitter.to_string()),
        ("SWEEPS__ENABLED", settings.sweeps.enabled.to_string()),
        ("SWEEPS__INTERVAL_SECS", settings.sweeps.interval_secs.to_string()),
        ("WORKER__MAX_IN_FLIGHT", worker.max_in_flight.to_string()),
        ("WORKER__BATCH_SIZE", worker.batch_size.to_string()),
        ("WORKER__BATCH_LINGER_MS", worker.batch_linger_ms.to_string()),
        ("WORKER__MAX_TRANSACTIONS", worker.max_transactions.to_string()),
        ("WORKER__MAX_BODY_BYTES", worker.max_body_bytes.to_string()),
        (
            "WORKER__SHUTDOWN_TIMEOUT_SECS",
            worker.shutdown_timeout_secs.to_string(),
        ),
        (
            "WORKER__DATABASE_RETRY_MAX_MS",
            worker.database_retry_max_ms.to_string(),
        ),
        ("WORKER__LOCK_TIMEOUT_SECS", worker.lock_timeout_secs.to_string()),
        ("WORKER__MIGRATE_ON_START", worker.migrate_on_start.to_string()),
        ("WORKER__DATABASE_ROLE", worker.database_role.clone()),
    ]
    .into_iter()
    .map(|(key, value)| (format!("OPSGATE__{key}"), value))
    .collect()
}

pub fn topology(settings: &Settings) -> Topology {
    opsgate::worker::topology(settings)
}

/// A worker running in this process.
pub struct RunningWorker {
    pub cancel: CancellationToken,
    pub handle: JoinHandle<()>,
}

pub fn start_worker(settings: &Settings) -> RunningWorker {
    let cancel = CancellationToken::new();
    let settings = settings.clone();
    let token = cancel.clone();
    let handle = tokio::spawn(async move {
        opsgate::worker::run(&settings, token).await.expect("worker");
    });
    RunningWorker { cancel, handle }
}

impl RunningWorker {
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops in time")
            .expect("worker task");
    }
}

/// A producer (and dead-letter reader) on the test's namespace.
pub struct Producer {
    pub connection: Connection,
    pub publisher: Publisher,
    pub topology: Topology,
}

impl Producer {
    /// Connects and declares the topology, so messages published before the
    /// worker starts are kept.
    pub async fn new(settings: &Settings) -> Producer {
        let topology = topology(settings);
        let connection = broker::connect(&settings.amqp, "opsgate-test-producer")
            .await
            .expect("connect");
        let channel = connection.create_channel().await.unwrap();
        topology.declare(&channel).await.expect("declare");
        let publisher = Publisher::new(&connection, Duration::from_secs(10))
            .await
            .unwrap();
        Producer {
            connection,
            publisher,
            topology,
        }
    }

    pub async fn publish(&self, envelope: &Value) {
        self.publish_raw(
            &serde_json::to_vec(envelope).unwrap(),
            &routing_key(envelope),
            json_properties(),
        )
        .await;
    }

    pub async fn publish_raw(&self, body: &[u8], routing_key: &str, properties: BasicProperties) {
        self.publisher
            .publish(&self.topology.exchange, routing_key, body, properties, true)
            .await
            .expect("publish");
    }

    /// Publishes with no AMQP properties at all, as n8n's RabbitMQ node does.
    pub async fn publish_bare(&self, body: &[u8], routing_key: &str) {
        let channel = self.publisher.channel();
        channel
            .basic_publish(
                self.topology.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes with direct reply-to and waits for the worker's answer.
    pub async fn request(&self, envelope: &Value) -> (Value, Option<String>) {
        let channel = self.connection.create_channel().await.unwrap();
        let mut replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let correlation = Uuid::new_v4().to_string();
        channel
            .basic_publish(
                self.topology.exchange.as_str().into(),
                routing_key(envelope).as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(envelope).unwrap(),
                BasicProperties::default()
                    .with_reply_to("amq.rabbitmq.reply-to".into())
                    .with_correlation_id(correlation.as_str().into()),
            )
            .await
            .unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(20), replies.next())
            .await
            .expect("a reply in time")
            .expect("reply stream")
            .expect("reply");
        let reply: Value = serde_json::from_slice(&delivery.data).unwrap();
        let correlation_back = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string());
        assert_eq!(correlation_back.as_deref(), Some(correlation.as_str()));
        (reply, correlation_back)
    }

    /// Waits for the next dead letter; returns its body and headers.
    pub async fn next_dead_letter(&self, timeout: Duration) -> (Vec<u8>, FieldTable) {
        let channel = self.publisher.channel();
        let deadline = Instant::now() + timeout;
        loop {
            // Bounded too: a broker that cannot deliver must fail the test, not hang it.
            let remaining = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100);
            let got = tokio::time::timeout(
                remaining,
                channel.basic_get(
                    self.topology.dead_queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("no dead letter within {timeout:?}"))
            .unwrap();
            if let Some(message) = got {
                let headers = message.delivery.properties.headers().clone().unwrap_or_default();
                return (message.delivery.data, headers);
            }
            assert!(Instant::now() < deadline, "no dead letter within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The state of one of the namespace's queues (messages ready, consumers).
    pub async fn queue_state(&self, queue: &str) -> lapin::Queue {
        self.try_queue_state(queue)
            .await
            .unwrap_or_else(|| panic!("queue {queue} exists"))
    }

    /// As [`Producer::queue_state`]; `None` when the queue does not exist.
    pub async fn try_queue_state(&self, queue: &str) -> Option<lapin::Queue> {
        // A channel of its own: RabbitMQ closes it when the queue is missing.
        let channel = self.connection.create_channel().await.unwrap();
        let state = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok();
        let _ = channel.close(200, "inspected".into()).await;
        state
    }

    pub async fn dead_letter_count(&self) -> u32 {
        self.queue_state(&self.topology.dead_queue).await.message_count()
    }

    /// Messages ready in the ingest queue (not those delivered and unacked).
    pub async fn ready_count(&self) -> u32 {
        self.queue_state(&self.topology.ingest_queue)
            .await
            .message_count()
    }

    /// Waits until `n` consumers consume the ingest queue.
    pub async fn wait_for_consumers(&self, n: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self
            .queue_state(&self.topology.ingest_queue)
            .await
            .consumer_count()
            < n
        {
            assert!(Instant::now() < deadline, "{n} consumers within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes the namespace's exchanges and queues.
    pub async fn finish(self) {
        let channel = self.connection.create_channel().await.unwrap();
        let _ = self.topology.delete(&channel).await;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

pub fn header_i64(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name) {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

pub fn header_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    }
}

fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

fn routing_key(envelope: &Value) -> String {
    envelope["event_type"].as_str().unwrap_or("unknown").to_owned()
}

/// An envelope v1.0 with a fresh key unless `key` is given.
pub fn envelope(event_type: &str, release_id: Uuid, gate: Option<&str>, payload: Value) -> Value {
    json!({
        "schema_version": "v1.0",
        "idempotency_key": format!("test/{release_id}/{event_type}/{}", Uuid::new_v4().simple()),
        "event_type": event_type,
        "source_system": "github_actions",
        "release_id": release_id,
        "gate_code": gate,
        "payload": payload,
        "emitted_at": chrono::Utc::now().to_rfc3339(),
    })
}

pub fn release_created(release_id: Uuid, name: &str) -> Value {
    envelope(
        "release_created",
        release_id,
        None,
        json!({
            "project": "acme/odoo",
            "release_name": name,
            "environment_target": "production",
            "source_ref": "abc123",
            "initiating_actor": "dev-1",
        }),
    )
}

/// Releases created through a worker run in this process, now stopped.
pub async fn created_releases<const N: usize>(settings: &Settings, producer: &Producer) -> [Uuid; N] {
    let releases = [(); N].map(|()| Uuid::new_v4());
    let worker = start_worker(settings);
    for (n, release) in releases.iter().enumerate() {
        let (reply, _) = producer
            .request(&release_created(*release, &format!("v{n}")))
            .await;
        assert_eq!(reply["status"], "accepted");
    }
    worker.stop().await;
    releases
}

/// Ledger rows of a key, as (status, code) in order of writing.
pub async fn ledger(pool: &PgPool, key: &str) -> Vec<(String, i16)> {
    sqlx::query_as(
        "SELECT processing_status::text, response_code FROM ops.event_ingest_log
         WHERE idempotency_key = $1 ORDER BY received_at, attempt",
    )
    .bind(key)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Waits until `query` (a scalar count) returns at least `expected`.
pub async fn wait_for_count(pool: &PgPool, query: &'static str, expected: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let count: i64 = sqlx::query_scalar(query).fetch_one(pool).await.unwrap_or(-1);
        if count >= expected || Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the key has a ledger row with `status`.
pub async fn wait_for_status(
    pool: &PgPool,
    key: &str,
    status: &str,
    timeout: Duration,
) -> Vec<(String, i16)> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = ledger(pool, key).await;
        if rows.iter().any(|(s, _)| s == status) || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn key_of(envelope: &Value) -> String {
    envelope["idempotency_key"].as_str().unwrap().to_owned()
}

pub const SECS_10: Duration = Duration::from_secs(10);
pub const SECS_20: Duration = Duration::from_secs(20);

pub fn fresh_release() -> Uuid {
    Uuid::new_v4()
}

/// Publishes `n` distinct G1 check events for `release_id`: each applied
/// once is one more gate_checks row.
pub async fn publish_checks(producer: &Producer, release_id: Uuid, n: usize) -> Vec<Value> {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            envelope(
                "check_result",
                release_id,
                Some("G1"),
                json!({"check_name": format!("check_{i}"), "status": "pass"}),
            )
        })
        .collect();
    for event in &events {
        producer.publish(event).await;
    }
    events
}

/// Every one of `n` check events was accepted once and left exactly one row.
pub async fn assert_checks_applied_once(pool: &PgPool, n: usize) {
    let checks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.gate_checks")
        .fetch_one(pool)
        .await
        .unwrap();
    let accepted: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT idempotency_key) FROM ops.event_ingest_log
         WHERE processing_status = 'accepted' AND event_type = 'check_result'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (checks, accepted),
        (n as i64, n as i64),
        "every event applied exactly once"
    );
}
