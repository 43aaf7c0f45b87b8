//! The RabbitMQ layer against the real broker (`OPSGATE_TEST_AMQP_URL`, else
//! the local one). Every test works in a namespace of its own and deletes it.

use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicRejectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ErrorKind, ExchangeKind};
use opsgate::broker::{self, PublishError, Publisher, Topology};
use opsgate::config::{AmqpSettings, SecretUrl};

fn settings(namespace: &str, delivery_limit: u32) -> AmqpSettings {
    AmqpSettings {
        url: SecretUrl::new(
            std::env::var("OPSGATE_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        ),
        namespace: namespace.to_owned(),
        prefetch: 10,
        delivery_limit,
        reconnect_min_ms: 50,
        reconnect_max_ms: 200,
        confirm_timeout_secs: 5,
        connect_timeout_secs: 10,
    }
}

fn namespace() -> String {
    format!("test.{}.events", uuid::Uuid::new_v4().simple())
}

/// A declared topology with a connection, a plain channel and a publisher.
struct Harness {
    topology: Topology,
    connection: Connection,
    channel: Channel,
    publisher: Publisher,
}

impl Harness {
    async fn new(retry_delays: Vec<Duration>, delivery_limit: u32) -> Harness {
        let settings = settings(&namespace(), delivery_limit);
        let topology = broker::setup(&settings, retry_delays)
            .await
            .expect("declare the test topology");
        let connection = broker::connect(&settings, "opsgate-test")
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("open a channel");
        let publisher = Publisher::new(&connection, settings.confirm_timeout())
            .await
            .expect("open a publisher");
        Harness {
            topology,
            connection,
            channel,
            publisher,
        }
    }

    async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
    }

    async fn publish_event(&self, body: &[u8]) {
        self.publisher
            .publish(
                &self.topology.exchange,
                "build_complete",
                body,
                BasicProperties::default(),
                true,
            )
            .await
            .expect("publish an event");
    }

    async fn finish(self) {
        let cleanup = self.connection.create_channel().await.expect("channel");
        self.topology.delete(&cleanup).await.expect("delete topology");
        self.connection
            .close(200, "test done".into())
            .await
            .expect("close");
    }
}

#[tokio::test]
async fn declaring_twice_is_a_no_op() {
    let settings = settings(&namespace(), 3);
    let delays = vec![Duration::from_secs(1), Duration::from_secs(120)];
    let first = broker::setup(&settings, delays.clone())
        .await
        .expect("first declare");
    let second = broker::setup(&settings, delays)
        .await
        .expect("second declare with the same arguments");
    assert_eq!(first, second);
    assert_eq!(
        second
            .retry_queues()
            .into_iter()
            .map(|(q, _)| q)
            .collect::<Vec<_>>(),
        [
            format!("{}.retry.1s", settings.namespace),
            format!("{}.retry.2m", settings.namespace),
        ]
    );

    // Every queue exists (a passive declare fails on a missing queue).
    let connection = broker::connect(&settings, "opsgate-test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut queues = vec![second.ingest_queue.clone(), second.dead_queue.clone()];
    queues.extend(second.retry_queues().into_iter().map(|(q, _)| q));
    for queue in &queues {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|error| panic!("queue {queue} should exist: {error}"));
    }
    second.delete(&channel).await.expect("delete topology");
    connection.close(200, "test done".into()).await.expect("close");
}

#[tokio::test]
async fn events_published_to_the_exchange_land_in_the_ingest_queue() {
    let harness = Harness::new(vec![Duration::from_secs(1)], 3).await;
    harness.publish_event(b"{\"kind\":\"build_complete\"}").await;

    let message = harness
        .get(&harness.topology.ingest_queue)
        .await
        .expect("the event is in the ingest queue");
    assert_eq!(message.delivery.data, b"{\"kind\":\"build_complete\"}");
    assert_eq!(message.delivery.routing_key.as_str(), "build_complete");
    assert_eq!(*message.delivery.properties.delivery_mode(), Some(2));
    message
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    assert!(harness.get(&harness.topology.dead_queue).await.is_none());
    harness.finish().await;
}

#[tokio::test]
async fn retry_tier_returns_the_message_to_ingest_after_its_delay() {
    // Long enough that the probe below comes well before it on a slow machine.
    let delay = Duration::from_secs(3);
    let harness = Harness::new(vec![delay], 3).await;
    let retry_queue = harness.topology.retry_queue(0);
    let sent = Instant::now();
    harness
        .publisher
        .publish("", &retry_queue, b"again", BasicProperties::default(), true)
        .await
        .expect("publish to the retry tier");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        harness.get(&harness.topology.ingest_queue).await.is_none(),
        "the message must wait out its delay"
    );

    let message = loop {
        if let Some(message) = harness.get(&harness.topology.ingest_queue).await {
            break message;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the message never came back from {retry_queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(sent.elapsed() >= delay, "came back after {:?}", sent.elapsed());
    assert_eq!(message.delivery.data, b"again");
    message
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    harness.finish().await;
}

#[tokio::test]
async fn mandatory_publish_without_a_binding_is_unroutable() {
    let harness = Harness::new(vec![Duration::from_secs(1)], 3).await;
    let nowhere = format!("{}.nowhere", harness.topology.exchange);

    let error = harness
        .publisher
        .publish("", &nowhere, b"lost", BasicProperties::default(), true)
        .await
        .expect_err("no queue is named like that");
    assert!(
        matches!(&error, PublishError::Unroutable { routing_key, reply_code: 312, .. } if *routing_key == nowhere),
        "unexpected error: {error}"
    );

    // Without `mandatory` the broker drops it and confirms: that is the
    // silent loss `mandatory` exists to catch.
    harness
        .publisher
        .publish("", &nowhere, b"lost", BasicProperties::default(), false)
        .await
        .expect("non-mandatory publish is confirmed");

    // The channel stays usable after a returned message.
    harness.publish_event(b"still works").await;
    harness.finish().await;
}

#[tokio::test]
async fn a_message_rejected_past_the_delivery_limit_is_dead_lettered() {
    let harness = Harness::new(vec![Duration::from_secs(1)], 2).await;
    harness.publish_event(b"poison").await;

    let started = Instant::now();
    let mut deliveries = 0;
    let dead = loop {
        if let Some(message) = harness.get(&harness.topology.ingest_queue).await {
            deliveries += 1;
            assert_eq!(message.delivery.data, b"poison");
            // basic.reject, not basic.nack: from RabbitMQ 4.3 only a reject
            // counts towards the delivery limit.
            message
                .delivery
                .reject(BasicRejectOptions { requeue: true })
                .await
                .expect("reject");
        } else if let Some(message) = harness.get(&harness.topology.dead_queue).await {
            break message;
        } else {
            // Between a reject and its requeue or dead-lettering.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the message never reached {} ({deliveries} deliveries)",
            harness.topology.dead_queue
        );
    };
    assert_eq!(deliveries, 3, "delivery limit 2 allows 3 deliveries");
    assert_eq!(dead.delivery.data, b"poison");
    dead.delivery.ack(BasicAckOptions::default()).await.expect("ack");
    harness.finish().await;
}

#[tokio::test]
async fn the_reconnector_gives_up_only_when_cancelled() {
    // Nothing listens on port 1: every attempt fails fast.
    let mut settings = settings(&namespace(), 3);
    settings.url = SecretUrl::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let cancel = tokio_util::sync::CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            cancel.cancel();
        })
    };
    let started = Instant::now();
    let connection = broker::Reconnector::new(&settings, "opsgate-test")
        .connect(&cancel)
        .await;
    assert!(connection.is_none());
    assert!(started.elapsed() >= Duration::from_millis(500));
    canceller.await.expect("canceller");

    // Against the real broker it connects straight away.
    let good = self::settings(&namespace(), 3);
    let connection = broker::Reconnector::new(&good, "opsgate-test")
        .connect(&cancel_never())
        .await
        .expect("connects");
    connection.close(200, "test done".into()).await.expect("close");
}

