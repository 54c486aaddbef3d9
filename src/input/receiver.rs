//! The receiver thread: the only owner of the ROUTER socket.
//!
//! It polls the ROUTER (client messages; only while the queue has room, which is the
//! back-pressure) beside its mailbox's doorbell, rung by workers when verdicts are ready, by
//! the queue when room frees, and by the main thread with a command (apply a reload, stop
//! intake, finish). Parsing happens here (`judge`, pure), so malformed and oversized messages
//! are answered at once and never occupy the queue.
//!
//! The receiver owns its settings (endpoint, CURVE key, size limit): a reload is a command it
//! applies and answers `Ok` or the error, and nothing of a failed one stays applied. A new
//! endpoint is bound beside the old one; the old one is unbound only once every message
//! received before the change has been answered (or `shutdown_timeout_ms` passed), because
//! unbinding closes the connections accepted through it and their replies would be lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as Chan, Sender};

use crate::config::{Config, CurveKey};
use crate::input::mailbox::Doorbell;
use crate::input::record::{self, Record};
use crate::metrics::Metrics;
use crate::pipeline::queue::{Full, Intake, Job, Outbox, Queue, ReplyTo, Verdicts, Wake};

/// Most messages read in one go before the mailbox gets a turn (fairness to replies).
const READ_BURST: usize = 256;
/// Most frames in one message; beyond that it is answered FALSE (bounded envelopes).
const MAX_FRAMES: usize = 64;
/// Longest idle wait, so the thread turns (and shows it is alive) at least this often.
const IDLE_WAKE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("cannot bind {endpoint}: a socket is already listening on {path}")]
    IpcInUse { endpoint: String, path: String },
    #[error("receiver socket: {0}")]
    Socket(#[from] zmq::Error),
    #[error("receiver mailbox: {0}")]
    Mailbox(#[from] std::io::Error),
}

/// The receiver's part of the config: what it applies itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZmqSettings {
    pub endpoint: String,
    pub max_message_bytes: usize,
    pub curve_secret_key: Option<CurveKey>,
    /// How long an old endpoint stays bound after a change, for replies still due through it.
    pub drain: Duration,
}

impl ZmqSettings {
    pub fn of(config: &Config) -> ZmqSettings {
        ZmqSettings {
            endpoint: config.zmq.endpoint.clone(),
            max_message_bytes: config.zmq.max_message_bytes,
            curve_secret_key: config.zmq.curve_secret_key,
            drain: config.daemon.shutdown_timeout(),
        }
    }
}

/// What the main thread asks of the receiver.
enum Command {
    /// Apply these settings; answer whether they took (nothing changes if not).
    Apply(ZmqSettings, Sender<Result<(), String>>),
    /// Stop reading messages; keep sending replies.
    Stop,
    /// Send the replies already delivered, then return.
    Finish,
}

/// A message's reply address: its envelope on the socket (generation) it came through, and
/// the epoch (endpoint changes) it arrived in.
struct Envelope {
    frames: Vec<Vec<u8>>,
    socket: u64,
    epoch: u64,
}

/// Verdicts from workers, for the receiver to send.
struct ZmqOutbox {
    verdicts: Sender<Verdicts>,
    bell: Arc<Doorbell>,
}

impl Outbox for ZmqOutbox {
    fn deliver(&self, verdicts: Verdicts) {
        // Fails only once the receiver has returned; the clients then resend.
        if self.verdicts.send(verdicts).is_ok() {
            self.bell.wake();
        }
    }
}

/// The main thread's handle on the running receiver.
pub struct ReceiverHandle {
    commands: Sender<Command>,
    bell: Arc<Doorbell>,
}

impl ReceiverHandle {
    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            self.bell.wake();
        }
    }

    /// Applies new settings; `Ok` once bound, or why not (the old settings keep serving).
    pub fn apply(&self, settings: ZmqSettings) -> Result<(), String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Apply(settings, tx));
        // A bind retry loop is the longest thing the receiver does (about 2 s).
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Err("the receiver did not answer".into()))
    }

    pub fn stop_intake(&self) {
        self.send(Command::Stop);
    }

    pub fn finish(&self) {
        self.send(Command::Finish);
    }
}

