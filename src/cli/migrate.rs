use std::process::ExitCode;

use crate::config::Settings;
use crate::database;

pub async fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    let report = database::migrate(&settings.database).await?;
    let address = settings.database.address();
    if report.created_database {
        out!("created database {address}")?;
    }
    if report.applied.is_empty() {
        out!("{address} is up to date: no pending migrations")?;
    } else {
        for migration in &report.applied {
            out!("applied {migration}")?;
        }
        out!("{address}: {} migration(s) applied", report.applied.len())?;
    }
    Ok(ExitCode::SUCCESS)
}
