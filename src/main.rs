//! The `feedd` command line: parse it, call the library, print the error, pick the status.

#![deny(unsafe_code)]

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
    /// Internal: the serving process under the supervisor
    #[arg(long = "serve-child", hide = true)]
    serve_child: bool,
    /// Internal: the supervisor's new image after an upgrade's exec
    #[arg(long = "upgraded", hide = true)]
    upgraded: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Detach and serve; returns once the daemon is ready
    Start,
    /// SIGTERM the daemon and wait until it has exited
    Stop,
    /// Stop, then start
    Restart,
    /// SIGHUP the daemon: reload the config, reopen the log
    Reload,
    /// SIGUSR2 the supervisor: re-exec the binary on disk, replace the serving process
    /// without closing the listening socket; returns once the new one serves
    Upgrade,
    /// Is the daemon running? (exit 0 yes, 3 no)
    Status,
    /// Parse and validate the config, touch nothing
    Check,
    /// Print a new CURVE key pair (Z85)
    Keygen,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None if cli.serve_child => Ok(commands::serve_child(&cli.conf)),
        None if cli.upgraded => Ok(commands::resume_supervisor(&cli.conf)),
        None if cli.daemon => commands::start(&cli.conf),
        None => commands::foreground(&cli.conf),
        Some(Command::Start) => commands::start(&cli.conf),
        Some(Command::Stop) => commands::stop(&cli.conf),
        Some(Command::Restart) => commands::restart(&cli.conf),
        Some(Command::Reload) => commands::reload(&cli.conf),
        Some(Command::Upgrade) => commands::upgrade(&cli.conf),
        Some(Command::Status) => commands::status(&cli.conf),
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
