//! RabbitMQ and PostgreSQL restarted under a running worker, and a RabbitMQ
//! memory alarm. These tests disturb shared services, so they live in their
//! own test binary (cargo runs test binaries one after another) and run one
//! at a time, and every service is started (or its setting restored) again
//! even when an assertion fails.

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

/// Runs its closure when dropped, whatever happened in between: starts a
/// service again, restores a setting.
struct Restart(Box<dyn Fn()>);

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
        let _restart = Restart(Box::new(start_rabbitmq));
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
        let _restart = Restart(Box::new(start_postgres));
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

/// A worker process that a failed assertion does not leave running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// RabbitMQ's memory high watermark as `rabbitmqctl set_vm_memory_high_watermark`
/// takes it back, to restore it after an alarm.
fn memory_watermark() -> Vec<String> {
    let printed = Command::new("rabbitmqctl")
        .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    match printed.parse::<f64>() {
        Ok(fraction) => vec![fraction.to_string()],
        // {absolute,Bytes}
        Err(_) => match printed
            .trim_start_matches("{absolute,")
            .trim_end_matches('}')
            .parse::<u64>()
        {
            Ok(bytes) => vec!["absolute".to_owned(), bytes.to_string()],
            Err(_) => vec!["0.4".to_owned()],
        },
    }
}

/// Messages of the ingest queue delivered and not yet acked, as RabbitMQ
/// counts them.
fn unacked(queue: &str) -> u64 {
    let listed = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name", "messages_unacknowledged"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, count)| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("queue {queue} in {listed:?}"))
}

