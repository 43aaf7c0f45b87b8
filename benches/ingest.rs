//! End-to-end ingest benchmark: the real `opsgate worker` binary against the
//! real RabbitMQ and PostgreSQL on this machine.
//!
//!   cargo bench --bench ingest -- [--events N] [--rate R] [--seconds S] [--keep-database]
//!                                  [--timeline] [--without-derivation]
//!
//! Phase 1 (throughput, memory): preloads N envelopes (a realistic mix of
//! event types over many releases, 10% of them duplicates) into the ingest
//! queue as persistent messages, starts the worker and times the drain. The
//! worker's RSS is sampled the whole time.
//! Phase 2 (latency): with the worker idle, offers R events/s for S seconds,
//! each with reply_to; latency is publish -> reply, and the worker replies
//! after its transaction committed.
//!
//! Each run uses a database and a namespace of its own and removes both.
//!
//! `--without-derivation` is a diagnostic, not a configuration: it disables
//! the triggers that re-derive gate and release state on every fact, in the
//! benchmark's own database, to show what the rest of the pipeline (queue,
//! ledger, handler writes, commit) costs on its own.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use opsgate::broker::Topology;
use opsgate::config::{DatabaseSettings, SecretUrl};
use serde_json::{Value, json};
use uuid::Uuid;

struct Args {
    events: usize,
    rate: u64,
    seconds: u64,
    /// Leave the database behind for inspection (its name is printed).
    keep_database: bool,
    /// Print phase 2's latency second by second, to see where a tail comes from.
    timeline: bool,
    /// Diagnostic: disable the derivation triggers in the benchmark database.
    without_derivation: bool,
}

fn args() -> Args {
    let mut args = Args {
        events: 50_000,
        rate: 1_000,
        seconds: 10,
        keep_database: false,
        timeline: false,
        without_derivation: false,
    };
    let raw: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < raw.len() {
        let value = raw.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match (raw[i].as_str(), value) {
            ("--events", Some(v)) => args.events = v as usize,
            ("--rate", Some(v)) => args.rate = v,
            ("--seconds", Some(v)) => args.seconds = v,
            ("--keep-database", _) => args.keep_database = true,
            ("--timeline", _) => args.timeline = true,
            ("--without-derivation", _) => args.without_derivation = true,
            _ => {}
        }
        i += 1;
    }
    args
}

/// How often the benchmark does autovacuum's job when the server's
/// autovacuum is off; autovacuum's own default (`autovacuum_naptime`) is 60 s.
const AUTOVACUUM_NAPTIME: Duration = Duration::from_secs(10);

/// The ops tables autovacuum would process now, by its own rules and the
/// server's settings: vacuum (and analyze) past the dead-tuple or insert
/// threshold, analyze alone past the change threshold.
const AUTOVACUUM_DUE: &str = "
    SELECT name, to_vacuum FROM (
        SELECT s.relid::regclass::text AS name,
               s.n_dead_tup > current_setting('autovacuum_vacuum_threshold')::float8
                              + current_setting('autovacuum_vacuum_scale_factor')::float8 * tuples
               OR s.n_ins_since_vacuum > current_setting('autovacuum_vacuum_insert_threshold')::float8
                                         + current_setting('autovacuum_vacuum_insert_scale_factor')::float8 * tuples AS to_vacuum,
               s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
                                       + current_setting('autovacuum_analyze_scale_factor')::float8 * tuples AS to_analyze
        FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid,
             LATERAL (SELECT greatest(c.reltuples, 0)::float8 AS tuples) t
        WHERE s.schemaname = 'ops'
    ) due
    WHERE to_vacuum OR to_analyze
    ORDER BY name";

