//! What each command of the command line does (SPEC §2), for `main.rs` to call.
//!
//! Every serving mode walks the same layers: the process is held (signal handlers first, the
//! pidfile lock, the log), then `serve` binds everything that can fail, drops privileges and
//! runs. A failure anywhere releases what was held (the pidfile goes) *before* the failure is
//! reported, so an invoker that hears of it finds nothing left behind.
//!
//! Errors leave here as `anyhow` with context; `main` prints them on one line and picks the
//! exit status.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::Config;
use crate::input::zmq::listener::Listener;
use crate::logging::Logging;
use crate::process::control::Control;
use crate::process::daemon::{self, Detached, Readiness, Report};
use crate::process::notify::Notifier;
use crate::process::pidfile::{self, Pidfile};
use crate::process::privileges;
use crate::process::signals::Signals;
use crate::process::supervisor::{self, Start};
use crate::process::upgrade;
use crate::server::{Handed, Outcome, ServeError, Server};

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

/// What a serving process holds for its whole life, taken in this order.
struct Held {
    signals: Signals,
    pidfile: Option<Pidfile>,
    logging: Arc<Logging>,
}

/// Registers the signal handlers (first, so a signal during start-up waits instead of
/// killing us), takes the pidfile lock when asked, starts the log.
fn hold(config: &Config, signals: Signals, pidfile: bool, daemon: bool) -> anyhow::Result<Held> {
    let pidfile = if pidfile {
        Some(Pidfile::acquire(
            &config.daemon.pidfile,
            std::process::id(),
        )?)
    } else {
        None
    };
    let logging = Arc::new(Logging::start(&config.log(), daemon)?);
    if let Some(warning) = crate::config::exposure_warning(config) {
        log::warn!("{warning}");
    }
    Ok(Held {
        signals,
        pidfile,
        logging,
    })
}

/// How the serving process makes sure it never outlives its supervisor.
#[derive(Clone, Copy)]
enum Parent {
    /// Nobody to follow (foreground, or a daemon without a supervisor).
    None,
    /// A serving child: stop when this pid (the supervisor) dies.
    Supervisor(i32),
}

/// Binds, drops privileges, reports readiness, then serves until told to stop. `notify`: the
/// systemd notify socket of a `Type=notify` unit (foreground only).
fn serve(
    config: Config,
    held: Held,
    parent: Parent,
    readiness: &mut Readiness,
    notify: Option<Notifier>,
) -> anyhow::Result<Outcome> {
    let target = if nix::unistd::geteuid().is_root() {
        privileges::resolve(
            config.daemon.user.as_deref(),
            config.daemon.group.as_deref(),
        )?
    } else {
        None
    };
    let log_path =
        config.log_path(held.pidfile.is_some() || matches!(parent, Parent::Supervisor(_)));
    // Handed by a supervisor or by systemd socket activation; matched to `[zmq] endpoint`.
    let handed = Handed {
        listeners: Listener::inherited()?,
        control: Control::inherited(),
    };
    let bound = match Server::bind(config, held.signals, Arc::clone(&held.logging), handed) {
        // Asked to stop before serving: nothing was taken in, so nothing to drain.
        Err(ServeError::Interrupted(i)) => {
            log::info!("{i}");
            return Ok(Outcome::Drained);
        }
        bound => bound?,
    };
    if let Some(target) = target {
        if let Some(log) = &log_path {
            let mut paths: Vec<&Path> = vec![log.as_path()];
            if let Some(dir) = log.parent() {
                paths.push(dir);
            }
            privileges::hand_over(&target, &paths);
        }
        privileges::drop_to(&target)?;
    }
    if let Parent::Supervisor(ppid) = parent {
        // After the drop: the kernel clears the parent-death signal on a uid/gid change.
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
            .context("cannot set the parent-death signal")?;
        if nix::unistd::getppid().as_raw() != ppid {
            bail!("the supervisor (pid {ppid}) is gone; not serving unsupervised");
        }
    }
    readiness.ready();
    Ok(bound.run(notify)?)
}

