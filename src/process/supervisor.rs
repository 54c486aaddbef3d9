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
//!
//! Every listener a serving child uses is the supervisor's (input/zmq/listener.rs): the one for
//! `[zmq] endpoint` is made once and handed to every serving child, so a child that dies or is
//! replaced never leaves the endpoint refusing connections (they wait in the backlog). Before
//! it forwards a SIGHUP, the supervisor reads `[zmq] endpoint` from the file and hands the child
//! the listener for it over the child's control channel (control.rs), making it first when
//! the endpoint moved; the child's reload listens on it instead of binding. After the reload
//! the child reports what it serves, and the supervisor closes the listener no longer served
//! (the old one after a move, the new one after a refused reload). Before each start it reads
//! the endpoint again (a child may have died before it reported).
//!
//! SIGUSR2 is an upgrade (upgrade.rs): exec the binary on disk, keeping the pidfile lock and
//! the listener; the new image starts a successor (the candidate) and, once it is ready,
//! SIGTERMs the old child, which drains: it stops reading, commits and answers what it read,
//! closes. A candidate that fails, exits or is not ready within `READY_LIMIT` is stopped and
//! the old child serves on. Children are spawned and the exec done on the main thread: the
//! parent-death signal follows the thread that forked, and the exec keeps only the caller.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

use crate::backoff::Backoff;
use crate::input::zmq::listener::{Listener, HANDED_FDS_VAR};
use crate::logging::Logging;
use crate::process::control::{Control, Serving, CONTROL_FD_VAR};
use crate::process::daemon::{self, Readiness, Report};
use crate::process::pidfile::Pidfile;
use crate::process::signals::Signals;
use crate::process::upgrade::{self, Handover};

/// The hidden flag that makes `feedd` a serving child.
pub const SERVE_CHILD_FLAG: &str = "--serve-child";

