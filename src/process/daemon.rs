//! Detaching with readiness: the invoking process returns only once the daemon reports
//! `READY`, or with the daemon's own reason for failing.
//!
//! The report travels through a pipe made before the fork (daemon → invoking process), or,
//! for a serving child started by the supervisor, through the child's stdout. Forking happens
//! before any thread exists (see HAZARDS: fork copies only the calling thread).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daemonize::{Daemonize, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create the readiness pipe: {0}")]
    Pipe(nix::Error),
    #[error("cannot detach: {0}")]
    Detach(daemonize::Error),
}

/// Where a starting daemon reports `READY` or its failure. Reporting twice is a no-op.
pub struct Readiness {
    channel: Channel,
}

enum Channel {
    /// The pipe to the invoker, and whether the report was written. The write end stays open
    /// until the process exits, so the invoker's end of file after a failure means "exited".
    Pipe(File, bool),
    /// A serving child: its stdout is a pipe to the supervisor.
    Stdout(bool),
    /// Nobody waits (the foreground): the failure reaches stderr as the command's error.
    None,
}

const READY: &str = "READY";
const FAILED: &str = "ERR ";
/// After `READY`, a serving child reports each reload that took, so the supervisor switches
/// its own log only then (a refused reload keeps the running log).
const RELOADED: &str = "RELOADED";

/// Set once a serving child reported ready: its stdout still goes to the supervisor.
static REPORTS_TO_SUPERVISOR: AtomicBool = AtomicBool::new(false);

/// A reload took: tells the supervisor, if this process is a serving child (else nothing).
pub fn report_reloaded() {
    if REPORTS_TO_SUPERVISOR.load(Ordering::Relaxed) {
        let mut out = std::io::stdout().lock();
        // A supervisor gone: the write fails (SIGPIPE is ignored) and the child stops anyway.
        let _ = writeln!(out, "{RELOADED}");
        let _ = out.flush();
    }
}

impl Readiness {
    /// Reports to nobody (a foreground run).
    pub fn none() -> Readiness {
        Readiness::on(Channel::None)
    }

    /// Reports on stdout (a serving child to its supervisor).
    pub fn stdout() -> Readiness {
        Readiness::on(Channel::Stdout(false))
    }

    fn on(channel: Channel) -> Readiness {
        Readiness { channel }
    }

    pub fn ready(&mut self) {
        self.report(READY);
    }

    /// Reports a start-up failure. The caller releases what it held (the pidfile) first, so
    /// the invoker, once told, finds nothing left behind.
    pub fn failed(&mut self, reason: &str) {
        // One line: the reason may hold newlines from a server message.
        self.report(&format!("{FAILED}{}", reason.replace('\n', " ")));
    }

    fn report(&mut self, line: &str) {
        match &mut self.channel {
            Channel::Pipe(file, done) => {
                if !*done {
                    *done = true;
                    let _ = writeln!(file, "{line}");
                }
            }
            Channel::None => {}
            Channel::Stdout(done) => {
                if !*done {
                    *done = true;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    // The supervisor reads on (`read_reports`) after `READY` only.
                    if line == READY {
                        REPORTS_TO_SUPERVISOR.store(true, Ordering::Relaxed);
                    } else if let Ok(null) = File::options().write(true).open("/dev/null") {
                        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
                    }
                }
            }
        }
    }
}

/// What a readiness report said.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    Ready,
    Failed(String),
    /// The reporter went away without a word (crashed during start-up).
    Silent,
}

/// Reads the first report line from `source`.
pub fn read_report(source: impl Read) -> Report {
    read_first(&mut BufReader::new(source))
}

/// A serving child's reports: the first (`on_report`), then after `READY` one call of
/// `on_reload` per reload that took, until the child closes its stdout (exits).
pub fn read_reports(
    source: impl Read,
    on_report: impl FnOnce(Report),
    mut on_reload: impl FnMut(),
) {
    let mut source = BufReader::new(source);
    let first = read_first(&mut source);
    let ready = first == Report::Ready;
    on_report(first);
    if !ready {
        return;
    }
    let mut line = String::new();
    while matches!(source.read_line(&mut line), Ok(n) if n > 0) {
        if line.trim_end() == RELOADED {
            on_reload();
        }
        line.clear();
    }
}

fn read_first(source: &mut impl BufRead) -> Report {
    let mut line = String::new();
    match source.read_line(&mut line) {
        Ok(n) if n > 0 => {
            let line = line.trim_end();
            if line == READY {
                Report::Ready
            } else {
                Report::Failed(line.strip_prefix(FAILED).unwrap_or(line).to_string())
            }
        }
        _ => Report::Silent,
    }
}

/// Which side of the fork we are on.
pub enum Detached {
    /// The invoking process, with the daemon's report.
    Invoker(Report),
    /// The daemon (session leader's child, stdio on /dev/null, in `base`, with `umask`).
    Daemon(Readiness),
}

/// Forks (twice, with setsid) via `daemonize`. Must be called before any thread exists.
pub fn detach(base: &Path, umask: u32) -> Result<Detached, DaemonError> {
    // Close-on-exec: the supervisor's serving child must not inherit the write end.
    let (read_end, write_end): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(DaemonError::Pipe)?;
    let outcome = Daemonize::new()
        .working_directory(base)
        .umask(umask)
        .stdout(daemonize::Stdio::devnull())
        .stderr(daemonize::Stdio::devnull())
        .execute();
    match outcome {
        Outcome::Parent(Ok(_)) => {
            // Our copy of the write end must go, or EOF never comes if the daemon dies.
            drop(write_end);
            let mut pipe = File::from(read_end);
            let report = read_report(&mut pipe);
            if matches!(report, Report::Failed(_)) {
                await_exit(&mut pipe);
            }
            Ok(Detached::Invoker(report))
        }
        Outcome::Parent(Err(e)) => Err(DaemonError::Detach(e)),
        Outcome::Child(Ok(_)) => {
            drop(read_end);
            Ok(Detached::Daemon(Readiness::on(Channel::Pipe(
                File::from(write_end),
                false,
            ))))
        }
        Outcome::Child(Err(e)) => {
            // The half-made daemon cannot return to a caller that thinks it is the invoker.
            let mut r = Readiness::on(Channel::Pipe(File::from(write_end), false));
            r.failed(&format!("cannot detach: {e}"));
            std::process::exit(1);
        }
    }
}

/// After a failure report, waits (up to 5 s) for the pipe's end of file, which comes when the
/// failed daemon has exited: `start` then returns with no process left behind.
fn await_exit(pipe: &mut File) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::from(u16::try_from(left.as_millis()).unwrap_or(u16::MAX));
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(n) if n > 0 => {}
            _ => return, // timed out (a stuck daemon must not hang `start`) or failed
        }
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        assert_eq!(read_report(&b"READY\n"[..]), Report::Ready);
        assert_eq!(
            read_report(&b"ERR already running (pid 5)\n"[..]),
            Report::Failed("already running (pid 5)".into())
        );
        assert_eq!(read_report(&b""[..]), Report::Silent);
    }

    #[test]
    fn reloads_are_reported_after_ready_only() {
        let mut first = None;
        let mut reloads = 0;
        read_reports(
            &b"READY\nRELOADED\nnoise\nRELOADED\n"[..],
            |r| first = Some(r),
            || reloads += 1,
        );
        assert_eq!((first, reloads), (Some(Report::Ready), 2));
        let mut reloads = 0;
        read_reports(&b"ERR x\nRELOADED\n"[..], |_| {}, || reloads += 1);
        assert_eq!(reloads, 0);
    }
}
