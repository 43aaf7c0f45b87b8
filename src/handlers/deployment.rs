//! `deployment_event` (a deployment recorded, then advanced through its
//! statuses; each event is also appended to `ops.environment_events`) and
//! `health_check` (a G4 check of one deployment). A production deployment of
//! a release that is not eligible for production is still recorded, and
//! flagged as a policy violation.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::build::{NewCheck, check_status, insert_check};
use super::validate::{fact_time, not_blank, not_blank_if_given, one_of};
use super::{DbContext, Handled, HandlerError, Reports, payload};
use crate::envelope::{Envelope, GateCode};

/// The environments a deployment can target.
const DEPLOYMENT_ENVIRONMENTS: &[&str] = &["staging", "production"];

/// The values of `ops.ops_deployment_status`.
const DEPLOYMENT_STATUSES: &[&str] = &["in_progress", "succeeded", "failed", "rolled_back"];

/// Payload of `deployment_event` (no gate; the release is the envelope's).
#[derive(Debug, Deserialize)]
pub struct DeploymentEvent {
    /// The deployment's id, chosen by the producer so that later events
    /// (completion, failure, rollback) advance the same deployment.
    pub deployment_id: Uuid,
    /// `staging` or `production`; a later event must name the same environment.
    pub environment: String,
    /// `in_progress`, `succeeded`, `failed` or `rolled_back`. A new deployment
    /// starts at any of them; an existing one moves only in_progress ->
    /// succeeded | failed and succeeded -> rolled_back (the same status again
    /// changes nothing).
    pub status: String,
    /// Who or what deployed (user, agent or CI id); not blank.
    pub deployed_by: String,
    /// What was deployed (SHA, tag); default the release's source_ref. Only
    /// the first event of a deployment sets it.
    pub source_ref: Option<String>,
    /// When the deployment happened; default the envelope's emitted_at. Only
    /// the first event of a deployment sets it (the G4 SLA counts from it).
    pub deployed_at: Option<DateTime<Utc>>,
    /// When this deployment rolls another back: that deployment's id, an
    /// existing deployment in the same environment.
    pub rollback_of: Option<Uuid>,
    /// Anything else about the deployment; default `{}`. A later event that
    /// changes the status merges its keys into it.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// Payload of `health_check` (gate G4; the envelope's gate_code may be omitted).
#[derive(Debug, Deserialize)]
pub struct HealthCheck {
    /// The deployment observed; a deployment of the envelope's release.
    pub deployment_id: Uuid,
    /// `pass`, `fail`, `warning` or `skipped`.
    pub status: String,
    /// Name of the G4 check; default `health_check`.
    #[serde(default = "default_health_check")]
    pub check_name: String,
    /// When the result was observed; default the envelope's emitted_at. Only
    /// results observed within the G4 SLA of the deployment count.
    pub observed_at: Option<DateTime<Utc>>,
    /// URL or path of the supporting artifact (dashboard, probe log); optional.
    pub artifact_ref: Option<String>,
    /// Anything else about the check; default `{}`.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

fn default_health_check() -> String {
    "health_check".to_owned()
}

/// Fails unless `deployment_id` is a deployment of `release_id`:
/// UnknownReference when there is no such deployment, a 409 when it belongs
/// to another release. Returns the deployment's environment.
pub(crate) async fn deployment_of_release(
    conn: &mut PgConnection,
    release_id: Uuid,
    deployment_id: Uuid,
) -> Result<String, HandlerError> {
    let found: Option<(Uuid, String)> =
        sqlx::query_as("SELECT release_id, environment::text FROM ops.deployments WHERE deployment_id = $1")
            .bind(deployment_id)
            .fetch_optional(conn)
            .await
            .db("look up the deployment")?;
    match found {
        None => Err(HandlerError::UnknownReference {
            kind: "deployment",
            id: deployment_id,
        }),
        Some((owner, _)) if owner != release_id => Err(HandlerError::conflict(format!(
            "deployment {deployment_id} belongs to release {owner}, not to release {release_id}"
        ))),
        Some((_, environment)) => Ok(environment),
    }
}

/// Whether an existing deployment may move from `from` to `to`.
fn transition_allowed(from: &str, to: &str) -> bool {
    from == to
        || matches!(
            (from, to),
            ("in_progress", "succeeded" | "failed") | ("succeeded", "rolled_back")
        )
}

/// The deployment as stored before the event, with the source_ref of the
/// event's release (read together: one round trip).
#[derive(sqlx::FromRow)]
struct Before {
    release_source_ref: String,
    release_id: Option<Uuid>,
    environment: Option<String>,
    status: Option<String>,
    deployed_by: Option<String>,
    source_ref: Option<String>,
    deployed_at: Option<DateTime<Utc>>,
    rollback_of: Option<Uuid>,
}

/// The deployment as stored.
struct Deployment {
    release_id: Uuid,
    environment: String,
    status: String,
    deployed_by: String,
    source_ref: String,
    deployed_at: DateTime<Utc>,
    rollback_of: Option<Uuid>,
}

impl Before {
    fn deployment(self) -> Option<Deployment> {
        Some(Deployment {
            release_id: self.release_id?,
            environment: self.environment?,
            status: self.status?,
            deployed_by: self.deployed_by?,
            source_ref: self.source_ref?,
            deployed_at: self.deployed_at?,
            rollback_of: self.rollback_of,
        })
    }
}

pub async fn deployment_event(conn: &mut PgConnection, envelope: &Envelope) -> Result<Handled, HandlerError> {
    let event: DeploymentEvent = payload(envelope)?;
    one_of("environment", &event.environment, DEPLOYMENT_ENVIRONMENTS)?;
    one_of("status", &event.status, DEPLOYMENT_STATUSES)?;
    not_blank("deployed_by", &event.deployed_by)?;
    not_blank_if_given("source_ref", event.source_ref.as_deref())?;
    if event.rollback_of == Some(event.deployment_id) {
        return Err(HandlerError::bad_request(format!(
            "rollback_of {} is the deployment itself",
            event.deployment_id
        )));
    }
    // Unlocked: two events of one release are serialized by the release
    // lock, and the status update below only applies to the status read here.
    let before: Before = sqlx::query_as(
        "SELECT r.source_ref AS release_source_ref, d.release_id, d.environment::text AS environment,
                d.status::text AS status, d.deployed_by, d.source_ref, d.deployed_at, d.rollback_of
         FROM ops.releases r LEFT JOIN ops.deployments d ON d.deployment_id = $2
         WHERE r.release_id = $1",
    )
    .bind(envelope.release_id)
    .bind(event.deployment_id)
    .fetch_optional(&mut *conn)
    .await
    .db("read the release and the deployment")?
    .ok_or(HandlerError::UnknownRelease(envelope.release_id))?;
    let release_source_ref = before.release_source_ref.clone();
    let existing = before.deployment();
    let deployment_id = event.deployment_id;

    // A rollback is recorded against the release it rolls back (its
    // source_ref names what is deployed again): that release's status turns
    // rolled_back, and the production guard does not stop it. So it must
    // undo a deployment that went live; else any deployment could call
    // itself a rollback and skip the guard.
    if let Some(target) = event.rollback_of {
        let rolled_back: Option<(Uuid, String, String)> = sqlx::query_as(
            "SELECT release_id, environment::text, status::text FROM ops.deployments WHERE deployment_id = $1",
        )
        .bind(target)
        .fetch_optional(&mut *conn)
        .await
        .db("look up the rolled-back deployment")?;
        match rolled_back {
            None => {
                return Err(HandlerError::UnknownReference {
                    kind: "deployment",
                    id: target,
                });
            }
            Some((owner, _, _)) if owner != envelope.release_id => {
                return Err(HandlerError::conflict(format!(
                    "rollback_of {target} is a deployment of release {owner}, not of release {}",
                    envelope.release_id
                )));
            }
            Some((_, environment, _)) if environment != event.environment => {
                return Err(HandlerError::conflict(format!(
                    "rollback_of {target} is a {environment} deployment, but deployment {deployment_id} is in {}",
                    event.environment
                )));
            }
            // Its `succeeded` may still be on the way.
            Some((_, _, status)) if status == "in_progress" => {
                return Err(HandlerError::NotYet(format!(
                    "rollback_of {target} is in_progress: only a deployment that succeeded can be rolled back"
                )));
            }
            Some((_, _, status)) if !["succeeded", "rolled_back"].contains(&status.as_str()) => {
                return Err(HandlerError::conflict(format!(
                    "rollback_of {target} is {status}: only a deployment that succeeded can be rolled back"
                )));
            }
            Some(_) => {}
        }
    }

    if let Some(current) = &existing {
        if current.release_id != envelope.release_id {
            return Err(HandlerError::conflict(format!(
                "deployment {deployment_id} belongs to release {}, not to release {}",
                current.release_id, envelope.release_id
            )));
        }
        if current.environment != event.environment {
            return Err(HandlerError::conflict(format!(
                "deployment {deployment_id} is a {} deployment, not {}",
                current.environment, event.environment
            )));
        }
        if event.rollback_of.is_some() && event.rollback_of != current.rollback_of {
            return Err(HandlerError::conflict(format!(
                "deployment {deployment_id} was recorded with rollback_of {}, not {}",
                current
                    .rollback_of
                    .map_or_else(|| "unset".to_owned(), |id| id.to_string()),
                event.rollback_of.map_or_else(String::new, |id| id.to_string()),
            )));
        }
        if !transition_allowed(&current.status, &event.status) {
            return Err(HandlerError::conflict(format!(
                "cannot move deployment {deployment_id} from {} to {}",
                current.status, event.status
            )));
        }
    }
    let rollback_of = event
        .rollback_of
        .or_else(|| existing.as_ref().and_then(|current| current.rollback_of));

    // Evaluated before the deployment is written, so its own facts do not
    // change the answer.
    let blockers: Vec<String> = if event.environment == "production"
        && rollback_of.is_none()
        && ["in_progress", "succeeded"].contains(&event.status.as_str())
    {
        // Eligible exactly when nothing blocks (ops.is_eligible_for_promotion),
        // with the facts this transaction wrote before (an approval of G3
        // applied in the same batch) derived first.
        super::derive_pending(&mut *conn, Some(envelope.release_id))
            .await
            .db("derive the release before its eligibility is evaluated")?;
        let mut blockers: Vec<String> = sqlx::query_scalar("SELECT ops.promotion_blockers($1, 'production')")
            .bind(envelope.release_id)
            .fetch_all(&mut *conn)
            .await
            .db("evaluate production eligibility")?;
        // Eligibility is the release's, for its source_ref: deploying other
        // code under the release's name is not covered by it.
        let deployed_ref = existing
            .as_ref()
            .map(|current| current.source_ref.as_str())
            .or(event.source_ref.as_deref())
            .unwrap_or(&release_source_ref);
        if deployed_ref != release_source_ref {
            blockers.push(format!(
                "deployment {deployment_id} deploys {deployed_ref}, not the release's source_ref {release_source_ref}"
            ));
        }
        blockers
    } else {
        Vec::new()
    };
    let eligible = blockers.is_empty();

    let previous_status = existing.as_ref().map(|current| current.status.clone());
    // Checked on every event, though only the first one stores it: a time
    // past our clock is a producer's error either way.
    let deployed_at = fact_time("deployed_at", event.deployed_at, envelope)?;
    let stored = match existing {
        None => {
            let stored = Deployment {
                release_id: envelope.release_id,
                environment: event.environment.clone(),
                status: event.status.clone(),
                deployed_by: event.deployed_by.clone(),
                source_ref: event.source_ref.clone().unwrap_or(release_source_ref),
                deployed_at,
                rollback_of,
            };
            sqlx::query(
                "INSERT INTO ops.deployments (deployment_id, release_id, environment, deployed_at, deployed_by,
                                              source_ref, status, rollback_of, metadata, created_by)
                 VALUES ($1, $2, $3::ops.ops_environment, $4, $5, $6, $7::ops.ops_deployment_status, $8, $9, $10)",
            )
            .bind(deployment_id)
            .bind(stored.release_id)
            .bind(&stored.environment)
            .bind(stored.deployed_at)
            .bind(&stored.deployed_by)
            .bind(&stored.source_ref)
            .bind(&stored.status)
            .bind(stored.rollback_of)
            .bind(Value::Object(event.metadata.clone()))
            .bind(&envelope.source_system)
            .execute(&mut *conn)
            .await
            .db("insert the deployment")?;
            stored
        }
        Some(current) if current.status != event.status => {
            let advanced = sqlx::query(
                "UPDATE ops.deployments
                 SET status = $2::ops.ops_deployment_status, metadata = metadata || $3
                 WHERE deployment_id = $1 AND status = $4::ops.ops_deployment_status",
            )
            .bind(deployment_id)
            .bind(&event.status)
            .bind(Value::Object(event.metadata.clone()))
            .bind(&current.status)
            .execute(&mut *conn)
            .await
            .db("advance the deployment")?;
            if advanced.rows_affected() != 1 {
                return Err(super::vanished(&format!(
                    "the status of deployment {deployment_id}"
                )));
            }
            Deployment {
                status: event.status.clone(),
                ..current
            }
        }
        Some(current) => current,
    };