/// First restart delay, and the cap of its doubling.
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A child that lived this long was stable: the next restart starts from `FIRST_DELAY` again.
const STABLE: Duration = Duration::from_secs(10);
/// How long an upgrade's new child may take to report ready before it is given up.
const READY_LIMIT: Duration = Duration::from_secs(60);

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
    /// After a reload, what the child serves.
    Serving {
        pid: u32,
        serving: Serving,
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

/// A serving child just started: its pid, when, and the supervisor's end of its control
/// channel.
type Spawned = (u32, Instant, Control);

/// Starts a serving child, handing it `listener` and its end of a new control channel
/// (close-on-exec cleared for this spawn only: children are spawned on the main thread alone).
fn spawn_child(
    exe: &Path,
    conf: &Path,
    listener: Option<&Listener>,
    events: &Sender<Event>,
) -> std::io::Result<Spawned> {
    let (control, child_end) = Control::pair()?;
    let mut command = Command::new(exe);
    command
        .arg(SERVE_CHILD_FLAG)
        .arg("--conf")
        .arg(conf)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env(CONTROL_FD_VAR, child_end.raw_fd().to_string());
    child_end.set_inherited(true)?;
    match listener {
        Some(l) => {
            l.set_inherited(true)?;
            command.env(HANDED_FDS_VAR, l.raw_fd().to_string())
        }
        None => command.env_remove(HANDED_FDS_VAR),
    };
    let spawned = command.spawn();
    // The child has its copy (or none): ours goes, so its exit ends the channel.
    drop(child_end);
    if let Some(l) = listener {
        l.set_inherited(false)?;
    }
    let mut child: Child = spawned?;
    let pid = child.id();
    let stdout = child.stdout.take();
    let tx = events.clone();
    let reports = control.try_clone()?;
    std::thread::Builder::new()
        .name(format!("wait-{pid}"))
        .spawn(move || {
            // The control channel's reports on a thread of their own: like stdout, they are
            // read until the child exits.
            let relay_tx = tx.clone();
            let relay = std::thread::Builder::new()
                .name(format!("control-{pid}"))
                .spawn(move || relay_reports(pid, &reports, &relay_tx));
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
            let status = child.wait();
            // Its last reports before its exit.
            if let Ok(relay) = relay {
                let _ = relay.join();
            }
            if let Ok(status) = status {
                let _ = tx.send(Event::Exited { pid, status });
            }
        })?;
    Ok((pid, Instant::now(), control))
}

/// The child's reports after each reload, until its end of the channel closes (it exited).
fn relay_reports(pid: u32, control: &Control, events: &Sender<Event>) {
    while let Some(serving) = control.next_report() {
        let _ = events.send(Event::Serving { pid, serving });
    }
}

/// Waits for a child this image did not spawn (the old one, after an upgrade's exec), relaying
/// its reports first.
fn adopt_child(pid: u32, control: Option<Control>, events: &Sender<Event>) -> std::io::Result<()> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use std::os::unix::process::ExitStatusExt;
    let tx = events.clone();
    let raw = Pid::from_raw(i32::try_from(pid).unwrap_or(0));
    std::thread::Builder::new()
        .name(format!("wait-{pid}"))
        .spawn(move || {
            if let Some(c) = control {
                relay_reports(pid, &c, &tx);
            }
            let status = loop {
                match waitpid(raw, None) {
                    Ok(WaitStatus::Exited(_, code)) => break ExitStatus::from_raw(code << 8),
                    Ok(WaitStatus::Signaled(_, sig, _)) => break ExitStatus::from_raw(sig as i32),
                    Err(nix::Error::EINTR) | Ok(_) => {}
                    Err(_) => break ExitStatus::from_raw(0), // not ours (any more)
                }
            };
            let _ = tx.send(Event::Exited { pid, status });
        })
        .map(drop)
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

/// How a supervisor begins.
pub enum Start {
    /// A new daemon holding `Pidfile`: start the first serving child, the invoker waits
    /// for its readiness.
    Fresh(Pidfile),
    /// Resumed by an upgrade's exec: the old child serves; start its successor.
    Upgraded(upgrade::Resumed),
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
    start: Start,
) -> Result<i32, String> {
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
    let status = supervise(&conf, logging, readiness, start, &tx, &rx);
    handle.close();
    if let Ok(t) = signal_thread {
        let _ = t.join();
    }
    status
}

/// An upgrade's new child, until it reports ready.
struct Candidate {
    pid: u32,
    started: Instant,
    control: Control,
    /// HUP/USR1 that came while it started (it may have read the file before).
    held: Vec<i32>,
}

/// The supervisor's state between events: the child it runs and how it is doing.
struct Supervision<'a> {
    exe: PathBuf,
    conf: &'a Path,
    logging: &'a Logging,
    readiness: &'a mut Readiness,
    tx: &'a Sender<Event>,
    /// The pidfile lock (handed down on upgrade).
    pidfile: Pidfile,
    /// The listener the serving child serves on (handed down on upgrade).
    listener: Option<Listener>,
    /// Listeners made for a reload, by the number they were handed down as, until the child
    /// reports a reload that saw them.
    spares: Vec<(u64, Listener)>,
    /// The number of the last listener handed down.
    handed: u64,
    /// The serving child's control channel (`None`: an old child adopted without one).
    control: Option<Control>,
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
    candidate: Option<Candidate>,
    /// An upgrade whose old child died meanwhile: report once the current child is ready.
    report_when_ready: bool,
}

fn supervise(
    conf: &Path,
    logging: &Logging,
    readiness: &mut Readiness,
    start: Start,
    tx: &Sender<Event>,
    rx: &Receiver<Event>,
) -> Result<i32, String> {
    let (exe, pidfile, listener, old) = match start {
        Start::Fresh(pidfile) => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find my own executable: {e}"))?;
            (exe, pidfile, open_listener(conf, Vec::new()), None)
        }
        Start::Upgraded(r) => (r.exe, r.pidfile, r.listener, Some((r.old_child, r.control))),
    };
    let mut s = Supervision {
        exe,
        conf,
        logging,
        readiness,
        tx,
        pidfile,
        listener,
        spares: Vec::new(),
        handed: 0,
        control: None,
        policy: RestartPolicy::new(),
        stopping: false,
        first_start: old.is_none(),
        restarts: 0,
        child_ready: old.is_some(),
        held: Vec::new(),
        first_failure: None,
        pid: old.as_ref().map_or(0, |(pid, _)| *pid),
        started: Instant::now(),
        candidate: None,
        report_when_ready: false,
    };
    match old {
        None => {
            let (pid, started, control) = spawn_child(&s.exe, conf, s.listener.as_ref(), tx)
                .map_err(|e| format!("cannot start the serving process: {e}"))?;
            (s.pid, s.started, s.control) = (pid, started, Some(control));
            log::info!(
                "supervisor pid {}: serving process pid {} started",
                std::process::id(),
                s.pid
            );
        }
        Some((old, control)) => s.resume(old, control),
    }
    s.run(rx)
}

