//! The supervisor (`supervise = true` with `--daemon`): holds the pidfile lock, starts the
//! serving process (`feedd --serve-child`, fork+exec, so no threads are forked), forwards
//! HUP/USR1/TERM/INT to it, and restarts it when it dies abnormally, with growing backoff
//! while it keeps dying. It does no I/O on the data path.
//!
//! Threads: the main loop; a signal thread; one waiter per child (reads its readiness line,
//! then waits for its exit). All report through one channel.
//!
//! HUP and USR1 reach a child only once it reported ready: before it has installed its
//! handlers their default action would kill it. Until then they are held (and merged).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

use crate::backoff::Backoff;
use crate::logging::Logging;
use crate::process::daemon::{self, Readiness, Report};
use crate::process::signals::Signals;

/// The hidden flag that makes `feedd` a serving child.
pub const SERVE_CHILD_FLAG: &str = "--serve-child";

/// First restart delay, and the cap of its doubling.
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A child that lived this long was stable: the next restart starts from `FIRST_DELAY` again.
const STABLE: Duration = Duration::from_secs(10);

enum Event {
    Signal(i32),
    Report {
        pid: u32,
        report: Report,
    },
    /// The child's reload took (its log settings with it).
    Reloaded {
        pid: u32,
    },
    Exited {
        pid: u32,
        status: ExitStatus,
    },
}

/// Restart delays: doubling while the child keeps dying young, reset after a stable run.
#[derive(Debug)]
struct RestartPolicy {
    backoff: Backoff,
}

impl RestartPolicy {
    fn new() -> Self {
        RestartPolicy {
            backoff: Backoff::new(FIRST_DELAY, MAX_DELAY),
        }
    }

    /// The wait before restarting a child that lived `lived`.
    fn next_delay(&mut self, lived: Duration) -> Duration {
        if lived >= STABLE {
            self.backoff.reset();
        }
        self.backoff.next_delay()
    }
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".to_string(),
    }
}

fn spawn_child(exe: &Path, conf: &Path, events: &Sender<Event>) -> std::io::Result<(u32, Instant)> {
    let mut child: Child = Command::new(exe)
        .arg(SERVE_CHILD_FLAG)
        .arg("--conf")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take();
    let tx = events.clone();
    std::thread::Builder::new()
        .name(format!("wait-{pid}"))
        .spawn(move || {
            match stdout {
                Some(out) => daemon::read_reports(
                    out,
                    |report| {
                        let _ = tx.send(Event::Report { pid, report });
                    },
                    || {
                        let _ = tx.send(Event::Reloaded { pid });
                    },
                ),
                None => {
                    let _ = tx.send(Event::Report {
                        pid,
                        report: Report::Silent,
                    });
                }
            }
            if let Ok(status) = child.wait() {
                let _ = tx.send(Event::Exited { pid, status });
            }
        })?;
    Ok((pid, Instant::now()))
}

fn forward(pid: u32, signal: i32) {
    let Ok(sig) = Signal::try_from(signal) else {
        return;
    };
    let Ok(raw) = i32::try_from(pid) else { return };
    if let Err(e) = kill(Pid::from_raw(raw), sig) {
        log::warn!("supervisor: cannot forward {sig} to pid {pid}: {e}");
    }
}

/// Runs the supervisor until the serving process exits cleanly (after TERM/INT, or on its
/// own with status 0). Returns the process exit status.
///
/// A failure to start the first serving process comes back as `Err(reason)`, for the caller
/// to report once it has released the pidfile.
pub fn run(
    conf: PathBuf,
    signals: Signals,
    logging: &Logging,
    readiness: &mut Readiness,
) -> Result<i32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let signals = signals.into_inner();
    let handle = signals.handle();
    let signal_tx = tx.clone();
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals;
            for s in signals.forever() {
                let _ = signal_tx.send(Event::Signal(s));
            }
        });
    let status = supervise(&exe, &conf, logging, readiness, &tx, &rx);
    handle.close();
    if let Ok(t) = signal_thread {
        let _ = t.join();
    }
    status
}

/// The supervisor's state between events: the child it runs and how it is doing.
struct Supervision<'a> {
    exe: &'a Path,
    conf: &'a Path,
    logging: &'a Logging,
    readiness: &'a mut Readiness,
    tx: &'a Sender<Event>,
    policy: RestartPolicy,
    stopping: bool,
    first_start: bool,
    restarts: u64,
    /// Whether the current child reported ready, and the HUP/USR1 held until it does.
    child_ready: bool,
    held: Vec<i32>,
    first_failure: Option<String>,
    pid: u32,
    started: Instant,
}

fn supervise(
    exe: &Path,
    conf: &Path,
    logging: &Logging,
    readiness: &mut Readiness,
    tx: &Sender<Event>,
    rx: &Receiver<Event>,
) -> Result<i32, String> {
    let (pid, started) =
        spawn_child(exe, conf, tx).map_err(|e| format!("cannot start the serving process: {e}"))?;
    log::info!(
        "supervisor pid {}: serving process pid {pid} started",
        std::process::id()
    );
    let mut s = Supervision {
        exe,
        conf,
        logging,
        readiness,
        tx,
        policy: RestartPolicy::new(),
        stopping: false,
        first_start: true,
        restarts: 0,
        child_ready: false,
        held: Vec::new(),
        first_failure: None,
        pid,
        started,
    };
    loop {
        let Ok(event) = rx.recv() else { return Ok(1) };
        match event {
            Event::Signal(signal) => s.on_signal(signal),
            Event::Report { pid, report } if pid == s.pid => s.on_report(report),
            Event::Exited { pid, status } if pid == s.pid => {
                if let Some(done) = s.on_exit(&status, rx) {
                    return done;
                }
            }
            Event::Reloaded { pid } if pid == s.pid => s.follow_log(),
            Event::Report { .. } | Event::Exited { .. } | Event::Reloaded { .. } => {}
        }
    }
}

