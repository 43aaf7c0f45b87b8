//! The worker binary as operators run it: SIGTERM with messages in flight,
//! and a kill -9 at an arbitrary moment (possibly between commit and ack).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::worker::*;
use common::*;
use uuid::Uuid;

fn spawn_worker(settings: &opsgate::config::Settings) -> Child {
    Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .arg("worker")
        .envs(env_of(settings))
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the worker")
}

async fn checks(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops.gate_checks")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn sigterm_with_messages_in_flight_exits_0_and_loses_nothing() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__MAX_IN_FLIGHT", "4")]);
    let producer = Producer::new(&settings).await;
    let release_id = Uuid::new_v4();
    producer.publish(&release_created(release_id, "v1")).await;
    let events = publish_checks(&producer, release_id, 600).await;

    let mut child = spawn_worker(&settings);
    let started = wait_for_count(&db.pool, "SELECT count(*) FROM ops.gate_checks", 20, SECS_20).await;
    assert!(started >= 20, "the worker did not start processing");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(15),
            "the worker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    let at_exit = checks(&db).await;
    assert!(
        at_exit < events.len() as i64,
        "stopped before the end ({at_exit})"
    );

    // What was not processed is still queued: a new worker finishes the job.
    let worker = start_worker(&settings);
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.gate_checks",
        events.len() as i64,
        SECS_20,
    )
    .await;
    assert_checks_applied_once(&db.pool, events.len()).await;
    // The drain acked everything it had processed: nothing came back.
    let duplicates: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'duplicate'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        duplicates, 0,
        "a message processed before SIGTERM was redelivered"
    );
    worker.stop().await;
    producer.finish().await;
}

#[tokio::test]
async fn a_worker_killed_mid_flow_leaves_exactly_one_effect_per_event() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    let producer = Producer::new(&settings).await;
    let release_id = Uuid::new_v4();
    producer.publish(&release_created(release_id, "v1")).await;
    let events = publish_checks(&producer, release_id, 600).await;

    let mut child = spawn_worker(&settings);
    wait_for_count(&db.pool, "SELECT count(*) FROM ops.gate_checks", 50, SECS_20).await;
    child.kill().expect("kill -9");
    let _ = child.wait();

    let worker = start_worker(&settings);
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM ops.gate_checks",
        events.len() as i64,
        SECS_20,
    )
    .await;
    // Let redeliveries of committed-but-unacked messages settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_checks_applied_once(&db.pool, events.len()).await;
    let duplicates: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'duplicate'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    eprintln!("redeliveries answered as duplicates after the kill: {duplicates}");
    worker.stop().await;
    producer.finish().await;
}