/// An old endpoint kept bound until the messages received before the change are answered.
struct Retiring {
    endpoint: String,
    /// Messages of epochs below this one were received while it was the endpoint.
    before_epoch: u64,
    deadline: Instant,
}

pub struct Receiver {
    /// Kept to make a fresh ROUTER when the CURVE settings change.
    context: zmq::Context,
    router: zmq::Socket,
    /// Bumped when the socket is replaced: replies for an older one are dropped.
    generation: u64,
    /// Bumped at each endpoint change.
    epoch: u64,
    settings: ZmqSettings,
    /// The endpoint actually bound (wildcards resolved), for unbinding.
    bound: String,
    retiring: Vec<Retiring>,
    /// Accepted messages not answered yet, per epoch.
    in_flight: BTreeMap<u64, usize>,
    bell: Arc<Doorbell>,
    commands: Chan<Command>,
    verdicts: Chan<Verdicts>,
    outbox: Arc<dyn Outbox>,
    intake: Option<Intake>,
    /// A message that found the queue full; intake pauses until it is queued.
    held: Option<Job>,
    metrics: Metrics,
}

impl Receiver {
    /// Creates and binds every socket, so a bind failure is a start-up error.
    pub fn bind(
        context: &zmq::Context,
        settings: ZmqSettings,
        queue: &Queue,
        metrics: Metrics,
    ) -> Result<(Receiver, ReceiverHandle), ReceiverError> {
        let bell = Arc::new(Doorbell::new()?);
        let intake = queue.intake(Arc::clone(&bell) as Arc<dyn Wake>);
        let router = context.socket(zmq::ROUTER)?;
        configure_router(&router, &settings)?;
        refuse_live_ipc(&settings.endpoint)?;
        router
            .bind(&settings.endpoint)
            .map_err(|source| ReceiverError::Bind {
                endpoint: settings.endpoint.clone(),
                source,
            })?;
        let bound = last_endpoint(&router).unwrap_or_else(|| settings.endpoint.clone());
        let (commands_tx, commands) = crossbeam_channel::unbounded();
        let (verdicts_tx, verdicts) = crossbeam_channel::unbounded();
        let outbox = Arc::new(ZmqOutbox {
            verdicts: verdicts_tx,
            bell: Arc::clone(&bell),
        });
        let handle = ReceiverHandle {
            commands: commands_tx,
            bell: Arc::clone(&bell),
        };
        Ok((
            Receiver {
                context: context.clone(),
                router,
                generation: 0,
                epoch: 0,
                settings,
                bound,
                retiring: Vec::new(),
                in_flight: BTreeMap::new(),
                bell,
                commands,
                verdicts,
                outbox,
                intake,
                held: None,
                metrics,
            },
            handle,
        ))
    }

    /// The endpoint bound (with a wildcard port resolved).
    pub fn bound_endpoint(&self) -> &str {
        &self.bound
    }

    /// Serves until told `finish`; then sends the replies already delivered and returns.
    /// `turned` is called once per loop (a liveness heartbeat).
    pub fn run(mut self, turned: &dyn Fn()) -> Result<(), ReceiverError> {
        let result = self.serve(turned);
        // Whatever is left bound goes now; an ipc:// file of ours is removed.
        for old in std::mem::take(&mut self.retiring) {
            let _ = unbind(&mut self.router, &old.endpoint);
            remove_ipc_file(&old.endpoint);
        }
        let _ = self.router.set_linger(1000);
        let _ = unbind(&mut self.router, &self.bound);
        remove_ipc_file(&self.bound);
        result
    }