    let event_type = if rollback_of.is_some() {
        "rollback_trigger"
    } else {
        match event.status.as_str() {
            "in_progress" => "deploy_start",
            "succeeded" => "deploy_complete",
            "failed" => "deploy_failed",
            _ => "rollback_trigger",
        }
    };
    // The environment event. The G4 and release status the result reports
    // are read when it is stored, once derived.
    let event_id: Uuid = sqlx::query_scalar(
        "INSERT INTO ops.environment_events (environment, event_type, source_system, release_id,
                                             deployment_id, payload, idempotency_key, created_by)
         SELECT $1::ops.ops_environment, $2, $3, $4, $5, $6, $7, $3
         WHERE EXISTS (SELECT 1 FROM ops.deployments d WHERE d.deployment_id = $5)
         RETURNING event_id",
    )
    .bind(&stored.environment)
    .bind(event_type)
    .bind(&envelope.source_system)
    .bind(envelope.release_id)
    .bind(deployment_id)
    .bind(json!({
        "deployment_id": deployment_id,
        "environment": stored.environment,
        "status": stored.status,
        "previous_status": previous_status,
        "deployed_by": stored.deployed_by,
        // Who reported this step: a rollback or a failure is often reported
        // by someone other than the deployer.
        "actor": event.deployed_by,
        "source_ref": stored.source_ref,
        "deployed_at": stored.deployed_at,
        "rollback_of": stored.rollback_of,
        "metadata": event.metadata,
    }))
    .bind(&envelope.idempotency_key)
    .fetch_optional(&mut *conn)
    .await
    .db("insert the deployment's environment event")?
    .ok_or_else(|| super::vanished(&format!("deployment {deployment_id}")))?;

