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

/// A check to record on the gate `gate` of `release_id`, for a deployment of
/// that release when `deployment_id` is given.
pub(crate) struct NewCheck<'a> {
    pub release_id: Uuid,
    pub gate: GateCode,
    pub check_name: &'a str,
    pub source_system: &'a str,
    pub status: &'a str,
    pub artifact_ref: Option<&'a str>,
    pub deployment_id: Option<Uuid>,
    pub observed_at: DateTime<Utc>,
    pub metadata: Map<String, Value>,
}

/// Inserts one check and returns its id and its gate's id. The gate and the
/// deployment are looked up by the insert itself (one round trip); when it
/// writes nothing, they are looked up one by one to say which is missing.
pub(crate) async fn insert_check(
    conn: &mut PgConnection,
    check: NewCheck<'_>,
) -> Result<(Uuid, Uuid), HandlerError> {
    let inserted: Option<(Uuid, Uuid)> = sqlx::query_as(
        "INSERT INTO ops.gate_checks (gate_id, check_name, source_system, status, artifact_ref, deployment_id,
                                      observed_at, metadata, created_by)
         SELECT g.gate_id, $3, $4, $5::ops.ops_check_status, $6, $7, $8, $9, $4
         FROM ops.release_gates g
         WHERE g.release_id = $1 AND g.gate_code = $2::ops.ops_gate_code
           AND ($7::uuid IS NULL
                OR EXISTS (SELECT 1 FROM ops.deployments d WHERE d.deployment_id = $7 AND d.release_id = $1))
         RETURNING check_id, gate_id",
    )
    .bind(check.release_id)
    .bind(check.gate.as_str())
    .bind(check.check_name)
    .bind(check.source_system)
    .bind(check.status)
    .bind(check.artifact_ref)
    .bind(check.deployment_id)
    .bind(check.observed_at)
    .bind(Value::Object(check.metadata))
    .fetch_optional(&mut *conn)
    .await
    .db("insert the check")?;
    if let Some(inserted) = inserted {
        return Ok(inserted);
    }
    release_gate(conn, check.release_id, check.gate).await?;
    if let Some(deployment_id) = check.deployment_id {
        super::deployment::deployment_of_release(conn, check.release_id, deployment_id).await?;
    }
    Err(super::vanished("the check's gate or deployment"))
}

pub async fn build_complete(conn: &mut PgConnection, envelope: &Envelope) -> Result<Handled, HandlerError> {
    let build: BuildComplete = payload(envelope)?;
    check_status(&build.status)?;
    if envelope.gate_code.is_some_and(|gate| gate != GateCode::G1) {
        return Err(HandlerError::bad_request("build_complete is a G1 event"));
    }
    let built_at = fact_time("built_at", build.built_at, envelope)?;
    // The hash describes the log; without the log it would be dropped unseen.
    if build.build_log_sha256.is_some() && build.build_log_url.is_none() {
        return Err(HandlerError::bad_request(
            "build_log_sha256 is given without build_log_url",
        ));
    }

    // The release is looked up by the insert; none written: it is unknown.
    let build_id: Uuid = sqlx::query_scalar(
        "INSERT INTO ops.builds (release_id, git_sha, branch, commit_message, author, built_at, image_digest,
                                 lock_file_hashes, ci_run_url, created_by)
         SELECT r.release_id, $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM ops.releases r WHERE r.release_id = $1
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
    .fetch_optional(&mut *conn)
    .await
    .db("insert the build manifest")?
    .ok_or(HandlerError::UnknownRelease(envelope.release_id))?;

    let mut metadata = build.metadata;
    metadata.insert("build_id".to_owned(), json!(build_id));
    metadata.insert("git_sha".to_owned(), json!(build.git_sha));
    let (check_id, gate) = insert_check(
        conn,
        NewCheck {
            release_id: envelope.release_id,
            gate: GateCode::G1,
            check_name: &build.check_name,
            source_system: &envelope.source_system,
            status: &build.status,
            artifact_ref: build.ci_run_url.as_deref().or(build.build_log_url.as_deref()),
            deployment_id: None,
            observed_at: built_at,
            metadata,
        },
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
    let (check_id, gate) = insert_check(
        conn,
        NewCheck {
            release_id: envelope.release_id,
            gate: gate_code,
            check_name: &check.check_name,
            source_system: &envelope.source_system,
            status: &check.status,
            artifact_ref: check.artifact_ref.as_deref(),
            deployment_id: check.deployment_id,
            observed_at,
            metadata: check.metadata,
        },
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
