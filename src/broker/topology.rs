//! Names and declaration of the exchanges and queues under one namespace.
//!
//! Flow: producers publish to the topic exchange `<ns>`, which routes
//! everything (`#`) to the quorum queue `<ns>.ingest`. A message to retry is
//! published to `<ns>.retry.<delay>`, a quorum queue whose TTL expires it
//! back into the ingest queue through the default exchange (dead-lettered at
//! least once, so a broker restart cannot drop it on the way). Messages rejected
//! without requeue, or redelivered more than `delivery_limit` times, go to the
//! fanout exchange `<ns>.dlx` and from there to the quorum queue `<ns>.dead`.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::BrokerError;

/// The dead queue's delivery limit: in effect none. RabbitMQ 4 gives every
/// quorum queue a limit of 20 unless told otherwise, and the dead queue has
/// nowhere to send what passes it, so a dead letter looked at 20 times with
/// "requeue" (the runbook's way of reading them) would be dropped.
pub const DEAD_QUEUE_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// The topology of one namespace. Declaring it is idempotent, so every
/// process may declare it at start without coordination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchange: String,
    pub ingest_queue: String,
    pub dead_letter_exchange: String,
    pub dead_queue: String,
    pub retry_delays: Vec<Duration>,
    /// Returns to the ingest queue a message may have before it is
    /// dead-lettered (quorum `x-delivery-limit`). On RabbitMQ 4.3+ only
    /// `basic.reject` with requeue counts as a failed delivery; `basic.nack`
    /// does not, so consumers must reject to make this limit bite.
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(namespace: &str, retry_delays: Vec<Duration>, delivery_limit: u32) -> Topology {
        Topology {
            exchange: namespace.to_owned(),
            ingest_queue: format!("{namespace}.ingest"),
            dead_letter_exchange: format!("{namespace}.dlx"),
            dead_queue: format!("{namespace}.dead"),
            retry_delays,
            delivery_limit,
        }
    }

    /// The queue of retry tier `tier`. Tiers past the last reuse the last
    /// (the longest wait); with no tiers at all this is the dead queue, so a
    /// message sent there through the default exchange is kept, not dropped.
    pub fn retry_queue(&self, tier: usize) -> String {
        match self.retry_delays.get(tier).or_else(|| self.retry_delays.last()) {
            Some(delay) => self.retry_queue_name(*delay),
            None => self.dead_queue.clone(),
        }
    }

    /// Every retry tier's queue name with its delay, shortest tier first as configured.
    pub fn retry_queues(&self) -> Vec<(String, Duration)> {
        self.retry_delays
            .iter()
            .map(|delay| (self.retry_queue_name(*delay), *delay))
            .collect()
    }

    fn retry_queue_name(&self, delay: Duration) -> String {
        format!("{}.retry.{}", self.exchange, delay_label(delay))
    }

    /// Declares every exchange, queue and binding. Safe to repeat; a queue
    /// that exists with different arguments fails with PRECONDITION_FAILED
    /// (and closes `channel`), which is reported naming that queue.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        self.declare_exchange(channel, &self.exchange, ExchangeKind::Topic)
            .await?;
        self.declare_exchange(channel, &self.dead_letter_exchange, ExchangeKind::Fanout)
            .await?;

        let mut ingest_args = quorum_args();
        ingest_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        ingest_args.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange),
        );
        at_least_once_dead_lettering(&mut ingest_args);
        declare_queue(channel, &self.ingest_queue, ingest_args).await?;
        bind_queue(channel, &self.ingest_queue, &self.exchange, "#").await?;

        let mut dead_args = quorum_args();
        dead_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DEAD_QUEUE_DELIVERY_LIMIT),
        );
        declare_queue(channel, &self.dead_queue, dead_args).await?;
        bind_queue(channel, &self.dead_queue, &self.dead_letter_exchange, "").await?;

        for (queue, delay) in self.retry_queues() {
            // Quorum with at-least-once dead-lettering: a message whose delay
            // runs out while the broker restarts, or while the ingest queue is
            // briefly unavailable, is kept until it can move, never dropped
            // (classic queues dead-letter at most once).
            let mut args = quorum_args();
            at_least_once_dead_lettering(&mut args);
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-exchange".into(), long_string(""));
            args.insert(
                "x-dead-letter-routing-key".into(),
                long_string(&self.ingest_queue),
            );
            declare_queue(channel, &queue, args).await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange of this topology, messages included;
    /// meant for tests and for tearing down a namespace on purpose.
    pub async fn delete(&self, channel: &Channel) -> Result<(), BrokerError> {
        let mut queues = vec![self.ingest_queue.clone(), self.dead_queue.clone()];
        queues.extend(self.retry_queues().into_iter().map(|(queue, _)| queue));
        for queue in queues {
            channel
                .queue_delete(short(&queue)?, QueueDeleteOptions::default())
                .await
                .map_err(|source| BrokerError::Delete {
                    kind: "queue",
                    name: queue.clone(),
                    source,
                })?;
        }
        for exchange in [&self.exchange, &self.dead_letter_exchange] {
            channel
                .exchange_delete(short(exchange)?, ExchangeDeleteOptions::default())
                .await
                .map_err(|source| BrokerError::Delete {
                    kind: "exchange",
                    name: exchange.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    async fn declare_exchange(
        &self,
        channel: &Channel,
        name: &str,
        kind: ExchangeKind,
    ) -> Result<(), BrokerError> {
        channel
            .exchange_declare(
                short(name)?,
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| BrokerError::Declare {
                kind: "exchange",
                name: name.to_owned(),
                source,
            })
    }
}

/// RabbitMQ 3.10+: a quorum queue hands its dead letters over only once the
/// target confirmed them (this needs the reject-publish overflow mode).
fn at_least_once_dead_lettering(args: &mut FieldTable) {
    args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
    args.insert("x-overflow".into(), long_string("reject-publish"));
}

/// `1s`, `30s`, `2m`, `1h`, or `750ms` when not a whole second.
fn delay_label(delay: Duration) -> String {
    let ms = delay.as_millis();
    match ms {
        0 => "0s".to_owned(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// AMQP names are short strings (at most 255 bytes); lapin's `From` panics
/// past that, so names are checked here and reported instead.
pub(crate) fn short(name: &str) -> Result<ShortString, NameTooLong> {
    ShortString::try_new(name).map_err(|_| NameTooLong {
        name: name.to_owned(),
        len: name.len(),
    })
}

/// Kept apart from [`BrokerError`] so the name check stays cheap to return.
#[derive(Debug)]
pub(crate) struct NameTooLong {
    pub(crate) name: String,
    pub(crate) len: usize,
}

impl From<NameTooLong> for BrokerError {
    fn from(NameTooLong { name, len }: NameTooLong) -> Self {
        BrokerError::NameTooLong { name, len }
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            short(name)?,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|source| BrokerError::Declare {
            kind: "queue",
            name: name.to_owned(),
            source,
        })
}

async fn bind_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), BrokerError> {
    channel
        .queue_bind(
            short(queue)?,
            short(exchange)?,
            short(routing_key)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| BrokerError::Bind {
            queue: queue.to_owned(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_namespace() {
        let delays = [1, 5, 30, 120, 600].map(Duration::from_secs).to_vec();
        let topology = Topology::new("ops.events", delays, 10);
        assert_eq!(topology.exchange, "ops.events");
        assert_eq!(topology.ingest_queue, "ops.events.ingest");
        assert_eq!(topology.dead_letter_exchange, "ops.events.dlx");
        assert_eq!(topology.dead_queue, "ops.events.dead");
        let names: Vec<String> = topology.retry_queues().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "ops.events.retry.1s",
                "ops.events.retry.5s",
                "ops.events.retry.30s",
                "ops.events.retry.2m",
                "ops.events.retry.10m",
            ]
        );
        assert_eq!(topology.retry_queue(0), "ops.events.retry.1s");
        assert_eq!(topology.retry_queue(99), "ops.events.retry.10m");
    }

    #[test]
    fn labels_pick_the_largest_whole_unit() {
        assert_eq!(delay_label(Duration::from_millis(250)), "250ms");
        assert_eq!(delay_label(Duration::from_secs(90)), "90s");
        assert_eq!(delay_label(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn no_tiers_means_the_dead_queue() {
        let topology = Topology::new("ns", Vec::new(), 3);
        assert_eq!(topology.retry_queue(0), "ns.dead");
        assert!(topology.retry_queues().is_empty());
    }
}
