//! Domain handlers: one module per event family. Each takes a valid envelope
//! and the ingest transaction, writes facts, and returns a JSON result that
//! the ledger keeps (a duplicate is answered with it). Gate, G4 and release
//! state are never written here: the database derives them from the facts.

use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::envelope::{Envelope, EventType, GateCode};
use crate::text::{QUOTED_CHARS, clipped};

mod approval;
mod build;
mod deployment;
mod environment;
mod evidence;
mod exception;
mod incident;
mod release;
mod validate;

/// Why a handler did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Permanent: retrying the same message cannot succeed (400, 409, 422).
    #[error("{message}")]
    Rejected { code: u16, message: String },
    /// The release is not known yet: its release_created may still be on the
    /// way, so the event is retried and becomes 409 only when retries run out.
    #[error("release {0} is unknown")]
    UnknownRelease(Uuid),
    /// A record the event refers to is not known yet (retried like a release).
    #[error("{kind} {id} is unknown")]
    UnknownReference { kind: &'static str, id: Uuid },
    /// A record the event refers to is not in the state it needs yet, and
    /// the event that moves it may still be on the way (retried like a
    /// release).
    #[error("{0}")]
    NotYet(String),
    /// A database error; `ingest` decides whether it is transient.
    #[error("{action}: {source}")]
    Database {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl HandlerError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        HandlerError::Rejected {
            code: 400,
            message: message.into(),
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        HandlerError::Rejected {
            code: 409,
            message: message.into(),
        }
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        HandlerError::Rejected {
            code: 422,
            message: message.into(),
        }
    }
}

/// `.db("insert the check")?` on a sqlx result: names the step that failed.
pub(crate) trait DbContext<T> {
    fn db(self, action: &'static str) -> Result<T, HandlerError>;
}

impl<T> DbContext<T> for Result<T, sqlx::Error> {
    fn db(self, action: &'static str) -> Result<T, HandlerError> {
        self.map_err(|source| HandlerError::Database { action, source })
    }
}

/// The envelope's payload as `T`; a missing or ill-typed field is a 400 that
/// names it (`payload.deployed_at: …`; a missing field names itself).
pub(crate) fn payload<T: DeserializeOwned>(envelope: &Envelope) -> Result<T, HandlerError> {
    serde_path_to_error::deserialize(Value::Object(envelope.payload.clone())).map_err(|error| {
        let path = error.path().to_string();
        let reason = clipped(&error.inner().to_string(), QUOTED_CHARS * 2).into_owned();
        let message = if path == "." {
            format!("invalid {} payload: {reason}", envelope.event_type)
        } else {
            format!(
                "invalid {} payload: payload.{path}: {reason}",
                envelope.event_type
            )
        };
        HandlerError::bad_request(message)
    })
}

/// The envelope's gate_code, required by this event type.
pub(crate) fn required_gate(envelope: &Envelope) -> Result<GateCode, HandlerError> {
    envelope
        .gate_code
        .ok_or_else(|| HandlerError::bad_request(format!("{} needs gate_code", envelope.event_type)))
}

/// Fails with UnknownRelease unless the envelope's release exists; returns
/// its initiating actor.
pub(crate) async fn existing_release(
    conn: &mut PgConnection,
    release_id: Uuid,
) -> Result<String, HandlerError> {
    sqlx::query_scalar("SELECT initiating_actor FROM ops.releases WHERE release_id = $1")
        .bind(release_id)
        .fetch_optional(conn)
        .await
        .db("look up the release")?
        .ok_or(HandlerError::UnknownRelease(release_id))
}

/// The gate row of a release (in one query); fails with UnknownRelease
/// unless the release exists.
pub(crate) async fn release_gate(
    conn: &mut PgConnection,
    release_id: Uuid,
    gate: GateCode,
) -> Result<Uuid, HandlerError> {
    sqlx::query_scalar(
        "SELECT g.gate_id FROM ops.releases r
         JOIN ops.release_gates g ON g.release_id = r.release_id AND g.gate_code = $2::ops.ops_gate_code
         WHERE r.release_id = $1",
    )
    .bind(release_id)
    .bind(gate.as_str())
    .fetch_optional(conn)
    .await
    .db("look up the release's gate")?
    .ok_or(HandlerError::UnknownRelease(release_id))
}

/// A write that looks up what it refers to in its own statement wrote
/// nothing, yet each lookup alone finds its row: a direct writer changed
/// the rows in between (the worker's own writes of a release are serialized
/// by the release lock).
pub(crate) fn vanished(what: &str) -> HandlerError {
    HandlerError::conflict(format!("{what} changed while the event was being applied"))
}

/// What a handler returns: its JSON result, and the derived state the result
/// reports. That state is read when the ledger stores the result, after
/// every write of the transaction and the derivation they call for
/// (`derive_pending`), so it is the state the transaction commits.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub result: Value,
    pub reports: Reports,
}

/// Derived state a result reports, each under its key: `gate_status` of a
/// gate, `g4_status` of a deployment, `release_status` of a release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reports {
    pub gate_status_of: Option<Uuid>,
    pub g4_status_of: Option<Uuid>,
    pub release_status_of: Option<Uuid>,
}

impl Handled {
    pub fn reporting_gate(result: Value, gate: Option<Uuid>) -> Self {
        Handled {
            result,
            reports: Reports {
                gate_status_of: gate,
                ..Reports::default()
            },
        }
    }
}

impl From<Value> for Handled {
    fn from(result: Value) -> Self {
        Handled {
            result,
            reports: Reports::default(),
        }
    }
}

/// Derives what the facts of this transaction left pending (migration 0016:
/// the worker's transactions derive each release once, at their end), for
/// one release or for all. Called before anything reads derived state.
pub async fn derive_pending(conn: &mut PgConnection, release: Option<Uuid>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT ops.derive_pending($1)")
        .bind(release)
        .execute(conn)
        .await?;
    Ok(())
}

/// Applies `envelope` inside the ingest transaction `conn`.
pub async fn dispatch(conn: &mut PgConnection, envelope: &Envelope) -> Result<Handled, HandlerError> {
    match envelope.event_type {
        EventType::ReleaseCreated => release::release_created(conn, envelope).await.map(Handled::from),
        EventType::BuildComplete => build::build_complete(conn, envelope).await,
        EventType::CheckResult => build::check_result(conn, envelope).await,
        EventType::EvidenceAttached => evidence::evidence_attached(conn, envelope).await,
        EventType::GateSignoff => approval::gate_signoff(conn, envelope).await,
        EventType::ExceptionGranted => exception::exception_granted(conn, envelope)
            .await
            .map(Handled::from),
        EventType::ExceptionReviewed => exception::exception_reviewed(conn, envelope)
            .await
            .map(Handled::from),
        EventType::DeploymentEvent => deployment::deployment_event(conn, envelope).await,
        EventType::HealthCheck => deployment::health_check(conn, envelope).await,
        EventType::EnvironmentEvent => environment::environment_event(conn, envelope)
            .await
            .map(Handled::from),
        EventType::IncidentOpened => incident::incident_opened(conn, envelope).await.map(Handled::from),
        EventType::IncidentResolved => incident::incident_resolved(conn, envelope)
            .await
            .map(Handled::from),
        EventType::RecoveryDrill => incident::recovery_drill(conn, envelope).await.map(Handled::from),
    }
}