fn cancel_never() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

#[tokio::test]
async fn connect_errors_name_the_address_without_the_password() {
    let mut settings = settings(&namespace(), 3);
    settings.url = SecretUrl::new("amqp://guest:hunter2@127.0.0.1:1/%2f");
    let error = broker::connect(&settings, "opsgate-test")
        .await
        .expect_err("nothing listens on port 1");
    let message = error.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test]
async fn persistent_unless_the_caller_says_otherwise() {
    let harness = Harness::new(vec![Duration::from_secs(1)], 3).await;
    harness
        .publisher
        .publish(
            &harness.topology.exchange,
            "build_complete",
            b"transient",
            BasicProperties::default().with_delivery_mode(1),
            true,
        )
        .await
        .expect("publish");
    let message = harness
        .get(&harness.topology.ingest_queue)
        .await
        .expect("message");
    assert_eq!(*message.delivery.properties.delivery_mode(), Some(1));
    message
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    harness.finish().await;
}

#[tokio::test]
async fn names_past_255_bytes_are_an_error_not_a_panic() {
    let harness = Harness::new(vec![Duration::from_secs(1)], 3).await;
    let long_key = "k".repeat(300);
    let error = harness
        .publisher
        .publish(
            &harness.topology.exchange,
            &long_key,
            b"x",
            BasicProperties::default(),
            true,
        )
        .await
        .expect_err("routing key too long");
    assert!(
        matches!(error, PublishError::NameTooLong { len: 300, .. }),
        "{error}"
    );
    harness.finish().await;
}

