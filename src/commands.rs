//! What each command of the command line does (SPEC §2), for `main.rs` to call.
//!
//! Errors leave here as `anyhow` with context; `main` prints them on one line and picks the
//! exit status.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

use crate::config::Config;
use crate::logging::Logging;
use crate::server::{self, Hooks, Outcome};
use crate::signals::Signals;

/// Exit statuses.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;

/// Loads the config against the directory feedd was started in.
pub fn load_config(conf: &Path) -> anyhow::Result<Config> {
    let base = std::env::current_dir().context("cannot read the current directory")?;
    Ok(Config::load(conf, &base)?)
}

/// `feedd [--conf F]`: serve in the foreground until SIGTERM/SIGINT.
pub fn foreground(conf: &Path) -> anyhow::Result<i32> {
    // First of all, so a signal during start-up is queued rather than fatal.
    let signals = Signals::register().context("cannot install signal handlers")?;
    let config = load_config(conf)?;
    set_umask(config.daemon.umask);
    let logging = Arc::new(Logging::start(&config, false)?);
    let outcome = server::serve(config, signals, Arc::clone(&logging), Hooks::default())?;
    logging.flush();
    Ok(exit_status(&outcome))
}

/// The process exit status for how serving ended.
pub fn exit_status(outcome: &Outcome) -> i32 {
    match outcome {
        Outcome::Drained | Outcome::Abandoned => EXIT_OK,
        Outcome::Failed(_) => EXIT_FAILURE,
    }
}

/// `feedd check`: parse and validate, touch nothing.
pub fn check(conf: &Path) -> anyhow::Result<()> {
    load_config(conf)?;
    println!("ok");
    Ok(())
}

/// `feedd keygen`: a fresh CURVE key pair, ready to paste.
pub fn keygen() -> anyhow::Result<()> {
    let pair = zmq::CurveKeyPair::new().context("this libzmq has no CURVE support")?;
    let public = zmq::z85_encode(&pair.public_key).context("Z85 encoding")?;
    let secret = zmq::z85_encode(&pair.secret_key).context("Z85 encoding")?;
    println!("# public key: give it to the other side (server: clients' curve server key;");
    println!("#             client: one line of the server's curve_allowed_clients file)");
    println!("public = {public}");
    println!("# secret key: keep it private (server: [zmq] curve_secret_key)");
    println!("secret = {secret}");
    Ok(())
}

pub fn set_umask(mask: u32) {
    // Truncation is impossible: config validation keeps the mask within 0o777.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        mask as libc::mode_t,
    ));
}
