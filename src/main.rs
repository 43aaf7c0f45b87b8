use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = opsgate::cli::Cli::parse();
    match opsgate::cli::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            // One line for people; the chain is in it, the details in the logs.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
