//! The ingest ledger, `ops.event_ingest_log`: one row per delivery attempt,
//! and at most one `accepted` row per idempotency key (a partial unique index
//! in the database). The accepted row is claimed before any side effect, in
//! the same transaction as the handler's writes.

use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres, Row};
use uuid::Uuid;

use crate::envelope::{Envelope, MAX_IDEMPOTENCY_KEY_BYTES, Partial};
use crate::handlers::Reports;
use crate::text::{MAX_ERROR_BYTES, clipped};

/// What to do with an envelope whose key may have been seen before.
#[derive(Debug, Clone, PartialEq)]
pub enum NextAction {
    /// The key is ours: apply the handler, then `save_result`.
    StartProcessing { ingest_id: Uuid },
    /// The key was accepted before with the same payload: answer with the
    /// saved result (a `duplicate` row is already written).
    ReturnSavedResult { result: Value },
    /// The key was accepted before with a different payload.
    KeyReused { accepted_hash: String },
}

/// Claims `envelope`'s key by inserting its `accepted` row. When another
/// transaction holds the key, this waits for it to commit or roll back.
/// (`claim_batch` and friends for a batch of one.)
pub async fn try_processing(
    conn: &mut PgConnection,
    envelope: &Envelope,
    payload_hash: &str,
    attempt: u32,
    writer: &str,
) -> Result<NextAction, sqlx::Error> {
    let request = ClaimRequest {
        envelope,
        payload_hash,
        attempt,
    };
    if let Some(Some(ingest_id)) = claim_batch(&mut *conn, &[request], writer).await?.pop() {
        return Ok(NextAction::StartProcessing { ingest_id });
    }
    let key = envelope.idempotency_key.as_str();
    let (accepted_hash, result) = accepted_results(&mut *conn, &[key])
        .await?
        .remove(key)
        // Not claimed, so an accepted row exists: ON CONFLICT found it.
        .ok_or(sqlx::Error::RowNotFound)?;
    if accepted_hash != payload_hash {
        return Ok(NextAction::KeyReused { accepted_hash });
    }
    record_duplicates(conn, &[(request, &result)], writer).await?;
    Ok(NextAction::ReturnSavedResult { result })
}

/// Stores the handler's result on the accepted row, in the claiming
/// transaction, and returns it as stored, with the derived state `reports`
/// asks for read at this point (see `save_results`).
pub async fn save_result(
    conn: &mut PgConnection,
    ingest_id: Uuid,
    result: &Value,
    reports: Reports,
) -> Result<Value, sqlx::Error> {
    let pending = PendingResult {
        ingest_id,
        result: result.clone(),
        reports,
    };
    save_results(conn, &[pending])
        .await?
        .remove(&ingest_id)
        .ok_or(sqlx::Error::RowNotFound)
}

/// One envelope of a batch to claim in `claim_batch`.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    pub envelope: &'a Envelope,
    pub payload_hash: &'a str,
    pub attempt: u32,
}

/// Claims the keys of a whole batch in one statement and returns, in batch
/// order, the `accepted` row each envelope now owns. `None` means the key
/// was accepted before (by another transaction, or by an earlier envelope of
/// this batch): the caller answers it with `accepted_results` /
/// `record_duplicates`. Like `try_processing`, this waits for another
/// transaction that holds one of the keys. Keys are claimed in key order, so
/// two batches that share keys wait for each other's keys in the same order
/// and never deadlock; the same key twice goes to its first envelope.
pub async fn claim_batch(
    conn: &mut PgConnection,
    requests: &[ClaimRequest<'_>],
    writer: &str,
) -> Result<Vec<Option<Uuid>>, sqlx::Error> {
    let columns = LedgerColumns::of(requests);
    let claimed = columns
        .bind(sqlx::query(
            "INSERT INTO ops.event_ingest_log
             (source_system, event_type, idempotency_key, schema_version, release_id, payload_hash,
              processing_status, response_code, attempt, created_by)
         SELECT source_system, event_type, idempotency_key, schema_version, release_id, payload_hash,
                'accepted', 200, attempt, $8
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::text[], $7::int[])
              WITH ORDINALITY AS t(source_system, event_type, idempotency_key, schema_version, release_id,
                                   payload_hash, attempt, position)
         ORDER BY idempotency_key, position
         ON CONFLICT (idempotency_key) WHERE processing_status = 'accepted' DO NOTHING
         RETURNING idempotency_key, payload_hash, ingest_id",
        ))
        .bind(writer)
        .fetch_all(&mut *conn)
        .await?;
    let mut owners: std::collections::HashMap<String, (String, Uuid)> =
        std::collections::HashMap::with_capacity(claimed.len());
    for row in claimed {
        owners.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
    }
    // The row of a key goes to its first envelope with the claimed hash.
    Ok(requests
        .iter()
        .map(|request| {
            let key = request.envelope.idempotency_key.as_str();
            match owners.get(key) {
                Some((hash, _)) if hash == request.payload_hash => owners.remove(key).map(|(_, id)| id),
                _ => None,
            }
        })
        .collect())
}

