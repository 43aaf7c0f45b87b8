//! The consume loop: a bounded number of messages in flight (a semaphore and
//! a JoinSet), processed against PostgreSQL in batches of those already
//! received (a message whose release is in a running batch waits for it, so
//! a release's events apply in arrival order), each answered when it asks
//! for a reply, then retried,
//! dead-lettered or acked. A retry or dead letter is
//! published with a confirm before the original is acked, so nothing is lost
//! between the two.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BrokerError, Publisher, Topology};
use crate::ingest::{self, IngestOptions, Next, Outcome};
use crate::text::{MAX_HEADER_BYTES, clipped};

/// Our header with the attempt number of a message (1 when absent).
pub const ATTEMPT_HEADER: &str = "x-opsgate-attempt";
/// Headers of a dead letter, for the SREs who read the dead-letter queue.
pub const DEAD_CODE_HEADER: &str = "x-opsgate-code";
pub const DEAD_STATUS_HEADER: &str = "x-opsgate-status";
pub const DEAD_ERROR_HEADER: &str = "x-opsgate-error";
pub const DEAD_FAILED_AT_HEADER: &str = "x-opsgate-failed-at";
/// Set on a copy instead of the producer's headers when they were left out
/// (too large to fit in a frame beside ours): their encoded size in bytes.
pub const HEADERS_LEFT_OUT_HEADER: &str = "x-opsgate-headers-left-out";

/// An ack that takes longer is on a dead channel.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a message whose retry or dead letter could not be published
/// waits before it goes back to the queue, so that it does not come straight
/// back in a tight loop while the broker refuses.
const FORWARD_FAILED_PAUSE: Duration = Duration::from_secs(1);

/// Everything a message needs to be processed, shared by every task.
#[derive(Debug, Clone)]
pub struct ConsumerContext {
    pub pool: PgPool,
    pub topology: Topology,
    pub ingest: IngestOptions,
    pub prefetch: u16,
    pub max_in_flight: usize,
    /// Most deliveries applied in one transaction.
    pub batch_size: usize,
    /// Batches applied at once, each in its own transaction.
    pub max_transactions: usize,
    /// How long a batch that is not full waits for more deliveries.
    pub batch_linger: Duration,
    pub confirm_timeout: Duration,
    /// Each retry delay is shortened by up to this fraction at random.
    pub jitter: f64,
    /// Upper bound of the wait between attempts while PostgreSQL is down.
    pub database_retry_max: Duration,
    /// How long in-flight messages may take once shutdown is asked for.
    pub shutdown_timeout: Duration,
    pub consumer_tag: String,
}

/// How a consume session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was asked for; in-flight messages are done (or timed out).
    Cancelled,
    /// The channel or connection failed; reconnect.
    Lost(String),
}

