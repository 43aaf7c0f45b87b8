//! `release_created`: the release and (by trigger) its four pending gates.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;

use super::{DbContext, HandlerError, payload};
use crate::envelope::Envelope;
use crate::text::quoted;

/// Payload of `release_created`. The release id is the envelope's.
#[derive(Debug, Deserialize)]
pub struct ReleaseCreated {
    /// Repo or project, e.g. `acme/odoo`.
    pub project: String,
    /// Human-readable, e.g. `v2026.02.4`; unique within the project.
    pub release_name: String,
    /// `dev`, `staging` or `production`.
    pub environment_target: String,
    /// Git SHA, branch or tag.
    pub source_ref: String,
    /// Who started the release (user, agent or CI id).
    pub initiating_actor: String,
    /// Modules changed, OCA updates, ...
    #[serde(default)]
    pub scope_metadata: Map<String, Value>,
}

pub async fn release_created(conn: &mut PgConnection, envelope: &Envelope) -> Result<Value, HandlerError> {
    let release: ReleaseCreated = payload(envelope)?;
    if !["dev", "staging", "production"].contains(&release.environment_target.as_str()) {
        return Err(HandlerError::bad_request(format!(
            "environment_target {} is not one of dev, staging, production",
            quoted(&release.environment_target)
        )));
    }
    // The same id, or the same name under another id (at most two rows).
    let clashes: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
        "SELECT release_id, project, release_name FROM ops.releases
         WHERE release_id = $1 OR (project = $2 AND release_name = $3)",
    )
    .bind(envelope.release_id)
    .bind(&release.project)
    .bind(&release.release_name)
    .fetch_all(&mut *conn)
    .await
    .db("look up the release and its name")?;
    if let Some((_, project, name)) = clashes.iter().find(|(id, _, _)| *id == envelope.release_id) {
        // A second key for the same release: the first one won.
        return Err(HandlerError::conflict(format!(
            "release {} already exists as {project}/{name}",
            envelope.release_id
        )));
    }
    if let Some((other, _, _)) = clashes.first() {
        return Err(HandlerError::conflict(format!(
            "{}/{} is already release {other}",
            release.project, release.release_name
        )));
    }
    sqlx::query(
        "INSERT INTO ops.releases (release_id, project, release_name, environment_target, source_ref,
                                   scope_metadata, initiating_actor, created_at, created_by)
         VALUES ($1, $2, $3, $4::ops.ops_environment, $5, $6, $7, now(), $8)",
    )
    .bind(envelope.release_id)
    .bind(&release.project)
    .bind(&release.release_name)
    .bind(&release.environment_target)
    .bind(&release.source_ref)
    .bind(Value::Object(release.scope_metadata))
    .bind(&release.initiating_actor)
    .bind(&envelope.source_system)
    .execute(&mut *conn)
    .await
    .db("insert the release")?;
    Ok(json!({
        "release_id": envelope.release_id,
        "project": release.project,
        "release_name": release.release_name,
        "status": "draft",
        "gates": ["G1", "G2", "G3", "G4"],
    }))
}
