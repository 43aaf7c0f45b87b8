use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::{database, sweeps};

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Run once and exit (otherwise repeat every sweeps.interval_secs until Ctrl-C).
    #[arg(long)]
    once: bool,
    /// Sweep as of this RFC 3339 time instead of now (with --once).
    #[arg(long, requires = "once")]
    now: Option<DateTime<Utc>>,
}

pub async fn run(settings: &Settings, args: SweepArgs) -> anyhow::Result<ExitCode> {
    let pool = database::connect(&settings.database).await?;
    if args.once {
        let report = sweeps::run_once(&pool, args.now.unwrap_or_else(Utc::now)).await?;
        super::print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    let mut signals = crate::shutdown::StopSignals::install();
    tokio::spawn(async move {
        signals.next().await;
        on_signal.cancel();
    });
    sweeps::run_periodically(pool, settings.sweeps.clone(), cancel).await;
    Ok(ExitCode::SUCCESS)
}
