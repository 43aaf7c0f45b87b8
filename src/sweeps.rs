//! Scheduled sweeps: expire exceptions and flag overdue G4 confirmations.
//! The work is done by SQL functions that take `now` as a parameter and
//! serialize on advisory locks, so any number of workers may run them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::SweepSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    pub expired_exceptions: i64,
    pub overdue_g4: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("failed to run the sweeps at {now}: {source}")]
pub struct SweepError {
    now: DateTime<Utc>,
    #[source]
    source: sqlx::Error,
}

/// Runs every sweep once, as of `now`.
pub async fn run_once(pool: &PgPool, now: DateTime<Utc>) -> Result<SweepReport, SweepError> {
    let report: serde_json::Value = sqlx::query_scalar("SELECT ops.run_sweeps($1)")
        .bind(now)
        .fetch_one(pool)
        .await
        .map_err(|source| SweepError { now, source })?;
    Ok(SweepReport {
        expired_exceptions: report["expired_exceptions"].as_i64().unwrap_or(0),
        overdue_g4: report["overdue_g4"].as_i64().unwrap_or(0),
    })
}

/// Runs the sweeps every `interval_secs` until `cancel` fires. Failures are
/// logged and retried at the next tick; they never stop the loop.
pub async fn run_periodically(pool: PgPool, settings: SweepSettings, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(settings.interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match run_once(&pool, Utc::now()).await {
            Ok(report) if report.expired_exceptions + report.overdue_g4 > 0 => {
                tracing::info!(
                    expired_exceptions = report.expired_exceptions,
                    overdue_g4 = report.overdue_g4,
                    "sweeps acted"
                );
            }
            Ok(_) => tracing::debug!("sweeps found nothing to do"),
            Err(error) => {
                tracing::warn!(error = %error, "sweeps failed; retrying at the next interval")
            }
        }
    }
}
