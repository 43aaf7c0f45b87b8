//! The event envelope v1.0 (PRD "Event Ingestion Envelope"): parsing a raw
//! message body into a typed envelope, or into a rejection with the HTTP-like
//! code producers see.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::text::quoted;

/// The only schema version this worker understands.
pub const SCHEMA_VERSION: &str = "v1.0";

/// Keys of opsgate's own records; producers may not use them.
pub const RESERVED_KEY_PREFIX: &str = "opsgate/";

/// The longest idempotency key accepted: keys are indexed, and PostgreSQL's
/// index entries hold about 2.7 kB.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;

/// Every event type and the handler family that takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    ReleaseCreated,
    BuildComplete,
    CheckResult,
    EvidenceAttached,
    GateSignoff,
    ExceptionGranted,
    ExceptionReviewed,
    DeploymentEvent,
    HealthCheck,
    EnvironmentEvent,
    IncidentOpened,
    IncidentResolved,
    RecoveryDrill,
}

impl EventType {
    pub const ALL: [EventType; 13] = [
        EventType::ReleaseCreated,
        EventType::BuildComplete,
        EventType::CheckResult,
        EventType::EvidenceAttached,
        EventType::GateSignoff,
        EventType::ExceptionGranted,
        EventType::ExceptionReviewed,
        EventType::DeploymentEvent,
        EventType::HealthCheck,
        EventType::EnvironmentEvent,
        EventType::IncidentOpened,
        EventType::IncidentResolved,
        EventType::RecoveryDrill,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ReleaseCreated => "release_created",
            EventType::BuildComplete => "build_complete",
            EventType::CheckResult => "check_result",
            EventType::EvidenceAttached => "evidence_attached",
            EventType::GateSignoff => "gate_signoff",
            EventType::ExceptionGranted => "exception_granted",
            EventType::ExceptionReviewed => "exception_reviewed",
            EventType::DeploymentEvent => "deployment_event",
            EventType::HealthCheck => "health_check",
            EventType::EnvironmentEvent => "environment_event",
            EventType::IncidentOpened => "incident_opened",
            EventType::IncidentResolved => "incident_resolved",
            EventType::RecoveryDrill => "recovery_drill",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|event| event.as_str() == value)
            .ok_or_else(|| format!("unknown event_type {}", quoted(value)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GateCode {
    G1,
    G2,
    G3,
    G4,
}

impl GateCode {
    pub fn as_str(self) -> &'static str {
        match self {
            GateCode::G1 => "G1",
            GateCode::G2 => "G2",
            GateCode::G3 => "G3",
            GateCode::G4 => "G4",
        }
    }
}

impl fmt::Display for GateCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A valid envelope.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    pub schema_version: String,
    pub idempotency_key: String,
    pub event_type: EventType,
    pub source_system: String,
    pub release_id: Uuid,
    pub gate_code: Option<GateCode>,
    pub payload: Map<String, Value>,
    pub emitted_at: DateTime<Utc>,
}

impl Envelope {
    /// The hash that tells a retry (same hash) from a different event reusing
    /// a key: SHA-256 of the canonical JSON (sorted keys, no whitespace) of
    /// event_type, release_id, gate_code and payload. emitted_at and
    /// source_system are left out, so a retry stamped later is still the same event.
    pub fn payload_hash(&self) -> String {
        let canonical = serde_json::json!({
            "event_type": self.event_type,
            "release_id": self.release_id,
            "gate_code": self.gate_code,
            "payload": self.payload,
        });
        sha256_hex(canonical.to_string().as_bytes())
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What could be read of a message that failed validation, for the ledger.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Partial {
    pub idempotency_key: Option<String>,
    pub event_type: Option<String>,
    pub source_system: Option<String>,
    pub schema_version: Option<String>,
    pub release_id: Option<Uuid>,
}

/// Why a body is not a valid envelope. `code` is the HTTP-like status of the
/// PRD: 400 malformed, 413 too large, 422 unknown schema version.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: u16,
    pub reason: String,
    /// Boxed: a rejection travels in a Result, and Partial is large.
    pub partial: Box<Partial>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.reason)
    }
}

