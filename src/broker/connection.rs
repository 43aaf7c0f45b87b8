//! Connecting to RabbitMQ, once or until it works.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{Connection, ConnectionProperties, ErrorKind};
use tokio_util::sync::CancellationToken;

use super::BrokerError;
use crate::config::AmqpSettings;

/// One connection attempt of a short-lived command (`publish`, `setup`),
/// bounded by `amqp.connect_timeout_secs`, so that a broker that accepts
/// and never answers cannot hang a CI step. `name` shows up in the
/// management UI, so operators can tell opsgate's connections apart.
///
/// Only for processes that exit soon after: lapin cannot abandon a
/// handshake in progress, so each timed-out attempt leaves its I/O thread
/// and socket behind until the peer answers or closes.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    match tokio::time::timeout(settings.connect_timeout(), connect_unbounded(settings, name)).await {
        Ok(connected) => connected,
        Err(_) => Err(BrokerError::ConnectTimeout {
            address: settings.url.to_string(),
            name: name.to_owned(),
            seconds: settings.connect_timeout_secs,
        }),
    }
}

/// One connection attempt that waits for the handshake as long as it takes.
async fn connect_unbounded(settings: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(settings.url.expose(), properties)
        .await
        .map_err(|source| BrokerError::Connect {
            address: settings.url.to_string(),
            name: name.to_owned(),
            hint: connect_hint(&source),
            source,
        })
}

/// A broker that answered and refused (a wrong password, an unknown vhost)
/// is not helped by starting it.
fn connect_hint(error: &lapin::Error) -> &'static str {
    match error.kind() {
        ErrorKind::ProtocolError(_) | ErrorKind::AuthProviderError(_) => {
            "RabbitMQ refused the login: check the user, password and vhost in OPSGATE__AMQP__URL / \
             AMQP_URL, and the user's permissions on the vhost"
        }
        _ => {
            "start it (`docker compose up -d rabbitmq`, or your local server) or point \
             OPSGATE__AMQP__URL / AMQP_URL at it"
        }
    }
}

/// Connects, retrying forever with exponential backoff and jitter between
/// `reconnect_min_ms` and `reconnect_max_ms`, so a broker restart or a
/// deploy-order race heals by itself. `None` only when `cancel` fires.
/// An attempt is not timed out (see [`connect`]): a broker that accepted the
/// connection and hangs completes the handshake once it answers again.
pub async fn connect_with_retry(
    settings: &AmqpSettings,
    name: &str,
    cancel: &CancellationToken,
) -> Option<Connection> {
    let min = Duration::from_millis(settings.reconnect_min_ms.max(1));
    let max = Duration::from_millis(settings.reconnect_max_ms).max(min);
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let result = tokio::select! {
            () = cancel.cancelled() => return None,
            result = connect_unbounded(settings, name) => result,
        };
        let error = match result {
            Ok(connection) => {
                if attempt > 1 {
                    tracing::info!(address = %settings.url, connection = name, attempt, "connected to RabbitMQ");
                }
                return Some(connection);
            }
            Err(error) => error,
        };
        // backon's jitter adds up to one more delay; keep the configured cap.
        let delay = delays.next().unwrap_or(max).min(max);
        tracing::warn!(
            attempt,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "{error}"
        );
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