/// The column arrays of a batch insert into the ledger.
struct LedgerColumns<'a> {
    source_systems: Vec<&'a str>,
    event_types: Vec<&'a str>,
    keys: Vec<&'a str>,
    schema_versions: Vec<&'a str>,
    release_ids: Vec<Uuid>,
    payload_hashes: Vec<&'a str>,
    attempts: Vec<i32>,
}

impl<'a> LedgerColumns<'a> {
    fn of(requests: &[ClaimRequest<'a>]) -> Self {
        LedgerColumns {
            source_systems: requests
                .iter()
                .map(|r| r.envelope.source_system.as_str())
                .collect(),
            event_types: requests.iter().map(|r| r.envelope.event_type.as_str()).collect(),
            keys: requests
                .iter()
                .map(|r| r.envelope.idempotency_key.as_str())
                .collect(),
            schema_versions: requests
                .iter()
                .map(|r| r.envelope.schema_version.as_str())
                .collect(),
            release_ids: requests.iter().map(|r| r.envelope.release_id).collect(),
            payload_hashes: requests.iter().map(|r| r.payload_hash).collect(),
            attempts: requests.iter().map(|r| attempt_column(r.attempt)).collect(),
        }
    }

    /// Binds the columns as $1..$7, in the order of the struct.
    fn bind<'q>(&'q self, query: Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.source_systems)
            .bind(&self.event_types)
            .bind(&self.keys)
            .bind(&self.schema_versions)
            .bind(&self.release_ids)
            .bind(&self.payload_hashes)
            .bind(&self.attempts)
    }
}

/// The payload hash and stored result of the `accepted` row of each key that
/// has one (keys without one are left out).
pub async fn accepted_results(
    conn: &mut PgConnection,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, (String, Value)>, sqlx::Error> {
    let rows: Vec<(String, String, Option<Value>)> = sqlx::query_as(
        "SELECT idempotency_key, payload_hash, result FROM ops.event_ingest_log
         WHERE idempotency_key = ANY ($1) AND processing_status = 'accepted'",
    )
    .bind(keys)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, hash, result)| (key, (hash, result.unwrap_or(Value::Null))))
        .collect())
}

/// A result to store on a claimed row; see `save_result`.
#[derive(Debug, Clone)]
pub struct PendingResult {
    pub ingest_id: Uuid,
    pub result: Value,
    pub reports: Reports,
}