    fn serve(&mut self, turned: &dyn Fn()) -> Result<(), ReceiverError> {
        loop {
            turned();
            let reading =
                self.intake.as_ref().is_some_and(|i| i.has_room(1)) && self.held.is_none();
            let router_events = if reading {
                zmq::POLLIN
            } else {
                zmq::PollEvents::empty()
            };
            let timeout = self.poll_timeout();
            let mut items = [
                self.router.as_poll_item(router_events),
                zmq::PollItem::from_fd(self.bell.fd(), zmq::POLLIN),
            ];
            zmq::poll(&mut items, timeout)?;
            let (router_ready, mail) = (items[0].is_readable(), items[1].is_readable());
            if mail {
                self.bell.clear();
                self.send_verdicts();
                if self.obey()? {
                    self.send_verdicts();
                    return Ok(());
                }
                self.retry_held();
            }
            self.retire_endpoints(Instant::now());
            if router_ready && reading {
                self.read_messages()?;
            }
        }
    }

    /// Milliseconds to wait: the idle wake, or sooner for an old endpoint's deadline.
    fn poll_timeout(&self) -> i64 {
        let now = Instant::now();
        let wait = self
            .retiring
            .iter()
            .map(|r| r.deadline.saturating_duration_since(now))
            .fold(IDLE_WAKE, Duration::min);
        i64::try_from(wait.as_millis()).unwrap_or(i64::MAX).max(1)
    }