/// The file's `[zmq] endpoint`, read alone (`None`: unreadable; the child reports why).
fn file_endpoint(conf: &Path) -> Option<String> {
    // `conf` is absolute and the daemon runs in the directory it was started from.
    let base = std::env::current_dir().unwrap_or_default();
    crate::config::zmq_endpoint(conf, &base).ok()
}

/// A listener for the file's `[zmq] endpoint`: the one of `known` serving it (the others
/// close), else a new one (`None`: ZeroMQ off, an endpoint only libzmq binds, or it cannot be
/// bound now; the child then binds it itself and reports the reason).
fn open_listener(conf: &Path, known: Vec<Listener>) -> Option<Listener> {
    let Some(endpoint) = file_endpoint(conf) else {
        return known.into_iter().next();
    };
    if endpoint.is_empty() {
        return None;
    }
    if let Some(l) = known.into_iter().find(|l| l.serves(&endpoint)) {
        return Some(l);
    }
    open_for(&endpoint)
}

fn open_for(endpoint: &str) -> Option<Listener> {
    match Listener::open(endpoint) {
        Ok(Some(l)) => {
            log::info!(
                "supervisor: listening on {} for the serving processes",
                l.endpoint()
            );
            Some(l)
        }
        Ok(None) => None,
        Err(e) => {
            log::warn!("supervisor: {e}; the serving process binds it itself");
            None
        }
    }
}

