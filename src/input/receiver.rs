//! The receiver thread: the only owner of the ROUTER socket.
//!
//! It polls the ROUTER (client messages; only while the queue has room, which is the
//! back-pressure) beside its mailbox's doorbell, rung by workers when verdicts are ready, by
//! the queue when room frees, and by the main thread with a command (apply a reload, stop
//! intake, finish). Parsing happens here (`judge`, pure), so malformed and oversized messages
//! are answered at once and never occupy the queue.
//!
//! The receiver owns its settings (endpoint, CURVE key, size limit): a reload is a command it
//! applies and answers `Ok` or the error, and nothing of a failed one stays applied. A change
//! moves serving to a fresh socket, bound to a new address before the old socket stops; the
//! old socket is read no more, answers every message it read (bounded by
//! `shutdown_timeout_ms`), then closes. What clients sent it that was not read yet is neither
//! stored nor answered: they reconnect and resend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as Chan, Sender};

use crate::config::{Config, CurveKey};
use crate::heartbeat::Heartbeat;
use crate::input::mailbox::Doorbell;
use crate::input::record::{self, Record};
use crate::metrics::Metrics;
use crate::pipeline::queue::{ChannelOutbox, Intake, Job, Outbox, Queue, ReplyTo, Verdicts, Wake};

/// Most messages read in one go before the mailbox gets a turn (fairness to replies).
const READ_BURST: usize = 256;
/// Most frames a client may send in one message (envelope and body; the routing id the ROUTER
/// adds is not counted); beyond that it is answered `FALSE too many frames`.
const MAX_CLIENT_FRAMES: usize = 64;
/// Most bytes of envelope (routing id included) echoed back: 64 ZeroMQ identities of 255 bytes.
const MAX_ENVELOPE_BYTES: usize = 64 * 256;
/// Longest idle wait, so the thread turns (and shows it is alive) at least this often.
const IDLE_WAKE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("cannot bind {endpoint}: {}", bind_reason(error))]
    Bind { endpoint: String, error: zmq::Error },
    #[error("cannot bind {endpoint}: a socket is already listening on {path}")]
    IpcInUse { endpoint: String, path: String },
    #[error("cannot bind {endpoint}: {path} exists and is not a socket (libzmq would delete it)")]
    IpcNotSocket { endpoint: String, path: String },
    #[error("receiver socket: {0}")]
    Socket(zmq::Error),
    #[error("receiver mailbox: {0}")]
    Mailbox(std::io::Error),
}

// Not `#[from]`: that would also make it the error's source, printed twice in a `{:#}` chain.
impl From<std::io::Error> for ReceiverError {
    fn from(e: std::io::Error) -> Self {
        ReceiverError::Mailbox(e)
    }
}

// Not `#[from]`: that would also make it the error's source, printed twice in a `{:#}` chain.
impl From<zmq::Error> for ReceiverError {
    fn from(e: zmq::Error) -> Self {
        ReceiverError::Socket(e)
    }
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

/// A message's reply address: its envelope on the socket (generation) it came through.
struct Envelope {
    frames: Vec<Vec<u8>>,
    socket: u64,
}

/// The main thread's handle on the running receiver.
pub struct ReceiverHandle {
    commands: Sender<Command>,
    bell: Arc<Doorbell>,
    last_bound: Arc<parking_lot::Mutex<String>>,
}

impl ReceiverHandle {
    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            self.bell.wake();
        }
    }

    /// Asks the receiver to apply new settings; the answer (`Ok` once bound, or why not:
    /// the old settings keep serving) comes on the returned channel. It may take up to the
    /// drain of the messages in flight plus a bind retry (about 2 s); a stop sent meanwhile
    /// abandons it.
    pub fn apply(&self, settings: ZmqSettings) -> Chan<Result<(), String>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Apply(settings, tx));
        rx
    }

    /// The endpoint the receiver serves (or served last).
    pub fn bound(&self) -> String {
        self.last_bound.lock().clone()
    }

    pub fn stop_intake(&self) {
        self.send(Command::Stop);
    }

    pub fn finish(&self) {
        self.send(Command::Finish);
    }
}