fn amqp_url() -> String {
    std::env::var("OPSGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn envelope(event_type: &str, release_id: Uuid, gate: Option<&str>, payload: Value) -> Value {
    json!({
        "schema_version": "v1.0",
        "idempotency_key": format!("bench/{release_id}/{event_type}/{}", Uuid::new_v4().simple()),
        "event_type": event_type,
        "source_system": "github_actions",
        "release_id": release_id,
        "gate_code": gate,
        "payload": payload,
        "emitted_at": chrono::Utc::now().to_rfc3339(),
    })
}

/// The events of one release, in the order a real release produces them.
fn release_events(n: usize) -> Vec<Value> {
    let r = Uuid::new_v4();
    let staging = Uuid::new_v4();
    let production = Uuid::new_v4();
    let sha = format!("{:040x}", n);
    vec![
        envelope(
            "release_created",
            r,
            None,
            json!({"project": "acme/odoo", "release_name": format!("v{n}-{r}"), "environment_target": "production",
                   "source_ref": sha, "initiating_actor": "dev-1"}),
        ),
        envelope(
            "build_complete",
            r,
            Some("G1"),
            json!({"status": "pass", "git_sha": sha, "branch": "main", "commit_message": "bench", "author": "dev-1"}),
        ),
        envelope(
            "check_result",
            r,
            Some("G1"),
            json!({"check_name": "lint", "status": "warning"}),
        ),
        envelope(
            "evidence_attached",
            r,
            Some("G2"),
            json!({"artifact_type": "test_result", "artifact_url": "https://ci.example/tests"}),
        ),
        envelope(
            "gate_signoff",
            r,
            Some("G2"),
            json!({"approver_id": "qa-1", "persona_role": "qa_tester", "decision": "approved"}),
        ),
        envelope(
            "deployment_event",
            r,
            None,
            json!({"deployment_id": staging, "environment": "staging", "status": "succeeded", "deployed_by": "ci"}),
        ),
        envelope(
            "evidence_attached",
            r,
            Some("G3"),
            json!({"artifact_type": "rollback_plan", "artifact_url": "https://wiki.example/rollback"}),
        ),
        envelope(
            "gate_signoff",
            r,
            Some("G3"),
            json!({"approver_id": "rm-1", "persona_role": "release_manager", "decision": "approved"}),
        ),
        envelope(
            "deployment_event",
            r,
            None,
            json!({"deployment_id": production, "environment": "production", "status": "succeeded", "deployed_by": "ci"}),
        ),
        envelope(
            "health_check",
            r,
            Some("G4"),
            json!({"deployment_id": production, "status": "pass"}),
        ),
    ]
}

/// `count` envelopes: whole releases interleaved in rounds (each release's
/// events stay in order), with every tenth message a duplicate of an earlier one.
fn workload(count: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(count);
    let mut release = 0usize;
    while out.len() < count {
        // 50 releases in flight at a time, their events interleaved.
        let batch: Vec<Vec<Value>> = (0..50)
            .map(|_| {
                release_events({
                    release += 1;
                    release
                })
            })
            .collect();
        for step in 0..10 {
            for events in &batch {
                if out.len() >= count {
                    break;
                }
                out.push(serde_json::to_vec(&events[step]).unwrap_or_default());
                if out.len() % 10 == 9 && out.len() < count {
                    let earlier = out[out.len() / 2].clone();
                    out.push(earlier);
                }
            }
        }
    }
    out.truncate(count);
    out
}

async fn confirm_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
}