    let policy_violation = !eligible;
    if policy_violation {
        sqlx::query(
            "INSERT INTO ops.environment_events (environment, event_type, source_system, release_id, deployment_id,
                                                 payload, idempotency_key, created_by)
             VALUES ('production', 'policy_violation', 'opsgate', $1, $2, $3,
                     'opsgate/policy_violation/' || $2::text, 'opsgate')
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(envelope.release_id)
        .bind(deployment_id)
        .bind(json!({
            "deployment_id": deployment_id,
            "blockers": blockers,
            "status": event.status,
            "reported_by": envelope.source_system,
        }))
        .execute(&mut *conn)
        .await
        .db("record the policy violation")?;
    }

    Ok(Handled {
        result: json!({
            "deployment_id": deployment_id,
            "environment": stored.environment,
            "status": stored.status,
            "previous_status": previous_status,
            "rollback_of": stored.rollback_of,
            "event_id": event_id,
            "policy_violation": policy_violation,
            "blockers": blockers,
        }),
        reports: Reports {
            g4_status_of: Some(deployment_id),
            release_status_of: Some(envelope.release_id),
            ..Reports::default()
        },
    })
}

pub async fn health_check(conn: &mut PgConnection, envelope: &Envelope) -> Result<Handled, HandlerError> {
    let check: HealthCheck = payload(envelope)?;
    let observed_at = fact_time("observed_at", check.observed_at, envelope)?;
    check_status(&check.status)?;
    not_blank("check_name", &check.check_name)?;
    if envelope.gate_code.is_some_and(|gate| gate != GateCode::G4) {
        return Err(HandlerError::bad_request(format!(
            "health_check is a G4 event, not {}",
            envelope.gate_code.map_or("", GateCode::as_str)
        )));
    }
    let (check_id, gate) = insert_check(
        conn,
        NewCheck {
            release_id: envelope.release_id,
            gate: GateCode::G4,
            check_name: &check.check_name,
            source_system: &envelope.source_system,
            status: &check.status,
            artifact_ref: check.artifact_ref.as_deref(),
            deployment_id: Some(check.deployment_id),
            observed_at,
            metadata: check.metadata,
        },
    )
    .await?;
    Ok(Handled {
        result: json!({
            "check_id": check_id,
            "deployment_id": check.deployment_id,
            "gate_code": "G4",
        }),
        reports: Reports {
            gate_status_of: Some(gate),
            g4_status_of: Some(check.deployment_id),
            ..Reports::default()
        },
    })
}
