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
        .env_clear()
        .envs(env_of(settings))
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

/// A worker process with one check in flight, waiting for the lock of a
/// release the test holds (`holder`).
struct Busy {
    child: Child,
    holder: sqlx::pool::PoolConnection<sqlx::Postgres>,
    release_id: Uuid,
    event: serde_json::Value,
}

async fn busy_worker(db: &TestDb, settings: &opsgate::config::Settings, producer: &Producer) -> Busy {
    let release_id = created_releases::<1>(settings, producer).await[0];
    let holder = hold_release_lock(db, release_id).await;
    let child = spawn_worker(settings);
    let mut events = publish_checks(producer, release_id, 1).await;
    wait_for_lock_waits(db, 1, SECS_20).await;
    Busy {
        child,
        holder,
        release_id,
        event: events.remove(0),
    }
}

/// Waits until the ingest queue holds `n` ready messages (a quorum queue
/// takes back the unacked ones of a closed channel a moment later).
async fn wait_for_ready(producer: &Producer, n: u32) {
    let deadline = Instant::now() + SECS_10;
    loop {
        let ready = producer.ready_count().await;
        if ready == n {
            return;
        }
        assert!(Instant::now() < deadline, "{ready} ready in the queue, not {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits for the process to exit; its status and how long it took.
async fn exit_of(child: &mut Child, within: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "the worker did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The worker, told to stop, stops consuming at once and still finishes
/// the message it is processing (here held up by another transaction on
/// its release), acks it, and exits 0; for SIGTERM and for Ctrl-C alike.
#[tokio::test]
async fn a_signal_stops_consuming_and_the_message_in_flight_is_finished() {
    for name in ["-TERM", "-INT"] {
        let db = TestDb::new().await;
        let settings = settings_for(&db, &[]);
        let producer = Producer::new(&settings).await;
        let [release_id, other] = created_releases(&settings, &producer).await;

        let holder = hold_release_lock(&db, release_id).await;
        let mut child = spawn_worker(&settings);
        let events = publish_checks(&producer, release_id, 1).await;
        wait_for_lock_waits(&db, 1, SECS_20).await;
        signal(&child, name);
        // Published once the worker has stopped consuming (basic.cancel), for
        // a release nobody holds: it stays in the queue, not pushed to the
        // worker that is still finishing its message. (A quorum queue counts
        // a cancelled consumer until its messages are settled, so the
        // consumer count cannot show the cancel.)
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = publish_checks(&producer, other, 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "{name}: still finishing its message"
        );
        assert_eq!(producer.ready_count().await, 1, "{name}: nothing more is taken");
        free_release_lock(holder, release_id).await;

        let (status, _) = exit_of(&mut child, SECS_20).await;
        assert_eq!(status.code(), Some(0), "{name}");
        assert_eq!(
            ledger(&db.pool, &key_of(&events[0])).await,
            vec![("accepted".to_owned(), 200)],
            "{name}"
        );
        assert_eq!(checks(&db).await, 1, "{name}");
        assert!(ledger(&db.pool, &key_of(&later[0])).await.is_empty(), "{name}");
        wait_for_ready(&producer, 1).await;
        producer.finish().await;
    }
}

/// A message that cannot finish within worker.shutdown_timeout_secs is
/// left unacked: the worker still exits 0 in time, and the message goes
/// back to the queue, unapplied, for the next worker.
#[tokio::test]
async fn a_message_that_outlasts_the_shutdown_timeout_goes_back_to_the_queue() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__SHUTDOWN_TIMEOUT_SECS", "2")]);
    let producer = Producer::new(&settings).await;
    let Busy {
        mut child,
        holder,
        release_id,
        event,
    } = busy_worker(&db, &settings, &producer).await;
    signal(&child, "-TERM");
    let (status, took) = exit_of(&mut child, SECS_20).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(1_900),
        "it gave the message its time: {took:?}"
    );
    // The timeout, then 2 s for what is still busy, and the closing.
    assert!(
        took < Duration::from_secs(2 + 2 + 4),
        "and not much more: {took:?}"
    );
    assert_eq!(checks(&db).await, 0, "nothing applied");
    wait_for_ready(&producer, 1).await;

    free_release_lock(holder, release_id).await;
    let worker = start_worker(&settings);
    wait_for_status(&db.pool, &key_of(&event), "accepted", SECS_20).await;
    worker.stop().await;
    assert_checks_applied_once(&db.pool, 1).await;
    producer.finish().await;
}

/// The major.minor version of the local RabbitMQ, when `rabbitmqctl` can
/// tell it.
fn local_rabbitmq_version() -> Option<(u32, u32)> {
    let output = Command::new("rabbitmqctl").arg("version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut parts = text.trim().split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A message that kills the worker every time cannot loop forever: past
/// amqp.delivery_limit returns, RabbitMQ dead-letters it (reason
/// `delivery_limit`, no opsgate header). From RabbitMQ 4.3 on, a crash no
/// longer counts as a return, so there is nothing to show there.
#[tokio::test]
async fn a_message_that_keeps_killing_the_worker_is_dead_lettered_at_the_delivery_limit() {
    if local_rabbitmq_version().is_some_and(|version| version >= (4, 3)) {
        eprintln!("skipped: RabbitMQ 4.3 and later do not count a crash as a return");
        return;
    }
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__AMQP__DELIVERY_LIMIT", "2")]);
    let producer = Producer::new(&settings).await;
    let release_id = created_releases::<1>(&settings, &producer).await[0];

    // Each worker takes the message, waits for the release, and is killed.
    let holder = hold_release_lock(&db, release_id).await;
    let events = publish_checks(&producer, release_id, 1).await;
    for killed in 0..3 {
        let mut child = spawn_worker(&settings);
        // The backends of killed workers wait on until the lock is free.
        wait_for_lock_waits(&db, killed + 1, SECS_20).await;
        child.kill().expect("kill -9");
        let _ = child.wait();
    }
    let (body, headers) = producer.next_dead_letter(SECS_10).await;
    free_release_lock(holder, release_id).await;
    assert_eq!(body, serde_json::to_vec(&events[0]).unwrap());
    assert_eq!(
        header_i64(&headers, "x-opsgate-code"),
        None,
        "RabbitMQ's own dead letter"
    );
    let reasons: Vec<String> = match headers.inner().get("x-death") {
        Some(lapin::types::AMQPValue::FieldArray(deaths)) => deaths
            .as_slice()
            .iter()
            .filter_map(|death| match death {
                lapin::types::AMQPValue::FieldTable(death) => match death.inner().get("reason") {
                    Some(lapin::types::AMQPValue::LongString(reason)) => Some(reason.to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        other => panic!("no x-death array: {other:?}"),
    };
    assert_eq!(reasons, ["delivery_limit"]);
    assert_eq!(checks(&db).await, 0, "never applied");
    producer.finish().await;
}

/// Runs `opsgate worker` until it exits by itself (within 30 s).
async fn worker_until_it_exits(settings: &opsgate::config::Settings) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_opsgate"))
            .arg("--config-dir")
            .arg(config_dir())
            .arg("worker")
            .env_clear()
            .envs(env_of(settings))
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the worker exits")
    .expect("run the worker")
}

/// A database role the worker cannot take would fail every pooled
/// connection, which the pool reports only as a timeout: the worker would
/// hold every message as if PostgreSQL were down. It refuses to start
/// instead, and says why.
#[tokio::test]
async fn a_database_role_the_worker_cannot_take_stops_it_at_start() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__DATABASE_ROLE", "no_such_role")]);
    let output = worker_until_it_exits(&settings).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cannot SET ROLE to worker.database_role \"no_such_role\"")
            && stderr.contains("[SQLSTATE 22023]"),
        "{stderr}"
    );
}

/// The same when the role exists but the login is not a member of it
/// (SQLSTATE 42501, which in a message's transaction holds the message).
#[tokio::test]
async fn a_database_role_the_login_is_not_a_member_of_stops_the_worker_at_start() {
    let db = TestDb::new().await;
    let login = format!("opsgate_test_{}", Uuid::new_v4().simple());
    let create = format!("CREATE ROLE \"{login}\" LOGIN");
    sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(&db.pool)
        .await
        .unwrap();
    // The worker reads which migrations are applied before it takes its role.
    let grant = format!("GRANT SELECT ON _sqlx_migrations TO \"{login}\"");
    sqlx::query(sqlx::AssertSqlSafe(grant))
        .execute(&db.pool)
        .await
        .unwrap();
    let mut url = url::Url::parse(db.settings.url.expose()).unwrap();
    url.set_username(&login).unwrap();
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__DATABASE__URL", url.as_str()),
            // It may not create tables: the test database is migrated already.
            ("OPSGATE__WORKER__MIGRATE_ON_START", "false"),
        ],
    );
    let output = worker_until_it_exits(&settings).await;
    let drop = format!("DROP OWNED BY \"{login}\"; DROP ROLE \"{login}\"");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(&db.pool)
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cannot SET ROLE to worker.database_role \"opsgate_worker\"")
            && stderr.contains("[SQLSTATE 42501]"),
        "{stderr}"
    );
}