/// RabbitMQ 4 gives every quorum queue a delivery limit of 20 unless told
/// otherwise, and the dead queue has nowhere to send what passes it: a dead
/// letter read with "requeue" (the runbook's way) must stay however often.
#[tokio::test]
async fn the_dead_queue_keeps_a_dead_letter_however_often_it_is_read() {
    let harness = Harness::new(vec![Duration::from_secs(1)], 3).await;
    let dead_queue = harness.topology.dead_queue.clone();

    // The limit is the queue's own argument: a redeclaration that states it
    // is accepted (RabbitMQ refuses one whose x-delivery-limit differs).
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(broker::DEAD_QUEUE_DELIVERY_LIMIT),
    );
    let checker = harness.connection.create_channel().await.expect("channel");
    checker
        .queue_declare(
            dead_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("the dead queue is declared with its own delivery limit");

    harness
        .publisher
        .publish("", &dead_queue, b"evidence", BasicProperties::default(), true)
        .await
        .expect("publish a dead letter");
    let started = Instant::now();
    let mut reads = 0;
    while reads < 25 {
        if let Some(message) = harness.get(&dead_queue).await {
            reads += 1;
            assert_eq!(message.delivery.data, b"evidence");
            message
                .delivery
                .reject(BasicRejectOptions { requeue: true })
                .await
                .expect("reject with requeue");
        } else {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the dead letter is gone after {reads} reads"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    harness.finish().await;
}

/// Starting a broker that answered and refused the login does not help: the
/// error says what does.
#[tokio::test]
async fn a_refused_login_is_told_apart_from_a_broker_that_is_down() {
    let mut refused = settings(&namespace(), 3);
    // The test broker's URL with its password replaced.
    let url = refused.url.expose().to_owned();
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (credentials, host) = rest.split_once('@').expect("credentials in the test URL");
    let user = credentials.split(':').next().unwrap_or("guest");
    refused.url = SecretUrl::new(format!("{scheme}://{user}:not-the-password@{host}"));
    let message = broker::connect(&refused, "opsgate-test")
        .await
        .expect_err("a wrong password")
        .to_string();
    assert!(message.contains("refused the login"), "{message}");
    assert!(!message.contains("docker compose"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");

    let mut down = settings(&namespace(), 3);
    down.url = SecretUrl::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let message = broker::connect(&down, "opsgate-test")
        .await
        .expect_err("nothing listens on port 1")
        .to_string();
    assert!(message.contains("start it"), "{message}");
}

/// Deletes a namespace's topology when dropped: a test that fails half-way
/// leaves nothing behind on the shared broker either.
struct DeleteOnDrop {
    settings: AmqpSettings,
    topology: Topology,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let (settings, topology) = (self.settings.clone(), self.topology.clone());
        // Drop is synchronous; a helper thread with its own runtime does the async work.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                if let Ok(connection) = broker::connect(&settings, "opsgate-test-cleanup").await {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = topology.delete(&channel).await;
                    }
                    let _ = connection.close(200, "cleaned up".into()).await;
                }
            });
        })
        .join();
    }
}

/// What the broker said when it refused a declaration: its reply code and
/// text (the channel it was sent on is closed by then).
fn refusal<T: std::fmt::Debug>(result: Result<T, lapin::Error>) -> (u16, String) {
    match result {
        Err(error) => match error.kind() {
            ErrorKind::ProtocolError(amqp) => (amqp.get_id(), amqp.get_message().to_string()),
            other => panic!("expected the broker to refuse, got {other:?}"),
        },
        Ok(value) => panic!("expected the broker to refuse the declaration, it accepted: {value:?}"),
    }
}

