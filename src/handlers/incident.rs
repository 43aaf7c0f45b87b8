//! `incident_opened` and `incident_resolved` (an `ops.incidents` row, opened
//! then resolved once) and `recovery_drill` (an `ops.recovery_drills` row,
//! with its evidence as a `restore_drill` artifact of the release).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::validate::{ENVIRONMENTS, fact_time, key_uuid, not_blank, not_blank_if_given, one_of, sha256};
use super::{DbContext, HandlerError, existing_release, payload};
use crate::envelope::Envelope;

/// The values of `ops.ops_incident_severity`.
const SEVERITIES: &[&str] = &["sev1", "sev2", "sev3", "sev4"];

/// The values of `ops.ops_postmortem_status`.
const POSTMORTEM_STATUSES: &[&str] = &["not_required", "pending", "in_progress", "complete"];

/// The values of `ops.ops_drill_outcome`.
const DRILL_OUTCOMES: &[&str] = &["succeeded", "partial", "failed"];

/// Payload of `incident_opened` (no gate; the incident is recorded against
/// the envelope's release).
#[derive(Debug, Deserialize)]
pub struct IncidentOpened {
    /// The incident's id, chosen by the producer so `incident_resolved` can
    /// name it; an id already recorded is refused (409).
    pub incident_id: Uuid,
    /// `sev1` (worst), `sev2`, `sev3` or `sev4`.
    pub severity: String,
    /// Short description; not blank.
    pub title: String,
    /// The deployment that caused it, when known; a deployment of the
    /// envelope's release. Counts against the change failure rate.
    pub deployment_id: Option<Uuid>,
    /// Where it happened: `dev`, `staging` or `production`; default the
    /// deployment's environment when `deployment_id` is given, else
    /// `production`. With a deployment it must be the deployment's (409).
    pub environment: Option<String>,
    /// When it was detected; default the envelope's emitted_at.
    pub detected_at: Option<DateTime<Utc>>,
    /// Timeline entries as given (objects or strings); default `[]`.
    #[serde(default)]
    pub timeline: Vec<Value>,
}

/// Payload of `incident_resolved`. The first one resolves the incident;
/// later ones record the postmortem's progress (`root_cause`,
/// `postmortem_status`) and may not move `resolved_at`.
#[derive(Debug, Deserialize)]
pub struct IncidentResolved {
    /// The incident; it must be of the envelope's release.
    pub incident_id: Uuid,
    /// When service was restored; default the envelope's emitted_at. Not
    /// before the incident's detected_at. For an incident already resolved:
    /// omitted, or the recorded time (409 otherwise).
    pub resolved_at: Option<DateTime<Utc>>,
    /// The root cause, when known; optional (an earlier value is kept when omitted).
    pub root_cause: Option<String>,
    /// `not_required`, `pending`, `in_progress` or `complete`; optional (the
    /// incident keeps its current status, `pending` by default, when omitted).
    pub postmortem_status: Option<String>,
}

