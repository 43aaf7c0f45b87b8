//! `exception_granted` (a time-bounded exception that bypasses gates while it
//! is active) and `exception_reviewed` (its post-review, recorded as an
//! approval of scope `exception`).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::approval::PERSONA_ROLES;
use super::validate::{fact_time, key_uuid, not_blank, one_of};
use super::{DbContext, HandlerError, existing_release, payload};
use crate::envelope::Envelope;
use crate::text::quoted;

const GATE_CODES: &[&str] = &["G1", "G2", "G3", "G4"];

/// Payload of `exception_granted` (the release is the envelope's; the gates
/// are named in `impacted_gates`, the envelope's gate_code is not used).
#[derive(Debug, Deserialize)]
pub struct ExceptionGranted {
    /// The exception's id; default a UUIDv5 of the envelope's idempotency key
    /// (namespace OID), so every retry names the same exception.
    pub exception_id: Option<Uuid>,
    /// What kind of exception, e.g. `gate_bypass`, `hotfix`; not blank.
    pub exception_type: String,
    /// The gates it bypasses: a non-empty array of `G1`, `G2`, `G3`, `G4`.
    pub impacted_gates: Vec<String>,
    /// Why the exception is needed; not blank.
    pub reason: String,
    /// The risk accepted; not blank.
    pub risk_statement: String,
    /// Who granted it; not blank, and never the release's initiating actor
    /// (separation of duties).
    pub approver_id: String,
    /// When it starts to authorize; default the envelope's emitted_at.
    pub effective_from: Option<DateTime<Utc>>,
    /// When it stops authorizing. Required: exceptions are always
    /// time-bounded; must be in the future and after effective_from.
    pub expires_at: DateTime<Utc>,
    /// The controls that offset the risk (monitoring, rollback plan, ...);
    /// default `{}`.
    #[serde(default)]
    pub compensating_controls: Map<String, Value>,
}

/// Payload of `exception_reviewed`.
#[derive(Debug, Deserialize)]
pub struct ExceptionReviewed {
    /// The exception reviewed; an exception of the envelope's release.
    pub exception_id: Uuid,
    /// The outcome of the post-review: `complete` or `waived`.
    pub post_review_status: String,
    /// Who reviewed it; not blank. Recorded as the approver of an approval of
    /// scope `exception`.
    pub reviewer_id: String,
    /// The reviewer's role: `developer`, `qa_tester`, `release_manager` or
    /// `sre`; default `release_manager`.
    #[serde(default = "default_reviewer_role")]
    pub persona_role: String,
    /// Free-text notes of the review; optional.
    pub rationale_text: Option<String>,
}

fn default_reviewer_role() -> String {
    "release_manager".to_owned()
}

