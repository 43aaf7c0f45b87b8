//! opsgate: the release-governance control plane for an Odoo platform.
//!
//! PostgreSQL (`ops.*`) is the system of record; producers publish event
//! envelopes to RabbitMQ and `opsgate worker` turns them into facts.

pub mod broker;
pub mod cli;
pub mod config;
pub mod database;
pub mod envelope;
pub mod handlers;
pub mod ingest;
pub mod ledger;
pub mod policy;
pub mod publish;
pub mod releases;
pub mod shutdown;
pub mod sweeps;
pub mod telemetry;
pub mod text;
pub mod worker;
