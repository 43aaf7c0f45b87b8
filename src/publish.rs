//! Building envelopes for producers (`opsgate publish`): the idempotency key
//! and, for `release_created`, the release id are derived from the content,
//! so a retried CI job publishes the very same event.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::envelope::{EventType, GateCode, SCHEMA_VERSION, sha256_hex};

/// The namespace of release ids derived from `<project>/<release_name>`.
pub const RELEASE_NAMESPACE: Uuid = Uuid::from_u128(0x6f70_7367_6174_6552_656c_6561_7365_4964);

/// The release id of `project`/`release_name`: a UUIDv5, the same on every run.
pub fn release_id_for(project: &str, release_name: &str) -> Uuid {
    Uuid::new_v5(&RELEASE_NAMESPACE, format!("{project}/{release_name}").as_bytes())
}

/// `<source_system>/<release_id>/<event_type>/<hash of payload>` (PRD format),
/// the hash being the first 16 hex characters of SHA-256 over the canonical
/// JSON of the gate code and the payload (the same payload for two gates is
/// two events).
pub fn idempotency_key(
    source_system: &str,
    release_id: Uuid,
    event_type: EventType,
    gate_code: Option<GateCode>,
    payload: &Map<String, Value>,
) -> String {
    let canonical = json!({"gate_code": gate_code, "payload": payload});
    let hash = sha256_hex(canonical.to_string().as_bytes());
    format!("{source_system}/{release_id}/{event_type}/{}", &hash[..16])
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error(
        "--release is required for {0} (only release_created can derive it from project and release_name)"
    )]
    MissingRelease(EventType),
    #[error(
        "release_created needs string fields project and release_name in its payload to derive the release id"
    )]
    CannotDeriveRelease,
}

/// What a producer says about one event.
#[derive(Debug, Clone)]
pub struct EventSpec {
    pub event_type: EventType,
    pub source_system: String,
    pub release_id: Option<Uuid>,
    pub gate_code: Option<GateCode>,
    pub idempotency_key: Option<String>,
    pub payload: Map<String, Value>,
    pub emitted_at: DateTime<Utc>,
}

/// The envelope v1.0 for `spec`.
pub fn build_envelope(spec: &EventSpec) -> Result<Value, EnvelopeError> {
    let release_id = match spec.release_id {
        Some(id) => id,
        None if spec.event_type == EventType::ReleaseCreated => {
            let text = |name| spec.payload.get(name).and_then(Value::as_str);
            match (text("project"), text("release_name")) {
                (Some(project), Some(name)) => release_id_for(project, name),
                _ => return Err(EnvelopeError::CannotDeriveRelease),
            }
        }
        None => return Err(EnvelopeError::MissingRelease(spec.event_type)),
    };
    let key = spec.idempotency_key.clone().unwrap_or_else(|| {
        idempotency_key(
            &spec.source_system,
            release_id,
            spec.event_type,
            spec.gate_code,
            &spec.payload,
        )
    });
    Ok(json!({
        "schema_version": SCHEMA_VERSION,
        "idempotency_key": key,
        "event_type": spec.event_type,
        "source_system": spec.source_system,
        "release_id": release_id,
        "gate_code": spec.gate_code,
        "payload": spec.payload,
        "emitted_at": spec.emitted_at.to_rfc3339(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(event_type: EventType, payload: Value) -> EventSpec {
        EventSpec {
            event_type,
            source_system: "github_actions".into(),
            release_id: None,
            gate_code: None,
            idempotency_key: None,
            payload: payload.as_object().cloned().unwrap_or_default(),
            emitted_at: Utc::now(),
        }
    }

    #[test]
    fn release_created_derives_a_stable_release_id_and_key() {
        let payload =
            json!({"project": "acme/odoo", "release_name": "v1", "environment_target": "production"});
        let first = build_envelope(&spec(EventType::ReleaseCreated, payload.clone())).unwrap();
        let retry = build_envelope(&spec(EventType::ReleaseCreated, payload)).unwrap();
        assert_eq!(first["release_id"], retry["release_id"]);
        assert_eq!(first["idempotency_key"], retry["idempotency_key"]);
        assert_eq!(first["release_id"], json!(release_id_for("acme/odoo", "v1")));
        let key = first["idempotency_key"].as_str().unwrap();
        assert!(key.starts_with(&format!(
            "github_actions/{}/release_created/",
            release_id_for("acme/odoo", "v1")
        )));
    }

    #[test]
    fn the_same_payload_for_two_gates_gets_two_keys() {
        let mut g2 = spec(
            EventType::GateSignoff,
            json!({"approver_id": "x", "decision": "approved"}),
        );
        g2.release_id = Some(Uuid::nil());
        g2.gate_code = Some(GateCode::G2);
        let mut g3 = g2.clone();
        g3.gate_code = Some(GateCode::G3);
        assert_ne!(
            build_envelope(&g2).unwrap()["idempotency_key"],
            build_envelope(&g3).unwrap()["idempotency_key"]
        );
    }

    #[test]
    fn other_events_need_a_release() {
        assert_eq!(
            build_envelope(&spec(EventType::BuildComplete, json!({}))),
            Err(EnvelopeError::MissingRelease(EventType::BuildComplete))
        );
    }

    #[test]
    fn a_different_payload_gets_a_different_key() {
        let mut a = spec(EventType::CheckResult, json!({"status": "pass"}));
        a.release_id = Some(Uuid::nil());
        let mut b = a.clone();
        b.payload.insert("status".into(), json!("fail"));
        assert_ne!(
            build_envelope(&a).unwrap()["idempotency_key"],
            build_envelope(&b).unwrap()["idempotency_key"]
        );
    }
}
