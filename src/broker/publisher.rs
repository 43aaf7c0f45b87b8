//! Publishing with publisher confirms: a publish only succeeds once the
//! broker has taken responsibility for the message.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::BrokerError;
use super::topology::{NameTooLong, short};

/// Why a publish did not end with the broker owning the message; each names
/// the exchange and routing key.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ refused (nacked) the message to exchange {exchange:?}, routing key {routing_key:?}")]
    Nacked { exchange: String, routing_key: String },
    #[error(
        "no queue is bound for exchange {exchange:?}, routing key {routing_key:?}; RabbitMQ returned \
         the message: {reply_code} {reply_text}"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply_code: u16,
        reply_text: String,
    },
    #[error(
        "RabbitMQ did not confirm the message to exchange {exchange:?}, routing key {routing_key:?} \
         within {timeout:?}"
    )]
    Timeout {
        exchange: String,
        routing_key: String,
        timeout: Duration,
    },
    #[error("publishing to exchange {exchange:?}, routing key {routing_key:?} failed: {source}")]
    Broker {
        exchange: String,
        routing_key: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot publish to {name:?}: the name is {len} bytes long; RabbitMQ allows at most 255")]
    NameTooLong { name: String, len: usize },
}

impl From<NameTooLong> for PublishError {
    fn from(NameTooLong { name, len }: NameTooLong) -> Self {
        PublishError::NameTooLong { name, len }
    }
}

/// A confirm-mode channel. Cheap to clone; clones share the channel.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
    /// The connection's negotiated frame size; 0 means no limit.
    frame_max: u32,
    /// Whether RabbitMQ has blocked the connection (a memory or disk alarm).
    connection: lapin::ConnectionStatus,
    /// Whether the confirm timeout waits while the connection is blocked.
    waits_out_alarms: bool,
}

/// What a copy's own headers and its other properties may take in a frame
/// at most (our headers about 1.3 KiB, the producer's short properties).
const COPY_HEADROOM_BYTES: usize = 4 * 1024;

impl Publisher {
    /// Opens a channel on `connection` and puts it in confirm mode.
    pub async fn new(connection: &Connection, confirm_timeout: Duration) -> Result<Publisher, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| BrokerError::Channel {
                name: "publisher".to_owned(),
                source,
            })?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|source| BrokerError::ConfirmSelect { source })?;
        Ok(Publisher {
            channel,
            confirm_timeout,
            frame_max: connection.configuration().frame_max(),
            connection: connection.status().clone(),
            waits_out_alarms: false,
        })
    }

    /// The worker's publisher: while RabbitMQ blocks the connection (an
    /// alarm), the confirm timeout does not run out. The message waits in
    /// the connection's buffer and goes out when the alarm clears; given up,
    /// it would still go out then, beside the copy the worker would publish
    /// again on the next delivery. (A command such as `opsgate publish`
    /// keeps its timeout, so that a CI step does not hang.)
    #[must_use]
    pub fn waiting_out_alarms(mut self) -> Publisher {
        self.waits_out_alarms = true;
        self
    }

    /// How many bytes of a producer's headers, encoded, a copy of its message
    /// may carry: the properties of a message must fit in one frame.
    pub fn headers_budget(&self) -> usize {
        match usize::try_from(self.frame_max) {
            Ok(0) | Err(_) => usize::MAX,
            Ok(frame_max) => frame_max.saturating_sub(COPY_HEADROOM_BYTES),
        }
    }

    /// The underlying channel, e.g. to check it is still open.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for the broker's confirm. Persistent (delivery
    /// mode 2) unless `properties` set a delivery mode. With `mandatory`, a
    /// message no queue would receive is an error instead of silently lost.
    /// See [`Publisher::waiting_out_alarms`].
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let properties = if properties.delivery_mode().is_some() {
            properties
        } else {
            properties.with_delivery_mode(2)
        };
        let exchange_name = short(exchange)?;
        let routing_key_name = short(routing_key)?;
        let broker = |source| PublishError::Broker {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            source,
        };
        let confirmed = async {
            self.channel
                .basic_publish(
                    exchange_name,
                    routing_key_name,
                    BasicPublishOptions {
                        mandatory,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        };
        let mut confirmed = std::pin::pin!(confirmed);
        // Blocked when the last wait ran out: the alarm may have cleared just
        // before this one did, so the confirm gets a whole wait after it.
        let mut was_blocked = false;
        let confirmation = loop {
            match tokio::time::timeout(self.confirm_timeout, &mut confirmed).await {
                Ok(confirmation) => break confirmation.map_err(broker)?,
                Err(_) if self.waits_out_alarms && (self.connection.blocked() || was_blocked) => {
                    was_blocked = self.connection.blocked();
                }
                Err(_) => {
                    return Err(PublishError::Timeout {
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                        timeout: self.confirm_timeout,
                    });
                }
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                reply_code: returned.reply_code,
                reply_text: returned.reply_text.to_string(),
            }),
            // NotRequested cannot happen on a confirm-mode channel; if it did,
            // nobody vouched for the message, which is what a nack means too.
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
        }
    }
}
