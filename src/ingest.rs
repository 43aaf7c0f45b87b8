//! From a message body to an outcome, against PostgreSQL only: parse the
//! envelope, claim its idempotency key in the ledger, apply the handler and
//! store the result in one transaction. What happens to the message next
//! (ack, retry, dead-letter) is decided here and carried out by the consumer.
//!
//! Several deliveries that are ready together are applied in one transaction
//! (`process_batch`): one commit, one lock statement and one pooled
//! connection for all of them. When any of them does not simply succeed, the
//! whole transaction is rolled back and each delivery goes through `process`
//! alone, so every failure is classified, recorded and answered exactly as
//! for a single message.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::envelope::{self, Envelope, MAX_IDEMPOTENCY_KEY_BYTES, Partial, Rejection};
use crate::handlers::{self, HandlerError};
use crate::ledger::{self, ClaimRequest, FailedAttempt, FailureStatus, NextAction, PendingResult};
use crate::text::{MAX_ERROR_BYTES, clipped, quoted};

/// The processing status of the PRD, with its HTTP-like code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Accepted,
    Duplicate,
    Rejected,
    Error,
}

/// What the consumer does with the message after processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Ack,
    /// Publish to the next retry tier, then ack.
    Retry,
    /// Publish to the dead-letter exchange, then ack.
    DeadLetter,
}

/// The answer to one delivery; this is also the reply body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub idempotency_key: Option<String>,
    pub status: Status,
    pub code: u16,
    pub error: Option<String>,
    pub result: Option<Value>,
    #[serde(skip)]
    pub next: Next,
}

/// PostgreSQL cannot be reached: nothing was written; hold the message and
/// try again once the database answers.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL is unavailable: {}", crate::database::describe(.0))]
pub struct DatabaseUnavailable(#[source] pub sqlx::Error);

/// How a failed database call should be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The server is not reachable (or is shutting down).
    Unavailable,
    /// Worth another attempt later: deadlock, serialization failure, ...
    Transient,
    /// The data was refused for good; the HTTP-like code to report.
    Permanent(u16),
}

pub fn classify(error: &sqlx::Error) -> Fault {
    // Connection exceptions, admin/crash shutdown, cannot connect now.
    if crate::database::is_server_gone(error) {
        return Fault::Unavailable;
    }
    let Some(code) = error.as_database_error().and_then(|e| e.code()) else {
        return Fault::Transient;
    };
    match code.as_ref() {
        // A server that answers but takes no writes (read-only after a
        // failover, a full disk): every message would fail alike, so none
        // should spend its retries.
        "25006" | "53100" => Fault::Unavailable,
        // The schema or the grants do not match this binary (a privilege
        // revoked, a migration not yet applied): alike for every message of
        // its kind until an operator fixes it, so none is dead-lettered.
        "42501" | "42P01" | "42703" | "42883" | "42704" | "3F000" => Fault::Unavailable,
        // Serialization failure, deadlock, lock timeout, canceled, out of resources.
        "40001" | "40P01" | "55P03" | "57014" => Fault::Transient,
        c if c.starts_with("53") => Fault::Transient,
        // Unique and foreign-key violations: the event conflicts with the state.
        "23505" | "23503" => Fault::Permanent(409),
        // Other integrity rules, bad values, rules raised by our triggers, and
        // values past one of PostgreSQL's limits (class 54: an index entry
        // too large, too many arguments), which fail alike on every attempt.
        c if c.starts_with("23") || c.starts_with("22") || c.starts_with("54") || c == "P0001" => {
            Fault::Permanent(422)
        }
        _ => Fault::Transient,
    }
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub max_body_bytes: usize,
    /// Written to `created_by` of ledger rows.
    pub writer: String,
}