/// With `worker.migrate_on_start`, a stop request while the migrations wait
/// for their locks (another migration, a long transaction) stops the
/// worker at once, exit 0, instead of waiting for the locks.
#[tokio::test]
async fn a_signal_while_migrating_on_start_stops_the_worker() {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__MIGRATE_ON_START", "true")]);
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut worker = spawn_worker(&settings);
    let deadline = Instant::now() + SECS_10;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = '_sqlx_migrations'::regclass",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never waited for the migrations' lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(&worker, "-TERM");
    let (status, _) = exit_of(&mut worker, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
    blocker.rollback().await.unwrap();
}

/// A second stop request while the worker waits for its in-flight messages
/// ends it at once (exit 130); the unfinished message is not applied and
/// goes back to the queue.
#[tokio::test]
async fn a_second_signal_while_draining_exits_at_once() {
    stopped_twice(false).await;
}

/// Two stop signals back to back (a supervisor's SIGTERM and an impatient
/// Ctrl-C) are both heard: the second one ends the drain at once, though it
/// came before the worker had finished reacting to the first.
#[tokio::test]
async fn two_stop_signals_back_to_back_exit_at_once() {
    stopped_twice(true).await;
}

/// A worker draining a message it cannot finish gets SIGTERM, then SIGINT
/// (half a second later, or `back_to_back`): it exits 130 at once, and the
/// message is neither applied nor lost.
async fn stopped_twice(back_to_back: bool) {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[("OPSGATE__WORKER__SHUTDOWN_TIMEOUT_SECS", "60")]);
    let producer = Producer::new(&settings).await;
    let Busy {
        mut child,
        holder,
        release_id,
        event,
    } = busy_worker(&db, &settings, &producer).await;
    if back_to_back {
        // One shell sends both, microseconds apart.
        let sent = Command::new("sh")
            .args(["-c", "kill -TERM \"$0\"; kill -INT \"$0\""])
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    } else {
        signal(&child, "-TERM");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(child.try_wait().unwrap().is_none(), "still draining");
        signal(&child, "-INT");
    }
    let (status, _) = exit_of(&mut child, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(130));
    free_release_lock(holder, release_id).await;
    wait_for_ready(&producer, 1).await;
    assert!(ledger(&db.pool, &key_of(&event)).await.is_empty());
    assert_eq!(checks(&db).await, 0);
    producer.finish().await;
}

/// A broker (or a load balancer in front of a dead one) that accepts the
/// connection and never answers leaves the worker waiting, since a
/// handshake cannot be given up without leaving its thread behind; it says
/// so every `amqp.connect_timeout_secs`, instead of sitting idle in silence.
#[tokio::test]
async fn a_broker_that_never_answers_is_reported_while_the_worker_waits() {
    let db = TestDb::new().await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a silent listener");
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Accept and hold every connection, saying nothing.
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let settings = settings_for(
        &db,
        &[
            ("OPSGATE__AMQP__URL", url.as_str()),
            ("OPSGATE__AMQP__CONNECT_TIMEOUT_SECS", "1"),
        ],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(config_dir())
        .arg("worker")
        .env_clear()
        .envs(env_of(&settings))
        .env("RUST_LOG", "warn")
        .env("OPSGATE__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the worker");
    let stderr = child.stderr.take().unwrap();
    let (lines, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match reported.recv_timeout(left) {
            Ok(line) if line.contains("RabbitMQ has not answered the connection yet; still waiting") => {
                break Some(line);
            }
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no report of the wait within 15 s; stderr: {seen:?}"));
    let logged: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(logged["connection"], "opsgate-worker", "{line}");
}
