//! The `feedd` command line: parse it, call the library, print the error, pick the status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use feedd::commands;

#[derive(Parser)]
#[command(
    name = "feedd",
    version,
    about = "ZeroMQ to MySQL/MariaDB ingest daemon"
)]
struct Cli {
    /// Config file (INI)
    #[arg(long, global = true, default_value = "conf/feed.ini")]
    conf: PathBuf,
    /// Detach and run as a daemon (same as `start`)
    #[arg(long)]
    daemon: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate the config, touch nothing
    Check,
    /// Print a new CURVE key pair (Z85)
    Keygen,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => commands::foreground(&cli.conf),
        Some(Command::Check) => commands::check(&cli.conf).map(|()| commands::EXIT_OK),
        Some(Command::Keygen) => commands::keygen().map(|()| commands::EXIT_OK),
    };
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            eprintln!("feedd: {e:#}");
            ExitCode::from(1)
        }
    }
}
