//! Gate policies as data: `config/gate_policies.toml` <-> `ops.gate_policies`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
#[serde(deny_unknown_fields)]
pub struct GatePolicy {
    pub gate: String,
    pub environment: String,
    #[serde(default)]
    pub min_passing_checks: i32,
    #[serde(default)]
    pub approver_roles: Vec<String>,
    #[serde(default)]
    pub evidence_any_of: Vec<String>,
    #[serde(default)]
    pub evidence_all_of: Vec<String>,
    #[serde(default)]
    pub requires_gates: Vec<String>,
    #[serde(default)]
    pub separation_of_duties: bool,
    #[serde(default)]
    pub sla_minutes: Option<i32>,
    #[serde(default = "default_overdue_action")]
    pub overdue_action: String,
}

fn default_overdue_action() -> String {
    "fail".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    policy: Vec<GatePolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("policy {gate}/{environment} is listed twice in {path}")]
    Duplicate {
        path: String,
        gate: String,
        environment: String,
    },
    #[error("policy {gate}/{environment} was refused by the database: {source}")]
    Rejected {
        gate: String,
        environment: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to {action}: {source}")]
    Database {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

pub fn read_file(path: &Path) -> Result<Vec<GatePolicy>, PolicyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: shown.clone(),
        source,
    })?;
    let file: PolicyFile = toml::from_str(&text).map_err(|source| PolicyError::Parse {
        path: shown.clone(),
        source,
    })?;
    let mut seen = std::collections::BTreeSet::new();
    for policy in &file.policy {
        if !seen.insert((policy.gate.clone(), policy.environment.clone())) {
            return Err(PolicyError::Duplicate {
                path: shown,
                gate: policy.gate.clone(),
                environment: policy.environment.clone(),
            });
        }
    }
    Ok(file.policy)
}

/// The policies in force, in gate and environment order.
pub async fn current(pool: &PgPool) -> Result<Vec<GatePolicy>, PolicyError> {
    sqlx::query_as(
        "SELECT gate_code::text AS gate, environment::text AS environment, min_passing_checks,
                approver_roles::text[] AS approver_roles, evidence_any_of::text[] AS evidence_any_of,
                evidence_all_of::text[] AS evidence_all_of, requires_gates::text[] AS requires_gates,
                separation_of_duties, sla_minutes, overdue_action
         FROM ops.gate_policies ORDER BY gate_code, environment",
    )
    .fetch_all(pool)
    .await
    .map_err(|source| PolicyError::Database {
        action: "read ops.gate_policies",
        source,
    })
}

/// Writes `policies` in one transaction and returns those that changed. The
/// database validates every value (enums, G4 SLA) and re-evaluates releases.
pub async fn apply(pool: &PgPool, policies: &[GatePolicy]) -> Result<Vec<GatePolicy>, PolicyError> {
    let before = current(pool).await?;
    let changed: Vec<GatePolicy> = policies.iter().filter(|p| !before.contains(p)).cloned().collect();
    if changed.is_empty() {
        return Ok(changed);
    }
    let database = |action| move |source| PolicyError::Database { action, source };
    let mut tx = pool.begin().await.map_err(database("begin a transaction"))?;
    for policy in &changed {
        sqlx::query(
            "INSERT INTO ops.gate_policies
                 (gate_code, environment, min_passing_checks, approver_roles, evidence_any_of, evidence_all_of,
                  requires_gates, separation_of_duties, sla_minutes, overdue_action)
             VALUES ($1::ops.ops_gate_code, $2::ops.ops_environment, $3, $4::ops.ops_persona_role[],
                     $5::ops.ops_artifact_type[], $6::ops.ops_artifact_type[], $7::ops.ops_gate_code[], $8, $9, $10)
             ON CONFLICT (gate_code, environment) DO UPDATE SET
                 min_passing_checks = EXCLUDED.min_passing_checks,
                 approver_roles = EXCLUDED.approver_roles,
                 evidence_any_of = EXCLUDED.evidence_any_of,
                 evidence_all_of = EXCLUDED.evidence_all_of,
                 requires_gates = EXCLUDED.requires_gates,
                 separation_of_duties = EXCLUDED.separation_of_duties,
                 sla_minutes = EXCLUDED.sla_minutes,
                 overdue_action = EXCLUDED.overdue_action,
                 updated_at = now(),
                 updated_by = ops.acting_identity()",
        )
        .bind(&policy.gate)
        .bind(&policy.environment)
        .bind(policy.min_passing_checks)
        .bind(&policy.approver_roles)
        .bind(&policy.evidence_any_of)
        .bind(&policy.evidence_all_of)
        .bind(&policy.requires_gates)
        .bind(policy.separation_of_duties)
        .bind(policy.sla_minutes)
        .bind(&policy.overdue_action)
        .execute(&mut *tx)
        .await
        .map_err(|source| PolicyError::Rejected {
            gate: policy.gate.clone(),
            environment: policy.environment.clone(),
            source,
        })?;
    }
    tx.commit().await.map_err(database("commit the policies"))?;
    Ok(changed)
}