    /// Carries out the main thread's commands; true when told to finish.
    fn obey(&mut self) -> Result<bool, ReceiverError> {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Apply(settings, answer) => {
                    let result = self.apply(settings);
                    let _ = answer.send(result);
                }
                Command::Stop => {
                    log::info!("receiver: intake stopped, draining");
                    // Dropping the intake lets workers finish the queue and exit.
                    self.intake = None;
                    if let Some(job) = self.held.take() {
                        self.answered(job_epoch(&job));
                    }
                }
                Command::Finish => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Sends every verdict delivered so far.
    fn send_verdicts(&mut self) {
        while let Ok(verdicts) = self.verdicts.try_recv() {
            for (tag, verdict) in verdicts {
                let Ok(envelope) = tag.downcast::<Envelope>() else {
                    continue;
                };
                self.answered(envelope.epoch);
                if envelope.socket != self.generation {
                    continue; // its socket was replaced: the client resends
                }
                send(&self.router, &envelope.frames, &verdict.reply_text());
            }
        }
    }

    fn answered(&mut self, epoch: u64) {
        if let Some(n) = self.in_flight.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&epoch);
            }
        }
    }

    fn reply_false(&self, envelope: &[Vec<u8>], reason: &str) {
        self.metrics.messages_rejected.inc();
        send(&self.router, envelope, format!("FALSE {reason}").as_bytes());
    }

    fn read_messages(&mut self) -> Result<(), ReceiverError> {
        for _ in 0..READ_BURST {
            if self.held.is_some() || !self.intake.as_ref().is_some_and(|i| i.has_room(1)) {
                return Ok(());
            }
            let frames = match self.router.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let received = Instant::now();
            self.metrics.messages_received.inc();
            match judge(frames, self.settings.max_message_bytes) {
                Incoming::Ignore => {}
                Incoming::Refuse { envelope, reason } => self.reply_false(&envelope, &reason),
                Incoming::Accept { envelope, records } => self.enqueue(envelope, records, received),
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, frames: Vec<Vec<u8>>, records: Vec<Record>, received: Instant) {
        let Some(intake) = &self.intake else { return };
        *self.in_flight.entry(self.epoch).or_insert(0) += 1;
        let job = Job {
            records,
            received,
            reply: ReplyTo {
                outbox: Arc::clone(&self.outbox),
                tag: Box::new(Envelope {
                    frames,
                    socket: self.generation,
                    epoch: self.epoch,
                }),
            },
        };
        if let Err(Full(job)) = intake.push(job) {
            self.held = Some(job);
        }
    }

    fn retry_held(&mut self) {
        let (Some(intake), Some(job)) = (&self.intake, self.held.take()) else {
            return;
        };
        if let Err(Full(job)) = intake.push(job) {
            self.held = Some(job);
        }
    }

    /// Unbinds old endpoints whose messages are all answered, or whose time is up.
    fn retire_endpoints(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.retiring.len() {
            let r = &self.retiring[i];
            let pending = self.in_flight.range(..r.before_epoch).next().is_some();
            if pending && now < r.deadline {
                i += 1;
                continue;
            }
            let old = self.retiring.swap_remove(i);
            match unbind(&mut self.router, &old.endpoint) {
                Ok(()) => log::info!(
                    "receiver: old endpoint {} unbound{}",
                    old.endpoint,
                    if pending {
                        " (drain time up; unanswered clients resend)"
                    } else {
                        ", every message received through it answered"
                    }
                ),
                Err(e) => log::warn!("receiver: cannot unbind old endpoint {}: {e}", old.endpoint),
            }
            remove_ipc_file(&old.endpoint);
        }
    }

    /// Applies reloaded settings, all or nothing.
    fn apply(&mut self, new: ZmqSettings) -> Result<(), String> {
        let old = self.settings.clone();
        if new == old {
            return Ok(());
        }
        if new.curve_secret_key != old.curve_secret_key {
            self.replace_socket(&new)?;
        } else {
            // The guard applies to connections made from now on (see the README).
            configure_router(&self.router, &new).map_err(|e| format!("[zmq]: {e}"))?;
            if new.endpoint != old.endpoint {
                if let Err(e) = self.move_endpoint(&new.endpoint, new.drain) {
                    let _ = configure_router(&self.router, &old);
                    return Err(e);
                }
            }
        }
        self.settings = new;
        Ok(())
    }

    /// Binds `endpoint` beside the current one; the current one retires once drained.
    fn move_endpoint(&mut self, endpoint: &str, drain: Duration) -> Result<(), String> {
        refuse_live_ipc(endpoint).map_err(|e| e.to_string())?;
        match self.router.bind(endpoint) {
            Ok(()) => {}
            Err(zmq::Error::EADDRINUSE) if same_port(endpoint, &self.bound) => {
                // Widening `tcp://127.0.0.1:P` to `tcp://*:P` cannot be bound beside the old
                // listener: swap them, and put the old one back if the new one fails.
                return self.swap_endpoint(endpoint);
            }
            Err(e) => return Err(format!("[zmq] endpoint: cannot bind {endpoint}: {e}")),
        }
        let old = std::mem::replace(
            &mut self.bound,
            last_endpoint(&self.router).unwrap_or_else(|| endpoint.to_string()),
        );
        self.epoch += 1;
        self.retiring.push(Retiring {
            endpoint: old.clone(),
            before_epoch: self.epoch,
            deadline: Instant::now() + drain,
        });
        log::info!(
            "receiver: now serving {} (was {old}; kept until its messages are answered)",
            self.bound
        );
        Ok(())
    }

    fn swap_endpoint(&mut self, endpoint: &str) -> Result<(), String> {
        let old = self.bound.clone();
        unbind(&mut self.router, &old).map_err(|e| format!("cannot unbind {old}: {e}"))?;
        match bind_retrying(&self.router, endpoint) {
            Ok(()) => {
                self.bound = last_endpoint(&self.router).unwrap_or_else(|| endpoint.to_string());
                self.epoch += 1;
                log::info!(
                    "receiver: now serving {} (was {old}; its connections were closed, clients reconnect)",
                    self.bound
                );
                Ok(())
            }
            Err(e) => {
                if let Err(back) = bind_retrying(&self.router, &old) {
                    log::error!("receiver: cannot bind {old} again: {back}; serving nothing");
                }
                Err(format!("[zmq] endpoint: cannot bind {endpoint}: {e}"))
            }
        }
    }

    /// New CURVE settings get a fresh socket: changing the mechanism of a socket with live
    /// sessions crashed libzmq 4.3 here. Replies still due on the old socket are dropped with
    /// it; those clients resend and are answered TRUE.
    fn replace_socket(&mut self, new: &ZmqSettings) -> Result<(), String> {
        let fresh = self
            .context
            .socket(zmq::ROUTER)
            .and_then(|s| configure_router(&s, new).map(|()| s))
            .map_err(|e| format!("[zmq]: cannot make a socket: {e}"))?;
        refuse_live_ipc(&new.endpoint).map_err(|e| e.to_string())?;
        if new.endpoint != self.settings.endpoint {
            // A different address can be bound before the old socket closes: no gap.
            fresh
                .bind(&new.endpoint)
                .map_err(|e| format!("[zmq] endpoint: cannot bind {}: {e}", new.endpoint))?;
        }
        let old = std::mem::replace(&mut self.router, fresh);
        let _ = old.set_linger(0);
        // Closing it releases its listener (asynchronously: the bind below retries).
        drop(old);
        for r in std::mem::take(&mut self.retiring) {
            remove_ipc_file(&r.endpoint);
        }
        if new.endpoint == self.settings.endpoint {
            if let Err(e) = bind_retrying(&self.router, &new.endpoint) {
                // Back to the old settings on a fresh socket, so nothing of the reload stays.
                let restored = self
                    .context
                    .socket(zmq::ROUTER)
                    .and_then(|s| configure_router(&s, &self.settings).map(|()| s))
                    .and_then(|s| bind_retrying(&s, &self.settings.endpoint).map(|()| s));
                match restored {
                    Ok(s) => self.router = s,
                    Err(back) => log::error!("receiver: cannot restore the old socket: {back}"),
                }
                self.generation += 1;
                return Err(format!("[zmq] endpoint: cannot bind {}: {e}", new.endpoint));
            }
        }
        self.generation += 1;
        self.epoch += 1;
        self.bound = last_endpoint(&self.router).unwrap_or_else(|| new.endpoint.clone());
        log::info!(
            "receiver: now serving {}, CURVE {}",
            self.bound,
            if new.curve_secret_key.is_some() {
                "on"
            } else {
                "off"
            }
        );
        Ok(())
    }
}

fn job_epoch(job: &Job) -> u64 {
    job.reply
        .tag
        .downcast_ref::<Envelope>()
        .map_or(0, |e| e.epoch)
}

/// Sends a reply on the ROUTER; to a gone or saturated peer it is dropped, never waited for.
fn send(router: &zmq::Socket, envelope: &[Vec<u8>], text: &[u8]) {
    for frame in envelope {
        if let Err(e) = router.send(frame.as_slice(), zmq::DONTWAIT | zmq::SNDMORE) {
            // A multipart send fails on its first frame (unroutable peers are dropped
            // silently by the ROUTER), so nothing half-sent is left behind.
            log::debug!("receiver: reply dropped: {e}");
            return;
        }
    }
    if let Err(e) = router.send(text, zmq::DONTWAIT) {
        log::debug!("receiver: reply dropped: {e}");
    }
}

/// Both TCP endpoints on the same port (the new one cannot be bound beside the old one).
fn same_port(a: &str, b: &str) -> bool {
    let port = |e: &str| {
        e.strip_prefix("tcp://")
            .and_then(|rest| rest.rsplit_once(':'))
            .map(|(_, p)| p.to_string())
    };
    matches!((port(a), port(b)), (Some(x), Some(y)) if x == y)
}

/// libzmq unlinks an existing `ipc://` socket file on bind, silently stealing the address of
/// another running instance: refuse when something answers on it.
fn refuse_live_ipc(endpoint: &str) -> Result<(), ReceiverError> {
    let Some(path) = endpoint.strip_prefix("ipc://") else {
        return Ok(());
    };
    if path.starts_with('@') || path == "*" {
        return Ok(()); // abstract namespace or a generated name: no file to steal
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ReceiverError::IpcInUse {
            endpoint: endpoint.to_string(),
            path: path.to_string(),
        }),
        Err(_) => Ok(()),
    }
}