/// One delivery attempt. `attempt` counts from 1; `retries_left` says whether
/// a transient failure may still be retried.
pub async fn process(
    pool: &PgPool,
    body: &[u8],
    attempt: u32,
    retries_left: bool,
    options: &IngestOptions,
) -> Result<Outcome, DatabaseUnavailable> {
    let parsed = envelope::parse(body, options.max_body_bytes);
    settle(pool, body, parsed, attempt, retries_left, options).await
}

/// `process` once the body is parsed (or refused).
async fn settle(
    pool: &PgPool,
    body: &[u8],
    parsed: Result<Envelope, Rejection>,
    attempt: u32,
    retries_left: bool,
    options: &IngestOptions,
) -> Result<Outcome, DatabaseUnavailable> {
    let envelope = match parsed {
        Ok(envelope) => envelope,
        Err(rejection) => {
            let failure = FailedAttempt {
                partial: &rejection.partial,
                payload_hash: &envelope::sha256_hex(body),
                status: FailureStatus::Rejected,
                code: rejection.code,
                error: &rejection.reason,
                attempt,
            };
            record(pool, &failure, &options.writer).await?;
            return Ok(failed(&failure, Next::DeadLetter));
        }
    };
    let payload_hash = envelope.payload_hash();
    let partial = Partial::from(&envelope);

    let (status, code, error, next) =
        match apply(pool, &envelope, &payload_hash, attempt, &options.writer).await {
            Ok(Applied::Accepted(result)) => return Ok(success(&envelope, Status::Accepted, result)),
            Ok(Applied::Duplicate(result)) => return Ok(success(&envelope, Status::Duplicate, result)),
            Ok(Applied::KeyReused { accepted_hash }) => (
                FailureStatus::Rejected,
                422,
                format!(
                    "idempotency key {} was already accepted for a different payload (hash {accepted_hash})",
                    quoted(&envelope.idempotency_key)
                ),
                Next::DeadLetter,
            ),
            Err(HandlerError::Rejected { code, message }) => {
                (FailureStatus::Rejected, code, message, Next::DeadLetter)
            }
            Err(
                error @ (HandlerError::UnknownRelease(_)
                | HandlerError::UnknownReference { .. }
                | HandlerError::NotYet(_)),
            ) => {
                if retries_left {
                    (
                        FailureStatus::Error,
                        409,
                        format!("{error}; will retry"),
                        Next::Retry,
                    )
                } else {
                    (
                        FailureStatus::Rejected,
                        409,
                        format!("{error}; retries exhausted"),
                        Next::DeadLetter,
                    )
                }
            }
            Err(HandlerError::Database { action, source }) => {
                // What the producer and the dead-letter headers get: the server's
                // message and its code, without sqlx's prefix and the server's own
                // source line, which reads like a line of the payload.
                let reason = || format!("{action}: {}", crate::database::describe(&source));
                match classify(&source) {
                    Fault::Unavailable => return Err(DatabaseUnavailable(source)),
                    Fault::Permanent(code) => (FailureStatus::Rejected, code, reason(), Next::DeadLetter),
                    Fault::Transient if retries_left => (FailureStatus::Error, 503, reason(), Next::Retry),
                    Fault::Transient => (
                        FailureStatus::Error,
                        503,
                        format!("{}; retries exhausted", reason()),
                        Next::DeadLetter,
                    ),
                }
            }
        };
    let failure = FailedAttempt {
        partial: &partial,
        payload_hash: &payload_hash,
        status,
        code,
        error: &error,
        attempt,
    };
    record(pool, &failure, &options.writer).await?;
    Ok(failed(&failure, next))
}

/// PostgreSQL became unavailable part way through a batch. Some deliveries
/// may be done already (committed together, or one by one before the
/// failure, or their failure recorded): `settled` has one entry per
/// delivery, in order, with the outcome of each one that is done, to be
/// kept; those without are to be processed again once the database answers.
#[derive(Debug, thiserror::Error)]
#[error("{unavailable}")]
pub struct Interrupted {
    pub settled: Vec<Option<Outcome>>,
    pub unavailable: DatabaseUnavailable,
}

