use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Settings;
use crate::{database, policy};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the policies in force as JSON.
    Show,
    /// Write the policies of a file (default: <config-dir>/gate_policies.toml).
    Apply(ApplyArgs),
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Policy file to apply.
    #[arg(long)]
    file: Option<PathBuf>,
}

pub async fn run(settings: &Settings, config_dir: &Path, command: PolicyCommand) -> anyhow::Result<ExitCode> {
    let pool = database::connect(&settings.database).await?;
    match command {
        PolicyCommand::Show => super::print_json(&policy::current(&pool).await?)?,
        PolicyCommand::Apply(args) => {
            let path = args.file.unwrap_or_else(|| config_dir.join("gate_policies.toml"));
            let policies = policy::read_file(&path)?;
            let changed = policy::apply(&pool, &policies).await?;
            if changed.is_empty() {
                out!(
                    "{} policies in {} are already in force",
                    policies.len(),
                    path.display()
                )?;
            }
            for policy in &changed {
                out!("updated policy {}/{}", policy.gate, policy.environment)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