/// `feedd [--conf F]`: serve in the foreground until SIGTERM/SIGINT.
pub fn foreground(conf: &Path) -> anyhow::Result<i32> {
    let signals = Signals::register().context("cannot install signal handlers")?;
    let config = load_config(conf)?;
    set_umask(config.daemon.umask);
    // One instance per pidfile, whatever the mode: `status` and `reload` work on it too.
    let held = hold(&config, signals, true, false)?;
    let logging = Arc::clone(&held.logging);
    let notify = Notifier::from_env();
    let result = serve(config, held, Parent::None, &mut Readiness::none(), notify);
    if let Err(e) = &result {
        log::error!("start-up failed: {e:#}");
    }
    logging.flush();
    Ok(exit_status(&result?))
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
    if let Some(pid) = pidfile::running_pid(&config.daemon.pidfile)? {
        bail!("already running (pid {pid})");
    }
    // Unknown user or group, or not root: refuse before detaching.
    privileges::resolve(
        config.daemon.user.as_deref(),
        config.daemon.group.as_deref(),
    )?;
    match daemon::detach(&config.base_dir, config.daemon.umask)? {
        Detached::Invoker(Report::Ready) => {
            if let Some(pid) = pidfile::running_pid(&config.daemon.pidfile)? {
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

/// The detached process: hold the process, then supervise or serve; one failure path.
fn run_daemon(config: Config, mut readiness: Readiness) -> i32 {
    let result = Signals::register()
        .context("cannot install signal handlers")
        .and_then(|signals| hold(&config, signals, true, true))
        .and_then(|held| {
            let logging = Arc::clone(&held.logging);
            let result = if config.daemon.supervise {
                let Held {
                    signals, pidfile, ..
                } = held;
                let pidfile = pidfile.context("the supervisor holds no pidfile")?;
                // The supervisor owns the pidfile from here, and drops it as it returns.
                supervisor::run(
                    config.file.clone(),
                    signals,
                    &logging,
                    &mut readiness,
                    Start::Fresh(pidfile),
                )
                .map_err(anyhow::Error::msg)
            } else {
                // `held` (and its pidfile) is gone once `serve` returns: nothing is left
                // behind when the failure is reported below.
                serve(config, held, Parent::None, &mut readiness, None)
                    .map(|outcome| exit_status(&outcome))
            };
            logging.flush();
            result
        });
    match result {
        Ok(status) => status,
        Err(e) => {
            log::error!("start-up failed: {e:#}");
            readiness.failed(&format!("{e:#}"));
            EXIT_FAILURE
        }
    }
}

/// `feedd --serve-child` (hidden): the supervisor's serving process, reporting on stdout.
pub fn serve_child(conf: &Path) -> i32 {
    let mut readiness = Readiness::stdout();
    let parent = nix::unistd::getppid().as_raw();
    let result = Signals::register()
        .context("cannot install signal handlers")
        .and_then(|signals| {
            // Until the privilege drop re-arms it, the supervisor's death stops us too.
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
                .context("cannot set the parent-death signal")?;
            let config = load_config(conf)?;
            set_umask(config.daemon.umask);
            let held = hold(&config, signals, false, true)?;
            let logging = Arc::clone(&held.logging);
            let served = serve(
                config,
                held,
                Parent::Supervisor(parent),
                &mut readiness,
                None,
            );
            logging.flush();
            served
        });
    match result {
        Ok(outcome) => exit_status(&outcome),
        Err(e) => {
            log::error!("start-up failed: {e:#}");
            readiness.failed(&format!("{e:#}"));
            EXIT_FAILURE
        }
    }
}

/// `feedd --upgraded` (hidden): the supervisor's new image after an upgrade's exec.
pub fn resume_supervisor(conf: &Path) -> i32 {
    let result = Signals::register()
        .context("cannot install signal handlers")
        .and_then(|signals| {
            let config = load_config(conf)?;
            let resumed = upgrade::resume(&config.daemon.pidfile).map_err(anyhow::Error::msg)?;
            let logging = Logging::start(&config.log(), true)?;
            let status = supervisor::run(
                config.file.clone(),
                signals,
                &logging,
                &mut Readiness::none(),
                Start::Upgraded(resumed),
            );
            logging.flush();
            status.map_err(anyhow::Error::msg)
        });
    match result {
        Ok(status) => status,
        Err(e) => {
            // Nobody supervises any more: the children stop (parent-death signal).
            log::error!("upgrade: the new supervisor cannot start: {e:#}");
            EXIT_FAILURE
        }
    }
}

/// `feedd upgrade`: SIGUSR2 to the supervisor, then its outcome: 0 once the new serving
/// process serves, 1 with the reason when it never became ready (the old one serves on).
pub fn upgrade(conf: &Path) -> anyhow::Result<i32> {
    let config = load_config(conf)?;
    let path = &config.daemon.pidfile;
    let Some(pid) = pidfile::running_pid(path)? else {
        bail!("not running");
    };
    upgrade::clear_result(path);
    signal_pid(pid, Signal::SIGUSR2)?;
    // The new child's start-up, plus a margin.
    let limit = Duration::from_secs(75);
    match upgrade::await_result(path, limit) {
        Ok(child) => {
            println!("upgraded (pid {pid}, serving pid {child})");
            Ok(EXIT_OK)
        }
        Err(reason) => bail!("upgrade failed: {reason}"),
    }
}

fn signal_pid(pid: i32, signal: Signal) -> anyhow::Result<()> {
    if pid <= 0 {
        bail!("refusing to send {signal} to pid {pid}"); // 0 and -N mean process groups
    }
    kill(Pid::from_raw(pid), signal).with_context(|| format!("cannot send {signal} to pid {pid}"))
}

/// `feedd stop`: SIGTERM, then wait until the lock is released and every process of the
/// service (the daemon and its serving child) has exited: the lock goes a moment before the
/// process that held it ends.
pub fn stop(conf: &Path) -> anyhow::Result<i32> {
    let config = load_config(conf)?;
    let path = &config.daemon.pidfile;
    let Some(pid) = pidfile::running_pid(path)? else {
        println!("not running");
        return Ok(EXIT_OK);
    };
    let mut service = supervisor::children_of(pid);
    service.push(pid);
    signal_pid(pid, Signal::SIGTERM)?;
    let limit = config.daemon.shutdown_timeout() + Duration::from_secs(5);
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if pidfile::holder(path)?.is_none() && service.iter().all(|p| supervisor::exited(*p)) {
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
    match pidfile::running_pid(&config.daemon.pidfile)? {
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
    match pidfile::running_pid(&config.daemon.pidfile)? {
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
