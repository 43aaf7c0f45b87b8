//! The RabbitMQ layer: the topology opsgate owns (exchange, ingest queue,
//! retry tiers, dead letters), connections with reconnect backoff, and a
//! publisher that only reports success once the broker has confirmed.

mod connection;
pub mod consumer;
mod publisher;
mod topology;

use std::time::Duration;

pub use connection::{Reconnector, connect, connect_waiting};
pub use publisher::{PublishError, Publisher};
pub use topology::{DEAD_QUEUE_DELIVERY_LIMIT, Topology};

use crate::config::AmqpSettings;

/// Runs a broker call whose result no longer matters (closing a channel or a
/// connection that may already be dead) for at most two seconds, so a dead
/// socket can never hang shutdown or reconnection.
pub(crate) async fn quietly<F: std::future::Future>(call: F) {
    let _ = tokio::time::timeout(Duration::from_secs(2), call).await;
}

/// Failures of connecting to RabbitMQ or managing the topology; each names
/// the address or the exchange/queue involved.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {address} (connection {name:?}): {source}; {hint}")]
    Connect {
        address: String,
        name: String,
        /// What to do about it, which depends on whether the broker answered.
        hint: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "cannot connect to RabbitMQ at {address} (connection {name:?}): no answer within {seconds}s \
         (amqp.connect_timeout_secs). Is something else listening there, or is the broker hung?"
    )]
    ConnectTimeout {
        address: String,
        name: String,
        seconds: u64,
    },
    #[error("cannot open a channel on RabbitMQ connection {name:?}: {source}")]
    Channel {
        name: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot enable publisher confirms on a RabbitMQ channel: {source}")]
    ConfirmSelect {
        #[source]
        source: lapin::Error,
    },
    #[error("cannot declare {kind} {name:?}: {source}")]
    Declare {
        kind: &'static str,
        name: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot bind queue {queue:?} to exchange {exchange:?} with key {routing_key:?}: {source}")]
    Bind {
        queue: String,
        exchange: String,
        routing_key: String,
        #[source]
        source: lapin::Error,
    },
    #[error("AMQP name {name:?} is {len} bytes long; RabbitMQ allows at most 255")]
    NameTooLong { name: String, len: usize },
    #[error("cannot delete {kind} {name:?}: {source}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: lapin::Error,
    },
}

/// Declares the topology for `settings` once and disconnects: run at deploy
/// or start so producers never publish into a missing exchange.
pub async fn setup(settings: &AmqpSettings, retry_delays: Vec<Duration>) -> Result<Topology, BrokerError> {
    const NAME: &str = "opsgate-setup";
    let topology = Topology::new(&settings.namespace, retry_delays, settings.delivery_limit);
    let connection = connect(settings, NAME).await?;
    let declared = declare_on(&connection, NAME, &topology).await;
    // The work is done (or failed) either way; a failed close only leaks a
    // connection the broker reaps, so it is not worth failing setup for.
    if let Err(error) = connection.close(200, "setup done".into()).await {
        tracing::warn!(address = %settings.url, %error, "closing the RabbitMQ setup connection failed");
    }
    declared.map(|()| topology)
}

async fn declare_on(
    connection: &lapin::Connection,
    name: &str,
    topology: &Topology,
) -> Result<(), BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| BrokerError::Channel {
            name: name.to_owned(),
            source,
        })?;
    let declared = topology.declare(&channel).await;
    // Close the channel before the connection so the two closes do not race.
    let _ = channel.close(200, "declared".into()).await;
    declared
}
