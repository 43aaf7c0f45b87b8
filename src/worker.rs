//! `opsgate worker`: consumes envelopes until told to stop, reconnecting to
//! RabbitMQ whenever the connection drops, and runs the sweeps beside it.
//! One cancellation token stops every loop.

use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::broker::consumer::{self, ConsumerContext, SessionConnections, SessionEnd};
use crate::broker::{self, Topology};
use crate::config::Settings;
use crate::ingest::IngestOptions;
use crate::sweeps;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid database URL {url}: {source}")]
    DatabaseUrl {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    /// Every pooled connection would fail alike, which the pool reports only
    /// as a timeout: messages would be held for ever as if PostgreSQL were down.
    #[error("cannot SET ROLE to worker.database_role {role:?}: {reason}")]
    DatabaseRole { role: String, reason: String },
}

/// The topology the worker consumes, from its settings.
pub fn topology(settings: &Settings) -> Topology {
    Topology::new(
        &settings.amqp.namespace,
        settings.retry.schedule(),
        settings.amqp.delivery_limit,
    )
}

/// The worker's pool: lazy, so the worker starts (and holds messages) while
/// PostgreSQL is down, and each connection `SET ROLE`s to
/// `worker.database_role` for least privilege.
pub fn pool(settings: &Settings) -> Result<PgPool, WorkerError> {
    let options: PgConnectOptions =
        settings
            .database
            .url
            .expose()
            .parse()
            .map_err(|source| WorkerError::DatabaseUrl {
                url: settings.database.url.to_string(),
                source,
            })?;
    // The worker runs the same few statements (and the derivation's) over and
    // over with different ids. With custom plans PostgreSQL may plan them
    // again on every execution; generic plans are planned once per connection.
    // A lock held elsewhere for ever (an open psql transaction on a release)
    // fails the attempt after this, as a transient fault, instead of holding
    // a transaction slot until someone notices.
    let lock_timeout = format!("{}s", settings.worker.lock_timeout_secs);
    let options = options.options([
        ("plan_cache_mode", "force_generic_plan"),
        ("lock_timeout", lock_timeout.as_str()),
    ]);
    let role = settings.worker.database_role.clone();
    let pool = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(settings.database.acquire_timeout())
        .after_connect(move |conn, _| {
            let role = role.clone();
            Box::pin(async move {
                if !role.is_empty() {
                    // The name is validated by the settings: lowercase letters, digits and _.
                    sqlx::query(sqlx::AssertSqlSafe(format!("SET ROLE \"{role}\"")))
                        .execute(conn)
                        .await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options);

    Ok(pool)
}

/// Refuses to start when PostgreSQL answers but `worker.database_role` cannot
/// be taken (no such role, or the login is not a member of it). A database
/// that does not answer within `database.acquire_timeout_secs` is not an
/// error here: the worker holds messages until it answers.
async fn check_role(settings: &Settings) -> Result<(), WorkerError> {
    let role = &settings.worker.database_role;
    if role.is_empty() {
        return Ok(());
    }
    let connect = sqlx::PgConnection::connect(settings.database.url.expose());
    let mut conn = match tokio::time::timeout(settings.database.acquire_timeout(), connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            tracing::warn!(error = %crate::database::describe(&error),
                "PostgreSQL is not reachable at start; the worker holds messages until it is");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!("PostgreSQL did not answer at start; the worker holds messages until it does");
            return Ok(());
        }
    };
    // The name is validated by the settings: lowercase letters, digits and _.
    let set_role = sqlx::query(sqlx::AssertSqlSafe(format!("SET ROLE \"{role}\""))).execute(&mut conn);
    let taken = tokio::time::timeout(settings.database.acquire_timeout(), set_role).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.close()).await;
    match taken {
        // A server going down meanwhile is an outage, not a wrong role.
        Ok(Err(error)) if !crate::database::is_server_gone(&error) => Err(WorkerError::DatabaseRole {
            role: role.clone(),
            reason: crate::database::describe(&error),
        }),
        _ => Ok(()),
    }
}

/// Runs until `cancel` fires, then finishes in-flight messages and returns.
/// Neither RabbitMQ nor PostgreSQL being down makes it return.
pub async fn run(settings: &Settings, cancel: CancellationToken) -> Result<(), WorkerError> {
    let pool = pool(settings)?;
    check_role(settings).await?;

    let sweeper = settings.sweeps.enabled.then(|| {
        tokio::spawn(sweeps::run_periodically(
            pool.clone(),
            settings.sweeps.clone(),
            cancel.child_token(),
        ))
    });

    let context = Arc::new(ConsumerContext {
        batch_linger: std::time::Duration::from_millis(settings.worker.batch_linger_ms),
        pool: pool.clone(),
        topology: topology(settings),
        ingest: IngestOptions {
            max_body_bytes: settings.worker.max_body_bytes,
            writer: "opsgate-worker".to_owned(),
        },
        prefetch: settings.amqp.prefetch,
        max_in_flight: settings.worker.max_in_flight,
        batch_size: settings.worker.batch_size,
        max_transactions: settings.worker.max_transactions,
        confirm_timeout: settings.amqp.confirm_timeout(),
        jitter: settings.retry.jitter,
        database_retry_max: std::time::Duration::from_millis(settings.worker.database_retry_max_ms),
        shutdown_timeout: settings.worker.shutdown_timeout(),
        consumer_tag: format!("opsgate-worker-{}", std::process::id()),
    });

    tracing::info!(database = %settings.database.url, amqp = %settings.amqp.url,
        queue = %context.topology.ingest_queue, "worker starting");
    let mut reconnector = broker::Reconnector::new(&settings.amqp, "opsgate-worker");
    while !cancel.is_cancelled() {
        let Some(connection) = reconnector.connect(&cancel).await else {
            break;
        };
        let session = async {
            // A broker that stops answering mid-setup must not hold up a
            // shutdown: until consuming starts there is nothing in flight.
            let publishing = tokio::select! {
                () = cancel.cancelled() => return Ok((SessionEnd::Cancelled, std::time::Instant::now())),
                // Not broker::connect: a timed-out handshake would leave its
                // thread and socket behind, in a process that runs for months.
                publishing = broker::connect_waiting(&settings.amqp, PUBLISHING_CONNECTION) => publishing?,
            };
            let connections = SessionConnections {
                consuming: &connection,
                publishing: &publishing,
            };
            let ended = async {
                let declared = tokio::select! {
                    () = cancel.cancelled() => return Ok((SessionEnd::Cancelled, std::time::Instant::now())),
                    declared = declare_topology(connections.consuming, &context.topology) => declared,
                };
                declared?;
                consumer::consume(&connections, context.clone(), &cancel).await
            }
            .await;
            broker::quietly(publishing.close(200, "session over".into())).await;
            ended
        };
        let ended = session.await;
        // A session that failed ends now, which the next connect assumes.
        if let Ok((_, ended_at)) = &ended {
            reconnector.session_ended_at(*ended_at);
        }
        match ended.map(|(end, _)| end) {
            Ok(SessionEnd::Cancelled) => {
                broker::quietly(connection.close(200, "worker stopping".into())).await;
                break;
            }
            Ok(SessionEnd::Lost(reason)) => tracing::warn!(%reason, "lost RabbitMQ; reconnecting"),
            // The reconnector waits before the next session: a broker that
            // accepts connections and refuses the topology is not spun on.
            Err(error) => tracing::warn!(%error, "RabbitMQ session failed; reconnecting"),
        }
        broker::quietly(connection.close(200, "reconnecting".into())).await;
    }

    // What is still running after the drain (a sweep, or a message given up
    // at the shutdown timeout whose statement waits for a lock another
    // transaction holds) must not keep the process alive. Its statement is
    // abandoned: PostgreSQL finishes or rolls back its transaction, and a
    // message committed but not acked comes back as a duplicate.
    let deadline = tokio::time::Instant::now() + AFTER_DRAIN;
    if let Some(mut sweeper) = sweeper
        && tokio::time::timeout_at(deadline, &mut sweeper).await.is_err()
    {
        tracing::warn!("a sweep was still running at shutdown; it is abandoned");
        sweeper.abort();
    }
    if tokio::time::timeout_at(deadline, pool.close()).await.is_err() {
        tracing::warn!("database connections were still busy at shutdown; their statements are abandoned");
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// The name of each session's second connection, on which the worker
/// publishes replies, retries and dead letters (the first, which consumes
/// and acks, is `opsgate-worker`).
const PUBLISHING_CONNECTION: &str = "opsgate-worker-publishing";

/// How long the sweeps and the database connections get to finish once the
/// in-flight messages are done or given up.
const AFTER_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

async fn declare_topology(
    connection: &lapin::Connection,
    topology: &Topology,
) -> Result<(), broker::BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| broker::BrokerError::Channel {
            name: "topology".to_owned(),
            source,
        })?;
    topology.declare(&channel).await?;
    broker::quietly(channel.close(200, "declared".into())).await;
    Ok(())
}