/// Removes our `ipc://` socket file after our listener is gone (nothing answers on it).
fn remove_ipc_file(endpoint: &str) {
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        if !path.starts_with('@') && refuse_live_ipc(endpoint).is_ok() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What to do with one message read from the ROUTER.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Nothing to answer (no body frame after the routing id).
    Ignore,
    /// Answer `FALSE <reason>` to `envelope`.
    Refuse {
        envelope: Vec<Vec<u8>>,
        reason: String,
    },
    /// Queue these records; reply to `envelope` after COMMIT.
    Accept {
        envelope: Vec<Vec<u8>>,
        records: Vec<Record>,
    },
}

/// Judges a message's frames (pure): the last frame is the body, every frame before it the
/// envelope echoed back. Bounded: too many frames or bytes are refused before parsing.
pub fn judge(mut frames: Vec<Vec<u8>>, max_bytes: usize) -> Incoming {
    if frames.len() < 2 {
        return Incoming::Ignore; // a ROUTER always adds the identity; nothing to answer
    }
    if frames.len() > MAX_FRAMES {
        frames.truncate(1);
        return Incoming::Refuse {
            envelope: frames,
            reason: "too many frames".into(),
        };
    }
    let body = frames.pop().unwrap_or_default();
    let size: usize = body.len() + frames.iter().map(Vec::len).sum::<usize>();
    if size > max_bytes {
        return Incoming::Refuse {
            envelope: frames,
            reason: "too large".into(),
        };
    }
    match record::parse_body(&body) {
        Err(reason) => Incoming::Refuse {
            envelope: frames,
            reason: reason.to_string(),
        },
        Ok(records) => Incoming::Accept {
            envelope: frames,
            records,
        },
    }
}

