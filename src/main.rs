use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match opsgate::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // Usage errors get their own code (EX_USAGE), apart from every
            // command's documented outcomes.
            return if error.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match opsgate::cli::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            // One line for people; the chain is in it, the details in the logs.
            eprintln!("error: {}", opsgate::cli::one_line(&error));
            ExitCode::FAILURE
        }
    }
}