/// Consumes the ingest queue on `connection` until it fails or `cancel`
/// fires; how the session ended, and when (before the in-flight messages
/// were drained).
pub async fn consume(
    connections: &SessionConnections<'_>,
    context: Arc<ConsumerContext>,
    cancel: &CancellationToken,
) -> Result<(SessionEnd, Instant), BrokerError> {
    let broker_failed = BrokerFailure::watch(&[
        ("consuming", connections.consuming),
        ("publishing", connections.publishing),
    ]);
    // A broker that stops answering mid-setup must not hold up a shutdown:
    // until consuming starts there is nothing in flight.
    let opened = tokio::select! {
        () = cancel.cancelled() => return Ok((SessionEnd::Cancelled, Instant::now())),
        opened = open_session(connections, &context) => opened,
    };
    let (channel, publisher, mut consumer) = opened?;
    tracing::info!(queue = %context.topology.ingest_queue, prefetch = context.prefetch,
        max_in_flight = context.max_in_flight, "consuming");

    // Fired by a task that finds the publishing channel closed (RabbitMQ
    // closes a channel for good on an error such as a missing exchange):
    // the session is over, and the reconnect opens a new one and redeclares.
    let publisher_lost = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(context.max_in_flight));
    // A batch is put together only once it can start: while every
    // transaction slot is busy, deliveries gather in the prefetch buffer and
    // the next batch takes them all (up to batch_size). Under load batches
    // grow and each message costs less; a quiet queue still gets
    // one-message transactions, after at most batch_linger.
    let transactions = Arc::new(Semaphore::new(context.max_transactions));
    let mut tasks = JoinSet::new();
    // Deliveries received while their release was in another batch's
    // transaction, in arrival order, each with its in-flight slot.
    let mut held: VecDeque<Received> = VecDeque::new();
    let busy = BusyReleases::default();
    // Fired when the session ends, however it ends: a batch held while
    // PostgreSQL is down stops waiting, since its deliveries can no longer
    // be acked on this channel (RabbitMQ redelivers them).
    let session_over = cancel.child_token();
    let end = loop {
        while let Some(finished) = tasks.try_join_next() {
            report_panic(finished);
        }
        // Biased, the ends of the session first: once one has come, no new
        // batch may start, however many permits and deliveries are ready.
        let transaction = tokio::select! {
            biased;
            () = cancel.cancelled() => break SessionEnd::Cancelled,
            () = publisher_lost.cancelled() => break publishing_channel_closed(),
            () = broker_failed.token.cancelled() => break broker_failed.session_end(),
            permit = transactions.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break SessionEnd::Cancelled,
            },
        };
        let mut batch = Batch::default();
        // What has arrived while the slots were busy is held first, so that
        // the batch takes each release's deliveries together: the database
        // derives a release once per transaction, not once per event.
        let mut lost = hold_arrived(&slots, &mut consumer, &mut held, context.ingest.max_body_bytes);
        take_free_held(&mut held, &busy, &mut batch, context.batch_size);
        // Wait for the first delivery that can start, or for a release
        // to come free when one was held for it.
        while batch.is_empty() && lost.is_none() {
            let received = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = publisher_lost.cancelled() => break,
                () = broker_failed.token.cancelled() => break,
                () = busy.freed.notified(), if !held.is_empty() => {
                    take_free_held(&mut held, &busy, &mut batch, context.batch_size);
                    continue;
                }
                received = next_delivery(&slots, &mut consumer, context.ingest.max_body_bytes) => received,
            };
            match received {
                Ok(received) => admit(received, &mut held, &busy, &mut batch),
                Err(reason) => {
                    lost = Some(reason);
                    break;
                }
            }
        }
        if batch.is_empty() {
            if let Some(reason) = lost {
                break SessionEnd::Lost(reason);
            }
            if cancel.is_cancelled() {
                break SessionEnd::Cancelled;
            }
            if publisher_lost.is_cancelled() {
                break publishing_channel_closed();
            }
            break broker_failed.session_end();
        }
        // Whatever else has already arrived joins the batch, and what
        // arrives within batch_linger: at a steady rate a batch of several
        // costs the database much less than as many batches of one. (Biased:
        // a delivery that is there is taken before the deadline is looked
        // at, so with no linger this takes what has arrived and no more.)
        let until = tokio::time::Instant::now() + context.batch_linger;
        while lost.is_none() && batch.len() < context.batch_size {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                break;
            };
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = publisher_lost.cancelled() => break,
                () = broker_failed.token.cancelled() => break,
                next = consumer.next() => next,
                () = tokio::time::sleep_until(until) => break,
            };
            match received(next, slot, context.ingest.max_body_bytes) {
                Ok(received) => admit(received, &mut held, &busy, &mut batch),
                Err(reason) => lost = Some(reason),
            }
        }
        // An end that came while the batch was put together: its deliveries
        // are not started; RabbitMQ requeues them when the channel closes.
        if cancel.is_cancelled() {
            break SessionEnd::Cancelled;
        }
        if broker_failed.token.is_cancelled() {
            break broker_failed.session_end();
        }
        // Its retry copies and dead letters could not be published.
        if publisher_lost.is_cancelled() {
            break publishing_channel_closed();
        }
        let Batch {
            deliveries,
            releases,
            slots: permit,
        } = batch;
        busy.mark(&releases);
        // Built before the task, so that its drop frees the releases even
        // if the task never runs.
        let in_database = InDatabase {
            _transaction: transaction,
            busy: busy.clone(),
            releases,
        };
        let context = context.clone();
        let publisher = publisher.clone();
        let session_over = session_over.clone();
        let publisher_lost = publisher_lost.clone();
        let consuming = channel.clone();
        tasks.spawn(async move {
            handle(
                deliveries,
                in_database,
                &context,
                (&publisher, &consuming),
                &session_over,
                &publisher_lost,
            )
            .await;
            drop(permit);
        });
        if let Some(reason) = lost {
            break SessionEnd::Lost(reason);
        }
    };
    let ended_at = Instant::now();

    session_over.cancel();
    // Stop the broker pushing more; what it already pushed and we did not
    // start is requeued when the channel closes.
    if matches!(end, SessionEnd::Cancelled) {
        super::quietly(channel.basic_cancel(
            context.consumer_tag.as_str().into(),
            BasicCancelOptions::default(),
        ))
        .await;
    }
    let drained = tokio::time::timeout(context.shutdown_timeout, async {
        while let Some(finished) = tasks.join_next().await {
            report_panic(finished);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            unfinished = tasks.len(),
            "in-flight messages did not finish in time; they stay unacked and will be redelivered"
        );
        tasks.abort_all();
    }
    super::quietly(publisher.channel().close(200, "worker stopping".into())).await;
    super::quietly(channel.close(200, "worker stopping".into())).await;
    Ok((end, ended_at))
}