/// Payload of `recovery_drill` (no gate; the evidence is linked to the
/// envelope's release).
#[derive(Debug, Deserialize)]
pub struct RecoveryDrill {
    /// The drill's id; default a UUIDv5 of the envelope's idempotency key
    /// (namespace OID), so every retry names the same drill. An id already
    /// recorded is refused (409).
    pub drill_id: Option<Uuid>,
    /// Where the drill ran: `dev`, `staging` or `production`.
    pub environment: String,
    /// What was exercised, e.g. `database_restore`, `failover`; not blank.
    pub drill_type: String,
    /// Who ran it; not blank.
    pub executed_by: String,
    /// When it ran; default the envelope's emitted_at.
    pub executed_at: Option<DateTime<Utc>>,
    /// `succeeded`, `partial` or `failed`.
    pub outcome: String,
    /// Whether the restored data was validated; required.
    pub restore_validated: bool,
    /// Where the drill's report lives; optional. When given it is recorded as
    /// a `restore_drill` evidence artifact of the release.
    pub evidence_url: Option<String>,
    /// SHA-256 of the report, 64 hex characters; optional, only with evidence_url.
    pub evidence_sha256: Option<String>,
    /// Anything else about the drill; default `{}`.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// An incident as stored, for its resolution.
#[derive(sqlx::FromRow)]
struct OpenIncident {
    release_id: Option<Uuid>,
    detected_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
}

pub async fn incident_opened(conn: &mut PgConnection, envelope: &Envelope) -> Result<Value, HandlerError> {
    let incident: IncidentOpened = payload(envelope)?;
    one_of("severity", &incident.severity, SEVERITIES)?;
    not_blank("title", &incident.title)?;
    if let Some(environment) = &incident.environment {
        one_of("environment", environment, ENVIRONMENTS)?;
    }
    let detected_at = fact_time("detected_at", incident.detected_at, envelope)?;
    existing_release(conn, envelope.release_id).await?;
    let mut environment = incident.environment.clone();
    if let Some(deployment_id) = incident.deployment_id {
        // An incident caused by a deployment happened where it was deployed:
        // it counts in that environment's change failure rate and MTTR.
        let deployed_to =
            super::deployment::deployment_of_release(conn, envelope.release_id, deployment_id).await?;
        match &environment {
            Some(given) if *given != deployed_to => {
                return Err(HandlerError::conflict(format!(
                    "incident {} is in {given}, but deployment {deployment_id} is a {deployed_to} deployment",
                    incident.incident_id
                )));
            }
            _ => environment = Some(deployed_to),
        }
    }
    let environment = environment.unwrap_or_else(|| "production".to_owned());
    let existing: Option<Option<Uuid>> =
        sqlx::query_scalar("SELECT release_id FROM ops.incidents WHERE incident_id = $1")
            .bind(incident.incident_id)
            .fetch_optional(&mut *conn)
            .await
            .db("look up the incident")?;
    if existing.is_some() {
        return Err(HandlerError::conflict(format!(
            "incident {} already exists",
            incident.incident_id
        )));
    }
    sqlx::query(
        "INSERT INTO ops.incidents (incident_id, deployment_id, release_id, environment, severity, title,
                                    detected_at, timeline, created_by)
         VALUES ($1, $2, $3, $4::ops.ops_environment, $5::ops.ops_incident_severity, $6, $7, $8, $9)",
    )
    .bind(incident.incident_id)
    .bind(incident.deployment_id)
    .bind(envelope.release_id)
    .bind(&environment)
    .bind(&incident.severity)
    .bind(&incident.title)
    .bind(detected_at)
    .bind(Value::Array(incident.timeline))
    .bind(&envelope.source_system)
    .execute(&mut *conn)
    .await
    .db("insert the incident")?;
    Ok(json!({
        "incident_id": incident.incident_id,
        "severity": incident.severity,
        "environment": environment,
        "deployment_id": incident.deployment_id,
        "detected_at": detected_at,
    }))
}

pub async fn incident_resolved(conn: &mut PgConnection, envelope: &Envelope) -> Result<Value, HandlerError> {
    let resolution: IncidentResolved = payload(envelope)?;
    if let Some(status) = &resolution.postmortem_status {
        one_of("postmortem_status", status, POSTMORTEM_STATUSES)?;
    }
    existing_release(conn, envelope.release_id).await?;
    let incident_id = resolution.incident_id;
    let current: Option<OpenIncident> = sqlx::query_as(
        "SELECT release_id, detected_at, resolved_at FROM ops.incidents WHERE incident_id = $1 FOR UPDATE",
    )
    .bind(incident_id)
    .fetch_optional(&mut *conn)
    .await
    .db("look up the incident")?;
    let Some(OpenIncident {
        release_id: owner,
        detected_at,
        resolved_at: resolved,
    }) = current
    else {
        return Err(HandlerError::UnknownReference {
            kind: "incident",
            id: incident_id,
        });
    };
    if let Some(owner) = owner.filter(|owner| *owner != envelope.release_id) {
        return Err(HandlerError::conflict(format!(
            "incident {incident_id} belongs to release {owner}, not to release {}",
            envelope.release_id
        )));
    }
    if let Some(resolved) = resolved {
        // Resolved already: this event carries the postmortem on.
        if resolution.resolved_at.is_some_and(|given| given != resolved) {
            return Err(HandlerError::conflict(format!(
                "incident {incident_id} was already resolved at {resolved}; resolved_at cannot move"
            )));
        }
        fact_time("emitted_at", None, envelope)?;
    }
    let resolved_at = match resolved {
        Some(resolved) => resolved,
        None => fact_time("resolved_at", resolution.resolved_at, envelope)?,
    };
    if resolved_at < detected_at {
        return Err(HandlerError::unprocessable(format!(
            "resolved_at {resolved_at} is before the incident's detected_at {detected_at}"
        )));
    }
    let postmortem_status: String = sqlx::query_scalar(
        "UPDATE ops.incidents
         SET resolved_at = $2,
             root_cause = coalesce($3, root_cause),
             postmortem_status = coalesce($4::ops.ops_postmortem_status, postmortem_status)
         WHERE incident_id = $1
         RETURNING postmortem_status::text",
    )
    .bind(incident_id)
    .bind(resolved_at)
    .bind(&resolution.root_cause)
    .bind(&resolution.postmortem_status)
    .fetch_one(&mut *conn)
    .await
    .db("resolve the incident")?;
    Ok(json!({
        "incident_id": incident_id,
        "detected_at": detected_at,
        "resolved_at": resolved_at,
        "time_to_restore_seconds": (resolved_at - detected_at).num_seconds(),
        "postmortem_status": postmortem_status,
    }))
}

