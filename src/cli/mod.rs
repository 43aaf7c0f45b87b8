//! The `opsgate` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Settings};

/// `println!` that returns the write error instead of panicking, and takes a
/// closed pipe (`| head`, `| true`) as success: the reader has what it
/// wanted, and the exit code still says what happened.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

mod migrate;
mod policy;
mod publish;
mod release;
mod setup;
mod sweep;

#[derive(Debug, Parser)]
#[command(
    name = "opsgate",
    version,
    about = "Release-governance control plane for an Odoo platform"
)]
pub struct Cli {
    /// Directory holding default.toml and <stage>.toml.
    #[arg(long, global = true, env = "OPSGATE_CONFIG_DIR", default_value = "config")]
    pub config_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume envelopes from RabbitMQ and record them (until SIGTERM or Ctrl-C).
    Worker,
    /// Publish an event envelope for the worker (exit 0 accepted/duplicate, 2 rejected, 3 undelivered).
    Publish(publish::PublishArgs),
    /// Create the database when missing and apply pending migrations.
    Migrate,
    /// Declare the RabbitMQ topology (exchanges, queues, retry tiers, dead letters).
    Setup,
    /// Show a release's gates, or ask whether it may be promoted.
    #[command(subcommand)]
    Release(release::ReleaseCommand),
    /// Run the sweeps: expire exceptions, flag overdue G4 confirmations.
    Sweep(sweep::SweepArgs),
    /// Show or change the gate policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Print the effective settings (passwords redacted).
    Config,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The services each command talks to: in production their URLs must be given.
    let (database, amqp) = match &cli.command {
        Command::Worker => (true, true),
        Command::Publish(_) | Command::Setup => (false, true),
        Command::Migrate | Command::Release(_) | Command::Sweep(_) | Command::Policy(_) => (true, false),
        Command::Config => (false, false),
    };
    let loaded = config::load(&cli.config_dir)
        .and_then(|settings| settings.require_given_urls(database, amqp).map(|()| settings));
    let settings = match loaded {
        Ok(settings) => settings,
        // A promotion check that cannot read its settings could not decide:
        // exit 1 would read as "not eligible".
        Err(error)
            if matches!(
                cli.command,
                Command::Release(release::ReleaseCommand::Eligible(_))
            ) =>
        {
            print_error(&error);
            return Ok(ExitCode::from(2));
        }
        Err(error) => return Err(error.into()),
    };
    crate::telemetry::init(&settings.log);
    match cli.command {
        Command::Worker => {
            let cancel = tokio_util::sync::CancellationToken::new();
            let on_signal = cancel.clone();
            // Listening before anything else runs: a stop request during
            // start-up, or a second one right after the first, is not lost.
            let mut signals = crate::shutdown::StopSignals::install();
            tokio::spawn(async move {
                signals.next().await;
                on_signal.cancel();
                // Whoever asks twice does not want to wait for the drain. What
                // is not committed is rolled back; what is, but not acked,
                // comes back as a duplicate.
                signals.next().await;
                eprintln!("error: stopped again before the in-flight messages finished; exiting at once");
                std::process::exit(i32::from(crate::shutdown::STOPPED_AGAIN));
            });
            if settings.worker.migrate_on_start {
                // A migration can wait long for its locks; a stop request
                // must not. Each migration is one transaction: the one in
                // progress is rolled back with the connection.
                let report = tokio::select! {
                    () = cancel.cancelled() => {
                        tracing::info!("stopped while migrating; the migration in progress is rolled back");
                        return Ok(ExitCode::SUCCESS);
                    }
                    report = crate::database::migrate(&settings.database) => report?,
                };
                for migration in &report.applied {
                    tracing::info!(%migration, "applied migration");
                }
            }
            crate::worker::run(&settings, cancel).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish(args) => publish::run(&settings, args).await,
        Command::Migrate => migrate::run(&settings).await,
        Command::Setup => setup::run(&settings).await,
        Command::Release(command) => release::run(&settings, command).await,
        Command::Sweep(args) => sweep::run(&settings, args).await,
        Command::Policy(command) => policy::run(&settings, &cli.config_dir, command).await,
        Command::Config => {
            print_settings(&settings)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An error and its causes on one line, each cause once: many of our errors
/// already end with the text of their source, which `{:#}` would repeat.
/// Text that spans lines (TOML's parse errors draw the line and a caret) is
/// folded, so that a log line or a CI annotation holds the whole message.
pub fn one_line(error: &anyhow::Error) -> String {
    let causes: &(dyn std::error::Error + 'static) = error.as_ref();
    chain_on_one_line(causes)
}

fn chain_on_one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    for cause in std::iter::successors(Some(error), |cause| cause.source()) {
        let text = cause.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Prints `error: <the error and its causes on one line>` on stderr, for
/// commands that answer with an exit code of their own after an error.
pub(crate) fn print_error(error: &(dyn std::error::Error + 'static)) {
    eprintln!("error: {}", chain_on_one_line(error));
}

fn print_settings(settings: &Settings) -> std::io::Result<()> {
    out!("{settings:#?}")
}

/// One line on stdout; see [`out!`].
pub(crate) fn write_line(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Prints `value` as pretty JSON on stdout (see [`out!`]).
fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    Ok(out!("{text}")?)
}