/// The two connections of a session. RabbitMQ blocks a connection that
/// publishes during a memory or disk alarm, reading nothing more from it:
/// with replies, retries and dead letters published on a connection of
/// their own, the consuming one keeps acking.
pub struct SessionConnections<'a> {
    pub consuming: &'a Connection,
    pub publishing: &'a Connection,
}

/// The consuming channel (with its prefetch), the publisher of replies,
/// retries and dead letters, and the consumer of the ingest queue.
async fn open_session(
    connections: &SessionConnections<'_>,
    context: &ConsumerContext,
) -> Result<(lapin::Channel, Publisher, lapin::Consumer), BrokerError> {
    let channel_error = |source| BrokerError::Channel {
        name: context.topology.ingest_queue.clone(),
        source,
    };
    let channel = connections
        .consuming
        .create_channel()
        .await
        .map_err(channel_error)?;
    channel
        .basic_qos(context.prefetch, BasicQosOptions::default())
        .await
        .map_err(channel_error)?;
    let publisher = Publisher::new(connections.publishing, context.confirm_timeout)
        .await?
        .waiting_out_alarms();
    let consumer = channel
        .basic_consume(
            context.topology.ingest_queue.as_str().into(),
            context.consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(channel_error)?;
    Ok((channel, publisher, consumer))
}

/// Fired when RabbitMQ reports an error on a connection, or closes one of
/// its channels with an error (e.g. the consuming channel after
/// `consumer_timeout`). The consume loop learns of a dead consumer only
/// while it waits for a delivery; when every slot is held (batches waiting
/// for PostgreSQL), this is what ends the session, so that the held
/// batches, which can no longer be acked, stop waiting.
struct BrokerFailure {
    token: CancellationToken,
    /// The first error reported.
    reason: Arc<std::sync::OnceLock<String>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

impl BrokerFailure {
    /// Watches each `(role, connection)` of the session.
    fn watch(connections: &[(&'static str, &Connection)]) -> BrokerFailure {
        let token = CancellationToken::new();
        let reason = Arc::new(std::sync::OnceLock::new());
        let watchers: Vec<_> = connections
            .iter()
            .map(|&(role, connection)| {
                let mut events = connection.events_listener();
                let token = token.clone();
                let reason = reason.clone();
                tokio::spawn(async move {
                    while let Some(event) = events.next().await {
                        match event {
                            lapin::Event::Error(error) => {
                                let _ = reason.set(format!("RabbitMQ reported an error: {error}"));
                                token.cancel();
                            }
                            // Not an end: the session goes on once RabbitMQ reads again.
                            lapin::Event::ConnectionBlocked(why) => {
                                tracing::warn!(
                                    connection = role,
                                    reason = %why,
                                    "RabbitMQ blocked a connection (a memory or disk alarm); \
                                     what it publishes waits until it is unblocked"
                                );
                            }
                            lapin::Event::ConnectionUnblocked => {
                                tracing::info!(connection = role, "RabbitMQ unblocked a connection");
                            }
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        BrokerFailure {
            token,
            reason,
            watchers,
        }
    }

    fn session_end(&self) -> SessionEnd {
        let reason = self
            .reason
            .get()
            .map_or("RabbitMQ reported an error", String::as_str);
        SessionEnd::Lost(reason.to_owned())
    }
}

impl Drop for BrokerFailure {
    fn drop(&mut self) {
        for watcher in &self.watchers {
            watcher.abort();
        }
    }
}

fn publishing_channel_closed() -> SessionEnd {
    SessionEnd::Lost("the publishing channel closed".to_owned())
}

fn report_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished
        && error.is_panic()
    {
        tracing::error!(%error, "a message task panicked; its message stays unacked until the channel closes, then it is redelivered");
    }
}

/// A delivery and its in-flight slot, with the release its envelope names
/// (read ahead of the batch, so that it can wait for its release).
struct Received {
    delivery: lapin::message::Delivery,
    slot: OwnedSemaphorePermit,
    release: Option<Uuid>,
}

impl Received {
    fn new(delivery: lapin::message::Delivery, slot: OwnedSemaphorePermit, max_body_bytes: usize) -> Self {
        let release = release_named_in(&delivery.data, max_body_bytes);
        Self {
            delivery,
            slot,
            release,
        }
    }
}

/// The `release_id` of an envelope, if the body is one; whatever else the
/// body holds is read (and judged) by the ingest step. A body over the limit
/// is refused with 413 unread, so it is not parsed here either.
fn release_named_in(body: &[u8], max_body_bytes: usize) -> Option<Uuid> {
    #[derive(serde::Deserialize)]
    struct ReleaseOnly {
        release_id: Option<Uuid>,
    }
    if body.len() > max_body_bytes {
        return None;
    }
    serde_json::from_slice::<ReleaseOnly>(body).ok()?.release_id
}

/// Holds every delivery that has already arrived, as far as in-flight slots
/// allow, without waiting; returns why the session is lost if it is.
fn hold_arrived(
    slots: &Arc<Semaphore>,
    consumer: &mut lapin::Consumer,
    held: &mut VecDeque<Received>,
    max_body_bytes: usize,
) -> Option<String> {
    loop {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            return None;
        };
        let next = consumer.next().now_or_never()?;
        match received(next, slot, max_body_bytes) {
            Ok(received) => held.push_back(received),
            Err(reason) => return Some(reason),
        }
    }
}

/// Waits for an in-flight slot, then for the next delivery.
async fn next_delivery(
    slots: &Arc<Semaphore>,
    consumer: &mut lapin::Consumer,
    max_body_bytes: usize,
) -> Result<Received, String> {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| "the in-flight slots were closed".to_owned())?;
    received(consumer.next().await, slot, max_body_bytes)
}

/// What the consumer stream gave: a delivery, or why the session is lost.
fn received(
    next: Option<Result<lapin::message::Delivery, lapin::Error>>,
    slot: OwnedSemaphorePermit,
    max_body_bytes: usize,
) -> Result<Received, String> {
    match next {
        Some(Ok(delivery)) => Ok(Received::new(delivery, slot, max_body_bytes)),
        Some(Err(error)) => Err(error.to_string()),
        None => Err("the consumer was cancelled by the broker".to_owned()),
    }
}

/// The deliveries of the batch being put together, their releases and
/// their in-flight slots.
#[derive(Default)]
struct Batch {
    deliveries: Vec<lapin::message::Delivery>,
    releases: Vec<Uuid>,
    slots: Option<OwnedSemaphorePermit>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    fn len(&self) -> usize {
        self.deliveries.len()
    }

    fn push(&mut self, received: Received) {
        self.deliveries.push(received.delivery);
        if let Some(release) = received.release
            && !self.releases.contains(&release)
        {
            self.releases.push(release);
        }
        match &mut self.slots {
            Some(slots) => slots.merge(received.slot),
            None => self.slots = Some(received.slot),
        }
    }
}

/// Releases whose batch is in the database. A delivery of one of them is
/// held back rather than put in another batch, which would only wait for
/// the release's lock while it kept a transaction slot and the locks of its
/// other releases; it goes, in its order, once the release is free.
#[derive(Clone, Default)]
struct BusyReleases {
    releases: Arc<std::sync::Mutex<HashSet<Uuid>>>,
    freed: Arc<Notify>,
}

impl BusyReleases {
    fn is_busy(&self, release: &Uuid) -> bool {
        self.releases
            .lock()
            .map(|busy| busy.contains(release))
            .unwrap_or(false)
    }

    fn mark(&self, releases: &[Uuid]) {
        if let Ok(mut busy) = self.releases.lock() {
            busy.extend(releases.iter().copied());
        }
    }

    fn free(&self, releases: &[Uuid]) {
        if let Ok(mut busy) = self.releases.lock() {
            for release in releases {
                busy.remove(release);
            }
        }
        self.freed.notify_one();
    }
}

/// A new delivery joins the batch unless its release is busy or has a
/// delivery held already (which must go first).
fn admit(received: Received, held: &mut VecDeque<Received>, busy: &BusyReleases, batch: &mut Batch) {
    let waits = received.release.is_some_and(|release| {
        busy.is_busy(&release) || held.iter().any(|other| other.release == Some(release))
    });
    if waits {
        held.push_back(received);
    } else {
        batch.push(received);
    }
}

/// Moves the held deliveries whose release is free into the batch, oldest
/// first, up to `batch_size`.
fn take_free_held(held: &mut VecDeque<Received>, busy: &BusyReleases, batch: &mut Batch, batch_size: usize) {
    let room = batch_size.saturating_sub(batch.len());
    let taken = take_in_order(
        held,
        |received| received.release,
        |release| busy.is_busy(release),
        room,
    );
    for received in taken {
        batch.push(received);
    }
}

/// Takes up to `room` items out of `held`: the oldest whose release is
/// free, with the later ones of its release, in order; then the next oldest
/// of another free release, and so on. A release found busy stays skipped
/// for the rest of the scan: batches free their releases from other
/// threads meanwhile, and a later delivery of a release must not go ahead
/// of an earlier one that was skipped a moment before (a health check
/// before its deployment).
fn take_in_order<T>(
    held: &mut VecDeque<T>,
    release_of: impl Fn(&T) -> Option<Uuid>,
    mut is_busy: impl FnMut(&Uuid) -> bool,
    room: usize,
) -> Vec<T> {
    let mut taken = Vec::new();
    let mut skipped: Vec<Uuid> = Vec::new();
    let mut index = 0;
    while index < held.len() && taken.len() < room {
        let release = release_of(&held[index]);
        let free = release.is_none_or(|release| !skipped.contains(&release) && !is_busy(&release));
        if free {
            if let Some(item) = held.remove(index) {
                taken.push(item);
            }
            // The release's later deliveries go with it (none is skipped
            // before them: the release was free for the whole scan so far).
            if let Some(release) = release {
                let mut later = index;
                while later < held.len() && taken.len() < room {
                    if release_of(&held[later]) == Some(release) {
                        if let Some(item) = held.remove(later) {
                            taken.push(item);
                        }
                    } else {
                        later += 1;
                    }
                }
            }
        } else {
            if let Some(release) = release
                && !skipped.contains(&release)
            {
                skipped.push(release);
            }
            index += 1;
        }
    }
    taken
}

/// A batch's hold on the database: its transaction slot and its releases,
/// both given back together once the database is done with it.
struct InDatabase {
    /// Held for its drop: the slot goes back with the batch's releases.
    _transaction: OwnedSemaphorePermit,
    busy: BusyReleases,
    releases: Vec<Uuid>,
}

impl Drop for InDatabase {
    // Runs before the fields are dropped: the releases are free by the time
    // the transaction slot goes back and the next batch is put together.
    fn drop(&mut self) {
        self.busy.free(&self.releases);
    }
}

/// Processes a batch of deliveries to the end: outcomes (one transaction
/// when they all succeed), replies, dispositions. The transaction slot is
/// given back as soon as the database is done with the batch.
/// `channels`: the publisher, and the consuming channel the deliveries
/// came on (and are acked on).
async fn handle(
    deliveries: Vec<lapin::message::Delivery>,
    transaction: InDatabase,
    context: &ConsumerContext,
    channels: (&Publisher, &lapin::Channel),
    session_over: &CancellationToken,
    publisher_lost: &CancellationToken,
) {
    let attempts: Vec<ingest::Attempt<'_>> = deliveries
        .iter()
        .map(|delivery| {
            let attempt = attempt_of(&delivery.properties);
            ingest::Attempt {
                body: &delivery.data,
                attempt,
                retries_left: usize::try_from(attempt).unwrap_or(usize::MAX)
                    <= context.topology.retry_delays.len(),
            }
        })
        .collect();

    let mut wait = Duration::from_millis(100);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; attempts.len()];
    loop {
        let pending: Vec<usize> = (0..attempts.len()).filter(|&i| outcomes[i].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        let rest: Vec<ingest::Attempt<'_>> = pending.iter().map(|&i| attempts[i]).collect();
        match ingest::process_batch(&context.pool, &rest, &context.ingest).await {
            Ok(settled) => {
                for (&i, outcome) in pending.iter().zip(settled) {
                    outcomes[i] = Some(outcome);
                }
            }
            Err(interrupted) => {
                // Those settled before the failure are kept, not processed again.
                for (&i, outcome) in pending.iter().zip(interrupted.settled) {
                    outcomes[i] = outcome;
                }
                tracing::warn!(error = %interrupted.unavailable, retry_in_ms = wait.as_millis() as u64,
                    deliveries = outcomes.iter().filter(|outcome| outcome.is_none()).count(),
                    "holding the message until PostgreSQL answers");
                tokio::select! {
                    // Leave them unacked: they are redelivered once the channel closes.
                    () = session_over.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(context.database_retry_max);
            }
        }
    }
    drop(transaction);
    // Every delivery has its outcome now (the loop ends only then).
    let outcomes = outcomes.into_iter().flatten();
    // Replies, retries and dead letters each wait for a confirm: wait for
    // them together rather than one after the other.
    futures_util::future::join_all(deliveries.iter().zip(&attempts).zip(outcomes).map(
        |((delivery, attempt), outcome)| {
            finish(
                delivery,
                attempt.attempt,
                outcome,
                context,
                channels,
                publisher_lost,
            )
        },
    ))
    .await;
}

/// Logs, answers and disposes of one processed delivery.
async fn finish(
    delivery: &lapin::message::Delivery,
    attempt: u32,
    outcome: Outcome,
    context: &ConsumerContext,
    (publisher, consuming): (&Publisher, &lapin::Channel),
    publisher_lost: &CancellationToken,
) {
    tracing::info!(
        status = ?outcome.status,
        code = outcome.code,
        key = outcome.idempotency_key.as_deref().unwrap_or(""),
        attempt,
        error = outcome.error.as_deref().unwrap_or(""),
        "processed"
    );
    // The publishing connection may outlive the consuming one: a reply or a
    // copy sent now could not be followed by the ack, and the redelivery
    // would send it again.
    if !consuming.status().connected() {
        tracing::warn!(
            key = outcome.idempotency_key.as_deref().unwrap_or(""),
            attempt,
            "the consuming channel is closed; the message will be redelivered, nothing is sent for it now"
        );
        return;
    }

    // A message on its way to a retry is not finished: the producer hears
    // the final outcome only.
    if outcome.next != Next::Retry {
        reply(delivery, &outcome, publisher, publisher_lost).await;
    }

    let forwarded = match outcome.next {
        Next::Ack => Ok(()),
        Next::Retry => {
            let tier = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
            let queue = context.topology.retry_queue(tier);
            let delay = context
                .topology
                .retry_delays
                .get(tier)
                .copied()
                .unwrap_or_default();
            let properties = with_headers(&delivery.properties, publisher.headers_budget(), |headers| {
                headers.insert(
                    ATTEMPT_HEADER.into(),
                    AMQPValue::LongLongInt(i64::from(attempt) + 1),
                );
            })
            .with_expiration(jittered_ms(delay, context.jitter).to_string().into());
            publisher
                .publish("", &queue, &delivery.data, properties, true)
                .await
        }
        Next::DeadLetter => {
            let properties = with_headers(&delivery.properties, publisher.headers_budget(), |headers| {
                headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(i64::from(attempt)));
                headers.insert(
                    DEAD_CODE_HEADER.into(),
                    AMQPValue::LongLongInt(i64::from(outcome.code)),
                );
                headers.insert(
                    DEAD_STATUS_HEADER.into(),
                    long_string(&format!("{:?}", outcome.status).to_lowercase()),
                );
                headers.insert(
                    DEAD_ERROR_HEADER.into(),
                    long_string(&clipped(outcome.error.as_deref().unwrap_or(""), MAX_HEADER_BYTES)),
                );
                headers.insert(
                    DEAD_FAILED_AT_HEADER.into(),
                    long_string(&Utc::now().to_rfc3339()),
                );
            });
            let routing_key = delivery.routing_key.as_str();
            publisher
                .publish(
                    &context.topology.dead_letter_exchange,
                    routing_key,
                    &delivery.data,
                    properties,
                    true,
                )
                .await
        }
    };
    match forwarded {
        Ok(()) => {
            let acked =
                tokio::time::timeout(ACK_TIMEOUT, delivery.acker.ack(BasicAckOptions::default())).await;
            // lapin answers Ok(false), not an error, when the channel is
            // already closed.
            if !matches!(acked, Ok(Ok(true))) {
                // The channel is gone; the broker redelivers, and the ledger
                // turns the redelivery into a duplicate.
                tracing::warn!(
                    ?acked,
                    key = outcome.idempotency_key.as_deref().unwrap_or(""),
                    attempt,
                    "failed to ack; the message will be redelivered"
                );
            }
        }
        Err(error) => {
            let key = outcome.idempotency_key.as_deref().unwrap_or("");
            if publisher.channel().status().connected() {
                tracing::warn!(%error, key, attempt, "failed to forward the message; returning it to the queue shortly");
                tokio::time::sleep(FORWARD_FAILED_PAUSE).await;
            } else {
                tracing::warn!(%error, key, attempt,
                    "failed to forward the message: the publishing channel closed; reconnecting");
                publisher_lost.cancel();
            }
            let rejected = tokio::time::timeout(
                ACK_TIMEOUT,
                delivery.acker.reject(BasicRejectOptions { requeue: true }),
            )
            .await;
            if !matches!(rejected, Ok(Ok(true))) {
                // It goes back all the same, once the consuming channel closes.
                tracing::warn!(
                    ?rejected,
                    key,
                    attempt,
                    "failed to return the message; RabbitMQ returns it when the channel closes"
                );
            }
        }
    }
}

/// Sends the outcome to `reply_to` (works with direct reply-to). A producer
/// that stopped listening is not our failure: log and go on.
async fn reply(
    delivery: &lapin::message::Delivery,
    outcome: &Outcome,
    publisher: &Publisher,
    publisher_lost: &CancellationToken,
) {
    let Some(reply_to) = delivery.properties.reply_to() else {
        return;
    };
    let body = match serde_json::to_vec(outcome) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "failed to encode the reply");
            return;
        }
    };
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(1);
    if let Some(correlation_id) = delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    if let Err(error) = publisher
        .publish("", reply_to.as_str(), &body, properties, false)
        .await
    {
        let key = outcome.idempotency_key.as_deref().unwrap_or("");
        tracing::warn!(%error, reply_to = %reply_to, key, "failed to send the reply");
        if !publisher.channel().status().connected() {
            publisher_lost.cancel();
        }
    }
}

/// The attempt number carried by our header; 1 for a first delivery.
pub fn attempt_of(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(ATTEMPT_HEADER).cloned());
    let attempt = match value {
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => i64::from(n),
        Some(AMQPValue::ShortInt(n)) => i64::from(n),
        Some(AMQPValue::LongUInt(n)) => i64::from(n),
        Some(AMQPValue::LongString(text)) => text.to_string().parse().unwrap_or(1),
        _ => 1,
    };
    u32::try_from(attempt.max(1)).unwrap_or(u32::MAX)
}

/// The properties of a retried or dead-lettered copy: the producer's, with
/// `edit`ed headers, minus `expiration` (the copy must not expire by the
/// producer's TTL), `user_id` (RabbitMQ checks it against our login),
/// `CC` and `BCC` (RabbitMQ would route the copy by them too, past its
/// delay tier) and the broker's own bookkeeping of the original's trips
/// (see [`is_broker_bookkeeping`]).
fn with_headers(
    properties: &BasicProperties,
    budget: usize,
    edit: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(original) = properties.headers() {
        for (name, value) in original.inner() {
            if !is_broker_bookkeeping(name.as_str()) && !is_sender_selected_routing(name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    // A copy that does not fit in one frame would make RabbitMQ close the
    // connection on every try, and the message come back for ever.
    let kept = encoded_table_len(&headers);
    if !headers.inner().is_empty() && kept > budget {
        headers = FieldTable::default();
        headers.insert(
            HEADERS_LEFT_OUT_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(kept).unwrap_or(i64::MAX)),
        );
    }
    edit(&mut headers);
    let mut copy = BasicProperties::default().with_headers(headers);
    if let Some(value) = properties.content_type() {
        copy = copy.with_content_type(value.clone());
    }
    if let Some(value) = properties.content_encoding() {
        copy = copy.with_content_encoding(value.clone());
    }
    if let Some(value) = properties.delivery_mode() {
        copy = copy.with_delivery_mode(*value);
    }
    if let Some(value) = properties.priority() {
        copy = copy.with_priority(*value);
    }
    if let Some(value) = properties.correlation_id() {
        copy = copy.with_correlation_id(value.clone());
    }
    if let Some(value) = properties.reply_to() {
        copy = copy.with_reply_to(value.clone());
    }
    if let Some(value) = properties.message_id() {
        copy = copy.with_message_id(value.clone());
    }
    if let Some(value) = properties.timestamp() {
        copy = copy.with_timestamp(*value);
    }
    if let Some(value) = properties.kind() {
        copy = copy.with_type(value.clone());
    }
    if let Some(value) = properties.app_id() {
        copy = copy.with_app_id(value.clone());
    }
    copy
}

/// Headers in which RabbitMQ describes a message's own trips: its
/// dead-letterings (`x-death`, `x-first-death-*`, `x-last-death-*`) and its
/// deliveries by a quorum queue (`x-delivery-count`, `x-acquired-count`).
/// A copy is a new message, so the original's would mislead whoever reads
/// it: RabbitMQ 4 neither updates an `x-death` a publisher sent nor always
/// overwrites a copied delivery count. `x-opsgate-attempt` counts the
/// attempts instead.
fn is_broker_bookkeeping(header: &str) -> bool {
    header == "x-death"
        || header.starts_with("x-first-death-")
        || header.starts_with("x-last-death-")
        || header == "x-delivery-count"
        || header == "x-acquired-count"
}

/// The size of `table` in AMQP's wire encoding (0-9-1 with RabbitMQ's field
/// types), without encoding it.
fn encoded_table_len(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + 1 + encoded_value_len(value))
        .sum::<usize>()
}

fn encoded_value_len(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(text) => 1 + text.as_str().len(),
        AMQPValue::LongString(text) => 4 + text.as_bytes().len(),
        AMQPValue::ByteArray(bytes) => 4 + bytes.as_slice().len(),
        AMQPValue::FieldArray(items) => {
            4 + items
                .as_slice()
                .iter()
                .map(|item| 1 + encoded_value_len(item))
                .sum::<usize>()
        }
        AMQPValue::FieldTable(table) => encoded_table_len(table),
        AMQPValue::Void => 0,
    }
}

/// RabbitMQ's sender-selected distribution: a message is also routed by the
/// routing keys in these headers. RabbitMQ removes `BCC` on delivery, and
/// `CC` too up to 3.x; where it keeps `CC`, a producer's would travel into
/// every copy.
fn is_sender_selected_routing(header: &str) -> bool {
    header == "CC" || header == "BCC"
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.to_owned()))
}

/// `delay` shortened by up to `jitter` of itself, at random, in milliseconds.
fn jittered_ms(delay: Duration, jitter: f64) -> u64 {
    let millis = delay.as_millis() as f64;
    let factor = 1.0 - jitter.clamp(0.0, 1.0) * rand::random::<f64>();
    (millis * factor).round().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_header_defaults_to_one() {
        assert_eq!(attempt_of(&BasicProperties::default()), 1);
        let mut headers = FieldTable::default();
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(3));
        assert_eq!(attempt_of(&BasicProperties::default().with_headers(headers)), 3);
    }

    #[test]
    fn held_deliveries_of_a_release_keep_their_order_when_it_comes_free_mid_scan() {
        let (r, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut held: VecDeque<(Option<Uuid>, &str)> = VecDeque::from([
            (Some(r), "deployment"),
            (Some(other), "check"),
            (Some(r), "health check"),
            (None, "unreadable"),
        ]);
        // r is busy when the scan first asks, and freed (by a batch on
        // another thread) before it asks again.
        let mut asked = 0;
        let taken = take_in_order(
            &mut held,
            |item| item.0,
            |release| {
                asked += 1;
                *release == r && asked == 1
            },
            10,
        );
        let names: Vec<&str> = taken.iter().map(|item| item.1).collect();
        assert_eq!(names, ["check", "unreadable"]);
        let left: Vec<&str> = held.iter().map(|item| item.1).collect();
        assert_eq!(left, ["deployment", "health check"], "still in order");

        // Once free, both go, in order; and no more than there is room for.
        let taken = take_in_order(&mut held, |item| item.0, |_| false, 1);
        assert_eq!(
            taken.iter().map(|item| item.1).collect::<Vec<_>>(),
            ["deployment"]
        );
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_release_is_taken_with_its_later_deliveries_in_order() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut held: VecDeque<(Option<Uuid>, &str)> = VecDeque::from([
            (Some(a), "a1"),
            (Some(b), "b1"),
            (Some(a), "a2"),
            (None, "unreadable"),
            (Some(b), "b2"),
            (Some(a), "a3"),
        ]);
        let taken = take_in_order(&mut held, |item| item.0, |_| false, 4);
        assert_eq!(
            taken.iter().map(|item| item.1).collect::<Vec<_>>(),
            ["a1", "a2", "a3", "b1"]
        );
        let left: Vec<&str> = held.iter().map(|item| item.1).collect();
        assert_eq!(left, ["unreadable", "b2"], "the rest in arrival order");

        // A busy release is passed over; the free one goes whole.
        let mut held: VecDeque<(Option<Uuid>, &str)> =
            VecDeque::from([(Some(a), "a1"), (Some(b), "b1"), (Some(a), "a2"), (Some(b), "b2")]);
        let taken = take_in_order(&mut held, |item| item.0, |release| *release == a, 10);
        assert_eq!(taken.iter().map(|item| item.1).collect::<Vec<_>>(), ["b1", "b2"]);
        assert_eq!(held.iter().map(|item| item.1).collect::<Vec<_>>(), ["a1", "a2"]);
    }

    #[test]
    fn a_body_over_the_limit_names_no_release() {
        let release = Uuid::new_v4();
        let body = serde_json::to_vec(&serde_json::json!({"release_id": release})).unwrap();
        assert_eq!(release_named_in(&body, body.len()), Some(release));
        assert_eq!(release_named_in(&body, body.len() - 1), None);
    }

    #[test]
    fn jitter_only_shortens_within_bounds() {
        for _ in 0..100 {
            let ms = jittered_ms(Duration::from_secs(10), 0.2);
            assert!((8_000..=10_000).contains(&ms), "{ms}");
        }
        assert_eq!(jittered_ms(Duration::from_secs(1), 0.0), 1_000);
    }

    /// RabbitMQ 3.10 drops `CC` on delivery, later versions may keep it: a
    /// copy must carry neither, or it is routed past its delay tier too.
    #[test]
    fn copies_carry_no_sender_selected_routing() {
        let mut headers = FieldTable::default();
        let elsewhere = AMQPValue::FieldArray(vec![long_string("elsewhere")].into());
        headers.insert("CC".into(), elsewhere.clone());
        headers.insert("BCC".into(), elsewhere);
        headers.insert("x-trace-id".into(), long_string("trace-7"));
        let copy = with_headers(
            &BasicProperties::default().with_headers(headers),
            usize::MAX,
            |_| {},
        );
        let names: Vec<String> = copy
            .headers()
            .as_ref()
            .map(|headers| headers.inner().keys().map(|name| name.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["x-trace-id"]);
    }

    /// The producer's headers stay in a copy while they fit the budget, as
    /// encoded on the wire; past it they are left out, and their size told.
    #[test]
    fn headers_past_the_budget_are_left_out() {
        let mut headers = FieldTable::default();
        headers.insert("x-big".into(), long_string(&"a".repeat(1_000)));
        let properties = BasicProperties::default().with_headers(headers);
        // 4 (table) + 1 + 5 ("x-big") + 1 (type) + 4 + 1000 (long string)
        let encoded = 1_015;
        let names = |copy: &BasicProperties| -> Vec<String> {
            copy.headers()
                .as_ref()
                .map(|headers| headers.inner().keys().map(|name| name.to_string()).collect())
                .unwrap_or_default()
        };
        assert_eq!(names(&with_headers(&properties, encoded, |_| {})), ["x-big"]);
        let copy = with_headers(&properties, encoded - 1, |_| {});
        assert_eq!(names(&copy), [HEADERS_LEFT_OUT_HEADER]);
        assert_eq!(
            copy.headers()
                .as_ref()
                .and_then(|h| h.inner().get(HEADERS_LEFT_OUT_HEADER).cloned()),
            Some(AMQPValue::LongLongInt(1_015))
        );
    }
}
