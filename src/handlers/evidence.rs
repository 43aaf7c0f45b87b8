//! `evidence_attached`: one `ops.evidence_artifacts` row of the envelope's
//! release, optionally linked to a gate (the envelope's gate_code), a check
//! and a deployment of that same release.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::validate::{ENVIRONMENTS, not_blank, one_of, sha256};
use super::{DbContext, Handled, HandlerError, existing_release, payload, release_gate, vanished};
use crate::envelope::Envelope;

/// The values of `ops.ops_artifact_type`.
const ARTIFACT_TYPES: &[&str] = &[
    "build_log",
    "test_result",
    "uat_summary",
    "approval_record",
    "rollback_plan",
    "health_check",
    "restore_drill",
    "incident_report",
    "reference",
];

/// Payload of `evidence_attached` (the envelope's gate_code is optional: when
/// given, the artifact is linked to that gate).
#[derive(Debug, Deserialize)]
pub struct EvidenceAttached {
    /// `build_log`, `test_result`, `uat_summary`, `approval_record`,
    /// `rollback_plan`, `health_check`, `restore_drill`, `incident_report` or
    /// `reference`. Gate policies ask for evidence by type.
    pub artifact_type: String,
    /// Where the artifact lives (URL or path); not blank.
    pub artifact_url: String,
    /// SHA-256 of the artifact's content, 64 hex characters; optional.
    pub sha256: Option<String>,
    /// The check the artifact supports; optional, a check of this release.
    pub check_id: Option<Uuid>,
    /// The deployment the artifact concerns; optional, a deployment of this release.
    pub deployment_id: Option<Uuid>,
    /// `dev`, `staging` or `production`; optional.
    pub environment: Option<String>,
    /// Anything else about the artifact; default `{}`.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

pub async fn evidence_attached(
    conn: &mut PgConnection,
    envelope: &Envelope,
) -> Result<Handled, HandlerError> {
    let evidence: EvidenceAttached = payload(envelope)?;
    one_of("artifact_type", &evidence.artifact_type, ARTIFACT_TYPES)?;
    not_blank("artifact_url", &evidence.artifact_url)?;
    sha256("sha256", evidence.sha256.as_deref())?;
    if let Some(environment) = &evidence.environment {
        one_of("environment", environment, ENVIRONMENTS)?;
    }
    // The release, gate, check and deployment are looked up by the insert
    // (one round trip); when it writes nothing, one by one to say which.
    let inserted: Option<(Uuid, Option<Uuid>)> = sqlx::query_as(
        "INSERT INTO ops.evidence_artifacts (release_id, gate_id, check_id, deployment_id, environment,
                                             artifact_type, source_system, artifact_url, sha256, metadata,
                                             created_by)
         SELECT r.release_id, g.gate_id, $3, $4, $5::ops.ops_environment, $6::ops.ops_artifact_type, $7, $8, $9,
                $10, $7
         FROM ops.releases r
         LEFT JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = $2::ops.ops_gate_code
         WHERE r.release_id = $1
           AND ($2::ops.ops_gate_code IS NULL OR g.gate_id IS NOT NULL)
           AND ($3::uuid IS NULL OR EXISTS (
                SELECT 1 FROM ops.gate_checks c JOIN ops.release_gates cg USING (gate_id)
                WHERE c.check_id = $3 AND cg.release_id = r.release_id))
           AND ($4::uuid IS NULL OR EXISTS (
                SELECT 1 FROM ops.deployments d WHERE d.deployment_id = $4 AND d.release_id = r.release_id))
         RETURNING artifact_id, gate_id",
    )
    .bind(envelope.release_id)
    .bind(envelope.gate_code.map(|code| code.as_str()))
    .bind(evidence.check_id)
    .bind(evidence.deployment_id)
    .bind(&evidence.environment)
    .bind(&evidence.artifact_type)
    .bind(&envelope.source_system)
    .bind(&evidence.artifact_url)
    .bind(&evidence.sha256)
    .bind(Value::Object(evidence.metadata))
    .fetch_optional(&mut *conn)
    .await
    .db("insert the evidence artifact")?;
    let Some((artifact_id, gate)) = inserted else {
        return Err(why_not_inserted(conn, envelope, evidence.check_id, evidence.deployment_id).await);
    };
    Ok(Handled::reporting_gate(
        json!({
            "artifact_id": artifact_id,
            "artifact_type": evidence.artifact_type,
            "gate_code": envelope.gate_code,
            "gate_status": null,
        }),
        gate,
    ))
}

/// Why the evidence of `envelope` could not be inserted: the first of its
/// references that is missing or belongs to another release.
async fn why_not_inserted(
    conn: &mut PgConnection,
    envelope: &Envelope,
    check_id: Option<Uuid>,
    deployment_id: Option<Uuid>,
) -> HandlerError {
    let found = async {
        match envelope.gate_code {
            Some(code) => {
                release_gate(conn, envelope.release_id, code).await?;
            }
            None => {
                existing_release(conn, envelope.release_id).await?;
            }
        }
        if let Some(check_id) = check_id {
            check_of_release(conn, envelope.release_id, check_id).await?;
        }
        if let Some(deployment_id) = deployment_id {
            super::deployment::deployment_of_release(conn, envelope.release_id, deployment_id).await?;
        }
        Ok::<(), HandlerError>(())
    };
    match found.await {
        Ok(()) => vanished("the evidence's release, gate, check or deployment"),
        Err(error) => error,
    }
}

/// Fails unless `check_id` is a check of `release_id`: UnknownReference when
/// there is no such check, a 409 when it belongs to another release.
async fn check_of_release(
    conn: &mut PgConnection,
    release_id: Uuid,
    check_id: Uuid,
) -> Result<(), HandlerError> {
    let owner: Option<Uuid> = sqlx::query_scalar(
        "SELECT g.release_id FROM ops.gate_checks c JOIN ops.release_gates g USING (gate_id) WHERE c.check_id = $1",
    )
    .bind(check_id)
    .fetch_optional(conn)
    .await
    .db("look up the check")?;
    match owner {
        None => Err(HandlerError::UnknownReference {
            kind: "check",
            id: check_id,
        }),
        Some(owner) if owner != release_id => Err(HandlerError::conflict(format!(
            "check {check_id} belongs to release {owner}, not to release {release_id}"
        ))),
        Some(_) => Ok(()),
    }
}