pub async fn exception_granted(conn: &mut PgConnection, envelope: &Envelope) -> Result<Value, HandlerError> {
    let exception: ExceptionGranted = payload(envelope)?;
    not_blank("exception_type", &exception.exception_type)?;
    not_blank("reason", &exception.reason)?;
    not_blank("risk_statement", &exception.risk_statement)?;
    not_blank("approver_id", &exception.approver_id)?;
    if exception.impacted_gates.is_empty() {
        return Err(HandlerError::bad_request(
            "impacted_gates is empty: name at least one of G1, G2, G3, G4",
        ));
    }
    let mut gates: Vec<String> = Vec::new();
    for gate in &exception.impacted_gates {
        one_of("impacted_gates entry", gate, GATE_CODES)?;
        if !gates.contains(gate) {
            gates.push(gate.clone());
        }
    }
    gates.sort();
    let exception_id = exception.exception_id.unwrap_or_else(|| key_uuid(envelope));
    let effective_from = exception.effective_from.unwrap_or(envelope.emitted_at);

    let initiator = existing_release(conn, envelope.release_id).await?;
    // The statement's time, not the transaction's: a batch's transaction may
    // have begun before it waited for its release locks.
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT statement_timestamp()")
        .fetch_one(&mut *conn)
        .await
        .db("read the database clock")?;
    if exception.expires_at <= now {
        return Err(HandlerError::unprocessable(format!(
            "expires_at {} is not in the future (now is {now}): an exception must expire later",
            exception.expires_at
        )));
    }
    if exception.expires_at <= effective_from {
        return Err(HandlerError::unprocessable(format!(
            "expires_at {} is not after effective_from {effective_from}",
            exception.expires_at
        )));
    }
    if exception.approver_id == initiator {
        return Err(HandlerError::conflict(format!(
            "separation of duties: approver_id {} initiated release {}, and an exception must be granted by \
             someone other than the release's initiating actor",
            quoted(&exception.approver_id),
            envelope.release_id
        )));
    }
    let existing: Option<Uuid> =
        sqlx::query_scalar("SELECT release_id FROM ops.exceptions WHERE exception_id = $1")
            .bind(exception_id)
            .fetch_optional(&mut *conn)
            .await
            .db("look up the exception")?;
    if let Some(owner) = existing {
        return Err(HandlerError::conflict(format!(
            "exception {exception_id} already exists (release {owner})"
        )));
    }

    sqlx::query(
        "INSERT INTO ops.exceptions (exception_id, release_id, exception_type, impacted_gates, reason,
                                     risk_statement, approver_id, effective_from, expires_at,
                                     compensating_controls, created_by)
         VALUES ($1, $2, $3, $4::text[]::ops.ops_gate_code[], $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(exception_id)
    .bind(envelope.release_id)
    .bind(&exception.exception_type)
    .bind(&gates)
    .bind(&exception.reason)
    .bind(&exception.risk_statement)
    .bind(&exception.approver_id)
    .bind(effective_from)
    .bind(exception.expires_at)
    .bind(Value::Object(exception.compensating_controls))
    .bind(&envelope.source_system)
    .execute(&mut *conn)
    .await
    .db("insert the exception")?;

    super::derive_pending(&mut *conn, Some(envelope.release_id))
        .await
        .db("derive the gates the exception impacts")?;
    let statuses: Vec<(String, String)> = sqlx::query_as(
        "SELECT gate_code::text, status::text FROM ops.release_gates
         WHERE release_id = $1 AND gate_code = ANY ($2::text[]::ops.ops_gate_code[])
         ORDER BY gate_code",
    )
    .bind(envelope.release_id)
    .bind(&gates)
    .fetch_all(&mut *conn)
    .await
    .db("read the gate statuses")?;
    let gate_statuses: Map<String, Value> = statuses
        .into_iter()
        .map(|(code, status)| (code, Value::String(status)))
        .collect();
    Ok(json!({
        "exception_id": exception_id,
        "impacted_gates": gates,
        "effective_from": effective_from,
        "expires_at": exception.expires_at,
        "gate_statuses": gate_statuses,
    }))
}

pub async fn exception_reviewed(conn: &mut PgConnection, envelope: &Envelope) -> Result<Value, HandlerError> {
    let review: ExceptionReviewed = payload(envelope)?;
    one_of(
        "post_review_status",
        &review.post_review_status,
        &["complete", "waived"],
    )?;
    not_blank("reviewer_id", &review.reviewer_id)?;
    one_of("persona_role", &review.persona_role, PERSONA_ROLES)?;
    existing_release(conn, envelope.release_id).await?;

    let decided_at = fact_time("decided_at", None, envelope)?;
    let granted: Option<(Uuid, String, String)> = sqlx::query_as(
        "SELECT e.release_id, e.approver_id, r.initiating_actor
         FROM ops.exceptions e JOIN ops.releases r ON r.release_id = e.release_id
         WHERE e.exception_id = $1 FOR UPDATE OF e",
    )
    .bind(review.exception_id)
    .fetch_optional(&mut *conn)
    .await
    .db("look up the exception")?;
    match granted {
        None => {
            return Err(HandlerError::UnknownReference {
                kind: "exception",
                id: review.exception_id,
            });
        }
        Some((owner, _, _)) if owner != envelope.release_id => {
            return Err(HandlerError::conflict(format!(
                "exception {} belongs to release {owner}, not to release {}",
                review.exception_id, envelope.release_id
            )));
        }
        // The review checks the grant: neither its approver nor the person
        // it let through may do it (separation of duties).
        Some((_, approver, _)) if approver == review.reviewer_id => {
            return Err(HandlerError::conflict(format!(
                "exception {} cannot be reviewed by {}, who approved it (separation of duties)",
                review.exception_id,
                quoted(&review.reviewer_id)
            )));
        }
        Some((_, _, initiator)) if initiator == review.reviewer_id => {
            return Err(HandlerError::conflict(format!(
                "exception {} cannot be reviewed by {}, who initiated the release (separation of duties)",
                review.exception_id,
                quoted(&review.reviewer_id)
            )));
        }
        Some(_) => {}
    }

    sqlx::query(
        "UPDATE ops.exceptions SET post_review_status = $2::ops.ops_post_review_status WHERE exception_id = $1",
    )
    .bind(review.exception_id)
    .bind(&review.post_review_status)
    .execute(&mut *conn)
    .await
    .db("update the exception's post-review status")?;
    let approval_id: Uuid = sqlx::query_scalar(
        "INSERT INTO ops.approvals (release_id, exception_id, approver_id, persona_role, decision, scope,
                                    rationale_structured, rationale_text, decided_at, created_by)
         VALUES ($1, $2, $3, $4::ops.ops_persona_role, 'approved', 'exception', $5, $6, $7, $8)
         RETURNING approval_id",
    )
    .bind(envelope.release_id)
    .bind(review.exception_id)
    .bind(&review.reviewer_id)
    .bind(&review.persona_role)
    .bind(json!({"post_review_status": review.post_review_status}))
    .bind(&review.rationale_text)
    .bind(decided_at)
    .bind(&envelope.source_system)
    .fetch_one(&mut *conn)
    .await
    .db("insert the post-review approval")?;
    Ok(json!({
        "exception_id": review.exception_id,
        "post_review_status": review.post_review_status,
        "approval_id": approval_id,
    }))
}
