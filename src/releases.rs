//! Reading release state for people and pipelines: gates with their
//! explanations, and promotion eligibility. The database evaluates; this
//! module only asks.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// A release named by id, or by `<project>/<release_name>` (the project may
/// itself contain slashes: `acme/odoo/v2026.02.4`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseRef {
    Id(Uuid),
    Name { project: String, release_name: String },
}

impl FromStr for ReleaseRef {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = Uuid::parse_str(value) {
            return Ok(ReleaseRef::Id(id));
        }
        match value.rsplit_once('/') {
            Some((project, name)) if !project.is_empty() && !name.is_empty() => Ok(ReleaseRef::Name {
                project: project.to_owned(),
                release_name: name.to_owned(),
            }),
            _ => Err(format!(
                "{value:?} is neither a release id (UUID) nor <project>/<release_name>"
            )),
        }
    }
}

impl fmt::Display for ReleaseRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReleaseRef::Id(id) => write!(f, "{id}"),
            ReleaseRef::Name {
                project,
                release_name,
            } => write!(f, "{project}/{release_name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("release {0} does not exist")]
    NotFound(ReleaseRef),
    #[error("{release} names more than one release (among them {first} and {second}): use the release id")]
    Ambiguous {
        release: ReleaseRef,
        first: Uuid,
        second: Uuid,
    },
    #[error("unknown environment {0:?}: expected dev, staging or production")]
    UnknownEnvironment(String),
    #[error("failed to {action} for release {release}: {source}")]
    Query {
        action: &'static str,
        release: String,
        #[source]
        source: sqlx::Error,
    },
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Gate {
    pub gate_code: String,
    pub gate_name: String,
    pub status: String,
    pub exception_id: Option<Uuid>,
    pub explanation: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Release {
    pub release_id: Uuid,
    pub project: String,
    pub release_name: String,
    pub environment_target: String,
    pub source_ref: String,
    pub status: String,
    pub initiating_actor: String,
    #[sqlx(skip)]
    pub gates: Vec<Gate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Eligibility {
    pub release_id: Uuid,
    pub target_env: String,
    pub eligible: bool,
    pub blockers: Vec<String>,
}

pub async fn resolve(pool: &PgPool, release: &ReleaseRef) -> Result<Uuid, ReleaseError> {
    let query_error = |source| ReleaseError::Query {
        action: "look up",
        release: release.to_string(),
        source,
    };
    let found: Option<Uuid> = match release {
        ReleaseRef::Id(id) => sqlx::query_scalar("SELECT release_id FROM ops.releases WHERE release_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(query_error)?,
        ReleaseRef::Name { .. } => {
            // Project and name may both hold slashes (`acme/odoo` and
            // `hotfix/login`): every split of the text is a reading, each
            // looked up by the (project, release_name) key.
            let text = release.to_string();
            let (projects, names): (Vec<&str>, Vec<&str>) = text
                .match_indices('/')
                .map(|(at, _)| (&text[..at], &text[at + 1..]))
                .filter(|(project, name)| !project.is_empty() && !name.is_empty())
                .unzip();
            let matches: Vec<Uuid> = sqlx::query_scalar(
                "SELECT r.release_id
                 FROM unnest($1::text[], $2::text[]) AS reading (project, release_name)
                 JOIN ops.releases r USING (project, release_name)
                 ORDER BY r.release_id LIMIT 2",
            )
            .bind(&projects)
            .bind(&names)
            .fetch_all(pool)
            .await
            .map_err(query_error)?;
            match matches.as_slice() {
                [] => None,
                [only] => Some(*only),
                [first, second, ..] => {
                    return Err(ReleaseError::Ambiguous {
                        release: release.clone(),
                        first: *first,
                        second: *second,
                    });
                }
            }
        }
    };
    found.ok_or_else(|| ReleaseError::NotFound(release.clone()))
}

/// The release with every gate evaluated now.
pub async fn show(pool: &PgPool, release_id: Uuid) -> Result<Release, ReleaseError> {
    let query_error = |action| {
        move |source| ReleaseError::Query {
            action,
            release: release_id.to_string(),
            source,
        }
    };
    let mut release: Release = sqlx::query_as(
        "SELECT release_id, project, release_name, environment_target::text, source_ref, status::text,
                initiating_actor
         FROM ops.releases WHERE release_id = $1",
    )
    .bind(release_id)
    .fetch_optional(pool)
    .await
    .map_err(query_error("read the release"))?
    .ok_or(ReleaseError::NotFound(ReleaseRef::Id(release_id)))?;
    release.gates = sqlx::query_as(
        "SELECT g.gate_code::text, g.gate_name, e.status::text, e.exception_id, e.explanation
         FROM ops.release_gates g, ops.evaluate_gate(g.gate_id) e
         WHERE g.release_id = $1 ORDER BY g.gate_code",
    )
    .bind(release_id)
    .fetch_all(pool)
    .await
    .map_err(query_error("evaluate the gates"))?;
    Ok(release)
}

pub async fn eligibility(
    pool: &PgPool,
    release_id: Uuid,
    target_env: &str,
) -> Result<Eligibility, ReleaseError> {
    if !["dev", "staging", "production"].contains(&target_env) {
        return Err(ReleaseError::UnknownEnvironment(target_env.to_owned()));
    }
    let blockers: Vec<String> = sqlx::query_scalar("SELECT ops.promotion_blockers($1, $2)")
        .bind(release_id)
        .bind(target_env)
        .fetch_all(pool)
        .await
        .map_err(|source| ReleaseError::Query {
            action: "evaluate promotion eligibility",
            release: release_id.to_string(),
            source,
        })?;
    Ok(Eligibility {
        release_id,
        target_env: target_env.to_owned(),
        eligible: blockers.is_empty(),
        blockers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_refs_parse_ids_and_names() {
        let id = Uuid::new_v4();
        assert_eq!(id.to_string().parse::<ReleaseRef>(), Ok(ReleaseRef::Id(id)));
        assert_eq!(
            "acme/odoo/v2026.02.4".parse::<ReleaseRef>(),
            Ok(ReleaseRef::Name {
                project: "acme/odoo".into(),
                release_name: "v2026.02.4".into()
            })
        );
        assert!("v1".parse::<ReleaseRef>().is_err());
        assert!("acme/".parse::<ReleaseRef>().is_err());
    }
}