impl Supervision<'_> {
    fn run(&mut self, rx: &Receiver<Event>) -> Result<i32, String> {
        loop {
            let event = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    self.check_candidate();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(1),
            };
            let candidate = self.candidate.as_ref().map(|c| c.pid);
            match event {
                Event::Signal(signal) => self.on_signal(signal),
                Event::Report { pid, report } if Some(pid) == candidate => {
                    self.on_candidate_report(report);
                }
                Event::Exited { pid, status } if Some(pid) == candidate => {
                    self.give_up_candidate(&format!(
                        "the new serving process {}",
                        describe(&status)
                    ));
                }
                Event::Report { pid, report } if pid == self.pid => self.on_report(report),
                Event::Exited { pid, status } if pid == self.pid => {
                    if let Some(done) = self.on_exit(&status, rx) {
                        return done;
                    }
                }
                Event::Exited { pid, status } => {
                    log::info!(
                        "supervisor: former serving process {pid} {}",
                        describe(&status)
                    );
                }
                Event::Serving { pid, serving } if pid == self.pid => self.on_serving(serving),
                Event::Reloaded { pid } if pid == self.pid => self.follow_log(),
                Event::Report { .. } | Event::Serving { .. } | Event::Reloaded { .. } => {}
            }
        }
    }

    fn on_signal(&mut self, s: i32) {
        if s == SIGUSR2 {
            self.upgrade();
            return;
        }
        if s == SIGHUP || s == SIGUSR1 {
            self.logging.reopen();
        }
        if s == SIGTERM || s == SIGINT {
            self.stopping = true;
            log::info!(
                "supervisor: signal {s}, stopping the serving process {}",
                self.pid
            );
            if let Some(c) = self.candidate.take() {
                forward(c.pid, s);
                upgrade::report(
                    self.pidfile.path(),
                    &Err("stopped during the upgrade".into()),
                );
            }
        }
        if let Some(c) = &mut self.candidate {
            if !c.held.contains(&s) {
                c.held.push(s);
            }
        }
        if self.child_ready || s == SIGTERM || s == SIGINT {
            self.forward_to_child(s);
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
                for s in std::mem::take(&mut self.held) {
                    self.forward_to_child(s);
                }
                if self.first_start {
                    self.first_start = false;
                    self.readiness.ready();
                } else {
                    log::info!("supervisor: serving process pid {} is serving", self.pid);
                }
                if std::mem::take(&mut self.report_when_ready) {
                    upgrade::report(self.pidfile.path(), &Ok(self.pid));
                }
            }
            Report::Failed(reason) if self.first_start => {
                // Start-up failed: the invoker hears the reason, nothing is restarted.
                self.first_failure = Some(reason);
                self.stopping = true;
            }
            Report::Failed(reason) => {
                log::error!("supervisor: serving process failed to start: {reason}");
                if std::mem::take(&mut self.report_when_ready) {
                    upgrade::report(self.pidfile.path(), &Err(reason));
                }
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
        if let Some(c) = self.candidate.take() {
            // The old child died during an upgrade: its successor is already starting.
            log::error!(
                "supervisor: serving process {pid} {} during an upgrade; pid {} takes over",
                describe(status),
                c.pid
            );
            (self.pid, self.started, self.child_ready) = (c.pid, c.started, false);
            self.control = Some(c.control);
            self.report_when_ready = true;
            return None;
        }
        // First thing: the endpoint is listened on again before the backoff, should the child
        // have died before it reported that a reload moved it.
        self.control = None;
        self.listener = open_listener(self.conf, self.take_listeners());
        let delay = self.policy.next_delay(lived);
        self.restarts += 1;
        log::error!(
            "supervisor: serving process {pid} {} after {:.1} s; restart #{} in {:.1} s",
            describe(status),
            lived.as_secs_f64(),
            self.restarts,
            delay.as_secs_f64()
        );
        if wait_or_stop(rx, delay, self.logging, self.pidfile.path()) {
            log::info!("supervisor: stopped while waiting to restart");
            return Some(Ok(0));
        }
        // The file may have changed during the wait (the child refuses a listener for another).
        self.listener = open_listener(self.conf, self.take_listeners());
        match spawn_child(&self.exe, self.conf, self.listener.as_ref(), self.tx) {
            Ok((p, s, control)) => {
                (self.pid, self.started, self.control) = (p, s, Some(control));
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

    /// SIGUSR2: exec the binary on disk (returns only if that failed or was refused).
    fn upgrade(&mut self) {
        let refuse = |s: &Self, reason: String| {
            log::error!("supervisor: upgrade refused: {reason}");
            upgrade::report(s.pidfile.path(), &Err(reason));
        };
        if self.stopping || self.candidate.is_some() || !self.child_ready {
            let reason = "the serving process is starting, stopping or being replaced; try again";
            return refuse(self, reason.into());
        }
        if !self.spares.is_empty() {
            return refuse(self, "a reload is under way; try again".into());
        }
        let base = std::env::current_dir().unwrap_or_default();
        if let Err(e) = crate::config::Config::load(self.conf, &base) {
            return refuse(self, e.to_string());
        }
        log::info!(
            "supervisor: SIGUSR2, upgrading: executing {}",
            self.exe.display()
        );
        let failed = upgrade::exec(&Handover {
            exe: &self.exe,
            conf: self.conf,
            pidfile: &self.pidfile,
            listener: self.listener.as_ref(),
            control: self.control.as_ref(),
            old_child: self.pid,
        });
        refuse(self, failed);
    }

    /// The new image after an upgrade's exec: wait for `old`, start its successor.
    fn resume(&mut self, old: u32, control: Option<Control>) {
        log::info!(
            "supervisor pid {} upgraded ({}); serving process {old} serves until its successor is ready",
            std::process::id(),
            self.exe.display()
        );
        self.control = control.as_ref().and_then(|c| c.try_clone().ok());
        if let Err(e) = adopt_child(old, control, self.tx) {
            log::error!("supervisor: cannot wait for serving process {old}: {e}");
        }
        self.listener = open_listener(self.conf, self.take_listeners());
        match spawn_child(&self.exe, self.conf, self.listener.as_ref(), self.tx) {
            Ok((pid, started, control)) => {
                log::info!("supervisor: new serving process pid {pid} started");
                self.candidate = Some(Candidate {
                    pid,
                    started,
                    control,
                    held: Vec::new(),
                });
            }
            Err(e) => {
                let reason = format!("cannot start the new serving process: {e}");
                log::error!("supervisor: {reason}; pid {old} serves on");
                upgrade::report(self.pidfile.path(), &Err(reason));
            }
        }
    }

    fn on_candidate_report(&mut self, report: Report) {
        match report {
            Report::Ready => {
                let Some(c) = self.candidate.take() else {
                    return;
                };
                let old = self.pid;
                (self.pid, self.started, self.child_ready) = (c.pid, c.started, true);
                self.control = Some(c.control);
                for s in c.held {
                    self.forward_to_child(s);
                }
                log::info!(
                    "supervisor: new serving process pid {} is serving; the old one ({old}) drains",
                    self.pid
                );
                // The old child stops reading, answers what it read, and closes.
                forward(old, SIGTERM);
                upgrade::report(self.pidfile.path(), &Ok(self.pid));
            }
            Report::Failed(reason) => self.give_up_candidate(&reason),
            // It exited without a word: its exit gives the reason.
            Report::Silent => {}
        }
    }

    /// Once a second: a candidate that is not ready in time is given up.
    fn check_candidate(&mut self) {
        if self
            .candidate
            .as_ref()
            .is_some_and(|c| c.started.elapsed() > READY_LIMIT)
        {
            let reason = format!(
                "the new serving process was not ready within {} s",
                READY_LIMIT.as_secs()
            );
            self.give_up_candidate(&reason);
        }
    }

    /// Forwards `s` to the serving child; a SIGHUP after handing it the listener for the
    /// file's `[zmq] endpoint`.
    fn forward_to_child(&mut self, s: i32) {
        if s == SIGHUP {
            self.hand_down();
        }
        forward(self.pid, s);
    }

    /// Hands the serving child the listener for the file's `[zmq] endpoint` (made now when the
    /// endpoint moved), for its reload to listen on instead of binding. Without one (ZeroMQ
    /// off, an endpoint only libzmq binds, an address that cannot be bound) the child binds
    /// itself and reports why not.
    fn hand_down(&mut self) {
        let Some(control) = &self.control else {
            return;
        };
        let Some(endpoint) = file_endpoint(self.conf).filter(|e| !e.is_empty()) else {
            return;
        };
        self.handed += 1;
        let seq = self.handed;
        let known = (self.listener.iter())
            .chain(self.spares.iter().map(|(_, l)| l))
            .find(|l| l.serves(&endpoint));
        let sent = match known {
            Some(l) => control.hand(seq, l),
            None => {
                let Some(l) = open_for(&endpoint) else {
                    return;
                };
                let sent = control.hand(seq, &l);
                self.spares.push((seq, l));
                sent
            }
        };
        if let Err(e) = sent {
            log::warn!("supervisor: cannot hand the listener on {endpoint} down: {e}");
        }
    }

    /// The child's reload is over: it serves `serving.endpoint`. The listener for it stays,
    /// the others it saw close (a listener handed down since stays for the next reload).
    fn on_serving(&mut self, serving: Serving) {
        let (seen, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.spares)
            .into_iter()
            .partition(|(seq, _)| *seq <= serving.taken);
        self.spares = later;
        let seen = self
            .listener
            .take()
            .into_iter()
            .chain(seen.into_iter().map(|(_, l)| l));
        for l in seen {
            if self.listener.is_none()
                && !serving.endpoint.is_empty()
                && l.serves(&serving.endpoint)
            {
                self.listener = Some(l);
            } else {
                log::info!(
                    "supervisor: closing the listener on {} (no longer served)",
                    l.endpoint()
                );
            }
        }
    }

    /// Every listener held (the serving one first); the caller keeps what it needs.
    fn take_listeners(&mut self) -> Vec<Listener> {
        let spares = self.spares.drain(..).map(|(_, l)| l);
        self.listener.take().into_iter().chain(spares).collect()
    }

    /// The upgrade failed: the candidate is stopped, the old child serves on.
    fn give_up_candidate(&mut self, reason: &str) {
        let Some(c) = self.candidate.take() else {
            return;
        };
        log::error!(
            "supervisor: upgrade failed: {reason}; serving process {} serves on",
            self.pid
        );
        forward(c.pid, SIGTERM);
        upgrade::report(self.pidfile.path(), &Err(reason.to_string()));
    }
}

/// Waits `delay` while still honouring TERM/INT (true if told to stop meanwhile),
/// reopening the supervisor's own log on HUP/USR1 (the next child reads the config afresh) and
/// refusing an upgrade (nothing serves to hand over from).
fn wait_or_stop(rx: &Receiver<Event>, delay: Duration, logging: &Logging, pidfile: &Path) -> bool {
    let until = Instant::now() + delay;
    loop {
        match rx.recv_deadline(until) {
            Ok(Event::Signal(s)) if s == SIGTERM || s == SIGINT => return true,
            Ok(Event::Signal(s)) if s == SIGHUP || s == SIGUSR1 => logging.reopen(),
            Ok(Event::Signal(SIGUSR2)) => {
                let reason = "the serving process is restarting; try again";
                upgrade::report(pidfile, &Err(reason.into()));
            }
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