impl Supervision<'_> {
    fn on_signal(&mut self, s: i32) {
        if s == SIGHUP || s == SIGUSR1 {
            self.logging.reopen();
        }

        if s == SIGTERM || s == SIGINT {
            self.stopping = true;
            log::info!(
                "supervisor: signal {s}, stopping the serving process {}",
                self.pid
            );
        }
        if self.child_ready || s == SIGTERM || s == SIGINT {
            forward(self.pid, s);
        } else if !self.held.contains(&s) {
            self.held.push(s);
        }
    }

    /// The child's reload took: the supervisor's own log follows the file too (a refused
    /// reload keeps it). `conf` is absolute and the daemon runs where it was started.
    fn follow_log(&self) {
        let base = std::env::current_dir().unwrap_or_default();
        if let Ok(settings) = crate::config::LogSettings::load(self.conf, &base) {
            match self.logging.apply(&settings) {
                Ok(()) => log::info!("supervisor: the serving process reloaded; log follows"),
                Err(e) => log::error!("supervisor: {e}"),
            }
        }
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Ready => {
                self.child_ready = true;
                for s in self.held.drain(..) {
                    forward(self.pid, s);
                }
                if self.first_start {
                    self.first_start = false;
                    self.readiness.ready();
                } else {
                    log::info!("supervisor: serving process pid {} is serving", self.pid);
                }
            }
            Report::Failed(reason) if self.first_start => {
                // Start-up failed: the invoker hears the reason, nothing is restarted.
                self.first_failure = Some(reason);
                self.stopping = true;
            }
            Report::Failed(reason) => {
                log::error!("supervisor: serving process failed to start: {reason}")
            }
            Report::Silent => {}
        }
    }

    /// The child exited: the supervisor's exit status, or `None` once a new child runs.
    fn on_exit(
        &mut self,
        status: &ExitStatus,
        rx: &Receiver<Event>,
    ) -> Option<Result<i32, String>> {
        let (pid, lived) = (self.pid, self.started.elapsed());
        if self.stopping || status.success() {
            if self.first_start {
                return Some(Err(self.first_failure.take().unwrap_or_else(|| {
                    "the serving process exited during start-up; see the log".into()
                })));
            }
            log::info!(
                "supervisor: serving process {pid} {}; exiting",
                describe(status)
            );
            return Some(Ok(if status.success() { 0 } else { 1 }));
        }
        let delay = self.policy.next_delay(lived);
        self.restarts += 1;
        log::error!(
            "supervisor: serving process {pid} {} after {:.1} s; restart #{} in {:.1} s",
            describe(status),
            lived.as_secs_f64(),
            self.restarts,
            delay.as_secs_f64()
        );
        if wait_or_stop(rx, delay, self.logging) {
            log::info!("supervisor: stopped while waiting to restart");
            return Some(Ok(0));
        }
        match spawn_child(self.exe, self.conf, self.tx) {
            Ok((p, s)) => {
                (self.pid, self.started) = (p, s);
                self.child_ready = false;
                log::info!("supervisor: serving process pid {p} started");
                None
            }
            Err(e) => {
                log::error!("supervisor: cannot start the serving process: {e}");
                Some(Ok(1))
            }
        }
    }
}

/// Waits `delay` while still honouring TERM/INT (true if told to stop meanwhile) and
/// reopening the supervisor's own log on HUP/USR1 (the next child reads the config afresh).
fn wait_or_stop(rx: &Receiver<Event>, delay: Duration, logging: &Logging) -> bool {
    let until = Instant::now() + delay;
    loop {
        match rx.recv_deadline(until) {
            Ok(Event::Signal(s)) if s == SIGTERM || s == SIGINT => return true,
            Ok(Event::Signal(s)) if s == SIGHUP || s == SIGUSR1 => logging.reopen(),
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// Whether `pid` is gone or a zombie (exited, not yet reaped): `feedd stop` waits for that.
pub fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        // The state follows the parenthesised command.
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// Pids of running serving children of `supervisor` (for `feedd status`).
pub fn children_of(supervisor: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the parenthesised command: state, ppid, …
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<i32>().ok()
                })
                == Some(supervisor)
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_while_dying_young_and_resets_when_stable() {
        let mut p = RestartPolicy::new();
        let young = Duration::from_millis(50);
        assert_eq!(p.next_delay(young), Duration::from_millis(200));
        assert_eq!(p.next_delay(young), Duration::from_millis(400));
        assert_eq!(p.next_delay(young), Duration::from_millis(800));
        for _ in 0..10 {
            p.next_delay(young);
        }
        assert_eq!(p.next_delay(young), MAX_DELAY);
        assert_eq!(p.next_delay(Duration::from_secs(60)), FIRST_DELAY);
    }
}