/// `save_result` for many rows in one statement; returns each stored result
/// by ingest id. The derived state the results report (`gate_status`,
/// `g4_status`, `release_status`) is read as it stands now: the caller
/// derives what its transaction left pending first
/// (`handlers::derive_pending`), so a result says what the transaction
/// commits.
pub async fn save_results(
    conn: &mut PgConnection,
    pending: &[PendingResult],
) -> Result<std::collections::HashMap<Uuid, Value>, sqlx::Error> {
    if pending.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let ids: Vec<Uuid> = pending.iter().map(|p| p.ingest_id).collect();
    let results: Vec<&Value> = pending.iter().map(|p| &p.result).collect();
    let gates: Vec<Option<Uuid>> = pending.iter().map(|p| p.reports.gate_status_of).collect();
    let deployments: Vec<Option<Uuid>> = pending.iter().map(|p| p.reports.g4_status_of).collect();
    let releases: Vec<Option<Uuid>> = pending.iter().map(|p| p.reports.release_status_of).collect();
    let rows: Vec<(Uuid, Value)> = sqlx::query_as(
        "UPDATE ops.event_ingest_log l
         SET result = t.result
             || CASE WHEN t.gate_id IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('gate_status',
                    (SELECT status::text FROM ops.release_gates WHERE gate_id = t.gate_id)) END
             || CASE WHEN t.deployment_id IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('g4_status',
                    (SELECT g4_status::text FROM ops.deployments WHERE deployment_id = t.deployment_id)) END
             || CASE WHEN t.release_id IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('release_status',
                    (SELECT status::text FROM ops.releases WHERE release_id = t.release_id)) END
         FROM unnest($1::uuid[], $2::jsonb[], $3::uuid[], $4::uuid[], $5::uuid[])
              AS t(ingest_id, result, gate_id, deployment_id, release_id)
         WHERE l.ingest_id = t.ingest_id
         RETURNING l.ingest_id, l.result",
    )
    .bind(&ids)
    .bind(&results)
    .bind(&gates)
    .bind(&deployments)
    .bind(&releases)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Writes the `duplicate` rows of a batch, each repeating the accepted
/// result it is answered with.
pub async fn record_duplicates(
    conn: &mut PgConnection,
    duplicates: &[(ClaimRequest<'_>, &Value)],
    writer: &str,
) -> Result<(), sqlx::Error> {
    if duplicates.is_empty() {
        return Ok(());
    }
    let requests: Vec<ClaimRequest<'_>> = duplicates.iter().map(|(request, _)| *request).collect();
    let columns = LedgerColumns::of(&requests);
    let results: Vec<&Value> = duplicates.iter().map(|(_, result)| *result).collect();
    columns
        .bind(sqlx::query(
            "INSERT INTO ops.event_ingest_log
             (source_system, event_type, idempotency_key, schema_version, release_id, payload_hash,
              processing_status, response_code, result, attempt, created_by)
         SELECT source_system, event_type, idempotency_key, schema_version, release_id, payload_hash,
                'duplicate', 200, result, attempt, $9
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::text[], $7::int[],
                     $8::jsonb[])
              AS t(source_system, event_type, idempotency_key, schema_version, release_id,
                   payload_hash, attempt, result)",
        ))
        .bind(&results)
        .bind(writer)
        .execute(conn)
        .await?;
    Ok(())
}

/// A failed attempt: `rejected` (permanent) or `error` (transient).
#[derive(Debug, Clone)]
pub struct FailedAttempt<'a> {
    pub partial: &'a Partial,
    pub payload_hash: &'a str,
    pub status: FailureStatus,
    pub code: u16,
    pub error: &'a str,
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureStatus {
    Rejected,
    Error,
}

impl FailureStatus {
    fn as_str(self) -> &'static str {
        match self {
            FailureStatus::Rejected => "rejected",
            FailureStatus::Error => "error",
        }
    }
}

/// Writes the row of a failed attempt, in its own statement (the handler's
/// transaction, if any, has been rolled back).
pub async fn record_failure(
    conn: &mut PgConnection,
    failure: &FailedAttempt<'_>,
    writer: &str,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO ops.event_ingest_log
             (source_system, event_type, idempotency_key, schema_version, release_id, payload_hash,
              processing_status, response_code, error_detail, attempt, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7::ops.ops_processing_status, $8, $9, $10, $11)
         RETURNING ingest_id",
    )
    .bind(storable(&failure.partial.source_system))
    .bind(storable(&failure.partial.event_type))
    .bind(storable(&failure.partial.idempotency_key))
    .bind(storable(&failure.partial.schema_version))
    .bind(failure.partial.release_id)
    .bind(failure.payload_hash)
    .bind(failure.status.as_str())
    .bind(i16::try_from(failure.code).unwrap_or(500))
    .bind(clipped(failure.error, MAX_ERROR_BYTES))
    .bind(attempt_column(failure.attempt))
    .bind(writer)
    .fetch_one(conn)
    .await
}

/// A field of a refused envelope as PostgreSQL can store it: the envelope
/// may have been refused for the very NUL character that `text` cannot hold,
/// or for a length past what the ledger's key index can hold (about 2.7 kB),
/// so a field keeps at most as many bytes as the longest key accepted.
fn storable(field: &Option<String>) -> Option<String> {
    field
        .as_ref()
        .map(|text| clipped(&text.replace('\0', "\u{fffd}"), MAX_IDEMPOTENCY_KEY_BYTES).into_owned())
}

fn attempt_column(attempt: u32) -> i32 {
    i32::try_from(attempt.max(1)).unwrap_or(i32::MAX)
}

impl From<&Envelope> for Partial {
    fn from(envelope: &Envelope) -> Self {
        Partial {
            idempotency_key: Some(envelope.idempotency_key.clone()),
            event_type: Some(envelope.event_type.as_str().to_owned()),
            source_system: Some(envelope.source_system.clone()),
            schema_version: Some(envelope.schema_version.clone()),
            release_id: Some(envelope.release_id),
        }
    }
}