pub struct Receiver {
    /// Kept to make a fresh ROUTER when the CURVE settings change.
    context: zmq::Context,
    router: zmq::Socket,
    /// Bumped when the socket is replaced: replies for an older one are dropped.
    generation: u64,
    settings: ZmqSettings,
    /// The endpoint actually bound (wildcards resolved), for unbinding.
    bound: String,
    /// Messages read and accepted, not answered yet.
    in_flight: usize,
    bell: Arc<Doorbell>,
    commands: Chan<Command>,
    verdicts: Chan<Verdicts>,
    outbox: Arc<dyn Outbox>,
    intake: Option<Intake>,
    /// A message that found the queue full; intake pauses until it is queued.
    held: Option<Job>,
    metrics: Metrics,
    /// Bumped once per loop turn; the systemd watchdog pings only while it moves.
    heartbeat: Heartbeat,
    /// A stop or finish that arrived while a reload waited for answers: carried out next.
    interrupted: Option<Command>,
    /// The endpoint bound, shared with the handle (read after the receiver has returned).
    last_bound: Arc<parking_lot::Mutex<String>>,
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
        let mut router = context.socket(zmq::ROUTER)?;
        configure_router(&mut router, &settings)?;
        refuse_live_ipc(&settings.endpoint)?;
        router
            .bind(&settings.endpoint)
            .map_err(|error| ReceiverError::Bind {
                endpoint: settings.endpoint.clone(),
                error,
            })?;
        let bound = last_endpoint(&router).unwrap_or_else(|| settings.endpoint.clone());
        let (commands_tx, commands) = crossbeam_channel::unbounded();
        let (outbox, verdicts) = ChannelOutbox::open(Arc::clone(&bell) as Arc<dyn Wake>);
        let last_bound = Arc::new(parking_lot::Mutex::new(bound.clone()));
        let handle = ReceiverHandle {
            commands: commands_tx,
            bell: Arc::clone(&bell),
            last_bound: Arc::clone(&last_bound),
        };
        Ok((
            Receiver {
                context: context.clone(),
                router,
                generation: 0,
                settings,
                bound,
                in_flight: 0,
                bell,
                commands,
                verdicts,
                outbox,
                intake,
                held: None,
                metrics,
                heartbeat: Heartbeat::new("receiver"),
                interrupted: None,
                last_bound: Arc::clone(&last_bound),
            },
            handle,
        ))
    }

    /// The endpoint bound (with a wildcard port resolved).
    pub fn bound_endpoint(&self) -> &str {
        &self.bound
    }

    /// The receiver's heartbeat, for the watchdog.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Serves until told `finish`; then sends the replies already delivered and returns.
    /// An `ipc://` socket file is left for `remove_ipc_file` once the context has closed the
    /// listener (libzmq closes it asynchronously and never unlinks a named one itself).
    pub fn run(mut self) -> Result<(), ReceiverError> {
        let result = self.serve();
        // Time for the last replies to leave.
        let _ = self.router.set_linger(1000);
        *self.last_bound.lock() = self.bound.clone();
        result
    }

    fn serve(&mut self) -> Result<(), ReceiverError> {
        loop {
            self.heartbeat.beat();
            let reading =
                self.intake.as_ref().is_some_and(|i| i.has_room(1)) && self.held.is_none();
            let router_events = if reading {
                zmq::POLLIN
            } else {
                zmq::PollEvents::empty()
            };
            let timeout = i64::try_from(IDLE_WAKE.as_millis()).unwrap_or(1000);
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
            if router_ready && reading {
                self.read_messages()?;
            }
        }
    }

    /// Carries out the main thread's commands; true when told to finish.
    fn obey(&mut self) -> Result<bool, ReceiverError> {
        while let Some(command) = self
            .interrupted
            .take()
            .or_else(|| self.commands.try_recv().ok())
        {
            match command {
                Command::Apply(settings, answer) => {
                    let result = self.apply(settings);
                    let _ = answer.send(result);
                }
                Command::Stop => {
                    log::info!("receiver: intake stopped, draining");
                    // Dropping the intake lets workers finish the queue and exit.
                    self.intake = None;
                    if self.held.take().is_some() {
                        self.in_flight -= 1;
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
                self.in_flight = self.in_flight.saturating_sub(1);
                if envelope.socket != self.generation {
                    continue; // its socket was replaced: the client resends
                }
                send(
                    &self.router,
                    &envelope.frames,
                    &record::reply_text(&verdict),
                );
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
        self.in_flight += 1;
        let job = Job {
            records,
            received,
            reply: ReplyTo {
                outbox: Arc::clone(&self.outbox),
                tag: Box::new(Envelope {
                    frames,
                    socket: self.generation,
                }),
            },
        };
        intake.push_or_hold(job, &mut self.held);
    }

    fn retry_held(&mut self) {
        if let Some(intake) = &self.intake {
            intake.retry(&mut self.held);
        }
    }

    /// Sends verdicts (and queues the held message) until every message read so far is
    /// answered, or `drain` passes. Nothing is read from the ROUTER meanwhile.
    ///
    /// False when a stop or finish command came meanwhile: the reload is abandoned (the
    /// command is carried out next) so a shutdown never waits for it.
    fn quiesce(&mut self, drain: Duration) -> bool {
        let deadline = Instant::now() + drain;
        if self.in_flight > 0 {
            log::debug!(
                "receiver: answering {} message(s) in flight before the old socket closes",
                self.in_flight
            );
        }
        while self.in_flight > 0 {
            if let Ok(command) = self.commands.try_recv() {
                match command {
                    Command::Apply(_, answer) => {
                        let _ = answer.send(Err("another reload is being applied".into()));
                    }
                    other => {
                        self.interrupted = Some(other);
                        return false;
                    }
                }
            }
            self.heartbeat.beat();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "receiver: {} message(s) still unanswered after {} ms; their clients resend",
                    self.in_flight,
                    drain.as_millis()
                );
                return true;
            }
            let mut items = [zmq::PollItem::from_fd(self.bell.fd(), zmq::POLLIN)];
            let ms = i64::try_from(left.as_millis())
                .unwrap_or(i64::MAX)
                .clamp(1, 100);
            if zmq::poll(&mut items, ms).is_err() {
                return true;
            }
            self.bell.clear();
            self.send_verdicts();
            self.retry_held();
        }
        true
    }

    /// Applies reloaded settings, all or nothing. Any change takes a fresh socket: libzmq
    /// copies a socket's options (CURVE key, size guard) into each listener when it is bound,
    /// and unbinding an endpoint may still leave messages of its closed connections to be read
    /// (and committed) with nobody to answer. A fresh socket lets the old one answer what it
    /// read and close without being read again.
    fn apply(&mut self, new: ZmqSettings) -> Result<(), String> {
        // Bound to nothing (a failed reload could not get the old address back): any reload
        // tries to bind again.
        let serving = !self.bound.is_empty();
        if new == self.settings && serving {
            return Ok(());
        }
        let same_listener = new.endpoint == self.settings.endpoint
            && new.curve_secret_key == self.settings.curve_secret_key
            && new.max_message_bytes == self.settings.max_message_bytes;
        if !same_listener || !serving {
            self.replace_socket(&new)?;
        }
        self.settings = new;
        Ok(())
    }

    /// Moves serving to a fresh socket with `new` settings. A different address is bound
    /// before the old socket stops (no gap); the same address, or the same port widened to
    /// every interface, only once the old socket has closed, and on failure the old settings
    /// are bound again. Either way the old socket first answers every message it read.
    fn replace_socket(&mut self, new: &ZmqSettings) -> Result<(), String> {
        let fresh = self
            .context
            .socket(zmq::ROUTER)
            .and_then(|mut s| configure_router(&mut s, new).map(|()| s))
            .map_err(|e| format!("[zmq]: cannot make a socket: {e}"))?;
        let bind_error =
            |e: zmq::Error| format!("[zmq] endpoint: cannot bind {}: {e}", new.endpoint);
        let bound_early = if new.endpoint == self.settings.endpoint || self.bound.is_empty() {
            false
        } else {
            refuse_live_ipc(&new.endpoint).map_err(|e| e.to_string())?;
            match fresh.bind(&new.endpoint) {
                Ok(()) => true,
                // In use by our own listener only if the addresses overlap; else by another.
                Err(zmq::Error::EADDRINUSE) if overlaps(&new.endpoint, &self.bound) => false,
                Err(e) => return Err(bind_error(e)),
            }
        };
        if !self.quiesce(new.drain) {
            // `fresh` (and a new address it bound) goes; the old socket serves on.
            return Err("abandoned: shutting down".into());
        }
        let old = std::mem::replace(&mut self.router, fresh);
        // Time for the replies just sent to leave; the listener closes at once regardless.
        let _ = old.set_linger(1000);
        drop(old);
        self.generation += 1;
        if !bound_early {
            if let Err(e) = bind_retrying(&self.router, &new.endpoint) {
                // Back to the old settings, so nothing of the reload stays applied.
                let restored = self
                    .context
                    .socket(zmq::ROUTER)
                    .and_then(|mut s| configure_router(&mut s, &self.settings).map(|()| s))
                    .and_then(|s| bind_retrying(&s, &self.settings.endpoint).map(|()| s));
                match restored {
                    Ok(s) => self.router = s,
                    Err(back) => {
                        log::error!(
                            "receiver: cannot bind {} again: {back}; serving nothing until a reload binds an endpoint",
                            self.settings.endpoint
                        );
                        self.bound.clear();
                    }
                }
                return Err(bind_error(e));
            }
        }
        let old_bound = std::mem::replace(
            &mut self.bound,
            last_endpoint(&self.router).unwrap_or_else(|| new.endpoint.clone()),
        );
        *self.last_bound.lock() = self.bound.clone();
        if old_bound != self.bound {
            // Ours until a moment ago; the old listener may still be closing, so the file
            // goes by name (a new instance would have been refused while we held it).
            unlink_ipc(&old_bound);
        }
        log::info!(
            "receiver: now serving {} (was {old_bound}) on a new socket (CURVE {}, size guard {} bytes); clients of the old one reconnect",
            self.bound,
            if new.curve_secret_key.is_some() {
                "on"
            } else {
                "off"
            },
            guard_bytes(new.max_message_bytes)
        );
        Ok(())
    }
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

/// Two TCP endpoints that one listener's address excludes the other's: the same port, and the
/// same host or a wildcard on either side (`tcp://127.0.0.1:P` and `tcp://*:P`).
fn overlaps(a: &str, b: &str) -> bool {
    let split = |e: &str| {
        e.strip_prefix("tcp://")
            .and_then(|rest| rest.rsplit_once(':'))
            .map(|(h, p)| (h.to_string(), p.to_string()))
    };
    let wildcard = |h: &str| matches!(h, "*" | "0.0.0.0" | "[::]" | "::" | "[*]");
    match (split(a), split(b)) {
        (Some((ha, pa)), Some((hb, pb))) => {
            pa == pb && (ha == hb || wildcard(&ha) || wildcard(&hb))
        }
        _ => false,
    }
}

/// libzmq unlinks an existing `ipc://` socket file on bind, silently stealing the address of
/// another running instance: refuse when something answers on it.
fn refuse_live_ipc(endpoint: &str) -> Result<(), ReceiverError> {
    let Some(path) = ipc_path(endpoint) else {
        return Ok(());
    };
    if std::fs::symlink_metadata(path).is_ok() && !is_socket(path) {
        return Err(ReceiverError::IpcNotSocket {
            endpoint: endpoint.to_string(),
            path: path.to_string(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ReceiverError::IpcInUse {
            endpoint: endpoint.to_string(),
            path: path.to_string(),
        }),
        Err(_) => Ok(()),
    }
}

/// Removes our `ipc://` socket file once our listener is gone (nothing answers on it); for
/// the server to call after the ZeroMQ context has closed.
pub fn remove_ipc_file(endpoint: &str) {
    if refuse_live_ipc(endpoint).is_ok() {
        unlink_ipc(endpoint);
    }
}

fn unlink_ipc(endpoint: &str) {
    if let Some(path) = ipc_path(endpoint) {
        if is_socket(path) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The file of an `ipc://` endpoint (none for the abstract namespace or a generated name).
fn ipc_path(endpoint: &str) -> Option<&str> {
    let path = endpoint.strip_prefix("ipc://")?;
    (!path.starts_with('@') && path != "*").then_some(path)
}

fn is_socket(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
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

/// Judges a message's frames (pure): the first frame is the routing id the ROUTER added, the
/// last the body, every frame before the body the envelope echoed back. Bounded: more than
/// `MAX_CLIENT_FRAMES` client frames, a body over `max_bytes` or an envelope over
/// `MAX_ENVELOPE_BYTES` is refused before parsing, with a short envelope a REQ can match.
pub fn judge(mut frames: Vec<Vec<u8>>, max_bytes: usize) -> Incoming {
    if frames.len() < 2 {
        return Incoming::Ignore; // a ROUTER always adds the identity; nothing to answer
    }
    if frames.len() - 1 > MAX_CLIENT_FRAMES {
        return Incoming::Refuse {
            envelope: short_envelope(frames),
            reason: "too many frames".into(),
        };
    }
    let body = frames.pop().unwrap_or_default();
    // Only the body counts against `max_message_bytes`; the envelope has its own bound.
    let envelope_bytes: usize = frames.iter().map(Vec::len).sum();
    if body.len() > max_bytes || envelope_bytes > MAX_ENVELOPE_BYTES {
        return Incoming::Refuse {
            envelope: short_envelope(frames),
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

/// The envelope to answer a refused message with: the routing id and, when an empty delimiter
/// frame comes within `MAX_ENVELOPE_BYTES`, every frame up to it (what a REQ, or a DEALER that
/// sent a delimiter, needs to match the reply); else the routing id alone.
fn short_envelope(mut frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut bytes = 0;
    let mut keep = 1;
    for (i, frame) in frames.iter().enumerate().take(MAX_CLIENT_FRAMES) {
        bytes += frame.len();
        if bytes > MAX_ENVELOPE_BYTES {
            break;
        }
        if i > 0 && frame.is_empty() {
            keep = i + 1;
            break;
        }
    }
    frames.truncate(keep);
    frames
}

/// libzmq's per-frame limit: a peer sending more is disconnected without a reply. Well above
/// `max_message_bytes`, so messages up to there are answered `FALSE too large`.
fn guard_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(4).saturating_add(65_536)
}

fn configure_router(router: &mut zmq::Socket, settings: &ZmqSettings) -> Result<(), zmq::Error> {
    // A peer sending more than this is disconnected by libzmq: a memory guard well above the
    // size answered `FALSE too large`.
    router.set_maxmsgsize(
        i64::try_from(guard_bytes(settings.max_message_bytes)).unwrap_or(i64::MAX),
    )?;
    router.set_rcvhwm(1000)?;
    router.set_sndhwm(1000)?;
    match &settings.curve_secret_key {
        Some(key) => {
            router.set_zap_domain("feedd")?;
            enforce_zap(router)?;
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

/// With CURVE on, a handshake is refused when no ZAP handler answers, instead of libzmq's
/// default of letting it through unchecked (the allowlist must never fail open).
/// `zmq` 0.9 has no setter for `ZMQ_ZAP_ENFORCE_DOMAIN` (libzmq 4.3's option 93).
fn enforce_zap(router: &mut zmq::Socket) -> Result<(), zmq::Error> {
    const ZMQ_ZAP_ENFORCE_DOMAIN: std::os::raw::c_int = 93;
    let on: std::os::raw::c_int = 1;
    // SAFETY: a live socket owned by this thread; the value is a c_int of the given size.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            router.as_mut_ptr(),
            ZMQ_ZAP_ENFORCE_DOMAIN,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<std::os::raw::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: reads this thread's errno as libzmq left it.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
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

/// The bind error in words; libzmq says ENODEV ("No such device") for a host it cannot resolve.
fn bind_reason(error: &zmq::Error) -> String {
    match error {
        zmq::Error::ENODEV => {
            "the host is not a local address, an interface, or a name that resolves".to_string()
        }
        other => other.to_string(),
    }
}

fn last_endpoint(socket: &zmq::Socket) -> Option<String> {
    socket.get_last_endpoint().ok().and_then(Result::ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overlapping_addresses_wait_for_the_old_listener() {
        assert!(overlaps("tcp://*:5555", "tcp://127.0.0.1:5555"));
        assert!(overlaps("tcp://127.0.0.1:5555", "tcp://0.0.0.0:5555"));
        assert!(overlaps("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"));
        assert!(!overlaps("tcp://127.0.0.2:5555", "tcp://127.0.0.1:5555"));
        assert!(!overlaps("tcp://*:5556", "tcp://127.0.0.1:5555"));
        assert!(!overlaps("ipc:///tmp/a", "tcp://127.0.0.1:5555"));
    }

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
        let bad = judge(frames(&[b"id", b"1,2"]), 100);
        assert!(matches!(bad, Incoming::Refuse { reason, .. } if reason.starts_with("line 1:")));
    }

    /// `n` client frames as a REQ sends them (empty delimiter, then `n - 1` parts), after the id.
    fn req_frames(n: usize) -> Vec<Vec<u8>> {
        let mut f = vec![b"id".to_vec(), Vec::new()];
        f.extend((1..n).map(|i| format!("{i},1,1").into_bytes()));
        f
    }

    #[test]
    fn too_many_frames_is_answered_with_the_envelope() {
        // 64 client frames are judged as usual (the body is the last one).
        assert!(matches!(
            judge(req_frames(64), 1 << 20),
            Incoming::Accept { envelope, .. } if envelope.len() == 64
        ));
        match judge(req_frames(65), 1 << 20) {
            Incoming::Refuse { envelope, reason } => {
                assert_eq!(reason, "too many frames");
                assert_eq!(envelope, frames(&[b"id", b""]), "a REQ needs the delimiter");
            }
            other => panic!("{other:?}"),
        }
        // Behind a proxy: every routing id up to the delimiter.
        let mut proxied = frames(&[b"id", b"hop", b""]);
        proxied.extend((0..100).map(|_| b"x".to_vec()));
        assert!(matches!(
            judge(proxied, 1 << 20),
            Incoming::Refuse { envelope, .. } if envelope == frames(&[b"id", b"hop", b""])
        ));
        // No delimiter at all (a DEALER that sent none): the routing id alone.
        let bare: Vec<Vec<u8>> = (0..100).map(|_| b"x".to_vec()).collect();
        assert!(matches!(
            judge(bare, 1 << 20),
            Incoming::Refuse { envelope, .. } if envelope == frames(&[b"x"])
        ));
    }

    #[test]
    fn only_the_body_counts_against_max_bytes() {
        let body = vec![b'1'; 10];
        let exact = vec![b"routing-id".to_vec(), Vec::new(), body.clone()];
        // 10-byte body, limit 10: judged (malformed here), not "too large".
        assert!(matches!(
            judge(exact, 10),
            Incoming::Refuse { reason, .. } if reason != "too large"
        ));
        let over = vec![b"routing-id".to_vec(), Vec::new(), vec![b'1'; 11]];
        assert!(matches!(
            judge(over, 10),
            Incoming::Refuse { reason, envelope } if reason == "too large" && envelope.len() == 2
        ));
        // A huge envelope is refused and not echoed.
        let fat = vec![
            b"id".to_vec(),
            vec![b'e'; MAX_ENVELOPE_BYTES],
            Vec::new(),
            b"1,1,1".to_vec(),
        ];
        assert!(matches!(
            judge(fat, 100),
            Incoming::Refuse { reason, envelope } if reason == "too large" && envelope == frames(&[b"id"])
        ));
    }
}
