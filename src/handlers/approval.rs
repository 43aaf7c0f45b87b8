//! `gate_signoff`: a person's decision on one gate, recorded as an
//! `ops.approvals` row of scope `gate`. Whether it counts (policy roles,
//! separation of duties) is decided by the database's gate evaluation.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::validate::{fact_time, not_blank, one_of};
use super::{DbContext, Handled, HandlerError, payload, required_gate};
use crate::envelope::Envelope;

/// The values of `ops.ops_persona_role`.
pub(crate) const PERSONA_ROLES: &[&str] = &["developer", "qa_tester", "release_manager", "sre"];

/// The values of `ops.ops_decision_type`.
const DECISIONS: &[&str] = &["approved", "rejected", "request_changes"];

/// Payload of `gate_signoff` (any gate: the envelope's gate_code is required).
#[derive(Debug, Deserialize)]
pub struct GateSignoff {
    /// Who decided (user or agent id); not blank.
    pub approver_id: String,
    /// The role they decided in: `developer`, `qa_tester`, `release_manager`
    /// or `sre`. Gate policies name the roles whose approval they need.
    pub persona_role: String,
    /// `approved`, `rejected` or `request_changes`.
    pub decision: String,
    /// Machine-readable rationale (checklist answers, ticket links, ...);
    /// default `{}`.
    #[serde(default)]
    pub rationale_structured: Map<String, Value>,
    /// Free-text rationale; optional.
    pub rationale_text: Option<String>,
    /// When the decision was made; default the envelope's emitted_at. The
    /// latest decision per role counts.
    pub decided_at: Option<DateTime<Utc>>,
}

pub async fn gate_signoff(conn: &mut PgConnection, envelope: &Envelope) -> Result<Handled, HandlerError> {
    let signoff: GateSignoff = payload(envelope)?;
    not_blank("approver_id", &signoff.approver_id)?;
    one_of("persona_role", &signoff.persona_role, PERSONA_ROLES)?;
    one_of("decision", &signoff.decision, DECISIONS)?;
    let gate_code = required_gate(envelope)?;
    let decided_at = fact_time("decided_at", signoff.decided_at, envelope)?;
    // The gate is looked up by the insert; none written: the release is unknown.
    let (approval_id, gate): (Uuid, Uuid) = sqlx::query_as(
        "INSERT INTO ops.approvals (release_id, gate_id, approver_id, persona_role, decision, scope,
                                    rationale_structured, rationale_text, decided_at, created_by)
         SELECT g.release_id, g.gate_id, $3, $4::ops.ops_persona_role, $5::ops.ops_decision_type, 'gate',
                $6, $7, $8, $9
         FROM ops.release_gates g
         WHERE g.release_id = $1 AND g.gate_code = $2::ops.ops_gate_code
         RETURNING approval_id, gate_id",
    )
    .bind(envelope.release_id)
    .bind(gate_code.as_str())
    .bind(&signoff.approver_id)
    .bind(&signoff.persona_role)
    .bind(&signoff.decision)
    .bind(Value::Object(signoff.rationale_structured))
    .bind(&signoff.rationale_text)
    .bind(decided_at)
    .bind(&envelope.source_system)
    .fetch_optional(&mut *conn)
    .await
    .db("insert the approval")?
    .ok_or(HandlerError::UnknownRelease(envelope.release_id))?;
    Ok(Handled::reporting_gate(
        json!({
            "approval_id": approval_id,
            "gate_code": gate_code,
            "decision": signoff.decision,
        }),
        Some(gate),
    ))
}