/// Publishes persistent messages, confirms awaited in windows of 500.
async fn preload(channel: &Channel, topology: &Topology, bodies: &[Vec<u8>]) {
    for window in bodies.chunks(500) {
        let mut confirms = Vec::with_capacity(window.len());
        for body in window {
            confirms.push(
                channel
                    .basic_publish(
                        topology.exchange.as_str().into(),
                        "bench".into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            confirm.await.expect("confirm");
        }
    }
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
}

/// Ledger rows written so far, roughly. The statistics counter is cheap to
/// poll (a count(*) over a growing ledger would load the database being
/// measured), but it lags and counts rolled-back rows, so the last tenth is
/// counted with `exact`.
async fn processed(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'ops.event_ingest_log'::regclass",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

async fn exact(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops.event_ingest_log")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may hold spaces: utime and stime
    // are the 14th and 15th fields of the line.
    let Some(rest) = stat.rfind(')').map(|end| &stat[end + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// The whole machine's CPU time so far, from the first line of /proc/stat:
/// (busy, idle, stolen) in ticks. Stolen is time the hypervisor gave our
/// virtual CPUs to someone else; on a shared machine it tells a slow run
/// from a slow change.
fn machine_ticks() -> (u64, u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0, 0);
    };
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    (busy, field(3) + field(4), field(7))
}

/// "busy 93%, idle 5%, stolen 2%" of all the machine's CPUs between two readings.
fn machine_share(before: (u64, u64, u64), after: (u64, u64, u64)) -> String {
    let busy = after.0.saturating_sub(before.0) as f64;
    let idle = after.1.saturating_sub(before.1) as f64;
    let stolen = after.2.saturating_sub(before.2) as f64;
    let total = (busy + idle + stolen).max(1.0);
    format!(
        "busy {:.0}%, idle {:.0}%, stolen by the hypervisor {:.0}%",
        busy * 100.0 / total,
        idle * 100.0 / total,
        stolen * 100.0 / total
    )
}

/// The processes whose command line contains `needle`.
fn pids_matching(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// CPU used so far by each side of the drain: the worker, the PostgreSQL
/// backends of the bench database, and RabbitMQ (when this user can read it).
struct CpuSnapshot {
    worker: f64,
    postgres: HashMap<u32, f64>,
    rabbitmq: f64,
    machine: (u64, u64, u64),
}

async fn cpu_snapshot(pool: &sqlx::PgPool, worker: u32) -> CpuSnapshot {
    let backends: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    CpuSnapshot {
        worker: cpu_secs(worker),
        postgres: backends
            .into_iter()
            .filter_map(|pid| u32::try_from(pid).ok())
            .map(|pid| (pid, cpu_secs(pid)))
            .collect(),
        rabbitmq: pids_matching("rabbit").into_iter().map(cpu_secs).sum(),
        machine: machine_ticks(),
    }
}

fn spawn_worker(database_url: &str, namespace: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_opsgate"))
        .arg("--config-dir")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .arg("worker")
        .env("OPSGATE__DATABASE__URL", database_url)
        .env("OPSGATE__AMQP__URL", amqp_url())
        .env("OPSGATE__AMQP__NAMESPACE", namespace)
        .env("OPSGATE__SWEEPS__ENABLED", "false")
        // The retry tiers of the bench's Topology, so that removing it at the
        // end removes every queue the worker declared.
        .env("OPSGATE__RETRY__SCHEDULE_SECS", "1,5")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the worker")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let args = args();
    let name = format!("opsgate_bench_{}", Uuid::new_v4().simple());
    let server = SecretUrl::new(common::server_url());
    let database = DatabaseSettings {
        url: server.with_path(&format!("/{name}")),
        max_connections: 4,
        acquire_timeout_secs: 10,
    };
    opsgate::database::migrate(&database)
        .await
        .expect("migrate the bench database");
    let pool = opsgate::database::connect(&database).await.expect("connect");
    if args.without_derivation {
        common::disable_derivation(&pool).await;
    }
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Production servers run autovacuum; a server with it off (some CI images)
    // would measure table bloat instead, so do its job in its place.
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&pool)
        .await
        .unwrap();
    let vacuums: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let vacuum = (autovacuum == "off").then(|| {
        let pool = pool.clone();
        let vacuums = vacuums.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = pool.acquire().await else {
                return;
            };
            // Throttled like autovacuum (its default cost delay), so that it
            // competes with the worker as autovacuum would, not harder.
            let _ = sqlx::query("SET vacuum_cost_delay = '2ms'")
                .execute(&mut *conn)
                .await;
            loop {
                tokio::time::sleep(AUTOVACUUM_NAPTIME).await;
                let started = Instant::now();
                let due: Vec<(String, bool)> = sqlx::query_as(AUTOVACUUM_DUE)
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap_or_default();
                for (table, vacuum) in &due {
                    let command = if *vacuum { "VACUUM (ANALYZE)" } else { "ANALYZE" };
                    // `table` is a regclass rendered by the server: quoted as needed.
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{command} {table}")))
                        .execute(&mut *conn)
                        .await;
                }
                if !due.is_empty()
                    && let Ok(mut v) = vacuums.lock()
                {
                    v.push((started, Instant::now()));
                }
            }
        })
    });

    let namespace = format!("bench.{}.events", Uuid::new_v4().simple());
    let topology = Topology::new(
        &namespace,
        vec![Duration::from_secs(1), Duration::from_secs(5)],
        10,
    );
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("amqp");
    let channel = confirm_channel(&connection).await;
    topology.declare(&channel).await.expect("declare");

    println!("opsgate ingest benchmark");
    println!(
        "  machine: {} cores, PostgreSQL synchronous_commit = {synchronous_commit}, quorum ingest queue, persistent messages",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    if args.without_derivation {
        println!("  DIAGNOSTIC RUN: derivation triggers disabled, gate and release state are not derived");
    }
    if vacuum.is_some() {
        println!(
            "  autovacuum is off on this server: every {} s the benchmark vacuums and analyzes the tables autovacuum would",
            AUTOVACUUM_NAPTIME.as_secs()
        );
    }

    // Phase 1: drain a preloaded backlog.
    let bodies = workload(args.events);
    let started = Instant::now();
    preload(&channel, &topology, &bodies).await;
    println!(
        "  preloaded {} envelopes in {:.1}s",
        bodies.len(),
        started.elapsed().as_secs_f64()
    );

    let mut worker = spawn_worker(database.url.expose(), &namespace);
    let pid = worker.id();
    let cpu_before = cpu_snapshot(&pool, pid).await;
    let drain_started = Instant::now();
    let mut samples: Vec<(f64, i64, u64)> = Vec::new();
    let mut last_counter = -1;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Backends flush the counter at most once a second, and an idle one
        // only after 10 s: near the end, or while it does not move, count
        // exactly.
        let counter = processed(&pool).await;
        let mut done = counter;
        if counter >= bodies.len() as i64 * 9 / 10 || counter == last_counter {
            done = exact(&pool).await;
        }
        last_counter = counter;
        let rss = rss_kib(pid, "VmRSS:").unwrap_or(0);
        samples.push((drain_started.elapsed().as_secs_f64(), done, rss));
        if done >= bodies.len() as i64 {
            break;
        }
        if let Ok(Some(status)) = worker.try_wait() {
            panic!("the worker exited early: {status}");
        }
    }
    let drain = drain_started.elapsed().as_secs_f64();
    let cpu_after = cpu_snapshot(&pool, pid).await;
    let peak = rss_kib(pid, "VmHWM:").unwrap_or(0);
    let accepted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'accepted'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let by_status: Vec<(String, i64)> = sqlx::query_as(
        "SELECT processing_status::text, count(*) FROM ops.event_ingest_log GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    println!("\n  phase 1: drain a backlog of {} messages", bodies.len());
    println!("    outcomes: {by_status:?}");
    println!(
        "    end to end: {:.0} messages/s, {:.0} accepted events/s ({drain:.1}s)",
        bodies.len() as f64 / drain,
        accepted as f64 / drain
    );
    // CPU per message is steadier than messages per second on a shared
    // machine: it does not count what other processes take from us.
    let per_message = |secs: f64| secs * 1000.0 / bodies.len() as f64;
    let postgres: f64 = cpu_after
        .postgres
        .iter()
        .map(|(pid, after)| after - cpu_before.postgres.get(pid).copied().unwrap_or(0.0))
        .sum();
    let worker_cpu = cpu_after.worker - cpu_before.worker;
    let rabbitmq = cpu_after.rabbitmq - cpu_before.rabbitmq;
    println!(
        "    CPU per message: PostgreSQL {:.2} ms, worker {:.2} ms, RabbitMQ {:.2} ms, together {:.2} ms",
        per_message(postgres),
        per_message(worker_cpu),
        per_message(rabbitmq),
        per_message(postgres + worker_cpu + rabbitmq)
    );
    println!(
        "    machine CPU over the drain: {}",
        machine_share(cpu_before.machine, cpu_after.machine)
    );
    println!("    worker RSS: peak {:.1} MiB", peak as f64 / 1024.0);
    for quarter in [0.25, 0.5, 0.75, 1.0] {
        let target = (bodies.len() as f64 * quarter) as i64;
        if let Some((t, done, rss)) = samples.iter().find(|(_, done, _)| *done >= target) {
            println!(
                "      at {:>3}% drained ({done} rows, {t:.1}s): RSS {:.1} MiB",
                (quarter * 100.0) as u32,
                *rss as f64 / 1024.0
            );
        }
    }

    // Phase 2: latency at an offered rate.
    let reply_queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply queue");
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    // (seconds into the phase when published, latency in ms)
    let latencies: Arc<Mutex<Vec<(f64, f64)>>> = Arc::new(Mutex::new(Vec::new()));
    let reply_channel = connection.create_channel().await.unwrap();
    let mut replies = reply_channel
        .basic_consume(
            reply_queue.name().clone(),
            "bench-replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let phase_started = Instant::now();
    let collector = {
        let sent_at = sent_at.clone();
        let latencies = latencies.clone();
        tokio::spawn(async move {
            while let Some(Ok(reply)) = replies.next().await {
                let id = reply
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                if let Some(start) = sent_at.lock().map(|mut m| m.remove(&id)).ok().flatten()
                    && let Ok(mut l) = latencies.lock()
                {
                    l.push((
                        start.duration_since(phase_started).as_secs_f64(),
                        start.elapsed().as_secs_f64() * 1000.0,
                    ));
                }
            }
        })
    };
    let offered = (args.rate * args.seconds) as usize;
    let paced = workload(offered);
    let machine_before = machine_ticks();
    let cpu_before = cpu_snapshot(&pool, pid).await;
    let bench_before = cpu_secs(std::process::id());
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for (i, body) in paced.iter().enumerate() {
        ticker.tick().await;
        let id = i.to_string();
        if let Ok(mut m) = sent_at.lock() {
            m.insert(id.clone(), Instant::now());
        }
        let _confirm = channel
            .basic_publish(
                topology.exchange.as_str().into(),
                "bench".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_reply_to(reply_queue.name().clone())
                    .with_correlation_id(id.into()),
            )
            .await
            .expect("publish");
    }
    let offer_secs = phase_started.elapsed().as_secs_f64();
    let machine_after = machine_ticks();
    let cpu_after = cpu_snapshot(&pool, pid).await;
    let bench_cpu = cpu_secs(std::process::id()) - bench_before;
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().map(|l| l.len()).unwrap_or(0) < offered && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    collector.abort();
    let timed = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let mut sorted: Vec<f64> = timed.iter().map(|(_, latency)| *latency).collect();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    println!(
        "\n  phase 2: {} events offered at {} events/s ({offer_secs:.1}s)",
        offered, args.rate
    );
    println!("    replies received: {}", sorted.len());
    println!(
        "    machine CPU while offering: {}",
        machine_share(machine_before, machine_after)
    );
    // Small transactions cost more per message than the drain's batches.
    let per_event = |secs: f64| secs * 1000.0 / offered as f64;
    let postgres: f64 = cpu_after
        .postgres
        .iter()
        .map(|(pid, after)| after - cpu_before.postgres.get(pid).copied().unwrap_or(0.0))
        .sum();
    println!(
        "    CPU per event while offering: PostgreSQL {:.2} ms, worker {:.2} ms, RabbitMQ {:.2} ms, \
         this benchmark (publishing, replies) {:.2} ms",
        per_event(postgres),
        per_event(cpu_after.worker - cpu_before.worker),
        per_event(cpu_after.rabbitmq - cpu_before.rabbitmq),
        per_event(bench_cpu)
    );
    println!(
        "    publish -> commit -> reply latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    if args.timeline {
        for second in 0..args.seconds {
            let mut in_second: Vec<f64> = timed
                .iter()
                .filter(|(at, _)| *at as u64 == second)
                .map(|(_, latency)| *latency)
                .collect();
            in_second.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            let from = phase_started + Duration::from_secs(second);
            let to = from + Duration::from_secs(1);
            let vacuuming = vacuums
                .lock()
                .map(|v| v.iter().any(|(start, end)| *start < to && *end > from))
                .unwrap_or(false);
            println!(
                "      second {second:>3}: {:>5} replies, p50 {:>6.1} ms, p99 {:>6.1} ms, max {:>6.1} ms{}",
                in_second.len(),
                percentile(&in_second, 0.50),
                percentile(&in_second, 0.99),
                in_second.last().copied().unwrap_or(f64::NAN),
                if vacuuming {
                    "  (vacuum or analyze running)"
                } else {
                    ""
                }
            );
        }
    }
    println!(
        "    worker RSS after both phases: {:.1} MiB (peak {:.1} MiB)",
        rss_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
        rss_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0
    );

    if let Some(vacuum) = vacuum {
        vacuum.abort();
    }
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = worker.wait();
    let _ = topology.delete(&channel).await;
    pool.close().await;
    if args.keep_database {
        println!("  database kept: {name}");
    } else if let Err(error) = common::drop_database(&name).await {
        eprintln!("  could not drop the benchmark database {name}: {error}");
    }
}
