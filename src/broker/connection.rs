//! Connecting to RabbitMQ, once or until it works.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
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

/// One connection attempt that waits for the handshake as long as it takes
/// (the worker's: it races the attempt against its shutdown instead).
pub async fn connect_unbounded(settings: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
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

/// `connect_unbounded`, saying every `amqp.connect_timeout_secs` that it is
/// still waiting: a broker or load balancer that accepts the connection and
/// never answers would otherwise leave the worker idle without a word.
pub async fn connect_waiting(settings: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let connecting = connect_unbounded(settings, name);
    tokio::pin!(connecting);
    let started = Instant::now();
    let mut reminders = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.connect_timeout(),
        settings.connect_timeout(),
    );
    loop {
        tokio::select! {
            result = &mut connecting => return result,
            _ = reminders.tick() => tracing::warn!(
                address = %settings.url,
                connection = %name,
                waited_secs = started.elapsed().as_secs(),
                "RabbitMQ has not answered the connection yet; still waiting"
            ),
        }
    }
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

/// The worker's way to RabbitMQ: connects, retrying forever with
/// exponential backoff from `reconnect_min_ms` to `reconnect_max_ms`, each
/// pause shortened by up to half at random, so a broker restart or a
/// deploy-order race heals by itself.
///
/// One backoff spans failed attempts and short sessions alike: a broker (or
/// a load balancer in front of it) that accepts connections and drops them
/// soon after is retried ever more slowly, not in a tight loop. A session
/// that stayed up for `reconnect_max_ms` or longer was healthy, and the
/// reconnect after it starts again at once, from the shortest delay.
///
/// An attempt is not timed out (see [`connect`]): a broker that accepted the
/// connection and hangs completes the handshake once it answers again.
pub struct Reconnector {
    settings: AmqpSettings,
    name: String,
    min: Duration,
    max: Duration,
    delays: ExponentialBackoff,
    /// When the current session's connection was made, if there is one.
    connected_at: Option<Instant>,
    /// How long the last session lasted, once it has ended.
    last_session: Option<Duration>,
}

impl Reconnector {
    pub fn new(settings: &AmqpSettings, name: &str) -> Reconnector {
        let min = Duration::from_millis(settings.reconnect_min_ms.max(1));
        let max = Duration::from_millis(settings.reconnect_max_ms).max(min);
        Reconnector {
            settings: settings.clone(),
            name: name.to_owned(),
            min,
            max,
            delays: backoff(min, max),
            connected_at: None,
            last_session: None,
        }
    }

    /// Notes that the current session ended at `ended_at` (when the loss or
    /// the shutdown was noticed), so that its length does not include the
    /// drain and the closing that follow.
    pub fn session_ended_at(&mut self, ended_at: Instant) {
        if let Some(connected_at) = self.connected_at.take() {
            self.last_session = Some(ended_at.saturating_duration_since(connected_at));
        }
    }

    /// A connection, after the pause the last session's length calls for.
    /// `None` only when `cancel` fires.
    pub async fn connect(&mut self, cancel: &CancellationToken) -> Option<Connection> {
        self.session_ended_at(Instant::now());
        if let Some(lasted) = self.last_session.take() {
            if lasted >= self.max {
                self.delays = backoff(self.min, self.max);
            } else {
                let delay = self.next_delay();
                tracing::info!(
                    connection = %self.name,
                    retry_in_ms = millis(delay),
                    "the last RabbitMQ session ended soon after it began; waiting before reconnecting"
                );
                if !pause(delay, cancel).await {
                    return None;
                }
            }
        }
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let result = tokio::select! {
                () = cancel.cancelled() => return None,
                result = connect_waiting(&self.settings, &self.name) => result,
            };
            let error = match result {
                Ok(connection) => {
                    if attempt > 1 {
                        tracing::info!(address = %self.settings.url, connection = %self.name, attempt,
                            "connected to RabbitMQ");
                    }
                    self.connected_at = Some(Instant::now());
                    return Some(connection);
                }
                Err(error) => error,
            };
            let delay = self.next_delay();
            tracing::warn!(attempt, retry_in_ms = millis(delay), "{error}");
            if !pause(delay, cancel).await {
                return None;
            }
        }
    }

    /// The next step of the backoff, less up to half of it at random: the
    /// jitter only shortens, so it holds at the cap too, where workers that
    /// lost the same broker would otherwise retry in lockstep.
    fn next_delay(&mut self) -> Duration {
        let step = self.delays.next().unwrap_or(self.max).min(self.max);
        step.mul_f64(1.0 - rand::random::<f64>() / 2.0)
    }
}

fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .without_max_times()
        .build()
}

/// Sleeps for `delay`; false when `cancel` fired first.
async fn pause(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

fn millis(delay: Duration) -> u64 {
    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
}