/// One delivery to process: its body, its attempt number (from 1) and
/// whether a transient failure may still be retried.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub body: &'a [u8],
    pub attempt: u32,
    pub retries_left: bool,
}

/// Processes `attempts` and returns their outcomes in the same order. The
/// envelopes that parse are applied together in one transaction; if any of
/// them fails there, nothing of that transaction stays and each delivery is
/// processed alone instead.
pub async fn process_batch(
    pool: &PgPool,
    attempts: &[Attempt<'_>],
    options: &IngestOptions,
) -> Result<Vec<Outcome>, Interrupted> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; attempts.len()];
    let parsed: Vec<Result<Envelope, Rejection>> = attempts
        .iter()
        .map(|attempt| envelope::parse(attempt.body, options.max_body_bytes))
        .collect();
    let valid: Vec<(usize, &Envelope)> = parsed
        .iter()
        .enumerate()
        .filter_map(|(index, parsed)| parsed.as_ref().ok().map(|envelope| (index, envelope)))
        .collect();
    if valid.len() > 1 {
        match apply_together(pool, &valid, attempts, &options.writer).await {
            Ok(applied) => {
                for ((index, envelope), applied) in valid.iter().zip(applied) {
                    outcomes[*index] = Some(match applied {
                        Settled::Accepted(result) => success(envelope, Status::Accepted, result),
                        Settled::Duplicate(result) => success(envelope, Status::Duplicate, result),
                    });
                }
            }
            Err(Together::Unavailable(error)) => {
                return Err(Interrupted {
                    settled: Vec::new(),
                    unavailable: DatabaseUnavailable(error),
                });
            }
            Err(Together::Singly(reason)) => {
                tracing::debug!(%reason, deliveries = valid.len(),
                    "a delivery of the batch did not simply succeed; processing them one by one");
            }
        }
    }
    for (index, (attempt, parsed)) in attempts.iter().zip(parsed).enumerate() {
        if outcomes[index].is_some() {
            continue;
        }
        // Parsed above, not again.
        let settled = settle(
            pool,
            attempt.body,
            parsed,
            attempt.attempt,
            attempt.retries_left,
            options,
        )
        .await;
        match settled {
            Ok(outcome) => outcomes[index] = Some(outcome),
            // Those done are committed: processing them again would answer
            // "duplicate", or record a failure twice.
            Err(unavailable) => {
                return Err(Interrupted {
                    settled: outcomes,
                    unavailable,
                });
            }
        }
    }
    // Every delivery has its outcome now.
    Ok(outcomes.into_iter().flatten().collect())
}

/// What a delivery of a successful shared transaction became.
enum Settled {
    Accepted(Value),
    Duplicate(Value),
}

/// Why the shared transaction was given up.
enum Together {
    Unavailable(sqlx::Error),
    /// Any other failure: process each delivery alone; the reason is logged.
    Singly(String),
}

impl From<sqlx::Error> for Together {
    fn from(error: sqlx::Error) -> Self {
        match classify(&error) {
            Fault::Unavailable => Together::Unavailable(error),
            _ => Together::Singly(error.to_string()),
        }
    }
}