fn configure_router(router: &zmq::Socket, settings: &ZmqSettings) -> Result<(), zmq::Error> {
    // A peer sending more than this is disconnected by libzmq: a memory guard well above the
    // size answered `FALSE too large`.
    let guard = settings
        .max_message_bytes
        .saturating_mul(4)
        .saturating_add(65_536);
    router.set_maxmsgsize(i64::try_from(guard).unwrap_or(i64::MAX))?;
    router.set_rcvhwm(1000)?;
    router.set_sndhwm(1000)?;
    match &settings.curve_secret_key {
        Some(key) => {
            router.set_zap_domain("feedd")?;
            router.set_curve_server(true)?;
            router.set_curve_secretkey(&key.0)?;
        }
        // Back to the NULL mechanism (libzmq rejects clearing an unset CURVE server flag).
        None => {
            if router.is_curve_server()? {
                router.set_curve_server(false)?;
            }
        }
    }
    Ok(())
}

/// Binds `endpoint`. Right after an unbind of the same address libzmq may still hold the
/// listener (the close is asynchronous), so a rebind retries EADDRINUSE for up to 2 s.
fn bind_retrying(socket: &zmq::Socket, endpoint: &str) -> Result<(), zmq::Error> {
    let mut tries = 200;
    loop {
        match socket.bind(endpoint) {
            Err(zmq::Error::EADDRINUSE) if tries > 1 => {
                tries -= 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn last_endpoint(socket: &zmq::Socket) -> Option<String> {
    socket.get_last_endpoint().ok().and_then(Result::ok)
}

/// `zmq` 0.9 has no safe `unbind`; the libzmq call is used directly on the socket we own.
fn unbind(socket: &mut zmq::Socket, endpoint: &str) -> Result<(), zmq::Error> {
    let c = std::ffi::CString::new(endpoint).map_err(|_| zmq::Error::EINVAL)?;
    // SAFETY: the pointer is this live socket's, used only from its owning thread.
    let rc = unsafe { zmq_sys::zmq_unbind(socket.as_mut_ptr(), c.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn judging_frames() {
        assert_eq!(judge(frames(&[b"id"]), 100), Incoming::Ignore);
        match judge(frames(&[b"id", b"", b"1,2,3"]), 100) {
            Incoming::Accept { envelope, records } => {
                assert_eq!(envelope, frames(&[b"id", b""]));
                assert_eq!(records.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let too_large = judge(frames(&[b"id", b"", b"1,2,3\n4,5,6"]), 8);
        assert!(matches!(too_large, Incoming::Refuse { reason, .. } if reason == "too large"));
        let many: Vec<Vec<u8>> = (0..100).map(|_| b"x".to_vec()).collect();
        match judge(many, 1 << 20) {
            Incoming::Refuse { envelope, reason } => {
                assert_eq!(reason, "too many frames");
                assert_eq!(envelope.len(), 1, "only the routing id is kept");
            }
            other => panic!("{other:?}"),
        }
        let bad = judge(frames(&[b"id", b"1,2"]), 100);
        assert!(matches!(bad, Incoming::Refuse { reason, .. } if reason.starts_with("line 1:")));
    }
}
