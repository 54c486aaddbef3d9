//! The receiver thread: the only owner of the ROUTER socket.
//!
//! It polls three sockets together: the ROUTER (client messages; polled only while the queue
//! has room, which is the back-pressure), the inproc PULL where workers push replies (written
//! to the ROUTER as they arrive, so replies never wait on a timer), and an inproc PULL for
//! control (`stop` intake, `finish`). Parsing happens here, so malformed and oversized messages
//! are answered at once and never occupy the queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam_channel::{Sender, TrySendError};

use crate::config::{Config, CurveKey};
use crate::input::record::{self, Record};
use crate::input::reply;
use crate::metrics::Metrics;
use crate::pipeline::worker::Job;
use crate::process::notify::Heartbeat;

/// Where workers push their replies.
pub const REPLY_ENDPOINT: &str = "inproc://feedd-replies";
/// Where the main and signal threads send control words.
pub const CONTROL_ENDPOINT: &str = "inproc://feedd-control";

/// Control words understood by the receiver.
pub const STOP: &[u8] = b"stop";
pub const FINISH: &[u8] = b"finish";
pub const RELOAD: &[u8] = b"reload";

/// Most messages read in one go before the reply socket gets a turn (fairness to replies).
const READ_BURST: usize = 256;
/// Most frames in one message; beyond that it is answered FALSE (bounded envelopes).
const MAX_FRAMES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("receiver socket: {0}")]
    Socket(#[from] zmq::Error),
}

pub struct Receiver {
    /// Kept to make a fresh ROUTER when the CURVE settings change.
    context: zmq::Context,
    router: zmq::Socket,
    replies: zmq::Socket,
    control: zmq::Socket,
    /// The endpoint actually bound (wildcards resolved), for unbinding on an endpoint change.
    bound: String,
    endpoint: String,
    /// The CURVE secret the ROUTER's listener was bound with.
    curve: Option<CurveKey>,
    /// The config last looked at, so an unchanged one costs a pointer compare per wake-up.
    seen: Arc<Config>,
    jobs: Option<Sender<Job>>,
    /// A message that found the channel full; intake pauses until it is queued.
    held: Option<Job>,
    config: Arc<ArcSwap<Config>>,
    metrics: Metrics,
    /// Bumped once per loop turn; the systemd watchdog pings only while it moves.
    heartbeat: Heartbeat,
}

impl Receiver {
    /// Creates and binds every socket, so a bind failure is a start-up error.
    pub fn bind(
        context: &zmq::Context,
        config: Arc<ArcSwap<Config>>,
        jobs: Sender<Job>,
        metrics: Metrics,
    ) -> Result<Receiver, ReceiverError> {
        let replies = context.socket(zmq::PULL)?;
        replies.set_rcvhwm(0)?;
        replies.bind(REPLY_ENDPOINT)?;
        let control = context.socket(zmq::PULL)?;
        control.bind(CONTROL_ENDPOINT)?;
        let current = config.load_full();
        let router = context.socket(zmq::ROUTER)?;
        configure_router(&router, &current)?;
        let endpoint = current.zmq.endpoint.clone();
        router
            .bind(&endpoint)
            .map_err(|source| ReceiverError::Bind {
                endpoint: endpoint.clone(),
                source,
            })?;
        let bound = last_endpoint(&router).unwrap_or_else(|| endpoint.clone());
        Ok(Receiver {
            context: context.clone(),
            router,
            replies,
            control,
            bound,
            endpoint,
            curve: current.zmq.curve_secret_key,
            seen: Arc::clone(&current),
            jobs: Some(jobs),
            held: None,
            config,
            metrics,
            heartbeat: Heartbeat::new("receiver"),
        })
    }

    /// The receiver's heartbeat, for the watchdog.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// The endpoint bound (with a wildcard port resolved).
    pub fn bound_endpoint(&self) -> &str {
        &self.bound
    }

    /// Serves until told `finish`; then drains the replies already pushed and returns.
    pub fn run(mut self) -> Result<(), ReceiverError> {
        loop {
            self.heartbeat.beat();
            self.follow_config();
            let capacity = self.config.load().pipeline.queue_capacity;
            if self.held.is_some() {
                self.retry_held();
            }
            let intake = self.jobs.is_some()
                && self.held.is_none()
                && self.metrics.queue_depth.load(Ordering::Relaxed) < capacity;
            let router_events = if intake {
                zmq::POLLIN
            } else {
                zmq::PollEvents::empty()
            };
            let mut items = [
                self.router.as_poll_item(router_events),
                self.replies.as_poll_item(zmq::POLLIN),
                self.control.as_poll_item(zmq::POLLIN),
            ];
            // While paused, wake now and then: workers free queue room before they reply.
            let timeout = if intake { 1000 } else { 5 };
            zmq::poll(&mut items, timeout)?;
            let (router_ready, replies_ready, control_ready) = (
                items[0].is_readable(),
                items[1].is_readable(),
                items[2].is_readable(),
            );
            if replies_ready {
                self.forward_replies()?;
            }
            if control_ready {
                let word = self.control.recv_bytes(0)?;
                if word == STOP {
                    log::info!("receiver: intake stopped, draining");
                    // Dropping the sender lets workers finish the queue and exit.
                    self.jobs = None;
                } else if word == FINISH {
                    self.forward_replies()?;
                    self.router.set_linger(1000)?;
                    return Ok(());
                }
            }
            if router_ready && intake {
                self.read_messages(capacity)?;
            }
        }
    }

