//! RabbitMQ and PostgreSQL restarted under a running worker. These tests stop
//! shared services, so they live in their own test binary (cargo runs test
//! binaries one after another) and run one at a time, and every service is
//! started again even when an assertion fails.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::worker::*;
use common::*;
use uuid::Uuid;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn postgres_version() -> String {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version")
}

fn start_postgres() {
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &postgres_version(), "main", "start"],
    );
}

fn start_rabbitmq() {
    run("rabbitmqctl", &["start_app"]);
}

/// Starts the service again when dropped, whatever happened in between.
struct Restart(fn());

impl Drop for Restart {
    fn drop(&mut self) {
        (self.0)();
    }
}

async fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not come back within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tcp_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// A slow worker (two messages at a time) with a backlog of 1,500 checks of
/// one release, already processing: the service goes away mid-flow.
struct Flow {
    settings: opsgate::config::Settings,
    producer: Producer,
    release_id: Uuid,
    events: Vec<serde_json::Value>,
    worker: RunningWorker,
}

async fn start_flow(db: &TestDb) -> Flow {
    let settings = settings_for(
        db,
        &[
            ("OPSGATE__WORKER__MAX_IN_FLIGHT", "2"),
            ("OPSGATE__AMQP__PREFETCH", "4"),
        ],
    );
    let producer = Producer::new(&settings).await;
    let release_id = Uuid::new_v4();
    producer.publish(&release_created(release_id, "v1")).await;
    let events = publish_checks(&producer, release_id, 1500).await;
    let worker = start_worker(&settings);
    wait_for_count(&db.pool, "SELECT count(*) FROM ops.gate_checks", 20, SECS_20).await;
    Flow {
        settings,
        producer,
        release_id,
        events,
        worker,
    }
}

#[tokio::test]
async fn rabbitmq_restarted_while_messages_flow() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    // The first producer's connection dies with the broker; a new one follows.
    let Flow {
        settings,
        producer: _,
        release_id,
        events,
        worker,
    } = start_flow(&db).await;

    {
        let _restart = Restart(start_rabbitmq);
        assert!(run("rabbitmqctl", &["stop_app"]), "stop RabbitMQ");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_until("RabbitMQ", Duration::from_secs(60), || tcp_open(5672)).await;
    let processed_during = wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.gate_checks",
        1500,
        Duration::from_secs(60),
    )
    .await;
    if processed_during != 1500 {
        let ledger: Vec<(String, i16, i64)> = sqlx::query_as(
            "SELECT processing_status::text, response_code, count(*) FROM ops.event_ingest_log GROUP BY 1, 2",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let queues = Command::new("rabbitmqctl")
            .args(["list_queues", "name", "messages_ready", "messages_unacknowledged"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ours: Vec<&str> = queues
            .lines()
            .filter(|l| l.contains(&settings.amqp.namespace))
            .collect();
        panic!(
            "the worker did not recover by itself: {processed_during} of 1500 processed; ledger {ledger:?}; queues {ours:?}"
        );
    }

    // And it keeps consuming new messages after the restart.
    let producer = Producer::new(&settings).await;
    let more = publish_checks(&producer, release_id, 10).await;
    wait_for_count(&db.pool, "SELECT count(*) FROM ops.gate_checks", 1510, SECS_20).await;
    assert_checks_applied_once(&db.pool, events.len() + more.len()).await;
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn postgresql_restarted_while_messages_flow() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let Flow {
        producer,
        events,
        worker,
        ..
    } = start_flow(&db).await;

    {
        let _restart = Restart(start_postgres);
        assert!(run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &postgres_version(),
                "main",
                "stop",
                "-m",
                "fast"
            ]
        ));
        // Down for a while: the worker must hold its messages, not ack or drop them.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    wait_until("PostgreSQL", Duration::from_secs(60), || tcp_open(5432)).await;
    let done = wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.gate_checks",
        1500,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done, 1500, "processing resumed when PostgreSQL returned");
    assert_eq!(
        producer.dead_letter_count().await,
        0,
        "nothing dead-lettered for an outage"
    );
    assert_checks_applied_once(&db.pool, events.len()).await;
    worker.stop().await;
    producer.finish().await;
}
