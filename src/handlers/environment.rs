//! `environment_event`: one row of the append-only `ops.environment_events`
//! log.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::validate::{ENVIRONMENTS, not_blank, one_of};
use super::{DbContext, HandlerError, existing_release, payload};
use crate::envelope::Envelope;

/// Payload of `environment_event` (no gate; the release is the envelope's).
#[derive(Debug, Deserialize)]
pub struct EnvironmentEvent {
    /// Where it happened: `dev`, `staging` or `production`.
    pub environment: String,
    /// What happened, free text but not blank, e.g. `config_change`,
    /// `maintenance_window`, `scale_out`.
    pub event_type: String,
    /// Details of the event, stored as given; default `{}`.
    #[serde(default)]
    pub payload: Map<String, Value>,
    /// The deployment the event concerns; optional, and when given it must be
    /// a deployment of the envelope's release.
    pub deployment_id: Option<Uuid>,
}

pub async fn environment_event(conn: &mut PgConnection, envelope: &Envelope) -> Result<Value, HandlerError> {
    let event: EnvironmentEvent = payload(envelope)?;
    one_of("environment", &event.environment, ENVIRONMENTS)?;
    not_blank("event_type", &event.event_type)?;
    existing_release(conn, envelope.release_id).await?;
    if let Some(deployment_id) = event.deployment_id {
        super::deployment::deployment_of_release(conn, envelope.release_id, deployment_id).await?;
    }
    let event_id: Uuid = sqlx::query_scalar(
        "INSERT INTO ops.environment_events (environment, event_type, source_system, release_id, deployment_id,
                                             payload, idempotency_key, created_by)
         VALUES ($1::ops.ops_environment, $2, $3, $4, $5, $6, $7, $3)
         RETURNING event_id",
    )
    .bind(&event.environment)
    .bind(&event.event_type)
    .bind(&envelope.source_system)
    .bind(envelope.release_id)
    .bind(event.deployment_id)
    .bind(Value::Object(event.payload))
    .bind(&envelope.idempotency_key)
    .fetch_one(&mut *conn)
    .await
    .db("insert the environment event")?;
    Ok(json!({
        "event_id": event_id,
        "environment": event.environment,
        "event_type": event.event_type,
        "deployment_id": event.deployment_id,
    }))
}
