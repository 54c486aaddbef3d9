//! What each command of the command line does (SPEC §2), for `main.rs` to call.
//!
//! Errors leave here as `anyhow` with context; `main` prints them on one line and picks the
//! exit status.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::Config;
use crate::logging::Logging;
use crate::process::daemon::{self, Detached, Readiness, Report};
use crate::process::pidfile::{self, Pidfile};
use crate::process::privileges;
use crate::process::signals::Signals;
use crate::process::supervisor;
use crate::server::{self, Hooks, Outcome};

/// Exit statuses.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
/// LSB: `status` of a daemon that is not running.
pub const EXIT_NOT_RUNNING: i32 = 3;

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
    warn_if_exposed(&config);
    // Under a systemd `Type=notify` unit: READY/RELOADING/STOPPING/STATUS and the watchdog.
    let hooks = Hooks {
        notify: crate::process::notify::Notifier::from_env(),
        ..Hooks::default()
    };
    let outcome = server::serve(config, signals, Arc::clone(&logging), hooks)?;
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

/// `feedd --daemon` / `feedd start`: detach, and return only once the daemon is ready.
pub fn start(conf: &Path) -> anyhow::Result<i32> {
    let config = load_config(conf)?;
    if let Some(pid) = pidfile::running_pid(&config.daemon.pidfile) {
        bail!("already running (pid {pid})");
    }
    // Unknown user or group, or not root: refuse before detaching.
    privileges::resolve(
        config.daemon.user.as_deref(),
        config.daemon.group.as_deref(),
    )?;
    match daemon::detach(&config.base_dir, config.daemon.umask)? {
        Detached::Invoker(Report::Ready) => {
            if let Some(pid) = pidfile::running_pid(&config.daemon.pidfile) {
                println!("started (pid {pid})");
            }
            Ok(EXIT_OK)
        }
        Detached::Invoker(Report::Failed(reason)) => bail!("{reason}"),
        Detached::Invoker(Report::Silent) => {
            bail!("the daemon exited during start-up; see its log")
        }
        Detached::Daemon(readiness) => Ok(run_daemon(config, readiness)),
    }
}

/// The detached process: take the pidfile, open the log, then supervise or serve.
fn run_daemon(config: Config, mut readiness: Readiness) -> i32 {
    // First, so a `reload` right after the pidfile appears cannot kill us.
    let signals = match Signals::register() {
        Ok(s) => s,
        Err(e) => {
            readiness.failed(&format!("cannot install signal handlers: {e}"));
            return EXIT_FAILURE;
        }
    };
    let pidfile = match Pidfile::acquire(&config.daemon.pidfile, std::process::id()) {
        Ok(p) => Rc::new(RefCell::new(Some(p))),
        Err(e) => {
            readiness.failed(&e.to_string());
            return EXIT_FAILURE;
        }
    };
    let held = Rc::clone(&pidfile);
    readiness.set_cleanup(Box::new(move || drop(held.borrow_mut().take())));
    let logging = match Logging::start(&config, true) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            readiness.failed(&e.to_string());
            return EXIT_FAILURE;
        }
    };
    let status = if config.daemon.supervise {
        supervisor::run(
            config.file.clone(),
            signals,
            Arc::clone(&logging),
            readiness,
        )
    } else {
        serve_detached(config, signals, Arc::clone(&logging), readiness)
    };
    drop(pidfile.borrow_mut().take());
    logging.flush();
    status
}

/// `feedd --serve-child` (hidden): the supervisor's serving process, reporting on stdout.
pub fn serve_child(conf: &Path) -> i32 {
    let mut readiness = Readiness::stdout();
    // If the supervisor dies (even by SIGKILL), stop too rather than serve unsupervised.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        readiness.failed(&format!("cannot set the parent-death signal: {e}"));
        return EXIT_FAILURE;
    }
    let signals = match Signals::register() {
        Ok(s) => s,
        Err(e) => {
            readiness.failed(&format!("cannot install signal handlers: {e}"));
            return EXIT_FAILURE;
        }
    };
    let config = match load_config(conf) {
        Ok(c) => c,
        Err(e) => {
            readiness.failed(&format!("{e:#}"));
            return EXIT_FAILURE;
        }
    };
    set_umask(config.daemon.umask);
    let logging = match Logging::start(&config, true) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            readiness.failed(&e.to_string());
            return EXIT_FAILURE;
        }
    };
    warn_if_exposed(&config);
    let status = serve_detached(config, signals, Arc::clone(&logging), readiness);
    logging.flush();
    status
}