/// Parses and validates a message body of at most `max_bytes`, whatever its
/// content type said.
pub fn parse(body: &[u8], max_bytes: usize) -> Result<Envelope, Rejection> {
    let reject = |code: u16, reason: String, partial: Partial| Rejection {
        code,
        reason,
        partial: Box::new(partial),
    };
    if body.len() > max_bytes {
        return Err(reject(
            413,
            format!("body is {} bytes, over the {max_bytes}-byte limit", body.len()),
            Partial::default(),
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|error| reject(400, format!("body is not UTF-8: {error}"), Partial::default()))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|error| reject(400, format!("body is not JSON: {error}"), Partial::default()))?;
    let Value::Object(mut object) = value else {
        return Err(reject(
            400,
            "body is not a JSON object".to_owned(),
            Partial::default(),
        ));
    };
    let partial = Partial {
        idempotency_key: text_field(&object, "idempotency_key"),
        event_type: text_field(&object, "event_type"),
        source_system: text_field(&object, "source_system"),
        schema_version: text_field(&object, "schema_version"),
        release_id: text_field(&object, "release_id").and_then(|id| Uuid::parse_str(&id).ok()),
    };
    // A NUL reaches a JSON string only as the escape \u0000 (raw control
    // characters are not JSON), so a body without one needs no walk.
    if text.contains("\\u0000")
        && let Some(path) = find_nul_in(&object, "$")
    {
        return Err(reject(400, format!("NUL character in {path}"), partial));
    }

    // The version decides the shape, so it is checked before anything else.
    let schema_version =
        required_text(&object, "schema_version").map_err(|r| reject(400, r, partial.clone()))?;
    if schema_version != SCHEMA_VERSION {
        return Err(reject(
            422,
            format!(
                "unknown schema_version {}; this worker accepts {SCHEMA_VERSION:?}",
                quoted(&schema_version)
            ),
            partial,
        ));
    }
    let field = |result: Result<String, String>| result.map_err(|r| reject(400, r, partial.clone()));
    let idempotency_key = field(required_text(&object, "idempotency_key"))?;
    if idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(reject(
            400,
            format!("idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            partial,
        ));
    }
    if idempotency_key.starts_with(RESERVED_KEY_PREFIX) {
        // The worker and the sweeps key their own records (policy
        // violations, expired exceptions, overdue G4) this way, and write
        // each only if its key is free: a producer's event under such a key
        // would suppress the real record.
        return Err(reject(
            400,
            format!(
                "idempotency_key {} starts with {RESERVED_KEY_PREFIX:?}, which is reserved for opsgate's own records",
                quoted(&idempotency_key)
            ),
            partial,
        ));
    }
    let event_type_text = field(required_text(&object, "event_type"))?;
    let event_type: EventType = event_type_text
        .parse()
        .map_err(|r| reject(400, r, partial.clone()))?;
    let source_system = field(required_text(&object, "source_system"))?;
    let release_id_text = field(required_text(&object, "release_id"))?;
    let release_id = Uuid::parse_str(&release_id_text).map_err(|_| {
        reject(
            400,
            format!("release_id {} is not a UUID", quoted(&release_id_text)),
            partial.clone(),
        )
    })?;
    let gate_code = match object.get("gate_code") {
        None | Some(Value::Null) => None,
        Some(Value::String(code)) => Some(match code.as_str() {
            "G1" => GateCode::G1,
            "G2" => GateCode::G2,
            "G3" => GateCode::G3,
            "G4" => GateCode::G4,
            other => {
                return Err(reject(
                    400,
                    format!("gate_code {} is not one of G1, G2, G3, G4", quoted(other)),
                    partial,
                ));
            }
        }),
        Some(other) => {
            return Err(reject(
                400,
                format!("gate_code must be a string, not {}", kind(other)),
                partial,
            ));
        }
    };
    let payload = match object.remove("payload") {
        Some(Value::Object(payload)) => payload,
        None => return Err(reject(400, "missing field payload".to_owned(), partial)),
        Some(other) => {
            return Err(reject(
                400,
                format!("payload must be an object, not {}", kind(&other)),
                partial,
            ));
        }
    };
    let emitted_at_text = field(required_text(&object, "emitted_at"))?;
    let emitted_at = DateTime::parse_from_rfc3339(&emitted_at_text)
        .map_err(|_| {
            reject(
                400,
                format!(
                    "emitted_at {} is not an ISO 8601 timestamp with offset",
                    quoted(&emitted_at_text)
                ),
                partial.clone(),
            )
        })?
        .to_utc();

    Ok(Envelope {
        schema_version,
        idempotency_key,
        event_type,
        source_system,
        release_id,
        gate_code,
        payload,
        emitted_at,
    })
}

fn text_field(object: &Map<String, Value>, name: &str) -> Option<String> {
    object.get(name).and_then(Value::as_str).map(str::to_owned)
}

fn required_text(object: &Map<String, Value>, name: &str) -> Result<String, String> {
    match object.get(name) {
        None | Some(Value::Null) => Err(format!("missing field {name}")),
        Some(Value::String(text)) if text.trim().is_empty() => Err(format!("field {name} is empty")),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(format!("field {name} must be a string, not {}", kind(other))),
    }
}

pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The JSON path of the first string or key holding a NUL character, which
/// PostgreSQL text and jsonb cannot store.
fn find_nul(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(text) if text.contains('\0') => Some(path.to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| find_nul(item, &format!("{path}[{index}]"))),
        Value::Object(map) => find_nul_in(map, path),
        _ => None,
    }
}

