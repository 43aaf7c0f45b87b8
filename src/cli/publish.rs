//! `opsgate publish`: how CI and scripts hand an event to opsgate.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use clap::Args;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::broker::{self, PublishError, Publisher};
use crate::config::Settings;
use crate::envelope::{EventType, GateCode};
use crate::publish::{EventSpec, build_envelope};

/// Exit codes of `opsgate publish`.
const REJECTED: u8 = 2;
const UNDELIVERED: u8 = 3;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Event type, e.g. build_complete (not needed with --envelope).
    #[arg(long, required_unless_present = "envelope")]
    event: Option<String>,
    /// Release id; derived from project/release_name for release_created.
    #[arg(long)]
    release: Option<Uuid>,
    /// Gate code G1..G4 when the event is gate-scoped.
    #[arg(long)]
    gate: Option<String>,
    /// source_system of the envelope.
    #[arg(long, env = "OPSGATE_SOURCE_SYSTEM", default_value = "manual")]
    source: String,
    /// Idempotency key; default <source>/<release>/<event>/<hash of gate and payload>.
    #[arg(long)]
    key: Option<String>,
    /// Payload: inline JSON, @file.json, or - for standard input. Numbers are
    /// read as 64-bit integers or doubles; send exact decimals as strings.
    #[arg(long, default_value = "{}")]
    payload: String,
    /// A whole envelope instead of the flags above: inline JSON, @file.json, or -.
    #[arg(long, conflicts_with_all = ["event", "release", "gate", "key", "payload"])]
    envelope: Option<String>,
    /// Wait for the worker's reply and print it.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait for the reply with --wait (1 to 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
}

fn read_json(argument: &str, what: &str) -> anyhow::Result<Value> {
    let text = read_text(argument, what)?;
    serde_json::from_str(&text).map_err(|error| anyhow::anyhow!("{what} is not JSON: {error}"))
}

/// `argument` itself, or the content of `@file` or of stdin (`-`).
fn read_text(argument: &str, what: &str) -> anyhow::Result<String> {
    Ok(if argument == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|error| anyhow::anyhow!("cannot read {what} from standard input: {error}"))?;
        text
    } else if let Some(path) = argument.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|error| anyhow::anyhow!("cannot read {what} file {path}: {error}"))?
    } else {
        argument.to_owned()
    })
}

/// The envelope to publish, and the body that carries it: a whole envelope
/// given with --envelope goes out byte for byte as given (a dead letter
/// replayed is the same message; re-encoding would reorder keys and round
/// large numbers), once it is known to be JSON.
fn envelope_of(args: &PublishArgs) -> anyhow::Result<(Value, Vec<u8>)> {
    if let Some(argument) = &args.envelope {
        let text = read_text(argument, "envelope")?;
        let envelope: Value =
            serde_json::from_str(&text).map_err(|error| anyhow::anyhow!("envelope is not JSON: {error}"))?;
        return Ok((envelope, text.into_bytes()));
    }
    let event_type: EventType = args
        .event
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|error: String| anyhow::anyhow!("{error}"))?;
    let gate_code = match args.gate.as_deref() {
        None => None,
        Some("G1") => Some(GateCode::G1),
        Some("G2") => Some(GateCode::G2),
        Some("G3") => Some(GateCode::G3),
        Some("G4") => Some(GateCode::G4),
        Some(other) => anyhow::bail!("--gate {other:?} is not one of G1, G2, G3, G4"),
    };
    let payload: Map<String, Value> = match read_json(&args.payload, "payload")? {
        Value::Object(map) => map,
        _ => anyhow::bail!("payload must be a JSON object"),
    };
    let envelope = build_envelope(&EventSpec {
        event_type,
        source_system: args.source.clone(),
        release_id: args.release,
        gate_code,
        idempotency_key: args.key.clone(),
        payload,
        emitted_at: Utc::now(),
    })?;
    let body = serde_json::to_vec(&envelope)?;
    Ok((envelope, body))
}

pub async fn run(settings: &Settings, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let (envelope, body) = envelope_of(&args)?;
    let routing_key = envelope["event_type"].as_str().unwrap_or("unknown").to_owned();

    let connection = broker::connect(&settings.amqp, "opsgate-publish").await?;
    let publisher = Publisher::new(&connection, settings.amqp.confirm_timeout()).await?;
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(Uuid::new_v4().to_string().into());
    let mut replies = None;
    if args.wait {
        // Direct reply-to: consume the pseudo-queue on the publishing channel, no ack.
        let consumer = publisher
            .channel()
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let consumer = match consumer {
            Ok(consumer) => consumer,
            Err(error) => {
                crate::broker::quietly(connection.close(200, "no reply consumer".into())).await;
                return Err(anyhow::Error::new(error)
                    .context("cannot consume direct reply-to (amq.rabbitmq.reply-to) for --wait"));
            }
        };
        replies = Some(consumer);
        properties = properties
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(Uuid::new_v4().to_string().into());
    }

    let published = publisher
        .publish(&settings.amqp.namespace, &routing_key, &body, properties, true)
        .await;
    let key = envelope["idempotency_key"].as_str().unwrap_or_default();
    match published {
        Ok(()) => {}
        Err(
            error @ (PublishError::Unroutable { .. }
            | PublishError::Timeout { .. }
            | PublishError::Nacked { .. }
            | PublishError::Broker { .. }),
        ) => {
            super::print_error(&error);
            crate::broker::quietly(connection.close(200, "not published".into())).await;
            return Ok(ExitCode::from(UNDELIVERED));
        }
        Err(error) => return Err(error.into()),
    }
    let Some(mut replies) = replies else {
        printed(out!("published {key}"));
        crate::broker::quietly(connection.close(200, "published".into())).await;
        return Ok(ExitCode::SUCCESS);
    };
    let reply = tokio::time::timeout(Duration::from_secs(args.timeout), replies.next()).await;
    let code = match reply {
        Ok(Some(Ok(delivery))) => {
            let outcome: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
            printed(out!("{}", serde_json::to_string_pretty(&outcome)?));
            match outcome["status"].as_str() {
                Some("accepted" | "duplicate") => ExitCode::SUCCESS,
                _ => ExitCode::from(REJECTED),
            }
        }
        Ok(_) => {
            eprintln!("error: the reply channel closed before the worker answered {key}");
            ExitCode::from(UNDELIVERED)
        }
        Err(_) => {
            eprintln!(
                "error: no reply for {key} within {}s (is `opsgate worker` running?)",
                args.timeout
            );
            ExitCode::from(UNDELIVERED)
        }
    };
    crate::broker::quietly(connection.close(200, "published".into())).await;
    Ok(code)
}

/// The event is published whether or not its report can be printed; the
/// exit code says what happened to it, so a failed print is only reported.
fn printed(result: std::io::Result<()>) {
    if let Err(error) = result {
        eprintln!("warning: failed to print to stdout: {error}");
    }
}