    /// Sends every batch of replies the workers have pushed so far.
    fn forward_replies(&mut self) -> Result<(), ReceiverError> {
        let mut batch = zmq::Message::new();
        loop {
            match self.replies.recv(&mut batch, zmq::DONTWAIT) {
                Ok(()) => {
                    for frames in reply::split(&batch) {
                        self.send(frames);
                    }
                }
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends on the ROUTER; a reply to a gone or saturated peer is dropped, never waited for.
    fn send<T: AsRef<[u8]>>(&self, frames: Vec<T>) {
        let last = frames.len().saturating_sub(1);
        for (i, frame) in frames.iter().enumerate() {
            let flags = zmq::DONTWAIT | if i < last { zmq::SNDMORE } else { 0 };
            if let Err(e) = self.router.send(frame.as_ref(), flags) {
                // A multipart send fails on its first frame (unroutable peers are dropped
                // silently by the ROUTER), so nothing half-sent is left behind.
                log::debug!("receiver: reply dropped: {e}");
                return;
            }
        }
    }

    fn reply_false(&self, mut envelope: Vec<Vec<u8>>, reason: &str) {
        self.metrics.messages_rejected.inc();
        envelope.push(format!("FALSE {reason}").into_bytes());
        self.send(envelope);
    }

    fn read_messages(&mut self, capacity: usize) -> Result<(), ReceiverError> {
        let max_bytes = self.config.load().zmq.max_message_bytes;
        for _ in 0..READ_BURST {
            if self.metrics.queue_depth.load(Ordering::Relaxed) >= capacity || self.held.is_some() {
                return Ok(());
            }
            let frames = match self.router.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let received = Instant::now();
            self.metrics.messages_received.inc();
            match judge(frames, max_bytes) {
                Incoming::Ignore => {}
                Incoming::Refuse { envelope, reason } => self.reply_false(envelope, &reason),
                Incoming::Accept { envelope, records } => self.enqueue(Job {
                    envelope,
                    records,
                    received,
                }),
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, job: Job) {
        let Some(jobs) = &self.jobs else { return };
        let n = job.records.len();
        self.metrics.queue_depth.fetch_add(n, Ordering::Relaxed);
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => self.held = Some(job),
            Err(TrySendError::Disconnected(_)) => {
                // Every worker is gone; the message stays unanswered and the client resends.
                self.metrics.queue_depth.fetch_sub(n, Ordering::Relaxed);
                log::error!("receiver: no worker left to take messages");
            }
        }
    }

    fn retry_held(&mut self) {
        let (Some(jobs), Some(job)) = (&self.jobs, self.held.take()) else {
            return;
        };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => self.held = Some(job),
            Err(TrySendError::Disconnected(job)) => {
                self.metrics
                    .queue_depth
                    .fetch_sub(job.records.len(), Ordering::Relaxed);
            }
        }
    }

    /// Applies a reloaded endpoint or CURVE key. A new endpoint is bound before the old one
    /// is unbound, and a failed bind keeps the old one serving. New CURVE settings replace the
    /// socket (a moment without a listener; connected clients reconnect).
    fn follow_config(&mut self) {
        let config = self.config.load();
        if Arc::ptr_eq(&config, &self.seen) {
            return;
        }
        self.seen = Arc::clone(&config);
        let endpoint_changed = config.zmq.endpoint != self.endpoint;
        let curve_changed = config.zmq.curve_secret_key != self.curve;
        if !endpoint_changed && !curve_changed {
            return;
        }
        let new = config.zmq.endpoint.clone();
        self.endpoint = new.clone();
        self.curve = config.zmq.curve_secret_key;
        if curve_changed {
            // New security settings get a fresh socket: changing the mechanism of a socket with
            // live sessions crashed libzmq 4.3 here. Replies still due to the old socket's
            // peers are dropped with it; those clients resend and are answered TRUE.
            let fresh = match self
                .context
                .socket(zmq::ROUTER)
                .and_then(|s| configure_router(&s, &config).map(|()| s))
            {
                Ok(s) => s,
                Err(e) => {
                    log::error!("receiver: cannot apply the new [zmq] settings: {e}");
                    return;
                }
            };
            let old = std::mem::replace(&mut self.router, fresh);
            let _ = old.set_linger(0);
            // Closing it releases its listener (asynchronously: the bind below retries).
            drop(old);
        } else if let Err(e) = configure_router(&self.router, &config) {
            log::error!("receiver: cannot apply the new [zmq] settings: {e}");
            return;
        }
        drop(config);
        if let Err(e) = bind_retrying(&self.router, &new, curve_changed) {
            log::error!(
                "receiver: cannot bind {new}: {e}; still serving {}",
                if curve_changed {
                    "nothing"
                } else {
                    self.bound.as_str()
                }
            );
            return;
        }
        let old = std::mem::replace(
            &mut self.bound,
            last_endpoint(&self.router).unwrap_or_else(|| new.clone()),
        );
        if endpoint_changed && !curve_changed {
            if let Err(e) = unbind(&mut self.router, &old) {
                log::warn!("receiver: cannot unbind old endpoint {old}: {e}");
            }
        }
        log::info!(
            "receiver: now serving {} (was {old}), CURVE {}",
            self.bound,
            if self.curve.is_some() { "on" } else { "off" }
        );
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

fn configure_router(router: &zmq::Socket, config: &Config) -> Result<(), zmq::Error> {
    // A peer sending more than this is disconnected by libzmq: a memory guard well above the
    // size answered `FALSE too large`.
    let guard = config
        .zmq
        .max_message_bytes
        .saturating_mul(4)
        .saturating_add(65_536);
    router.set_maxmsgsize(i64::try_from(guard).unwrap_or(i64::MAX))?;
    router.set_rcvhwm(1000)?;
    router.set_sndhwm(1000)?;
    match &config.zmq.curve_secret_key {
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
fn bind_retrying(socket: &zmq::Socket, endpoint: &str, rebind: bool) -> Result<(), zmq::Error> {
    let mut tries = if rebind { 200 } else { 1 };
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
