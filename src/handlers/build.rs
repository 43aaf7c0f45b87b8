//! `build_complete` (a G1 check, an `ops.builds` manifest, build-log
//! evidence) and `check_result` (a check for any gate).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::validate::fact_time;
use super::{DbContext, Handled, HandlerError, payload, release_gate, required_gate};
use crate::envelope::{Envelope, GateCode};
use crate::text::quoted;

/// Payload of `build_complete` (gate G1; the envelope's gate_code may be omitted).
#[derive(Debug, Deserialize)]
pub struct BuildComplete {
    /// `pass`, `fail`, `warning` or `skipped`.
    pub status: String,
    /// Name of the G1 check; default `build`.
    #[serde(default = "default_build_check")]
    pub check_name: String,
    /// Full 40- or 64-character lowercase hex commit SHA.
    pub git_sha: String,
    pub branch: String,
    #[serde(default)]
    pub commit_message: String,
    pub author: String,
    /// When the build finished; default the envelope's emitted_at.
    pub built_at: Option<DateTime<Utc>>,
    /// `sha256:<64 hex>` digest of the image.
    pub image_digest: Option<String>,
    /// Lock file name -> SHA-256 of its content.
    #[serde(default)]
    pub lock_file_hashes: Map<String, Value>,
    /// Link to the CI run.
    pub ci_run_url: Option<String>,
    /// When given, recorded as `build_log` evidence linked to the check.
    pub build_log_url: Option<String>,
    pub build_log_sha256: Option<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

fn default_build_check() -> String {
    "build".to_owned()
}

/// Payload of `check_result` (any gate: the envelope's gate_code is required).
#[derive(Debug, Deserialize)]
pub struct CheckResult {
    /// e.g. `unit_tests`, `lint`, `staging_deploy_health`.
    pub check_name: String,
    /// `pass`, `fail`, `warning` or `skipped`.
    pub status: String,
    /// URL or path of the supporting artifact.
    pub artifact_ref: Option<String>,
    /// When the result was observed; default the envelope's emitted_at.
    pub observed_at: Option<DateTime<Utc>>,
    /// For G4 checks: the deployment observed.
    pub deployment_id: Option<Uuid>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

pub(crate) fn check_status(status: &str) -> Result<(), HandlerError> {
    if ["pass", "fail", "warning", "skipped"].contains(&status) {
        Ok(())
    } else {
        Err(HandlerError::bad_request(format!(
            "check status {} is not one of pass, fail, warning, skipped",
            quoted(status)
        )))
    }
}

/// Inserts one check and returns its id.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_check(
    conn: &mut PgConnection,
    gate_id: Uuid,
    check_name: &str,
    source_system: &str,
    status: &str,
    artifact_ref: Option<&str>,
    deployment_id: Option<Uuid>,
    observed_at: DateTime<Utc>,
    metadata: Map<String, Value>,
) -> Result<Uuid, HandlerError> {
    sqlx::query_scalar(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, artifact_ref, deployment_id,
                                      observed_at, metadata, created_by)
         VALUES ($1, $2, $3, $4::ops.ops_check_status, $5, $6, $7, $8, $3)
         RETURNING check_id",
    )
    .bind(gate_id)
    .bind(check_name)
    .bind(source_system)
    .bind(status)
    .bind(artifact_ref)
    .bind(deployment_id)
    .bind(observed_at)
    .bind(Value::Object(metadata))
    .fetch_one(conn)
    .await
    .db("insert the check")
}

pub async fn build_complete(conn: &mut PgConnection, envelope: &Envelope) -> Result<Handled, HandlerError> {
    let build: BuildComplete = payload(envelope)?;
    check_status(&build.status)?;
    if envelope.gate_code.is_some_and(|gate| gate != GateCode::G1) {
        return Err(HandlerError::bad_request("build_complete is a G1 event"));
    }
    let gate = release_gate(conn, envelope.release_id, GateCode::G1).await?;
    let built_at = fact_time("built_at", build.built_at, envelope)?;

    let build_id: Uuid = sqlx::query_scalar(
        "INSERT INTO ops.builds (release_id, git_sha, branch, commit_message, author, built_at, image_digest,
                                 lock_file_hashes, ci_run_url, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         RETURNING build_id",
    )
    .bind(envelope.release_id)
    .bind(&build.git_sha)
    .bind(&build.branch)
    .bind(&build.commit_message)
    .bind(&build.author)
    .bind(built_at)
    .bind(&build.image_digest)
    .bind(Value::Object(build.lock_file_hashes))
    .bind(&build.ci_run_url)
    .bind(&envelope.source_system)
    .fetch_one(&mut *conn)
    .await
    .db("insert the build manifest")?;

    let mut metadata = build.metadata;
    metadata.insert("build_id".to_owned(), json!(build_id));
    metadata.insert("git_sha".to_owned(), json!(build.git_sha));
    let check_id = insert_check(
        conn,
        gate,
        &build.check_name,
        &envelope.source_system,
        &build.status,
        build.ci_run_url.as_deref().or(build.build_log_url.as_deref()),
        None,
        built_at,
        metadata,
    )
    .await?;

    let mut artifact_id = None;
    if let Some(url) = &build.build_log_url {
        artifact_id = Some(
            sqlx::query_scalar::<_, Uuid>(
                "INSERT INTO ops.evidence_artifacts (release_id, gate_id, check_id, artifact_type, source_system,
                                                     artifact_url, sha256, metadata, created_by)
                 VALUES ($1, $2, $3, 'build_log', $4, $5, $6, $7, $4)
                 RETURNING artifact_id",
            )
            .bind(envelope.release_id)
            .bind(gate)
            .bind(check_id)
            .bind(&envelope.source_system)
            .bind(url)
            .bind(&build.build_log_sha256)
            .bind(json!({"build_id": build_id}))
            .fetch_one(&mut *conn)
            .await
            .db("insert the build log evidence")?,
        );
    }
    Ok(Handled::reporting_gate(
        json!({
            "build_id": build_id,
            "check_id": check_id,
            "artifact_id": artifact_id,
            "gate_code": "G1",
        }),
        Some(gate),
    ))
}

pub async fn check_result(conn: &mut PgConnection, envelope: &Envelope) -> Result<Handled, HandlerError> {
    let check: CheckResult = payload(envelope)?;
    let observed_at = fact_time("observed_at", check.observed_at, envelope)?;
    check_status(&check.status)?;
    let gate_code = required_gate(envelope)?;
    let gate = release_gate(conn, envelope.release_id, gate_code).await?;
    if let Some(deployment_id) = check.deployment_id {
        super::deployment::deployment_of_release(conn, envelope.release_id, deployment_id).await?;
    }
    let check_id = insert_check(
        conn,
        gate,
        &check.check_name,
        &envelope.source_system,
        &check.status,
        check.artifact_ref.as_deref(),
        check.deployment_id,
        observed_at,
        check.metadata,
    )
    .await?;
    Ok(Handled::reporting_gate(
        json!({
            "check_id": check_id,
            "gate_code": gate_code,
        }),
        Some(gate),
    ))
}
