//! The ingest ledger, `ops.event_ingest_log`: one row per delivery attempt,
//! and at most one `accepted` row per idempotency key (a partial unique index
//! in the database). The accepted row is claimed before any side effect, in
//! the same transaction as the handler's writes.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::envelope::{Envelope, Partial};

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
pub async fn try_processing(
    conn: &mut PgConnection,
    envelope: &Envelope,
    payload_hash: &str,
    attempt: u32,
    writer: &str,
) -> Result<NextAction, sqlx::Error> {
    let claimed: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO ops.event_ingest_log
             (source_system, event_type, idempotency_key, schema_version, release_id, payload_hash,
              processing_status, response_code, attempt, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, 'accepted', 200, $7, $8)
         ON CONFLICT (idempotency_key) WHERE processing_status = 'accepted' DO NOTHING
         RETURNING ingest_id",
    )
    .bind(&envelope.source_system)
    .bind(envelope.event_type.as_str())
    .bind(&envelope.idempotency_key)
    .bind(&envelope.schema_version)
    .bind(envelope.release_id)
    .bind(payload_hash)
    .bind(attempt_column(attempt))
    .bind(writer)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(ingest_id) = claimed {
        return Ok(NextAction::StartProcessing { ingest_id });
    }

    let (accepted_hash, result): (String, Option<Value>) = sqlx::query_as(
        "SELECT payload_hash, result FROM ops.event_ingest_log
         WHERE idempotency_key = $1 AND processing_status = 'accepted'",
    )
    .bind(&envelope.idempotency_key)
    .fetch_one(&mut *conn)
    .await?;
    if accepted_hash != payload_hash {
        return Ok(NextAction::KeyReused { accepted_hash });
    }
    let result = result.unwrap_or(Value::Null);
    sqlx::query(
        "INSERT INTO ops.event_ingest_log
             (source_system, event_type, idempotency_key, schema_version, release_id, payload_hash,
              processing_status, response_code, result, attempt, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, 'duplicate', 200, $7, $8, $9)",
    )
    .bind(&envelope.source_system)
    .bind(envelope.event_type.as_str())
    .bind(&envelope.idempotency_key)
    .bind(&envelope.schema_version)
    .bind(envelope.release_id)
    .bind(payload_hash)
    .bind(&result)
    .bind(attempt_column(attempt))
    .bind(writer)
    .execute(&mut *conn)
    .await?;
    Ok(NextAction::ReturnSavedResult { result })
}

/// Stores the handler's result on the accepted row, in the claiming
/// transaction, and returns it as stored. With `gate_status_of`, the result
/// gets that gate's `gate_status` as derived at this point (after every
/// write of the event), read in the same statement.
pub async fn save_result(
    conn: &mut PgConnection,
    ingest_id: Uuid,
    result: &Value,
    gate_status_of: Option<Uuid>,
) -> Result<Value, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE ops.event_ingest_log
         SET result = CASE WHEN $3::uuid IS NULL THEN $2
                           ELSE $2 || jsonb_build_object('gate_status',
                                (SELECT status::text FROM ops.release_gates WHERE gate_id = $3))
                      END
         WHERE ingest_id = $1
         RETURNING result",
    )
    .bind(ingest_id)
    .bind(result)
    .bind(gate_status_of)
    .fetch_one(conn)
    .await
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
    .bind(&failure.partial.source_system)
    .bind(&failure.partial.event_type)
    .bind(&failure.partial.idempotency_key)
    .bind(&failure.partial.schema_version)
    .bind(failure.partial.release_id)
    .bind(failure.payload_hash)
    .bind(failure.status.as_str())
    .bind(i16::try_from(failure.code).unwrap_or(500))
    .bind(failure.error)
    .bind(attempt_column(failure.attempt))
    .bind(writer)
    .fetch_one(conn)
    .await
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
