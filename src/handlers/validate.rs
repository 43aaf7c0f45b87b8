//! Small validations the handlers share: closed vocabularies, non-blank
//! text, SHA-256 values, and ids derived from the idempotency key.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::HandlerError;
use crate::envelope::Envelope;
use crate::text::quoted;

/// How far ahead of the worker's clock a fact's time may be (producers'
/// clocks drift a little).
pub(crate) const MAX_CLOCK_SKEW_MINUTES: i64 = 5;

/// When the fact happened: the payload's `field` if given, else the
/// envelope's `emitted_at`. A time in the future is a 422: the latest fact
/// decides a check or an approval, so one dated 2099 would outvote every
/// real one until then.
pub(crate) fn fact_time(
    field: &str,
    given: Option<DateTime<Utc>>,
    envelope: &Envelope,
) -> Result<DateTime<Utc>, HandlerError> {
    let (at, named) = match given {
        Some(at) => (at, field),
        None => (envelope.emitted_at, "emitted_at"),
    };
    if at > Utc::now() + Duration::minutes(MAX_CLOCK_SKEW_MINUTES) {
        return Err(HandlerError::unprocessable(format!(
            "{named} {} is more than {MAX_CLOCK_SKEW_MINUTES} minutes in the future; check the producer's clock",
            at.to_rfc3339()
        )));
    }
    Ok(at)
}

/// The values of `ops.ops_environment`.
pub(crate) const ENVIRONMENTS: &[&str] = &["dev", "staging", "production"];

/// A 400 naming `field` unless `value` is one of `allowed`.
pub(crate) fn one_of(field: &str, value: &str, allowed: &[&str]) -> Result<(), HandlerError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(HandlerError::bad_request(format!(
            "{field} {} is not one of {}",
            quoted(value),
            allowed.join(", ")
        )))
    }
}

/// A 400 naming `field` when `value` is empty or only whitespace.
pub(crate) fn not_blank(field: &str, value: &str) -> Result<(), HandlerError> {
    if value.trim().is_empty() {
        Err(HandlerError::bad_request(format!("{field} must not be blank")))
    } else {
        Ok(())
    }
}

/// Like [`not_blank`], for an optional field: absent is fine, blank is not.
pub(crate) fn not_blank_if_given(field: &str, value: Option<&str>) -> Result<(), HandlerError> {
    value.map_or(Ok(()), |value| not_blank(field, value))
}

/// A 400 naming `field` unless `value` is 64 hex characters (a SHA-256).
pub(crate) fn sha256(field: &str, value: Option<&str>) -> Result<(), HandlerError> {
    match value {
        Some(hash) if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            Err(HandlerError::bad_request(format!(
                "{field} {} is not a SHA-256 (64 hex characters)",
                quoted(hash)
            )))
        }
        _ => Ok(()),
    }
}

/// The id a producer did not choose: a UUIDv5 of the envelope's idempotency
/// key (namespace OID), so every retry of the event names the same record.
pub(crate) fn key_uuid(envelope: &Envelope) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, envelope.idempotency_key.as_bytes())
}