async fn wait_for_unacked(queue: &str, n: u64) {
    let deadline = Instant::now() + SECS_20;
    loop {
        let now = unacked(queue);
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "{now} unacked in {queue}, not {n}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A memory alarm while the worker answers an event and retries another:
/// RabbitMQ blocks the connection on which the worker publishes, once it
/// publishes the reply. The worker says so; its acks, on a connection of
/// their own, go on, so a message that needs nothing published is finished
/// during the alarm. The reply and the retry copy wait, however long the
/// alarm lasts (not given up at the confirm timeout and tried again, which
/// would multiply the copies); when it clears they go out and their
/// messages are acked, each applied or retried once.
#[tokio::test]
async fn a_memory_alarm_blocks_only_the_workers_publishing_and_nothing_is_lost() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    // The alarm lasts several confirm timeouts.
    let settings = settings_for(&db, &[("OPSGATE__AMQP__CONFIRM_TIMEOUT_SECS", "1")]);
    let producer = Producer::new(&settings).await;
    let [answered, silent] = created_releases(&settings, &producer).await;

    // Replies to a queue of the test's, which it reads during the alarm
    // without publishing (a blocked connection is one that publishes).
    let replies = format!("{}.replies", settings.amqp.namespace);
    let channel = producer.connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            replies.as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let answered_lock = hold_release_lock(&db, answered).await;
    let silent_lock = hold_release_lock(&db, silent).await;
    // A release nobody created: its check is retried.
    let unknown = Uuid::new_v4();
    let unknown_lock = hold_release_lock(&db, unknown).await;
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_opsgate"))
            .arg("--config-dir")
            .arg(config_dir())
            .arg("worker")
            .env_clear()
            .envs(env_of(&settings))
            .env("RUST_LOG", "warn")
            .env("OPSGATE__LOG__FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the worker"),
    );
    let check = |release| {
        envelope(
            "check_result",
            release,
            Some("G1"),
            serde_json::json!({"check_name": "unit_tests", "status": "pass"}),
        )
    };
    let (with_reply, without, orphan) = (check(answered), check(silent), check(unknown));
    producer.wait_for_consumers(1, SECS_20).await;
    producer
        .publish_raw(
            &serde_json::to_vec(&with_reply).unwrap(),
            "check_result",
            lapin::BasicProperties::default().with_reply_to(replies.as_str().into()),
        )
        .await;
    wait_for_lock_waits(&db, 1, SECS_20).await;
    producer.publish(&without).await;
    producer.publish(&orphan).await;
    // The other two wait in a batch of their own, or in one each.
    wait_for_lock_waits(&db, 2, SECS_20).await;

    let ingest = settings.amqp.namespace.clone() + ".ingest";
    // A topology nobody consumes, for a command to publish into.
    let elsewhere_settings = settings_for(&db, &[("OPSGATE__AMQP__CONFIRM_TIMEOUT_SECS", "1")]);
    let elsewhere_producer = Producer::new(&elsewhere_settings).await;
    let elsewhere = (elsewhere_settings, elsewhere_producer);
    let watermark = memory_watermark();
    {
        let restore = watermark.clone();
        let _restore = Restart(Box::new(move || {
            let mut args = vec!["set_vm_memory_high_watermark"];
            args.extend(restore.iter().map(String::as_str));
            run("rabbitmqctl", &args);
        }));
        assert!(
            run("rabbitmqctl", &["set_vm_memory_high_watermark", "0.0001"]),
            "raise an alarm"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        free_release_lock(answered_lock, answered).await;
        free_release_lock(unknown_lock, unknown).await;
        free_release_lock(silent_lock, silent).await;
        wait_for_status(&db.pool, &key_of(&with_reply), "accepted", SECS_20).await;
        wait_for_status(&db.pool, &key_of(&orphan), "error", SECS_20).await;
        wait_for_status(&db.pool, &key_of(&without), "accepted", SECS_20).await;
        // The reply and the retry copy are blocked, and so are their acks;
        // the other message is acked all the same.
        wait_for_unacked(&ingest, 2).await;
        // A command keeps its confirm timeout (1 s): a CI step that
        // publishes during an alarm fails (exit 3) rather than hangs. This
        // also takes the worker past several confirm timeouts.
        let mut publishing = Command::new(env!("CARGO_BIN_EXE_opsgate"))
            .arg("--config-dir")
            .arg(config_dir())
            .args([
                "publish",
                "--event",
                "release_created",
                "--payload",
                r#"{"project": "p", "release_name": "r"}"#,
            ])
            .env_clear()
            .envs(env_of(&elsewhere.0))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run opsgate publish");
        let deadline = Instant::now() + Duration::from_secs(5);
        let exited = loop {
            if let Some(status) = publishing.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                // Not left waiting for an alarm that only this test clears.
                let _ = publishing.kill();
                let _ = publishing.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            exited.and_then(|status| status.code()),
            Some(3),
            "opsgate publish gives up at its confirm timeout"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(unacked(&ingest), 2);
        let waiting = producer.queue_state(&replies).await.message_count();
        assert_eq!(waiting, 0, "the reply waits for the alarm to clear");
        assert_eq!(
            ledger(&db.pool, &key_of(&orphan)).await,
            vec![("error".to_owned(), 409)],
            "the retried message was not processed again"
        );
    }
    wait_for_unacked(&ingest, 0).await;
    // One retry copy went out: two more attempts (the schedule is 1 s, 1 s),
    // then one dead letter.
    let (_, headers) = producer.next_dead_letter(SECS_20).await;
    assert_eq!(header_i64(&headers, "x-opsgate-code"), Some(409));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        producer.dead_letter_count().await,
        0,
        "a second copy was dead-lettered"
    );
    assert_eq!(ledger(&db.pool, &key_of(&orphan)).await.len(), 3);
    assert_eq!(
        producer.queue_state(&replies).await.message_count(),
        1,
        "the reply went out"
    );
    for event in [&with_reply, &without] {
        assert_eq!(
            ledger(&db.pool, &key_of(event)).await,
            vec![("accepted".to_owned(), 200)]
        );
    }
    assert_checks_applied_once(&db.pool, 2).await;

    assert!(run("kill", &["-TERM", &child.0.id().to_string()]));
    let status = child.0.wait().expect("the worker exits");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("RabbitMQ blocked a connection") && stderr.contains(r#""connection":"publishing""#),
        "{stderr}"
    );
    assert!(!stderr.contains(r#""connection":"consuming""#), "{stderr}");
    assert_eq!(producer.ready_count().await, 0);
    producer.finish().await;
    elsewhere.1.finish().await;
}