/// Every envelope of `parsed` applied in one transaction, or none of them.
/// The ledger is written set-wise: one statement claims every key, one
/// stores the results and one writes the duplicates, so a batch costs a few
/// round trips more than its handlers' own.
async fn apply_together(
    pool: &PgPool,
    parsed: &[(usize, &Envelope)],
    attempts: &[Attempt<'_>],
    writer: &str,
) -> Result<Vec<Settled>, Together> {
    let hashes: Vec<String> = parsed
        .iter()
        .map(|(_, envelope)| envelope.payload_hash())
        .collect();
    let requests: Vec<ClaimRequest<'_>> = parsed
        .iter()
        .zip(&hashes)
        .map(|((index, envelope), payload_hash)| ClaimRequest {
            envelope,
            payload_hash,
            attempt: attempts[*index].attempt,
        })
        .collect();
    let releases: Vec<Uuid> = parsed.iter().map(|(_, envelope)| envelope.release_id).collect();
    let mut tx = begin_locked(pool, &releases).await?;
    let claims = ledger::claim_batch(&mut tx, &requests, writer).await?;

    let mut pending = Vec::new();
    for (request, claim) in requests.iter().zip(&claims) {
        let Some(ingest_id) = *claim else { continue };
        let handled = match handlers::dispatch(&mut tx, request.envelope).await {
            Ok(handled) => handled,
            Err(HandlerError::Database { source, .. }) => return Err(source.into()),
            Err(error) => return Err(Together::Singly(error.to_string())),
        };
        pending.push(PendingResult {
            ingest_id,
            result: handled.result,
            reports: handled.reports,
        });
    }
    // Each release of the batch derived once, after all of its events; the
    // results then report the state the transaction commits.
    handlers::derive_pending(&mut tx, None).await?;
    let results = ledger::save_results(&mut tx, &pending).await?;

    // Keys accepted before this batch, and keys claimed earlier in it.
    let claimed_here: HashMap<&str, (&str, Uuid)> = requests
        .iter()
        .zip(&claims)
        .filter_map(|(request, claim)| {
            claim.map(|id| {
                (
                    request.envelope.idempotency_key.as_str(),
                    (request.payload_hash, id),
                )
            })
        })
        .collect();
    let earlier_keys: Vec<&str> = requests
        .iter()
        .zip(&claims)
        .filter(|(request, claim)| {
            claim.is_none() && !claimed_here.contains_key(request.envelope.idempotency_key.as_str())
        })
        .map(|(request, _)| request.envelope.idempotency_key.as_str())
        .collect();
    let accepted_earlier = if earlier_keys.is_empty() {
        HashMap::new()
    } else {
        ledger::accepted_results(&mut tx, &earlier_keys).await?
    };

    let mut settled = Vec::with_capacity(requests.len());
    let mut duplicates = Vec::new();
    for (request, claim) in requests.iter().zip(&claims) {
        let key = request.envelope.idempotency_key.as_str();
        if let Some(ingest_id) = claim {
            let result = results.get(ingest_id).ok_or_else(|| {
                Together::Singly(format!("the result of idempotency key {key:?} was not stored"))
            })?;
            settled.push(Settled::Accepted(result.clone()));
            continue;
        }
        let (accepted_hash, result) = match claimed_here.get(key) {
            Some((hash, ingest_id)) => (*hash, results.get(ingest_id)),
            None => match accepted_earlier.get(key) {
                Some((hash, result)) => (hash.as_str(), Some(result)),
                None => ("", None),
            },
        };
        match result {
            Some(result) if accepted_hash == request.payload_hash => {
                duplicates.push((*request, result));
                settled.push(Settled::Duplicate(result.clone()));
            }
            // Reused with another payload (or its accepted row vanished):
            // the single-message path classifies it.
            _ => return Err(Together::Singly(format!("idempotency key {key:?} reused"))),
        }
    }
    ledger::record_duplicates(&mut tx, &duplicates, writer).await?;
    tx.commit().await?;
    Ok(settled)
}

enum Applied {
    Accepted(Value),
    Duplicate(Value),
    KeyReused { accepted_hash: String },
}

/// The ledger claim, the handler and the result, in one transaction.
async fn apply(
    pool: &PgPool,
    envelope: &Envelope,
    payload_hash: &str,
    attempt: u32,
    writer: &str,
) -> Result<Applied, HandlerError> {
    use crate::handlers::DbContext;
    let mut tx = begin_locked(pool, &[envelope.release_id])
        .await
        .db("begin the ingest transaction and lock the release")?;
    let applied = match ledger::try_processing(&mut tx, envelope, payload_hash, attempt, writer)
        .await
        .db("claim the idempotency key")?
    {
        NextAction::StartProcessing { ingest_id } => {
            let handled = handlers::dispatch(&mut tx, envelope).await?;
            handlers::derive_pending(&mut tx, None)
                .await
                .db("derive the release")?;
            let result = ledger::save_result(&mut tx, ingest_id, &handled.result, handled.reports)
                .await
                .db("store the result")?;
            Applied::Accepted(result)
        }
        NextAction::ReturnSavedResult { result } => Applied::Duplicate(result),
        NextAction::KeyReused { accepted_hash } => return Ok(Applied::KeyReused { accepted_hash }),
    };
    tx.commit().await.db("commit the ingest transaction")?;
    Ok(applied)
}

/// Two messages of one release never interleave their writes, across any
/// number of workers: a transaction-scoped advisory lock on each release id.
/// All of a transaction's locks are taken at its start and in one order, so
/// two transactions never wait on each other's release locks in a cycle.
/// `ops.lock_releases` takes them: the sweeps take the same locks, in the
/// same order, through the same function (migration 0013).
/// The locks travel with BEGIN in one simple-query message: one round trip.
/// They come first, in the implicit transaction of that message, which BEGIN
/// then takes into the transaction block (PostgreSQL's rule for a BEGIN
/// after other statements of one query string). Were the lock statement
/// after BEGIN, its failure (a lock timeout, a cancel) would leave the
/// pooled connection in an aborted transaction that sqlx does not know it
/// has opened; before BEGIN, a failure ends the message with nothing open.
/// The same statement sets `opsgate.derive_at_end` for the transaction: its
/// facts are derived once per release, by `handlers::derive_pending` or at
/// commit (migrations 0016 and 0017), not once per fact.
async fn begin_locked(
    pool: &PgPool,
    releases: &[Uuid],
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(AssertSqlSafe(begin_and_lock_sql(releases))).await
}

/// The release ids are formatted by `Uuid` (hex digits and dashes only), so
/// the literal cannot carry anything but ids.
fn begin_and_lock_sql(releases: &[Uuid]) -> String {
    let ids: Vec<String> = releases.iter().map(Uuid::to_string).collect();
    format!(
        "SELECT ops.lock_releases('{{{}}}'::uuid[]), set_config('opsgate.derive_at_end', 'on', true); BEGIN",
        ids.join(",")
    )
}

async fn record(pool: &PgPool, failure: &FailedAttempt<'_>, writer: &str) -> Result<(), DatabaseUnavailable> {
    let mut conn = pool.acquire().await.map_err(DatabaseUnavailable)?;
    match ledger::record_failure(&mut conn, failure, writer).await {
        Ok(_) => Ok(()),
        Err(error) if classify(&error) == Fault::Unavailable => Err(DatabaseUnavailable(error)),
        Err(error) => {
            // The outcome still reaches the producer and the dead-letter queue;
            // only its ledger row is missing, so say so loudly.
            tracing::error!(error = %error, code = failure.code, attempt = failure.attempt,
                key = failure.partial.idempotency_key.as_deref().unwrap_or(""),
                "failed to record the failed attempt in the ledger");
            Ok(())
        }
    }
}

fn success(envelope: &Envelope, status: Status, result: Value) -> Outcome {
    Outcome {
        idempotency_key: Some(envelope.idempotency_key.clone()),
        status,
        code: 200,
        error: None,
        result: Some(result),
        next: Next::Ack,
    }
}

fn failed(failure: &FailedAttempt<'_>, next: Next) -> Outcome {
    Outcome {
        // A key refused for its length is not sent back or logged whole.
        idempotency_key: failure
            .partial
            .idempotency_key
            .as_deref()
            .map(|key| clipped(key, MAX_IDEMPOTENCY_KEY_BYTES).into_owned()),
        status: match failure.status {
            FailureStatus::Rejected => Status::Rejected,
            FailureStatus::Error => Status::Error,
        },
        code: failure.code,
        error: Some(clipped(failure.error, MAX_ERROR_BYTES).into_owned()),
        result: None,
        next,
    }
}
