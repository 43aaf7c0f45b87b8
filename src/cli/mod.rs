//! The `opsgate` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Settings};

mod migrate;

#[derive(Debug, Parser)]
#[command(
    name = "opsgate",
    version,
    about = "Release-governance control plane for an Odoo platform"
)]
pub struct Cli {
    /// Directory holding default.toml and <stage>.toml.
    #[arg(
        long,
        global = true,
        env = "OPSGATE_CONFIG_DIR",
        default_value = "config"
    )]
    pub config_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database when missing and apply pending migrations.
    Migrate,
    /// Print the effective settings (passwords redacted).
    Config,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = config::load(&cli.config_dir)?;
    crate::telemetry::init(&settings.log);
    match cli.command {
        Command::Migrate => migrate::run(&settings).await,
        Command::Config => {
            print_settings(&settings);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_settings(settings: &Settings) {
    println!("{settings:#?}");
}