pub async fn recovery_drill(conn: &mut PgConnection, envelope: &Envelope) -> Result<Value, HandlerError> {
    let drill: RecoveryDrill = payload(envelope)?;
    one_of("environment", &drill.environment, ENVIRONMENTS)?;
    not_blank("drill_type", &drill.drill_type)?;
    not_blank("executed_by", &drill.executed_by)?;
    one_of("outcome", &drill.outcome, DRILL_OUTCOMES)?;
    not_blank_if_given("evidence_url", drill.evidence_url.as_deref())?;
    sha256("evidence_sha256", drill.evidence_sha256.as_deref())?;
    if drill.evidence_sha256.is_some() && drill.evidence_url.is_none() {
        return Err(HandlerError::bad_request(
            "evidence_sha256 is given without evidence_url",
        ));
    }
    existing_release(conn, envelope.release_id).await?;
    let drill_id = drill.drill_id.unwrap_or_else(|| key_uuid(envelope));
    let exists: Option<Uuid> =
        sqlx::query_scalar("SELECT drill_id FROM ops.recovery_drills WHERE drill_id = $1")
            .bind(drill_id)
            .fetch_optional(&mut *conn)
            .await
            .db("look up the recovery drill")?;
    if exists.is_some() {
        return Err(HandlerError::conflict(format!(
            "recovery drill {drill_id} already exists"
        )));
    }
    let executed_at = fact_time("executed_at", drill.executed_at, envelope)?;

    let mut artifact_id = None;
    if let Some(url) = &drill.evidence_url {
        artifact_id = Some(
            sqlx::query_scalar::<_, Uuid>(
                "INSERT INTO ops.evidence_artifacts (release_id, environment, artifact_type, source_system,
                                                     artifact_url, sha256, metadata, created_by)
                 VALUES ($1, $2::ops.ops_environment, 'restore_drill', $3, $4, $5, $6, $3)
                 RETURNING artifact_id",
            )
            .bind(envelope.release_id)
            .bind(&drill.environment)
            .bind(&envelope.source_system)
            .bind(url)
            .bind(&drill.evidence_sha256)
            .bind(json!({
                "drill_id": drill_id,
                "drill_type": drill.drill_type,
                "outcome": drill.outcome,
                "restore_validated": drill.restore_validated,
            }))
            .fetch_one(&mut *conn)
            .await
            .db("insert the recovery drill evidence")?,
        );
    }

    let mut metadata = drill.metadata;
    metadata.insert("release_id".to_owned(), json!(envelope.release_id));
    sqlx::query(
        "INSERT INTO ops.recovery_drills (drill_id, environment, drill_type, executed_by, executed_at, outcome,
                                          restore_validated, evidence_artifact_id, metadata, created_by)
         VALUES ($1, $2::ops.ops_environment, $3, $4, $5, $6::ops.ops_drill_outcome, $7, $8, $9, $10)",
    )
    .bind(drill_id)
    .bind(&drill.environment)
    .bind(&drill.drill_type)
    .bind(&drill.executed_by)
    .bind(executed_at)
    .bind(&drill.outcome)
    .bind(drill.restore_validated)
    .bind(artifact_id)
    .bind(Value::Object(metadata))
    .bind(&envelope.source_system)
    .execute(&mut *conn)
    .await
    .db("insert the recovery drill")?;
    Ok(json!({
        "drill_id": drill_id,
        "outcome": drill.outcome,
        "restore_validated": drill.restore_validated,
        "evidence_artifact_id": artifact_id,
    }))
}
