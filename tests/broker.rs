//! The RabbitMQ layer against the real broker (`OPSGATE_TEST_AMQP_URL`, else
//! the local one). Every test works in a namespace of its own and deletes it.

use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicRejectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
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
    let delay = Duration::from_secs(1);
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