fn warn_if_exposed(config: &Config) {
    if let Some(warning) = crate::config::exposure_warning(config) {
        log::warn!("{warning}");
    }
}

/// Serves as a daemon: privilege drop before the first message, readiness once serving.
fn serve_detached(
    config: Config,
    signals: Signals,
    logging: Arc<Logging>,
    readiness: Readiness,
) -> i32 {
    let readiness = Rc::new(RefCell::new(readiness));
    let target = match privileges::resolve(
        config.daemon.user.as_deref(),
        config.daemon.group.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            readiness.borrow_mut().failed(&e.to_string());
            return EXIT_FAILURE;
        }
    };
    let log_path = config.log_path(true);
    let ready = Rc::clone(&readiness);
    let hooks = Hooks {
        before_serving: Box::new(move || {
            let Some(target) = target else { return Ok(()) };
            if let Some(log) = &log_path {
                let dir = log.parent().map(Path::to_path_buf);
                let mut paths: Vec<&Path> = vec![log.as_path()];
                if let Some(d) = &dir {
                    paths.push(d.as_path());
                }
                privileges::hand_over(&target, &paths);
            }
            privileges::drop_to(&target).map_err(|e| e.to_string())
        }),
        ready: Box::new(move || ready.borrow_mut().ready()),
        // Detached: readiness goes through the pipe; systemd is told only in the foreground.
        notify: None,
    };
    match server::serve(config, signals, logging, hooks) {
        Ok(outcome) => exit_status(&outcome),
        Err(e) => {
            log::error!("start-up failed: {e}");
            readiness.borrow_mut().failed(&e.to_string());
            EXIT_FAILURE
        }
    }
}

fn signal_pid(pid: i32, signal: Signal) -> anyhow::Result<()> {
    kill(Pid::from_raw(pid), signal).with_context(|| format!("cannot send {signal} to pid {pid}"))
}

/// `feedd stop`: SIGTERM, then wait until the lock is released.
pub fn stop(conf: &Path) -> anyhow::Result<i32> {
    let config = load_config(conf)?;
    let path = &config.daemon.pidfile;
    let Some(pid) = pidfile::running_pid(path) else {
        println!("not running");
        return Ok(EXIT_OK);
    };
    signal_pid(pid, Signal::SIGTERM)?;
    let limit = config.daemon.shutdown_timeout() + Duration::from_secs(5);
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if pidfile::running_pid(path).is_none() {
            println!("stopped (pid {pid})");
            return Ok(EXIT_OK);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("pid {pid} did not stop within {} ms", limit.as_millis())
}

/// `feedd restart`: stop, then start.
pub fn restart(conf: &Path) -> anyhow::Result<i32> {
    let status = stop(conf)?;
    if status != EXIT_OK {
        return Ok(status);
    }
    start(conf)
}

/// `feedd reload`: SIGHUP to the daemon.
pub fn reload(conf: &Path) -> anyhow::Result<i32> {
    let config = load_config(conf)?;
    match pidfile::running_pid(&config.daemon.pidfile) {
        Some(pid) => {
            signal_pid(pid, Signal::SIGHUP)?;
            println!("reload sent (pid {pid})");
            Ok(EXIT_OK)
        }
        None => bail!("not running"),
    }
}

/// `feedd status`: `running (pid N)` (and the serving child) or `not running` (exit 3).
pub fn status(conf: &Path) -> anyhow::Result<i32> {
    let config = load_config(conf)?;
    match pidfile::running_pid(&config.daemon.pidfile) {
        Some(pid) => {
            let children = supervisor::children_of(pid);
            match children.first() {
                Some(child) => println!("running (pid {pid}, serving pid {child})"),
                None => println!("running (pid {pid})"),
            }
            Ok(EXIT_OK)
        }
        None => {
            println!("not running");
            Ok(EXIT_NOT_RUNNING)
        }
    }
}