async fn declare_exchange(
    connection: &Connection,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if declared.is_ok() {
        let _ = channel.close(200, "declared".into()).await;
    }
    declared
}

/// The arguments `queue` of `topology` is declared with, but of type
/// `queue_type`: RabbitMQ checks the other arguments first, so only these
/// make a refusal be about the type alone.
fn queue_arguments(topology: &Topology, queue: &str, queue_type: &str) -> FieldTable {
    let long = |value: &str| AMQPValue::LongString(value.into());
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long(queue_type));
    if queue == topology.dead_queue {
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(broker::DEAD_QUEUE_DELIVERY_LIMIT),
        );
        return arguments;
    }
    arguments.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    arguments.insert("x-overflow".into(), long("reject-publish"));
    if queue == topology.ingest_queue {
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(topology.delivery_limit)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            long(&topology.dead_letter_exchange),
        );
        return arguments;
    }
    let (_, delay) = topology
        .retry_queues()
        .into_iter()
        .find(|(name, _)| name == queue)
        .expect("a queue of the topology");
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(delay.as_millis() as i64),
    );
    arguments.insert("x-dead-letter-exchange".into(), long(""));
    arguments.insert("x-dead-letter-routing-key".into(), long(&topology.ingest_queue));
    arguments
}

/// Declares `queue` (durable) with `arguments`, on a channel of its own.
async fn declare_queue(
    connection: &Connection,
    queue: &str,
    arguments: FieldTable,
) -> Result<lapin::Queue, lapin::Error> {
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await;
    if declared.is_ok() {
        let _ = channel.close(200, "declared".into()).await;
    }
    declared
}

async fn passive_queue(connection: &Connection, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if declared.is_ok() {
        let _ = channel.close(200, "inspected".into()).await;
    }
    declared
}

async fn passive_exchange(connection: &Connection, exchange: &str) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if declared.is_ok() {
        let _ = channel.close(200, "inspected".into()).await;
    }
    declared
}

/// The main exchange is a durable topic exchange, the dead-letter exchange a
/// durable fanout, and every queue a quorum queue: RabbitMQ refuses a
/// redeclaration that differs in any of these, and accepts one that does not.
#[tokio::test]
async fn exchanges_are_durable_of_their_kind_and_queues_are_quorum() {
    let harness = Harness::new(vec![Duration::from_secs(1), Duration::from_secs(30)], 3).await;
    let _cleanup = DeleteOnDrop {
        settings: settings(&harness.topology.exchange, 3),
        topology: harness.topology.clone(),
    };
    let topology = &harness.topology;
    let connection = &harness.connection;

    // What the topology was declared as is accepted again.
    declare_exchange(connection, &topology.exchange, ExchangeKind::Topic, true)
        .await
        .expect("the main exchange is a durable topic exchange");
    declare_exchange(
        connection,
        &topology.dead_letter_exchange,
        ExchangeKind::Fanout,
        true,
    )
    .await
    .expect("the dead-letter exchange is a durable fanout exchange");

    let (code, text) =
        refusal(declare_exchange(connection, &topology.exchange, ExchangeKind::Fanout, true).await);
    assert_eq!(code, 406, "{text}");
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    assert!(
        text.contains("'type'") && text.contains("current is 'topic'"),
        "{text}"
    );

    let (code, text) =
        refusal(declare_exchange(connection, &topology.exchange, ExchangeKind::Topic, false).await);
    assert_eq!(code, 406, "{text}");
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    assert!(
        text.contains("'durable'") && text.contains("current is 'true'"),
        "{text}"
    );

    let (code, text) = refusal(
        declare_exchange(
            connection,
            &topology.dead_letter_exchange,
            ExchangeKind::Topic,
            true,
        )
        .await,
    );
    assert_eq!(code, 406, "{text}");
    assert!(text.contains("current is 'fanout'"), "{text}");

    let mut queues = vec![topology.ingest_queue.clone(), topology.dead_queue.clone()];
    queues.extend(topology.retry_queues().into_iter().map(|(queue, _)| queue));
    assert_eq!(queues.len(), 4);
    for queue in &queues {
        declare_queue(connection, queue, queue_arguments(topology, queue, "quorum"))
            .await
            .unwrap_or_else(|error| panic!("{queue} is declared with these arguments: {error}"));
        let (code, text) =
            refusal(declare_queue(connection, queue, queue_arguments(topology, queue, "classic")).await);
        assert_eq!(code, 406, "{queue}: {text}");
        assert!(text.contains("PRECONDITION_FAILED"), "{queue}: {text}");
        assert!(
            text.contains("'x-queue-type'") && text.contains("current is 'quorum'"),
            "{queue}: {text}"
        );
    }

    // The connection survives the closed channels, and the topology as
    // declared is still accepted as it is.
    let channel = connection.create_channel().await.expect("channel");
    topology
        .declare(&channel)
        .await
        .expect("the same declaration again");
    harness.finish().await;
}