fn find_nul_in(map: &serde_json::Map<String, Value>, path: &str) -> Option<String> {
    map.iter().find_map(|(key, item)| {
        if key.contains('\0') {
            Some(format!("a key of {path}"))
        } else {
            find_nul(item, &format!("{path}.{key}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(overrides: &[(&str, Value)]) -> Vec<u8> {
        let mut envelope = serde_json::json!({
            "schema_version": "v1.0",
            "idempotency_key": "github_actions/r/build_complete/1",
            "event_type": "build_complete",
            "source_system": "github_actions",
            "release_id": "7f0c0a4e-3f8e-4b8e-9a39-7d1f5bb0d6a1",
            "gate_code": "G1",
            "payload": {"status": "pass"},
            "emitted_at": "2026-02-24T10:00:00+08:00"
        });
        for (key, value) in overrides {
            if value.is_null() && *key != "gate_code" {
                envelope.as_object_mut().unwrap().remove(*key);
            } else {
                envelope[*key] = value.clone();
            }
        }
        serde_json::to_vec(&envelope).unwrap()
    }

    #[test]
    fn a_valid_envelope_parses() {
        let envelope = parse(&body(&[]), 1024).unwrap();
        assert_eq!(envelope.event_type, EventType::BuildComplete);
        assert_eq!(envelope.gate_code, Some(GateCode::G1));
        assert_eq!(envelope.emitted_at.to_rfc3339(), "2026-02-24T02:00:00+00:00");
    }

    #[test]
    fn each_required_field_is_required() {
        for field in [
            "schema_version",
            "idempotency_key",
            "event_type",
            "source_system",
            "release_id",
            "payload",
            "emitted_at",
        ] {
            let rejection = parse(&body(&[(field, Value::Null)]), 4096).unwrap_err();
            assert_eq!(rejection.code, 400, "{field}");
            assert!(rejection.reason.contains(field), "{field}: {}", rejection.reason);
        }
    }

    #[test]
    fn codes_follow_the_prd() {
        assert_eq!(parse(&body(&[]), 10).unwrap_err().code, 413);
        assert_eq!(parse(b"\xff\xfe", 100).unwrap_err().code, 400);
        assert_eq!(parse(b"not json", 100).unwrap_err().code, 400);
        assert_eq!(
            parse(&body(&[("schema_version", "v2.0".into())]), 4096)
                .unwrap_err()
                .code,
            422
        );
        assert_eq!(
            parse(&body(&[("event_type", "made_up".into())]), 4096)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            parse(&body(&[("release_id", 42.into())]), 4096).unwrap_err().code,
            400
        );
        assert_eq!(
            parse(&body(&[("payload", "x".into())]), 4096).unwrap_err().code,
            400
        );
        let nul = parse(
            &body(&[("payload", serde_json::json!({"note": "a\u{0}b"}))]),
            4096,
        )
        .unwrap_err();
        assert_eq!(
            (nul.code, nul.reason.as_str()),
            (400, "NUL character in $.payload.note")
        );
    }

    #[test]
    fn a_nul_is_found_in_keys_and_arrays_and_a_written_backslash_u_is_no_nul() {
        let in_key = parse(&body(&[("payload", serde_json::json!({"a\u{0}": 1}))]), 4096).unwrap_err();
        assert_eq!(in_key.reason, "NUL character in a key of $.payload");
        let in_array = parse(
            &body(&[("payload", serde_json::json!({"tags": ["x", "\u{0}"]}))]),
            4096,
        )
        .unwrap_err();
        assert_eq!(in_array.reason, "NUL character in $.payload.tags[1]");
        // The six characters \u0000, not the escape: text, no NUL.
        let written = body(&[("payload", serde_json::json!({"note": "C:\\u0000"}))]);
        assert!(String::from_utf8_lossy(&written).contains("\\\\u0000"));
        assert!(parse(&written, 4096).is_ok());
    }

    #[test]
    fn the_payload_hash_ignores_emission_time_and_key_order() {
        let a = parse(&body(&[]), 4096).unwrap();
        let b = parse(&body(&[("emitted_at", "2026-03-01T00:00:00Z".into())]), 4096).unwrap();
        assert_eq!(a.payload_hash(), b.payload_hash());
        let c = parse(&body(&[("payload", serde_json::json!({"status": "fail"}))]), 4096).unwrap();
        assert_ne!(a.payload_hash(), c.payload_hash());
    }

    #[test]
    fn the_payload_hash_is_what_the_contracts_python_computes() {
        // docs/producer-contract.md §4, run on this envelope (an uppercase
        // release_id, keys out of order, a non-ASCII character).
        let envelope = parse(
            &body(&[
                ("event_type", "check_result".into()),
                ("release_id", "7F8772C0-8C09-5F2B-BD73-261BB305CE49".into()),
                ("gate_code", "G1".into()),
                ("payload", serde_json::json!({"b": 1, "a": "é"})),
            ]),
            4096,
        )
        .unwrap();
        assert_eq!(
            envelope.payload_hash(),
            "b7a0201e3cead6683563a2b305337d1ba5fccde758ff20e6a0b84c0f37b526aa"
        );
    }
}
