use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Settings;
use crate::database;
use crate::releases::{self, ReleaseRef};

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Print the release and each gate with its explanation.
    Show(ShowArgs),
    /// Exit 0 when the release may be promoted to --env, 1 with the blockers
    /// when not, 2 when eligibility could not be decided (unknown release,
    /// database unreachable, bad --env).
    Eligible(EligibleArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Release id, or <project>/<release_name>.
    release: ReleaseRef,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct EligibleArgs {
    /// Release id, or <project>/<release_name>.
    release: ReleaseRef,
    /// Target environment: dev, staging or production.
    #[arg(long)]
    env: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(settings: &Settings, command: ReleaseCommand) -> anyhow::Result<ExitCode> {
    let pool = match database::connect(&settings.database).await {
        Ok(pool) => pool,
        Err(error) if matches!(command, ReleaseCommand::Eligible(_)) => {
            super::print_error(&error);
            return Ok(ExitCode::from(2));
        }
        Err(error) => return Err(error.into()),
    };
    match command {
        ReleaseCommand::Show(args) => {
            let id = releases::resolve(&pool, &args.release).await?;
            let release = releases::show(&pool, id).await?;
            if args.json {
                super::print_json(&release)?;
            } else {
                out!(
                    "{}/{} ({})  target {}  source {}  status {}",
                    release.project,
                    release.release_name,
                    release.release_id,
                    release.environment_target,
                    release.source_ref,
                    release.status
                )?;
                for gate in &release.gates {
                    out!("  {} {:<38} {}", gate.gate_code, gate.gate_name, gate.status)?;
                    for requirement in gate.explanation["requirements"].as_array().into_iter().flatten() {
                        let met = requirement["met"].as_bool().unwrap_or(false);
                        out!(
                            "      [{}] {}",
                            if met { "x" } else { " " },
                            requirement["detail"].as_str().unwrap_or_default()
                        )?;
                    }
                    if let Some(exception) = gate.explanation.get("exception").filter(|e| !e.is_null()) {
                        out!(
                            "      bypassed by exception {} (approved by {}, expires {})",
                            exception["exception_id"].as_str().unwrap_or_default(),
                            exception["approver_id"].as_str().unwrap_or_default(),
                            exception["expires_at"].as_str().unwrap_or_default()
                        )?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ReleaseCommand::Eligible(args) => {
            // 1 means "not eligible"; failing to find out is 2, so a pipeline
            // can tell a blocked release from a broken check.
            let answer = match releases::resolve(&pool, &args.release).await {
                Ok(id) => releases::eligibility(&pool, id, &args.env).await,
                Err(error) => Err(error),
            };
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) => {
                    super::print_error(&error);
                    return Ok(ExitCode::from(2));
                }
            };
            let printed = if args.json {
                super::print_json(&answer)
            } else {
                print_eligibility(&args.release.to_string(), &answer).map_err(anyhow::Error::from)
            };
            if let Err(error) = printed {
                // The answer did not reach the caller: that is no answer.
                eprintln!("error: failed to print the answer: {error}");
                return Ok(ExitCode::from(2));
            }
            Ok(if answer.eligible {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn print_eligibility(release: &str, answer: &releases::Eligibility) -> std::io::Result<()> {
    if answer.eligible {
        return out!("{release} is eligible for {}", answer.target_env);
    }
    out!("{release} is NOT eligible for {}:", answer.target_env)?;
    for blocker in &answer.blockers {
        out!("  - {blocker}")?;
    }
    Ok(())
}