/// `opsgate setup` run as the real binary, against a fresh namespace.
fn run_setup(namespace: &str) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opsgate"));
    // Only what this test says: nothing inherited picks another broker,
    // namespace, stage or config directory.
    for (key, _) in std::env::vars() {
        if key.starts_with("OPSGATE") {
            command.env_remove(key);
        }
    }
    command
        .arg("--config-dir")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .arg("setup")
        .env_remove("ODOO_STAGE")
        .env_remove("AMQP_URL")
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env("OPSGATE__AMQP__URL", test_amqp_url())
        .env("OPSGATE__AMQP__NAMESPACE", namespace)
        .output()
        .expect("run opsgate setup")
}

fn test_amqp_url() -> String {
    std::env::var("OPSGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opsgate_setup_declares_the_topology_and_can_run_again() {
    let namespace = namespace();
    // The topology the binary declares, from the same settings.
    let env = std::collections::HashMap::from([
        ("OPSGATE__AMQP__URL".to_owned(), test_amqp_url()),
        ("OPSGATE__AMQP__NAMESPACE".to_owned(), namespace.clone()),
    ]);
    let config_dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"));
    let settings = opsgate::config::load_from(config_dir, &env).expect("settings");
    let topology = opsgate::worker::topology(&settings);
    assert!(
        !topology.retry_delays.is_empty(),
        "the default config has retry tiers"
    );
    let mut queues = vec![topology.ingest_queue.clone(), topology.dead_queue.clone()];
    queues.extend(topology.retry_queues().into_iter().map(|(queue, _)| queue));
    let _cleanup = DeleteOnDrop {
        settings: settings.amqp.clone(),
        topology: topology.clone(),
    };

    let connection = broker::connect(&settings.amqp, "opsgate-test")
        .await
        .expect("connect");
    for queue in &queues {
        let (code, text) = refusal(passive_queue(&connection, queue).await);
        assert_eq!(code, 404, "{queue} exists before setup: {text}");
    }

    let first = run_setup(&namespace);
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains(&topology.ingest_queue), "{stdout}");
    assert!(stdout.contains(&topology.dead_queue), "{stdout}");

    for queue in &queues {
        passive_queue(&connection, queue)
            .await
            .unwrap_or_else(|error| panic!("queue {queue} should exist after setup: {error}"));
    }
    for exchange in [&topology.exchange, &topology.dead_letter_exchange] {
        passive_exchange(&connection, exchange)
            .await
            .unwrap_or_else(|error| panic!("exchange {exchange} should exist after setup: {error}"));
    }
    // Declared exactly as the worker declares it (same kinds and arguments:
    // RabbitMQ refuses a redeclaration that differs), and bound: an event
    // published to the exchange reaches the ingest queue.
    let channel = connection.create_channel().await.expect("channel");
    topology
        .declare(&channel)
        .await
        .expect("the worker's declaration matches what setup declared");
    let publisher = Publisher::new(&connection, settings.amqp.confirm_timeout())
        .await
        .expect("publisher");
    publisher
        .publish(
            &topology.exchange,
            "build_complete",
            b"routed",
            BasicProperties::default(),
            true,
        )
        .await
        .expect("an event is routed to the ingest queue");

    let second = run_setup(&namespace);
    assert_eq!(second.status.code(), Some(0), "{second:?}");
    let kept = passive_queue(&connection, &topology.ingest_queue)
        .await
        .expect("the ingest queue");
    assert_eq!(kept.message_count(), 1, "running setup again keeps the messages");

    let cleanup = connection.create_channel().await.expect("channel");
    topology.delete(&cleanup).await.expect("delete topology");
    connection.close(200, "test done".into()).await.expect("close");
}
