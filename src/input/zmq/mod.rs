//! The ZeroMQ input: the ROUTER socket's owner, as an `Input` of the one driver
//! (input/driver.rs), which runs it on the pinned receiver thread.
//!
//! Messages are judged on arrival (`judge`, pure), so malformed and oversized ones are
//! answered at once and never occupy the queue; replies go out after COMMIT. A reply the
//! socket cannot take (`ZMQ_ROUTER_MANDATORY`: the peer's pipe is full) is held (`held`) and
//! sent when the socket is writable; while too many are held, the driver reads no more.
//!
//! Its part of a reload (endpoint, CURVE key, size limit) moves serving to a fresh socket:
//! libzmq copies a socket's options into each listener at bind, and unbinding may leave
//! messages of closed connections readable (committed with nobody to answer). A different
//! address is bound before the old socket stops (no gap); the same address, or the same port
//! widened, only once the old socket has closed, and on failure the old settings are bound
//! again. The old socket is read no more and answers what it read before it closes; what
//! clients sent it that was not read is neither stored nor answered: they resend.
//!
//! A listener handed to the process (by the supervisor at start or for a reload, or by systemd
//! socket activation; `listener`) serves its endpoint whenever the settings name it: the
//! ROUTER listens on a `dup` of it through `ZMQ_USE_FD`, at once, since the address never stops
//! being bound.

mod held;
mod judge;
pub mod listener;
mod socket;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, CurveKey};
use crate::input::driver::{Input, Ready, Taken};
use crate::input::mailbox::Doorbell;
use crate::input::record;
use crate::message::Verdict;
use crate::metrics::Metrics;
use held::{Held, Reply, Sent};
use listener::{Listener, Listeners};

pub use judge::{judge, Incoming};
pub use socket::remove_ipc_file;
use socket::{
    bind_reason, bind_retrying, configure_router, guard_bytes, last_endpoint, overlaps,
    refuse_live_ipc, send, unlink_ipc,
};

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
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
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
}

impl ZmqSettings {
    pub fn of(config: &Config) -> ZmqSettings {
        ZmqSettings {
            endpoint: config.zmq.endpoint.clone(),
            max_message_bytes: config.zmq.max_message_bytes,
            curve_secret_key: config.zmq.curve_secret_key,
        }
    }
}

/// A message's reply address: its envelope on the socket (generation) it came through.
pub struct Envelope {
    frames: Vec<Vec<u8>>,
    socket: u64,
    /// Records of the message, acknowledged when its `TRUE` is handed to the client.
    records: usize,
}

/// A fresh socket made for new settings, waiting for the old one's messages to be answered.
pub struct Fresh {
    socket: zmq::Socket,
    settings: ZmqSettings,
    /// Bound already (a different address); else bound once the old socket is closed.
    bound_early: bool,
}

/// The endpoint served, shared with the server, which removes an `ipc://` file at exit.
pub type BoundEndpoint = Arc<parking_lot::Mutex<String>>;

pub struct Receiver {
    /// Kept to make a fresh ROUTER when the settings change.
    context: zmq::Context,
    router: zmq::Socket,
    /// Bumped when the socket is replaced: replies for an older one are dropped.
    generation: u64,
    settings: ZmqSettings,
    /// The endpoint actually bound (wildcards resolved); empty while bound to nothing.
    bound: String,
    /// The endpoint of the socket replaced last: libzmq may still be closing its listener.
    released: Option<String>,
    shared_bound: BoundEndpoint,
    /// The listeners handed to this process: they outlive every socket bound on them.
    handed: Listeners,
    /// When the last reply went out: closing waits a moment after it (see `finish`).
    last_reply: Option<Instant>,
    /// Replies the socket could not take yet (a peer's pipe full), sent when it can.
    held: Held,
    /// The last flush moved nothing: wait on the retry timer, not on POLLOUT (which a ROUTER
    /// reports while any peer's pipe has room, not necessarily a held peer's).
    stalled: bool,
    metrics: Metrics,
}

/// How long the socket stays open (nothing read) after its last reply before it closes: a
/// client that set `ZMQ_IMMEDIATE` discards replies it received but had not read when its
/// connection drops (HAZARDS: ZeroMQ).
const CLOSE_PAUSE: Duration = Duration::from_millis(300);

/// Binds `socket` to `endpoint`: on a `dup` of the handed listener when it serves it (the
/// address never stops being bound, so no wait), else by libzmq, retrying while a replaced
/// listener of ours closes when `retry`.
fn bind_on(
    handed: &Listeners,
    socket: &mut zmq::Socket,
    endpoint: &str,
    retry: bool,
) -> Result<(), zmq::Error> {
    if let Some(fd) = handed.dup_for(endpoint) {
        let fd = fd.map_err(|e| zmq::Error::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
        crate::zmq_ffi::use_fd(socket, fd)?;
        return socket.bind(endpoint);
    }
    if retry {
        bind_retrying(socket, endpoint)
    } else {
        socket.bind(endpoint)
    }
}

/// How often held replies are offered again when the socket gave no sign it would take them.
const HELD_RETRY: Duration = Duration::from_millis(1);
/// Longest time `finish` spends sending held replies before the socket closes.
const FINISH_FLUSH: Duration = Duration::from_secs(1);

impl Receiver {
    /// Creates and binds the socket, so a bind failure is a start-up error. `handed`: the
    /// listeners handed to the process; one that does not serve the endpoint is an error.
    pub fn bind(
        context: &zmq::Context,
        settings: ZmqSettings,
        handed: Vec<Listener>,
        metrics: Metrics,
    ) -> Result<Receiver, ReceiverError> {
        let handed = Listeners::new(listener::take_for(handed, &settings.endpoint)?);
        let mut router = context.socket(zmq::ROUTER)?;
        configure_router(&mut router, &settings)?;
        if !handed.serves(&settings.endpoint) {
            refuse_live_ipc(&settings.endpoint)?;
        }
        bind_on(&handed, &mut router, &settings.endpoint, false).map_err(|error| {
            ReceiverError::Bind {
                endpoint: settings.endpoint.clone(),
                error,
            }
        })?;
        let bound = last_endpoint(&router).unwrap_or_else(|| settings.endpoint.clone());
        Ok(Receiver {
            context: context.clone(),
            router,
            generation: 0,
            released: None,
            settings,
            shared_bound: Arc::new(parking_lot::Mutex::new(bound.clone())),
            bound,
            handed,
            last_reply: None,
            held: Held::default(),
            stalled: false,
            metrics,
        })
    }

    /// The endpoint bound (with a wildcard port resolved).
    pub fn bound_endpoint(&self) -> &str {
        &self.bound
    }

    /// The listeners handed to this process, shared with the reload.
    pub fn listeners(&self) -> Listeners {
        self.handed.clone()
    }

    /// The endpoint served, kept up to date through reloads.
    pub fn shared_bound(&self) -> BoundEndpoint {
        Arc::clone(&self.shared_bound)
    }

    /// Sends a reply now, or holds it (its peer's pipe full, or replies already held for it).
    fn reply(&mut self, reply: Reply) {
        if self.held.waiting_for(&reply) {
            return self.held.hold(reply);
        }
        match send(&self.router, &reply.envelope, &reply.text) {
            Sent::Handed => self.acknowledged(reply.records),
            Sent::Full => self.held.hold(reply),
            Sent::Gone => self.lost("peer_gone", 1),
        }
    }

    /// Offers the held replies again.
    fn flush(&mut self) {
        let router = &self.router;
        let done = self.held.flush(|r| send(router, &r.envelope, &r.text));
        self.stalled = done.handed == 0 && done.gone == 0;
        self.acknowledged(done.records);
        self.lost("peer_gone", done.gone);
    }

    fn acknowledged(&self, records: usize) {
        if records > 0 {
            self.metrics.records_acknowledged.inc_by(records as u64);
        }
    }

    fn lost(&self, reason: &str, replies: usize) {
        if replies > 0 {
            log::debug!("receiver: {replies} reply(ies) dropped: {reason}");
            self.metrics
                .replies_dropped
                .with_label_values(&[reason])
                .inc_by(replies as u64);
        }
    }

    /// Before the socket closes: sends what it takes within `FINISH_FLUSH`, counts the rest.
    fn flush_before_close(&mut self, reason: &str) {
        let until = Instant::now() + FINISH_FLUSH;
        while !self.held.is_empty() && Instant::now() < until {
            self.flush();
            if self.stalled {
                let mut items = [self.router.as_poll_item(zmq::POLLOUT)];
                let _ = zmq::poll(&mut items, 1);
            }
        }
        let left = self.held.clear();
        if left > 0 {
            log::warn!("receiver: {left} reply(ies) not taken by their clients before the socket closed; they resend");
        }
        self.lost(reason, left);
    }

    fn make_socket(&self, settings: &ZmqSettings) -> Result<zmq::Socket, zmq::Error> {
        let mut s = self.context.socket(zmq::ROUTER)?;
        configure_router(&mut s, settings)?;
        Ok(s)
    }

    /// After a failed late bind: the old settings on a fresh socket again, so nothing of the
    /// reload stays applied (or, if even that fails, bound to nothing until a reload binds).
    fn restore(&mut self) {
        let restored = self.make_socket(&self.settings).and_then(|mut s| {
            bind_on(&self.handed, &mut s, &self.settings.endpoint, true).map(|()| s)
        });
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
    }
}

/// The same address, or one a listener on `a` keeps from being bound.
fn ours(a: &str, b: &str) -> bool {
    a == b || overlaps(a, b)
}

impl Input for Receiver {
    type Tag = Envelope;
    type Part = ZmqSettings;
    type Prepared = Fresh;
    type Error = ReceiverError;

    fn name(&self) -> &'static str {
        "receiver"
    }

    fn wait(&mut self, bell: &Doorbell, read: bool, max: Duration) -> Result<Ready, Self::Error> {
        let mut events = if read {
            zmq::POLLIN
        } else {
            zmq::PollEvents::empty()
        };
        let mut max = max;
        if !self.held.is_empty() {
            max = max.min(HELD_RETRY);
            if !self.stalled {
                events |= zmq::POLLOUT;
            }
        }
        let mut items = [
            self.router.as_poll_item(events),
            zmq::PollItem::from_fd(bell.fd(), zmq::POLLIN),
        ];
        // At least 1 ms: a shorter max would busy-loop.
        let ms = i64::try_from(max.as_millis()).unwrap_or(i64::MAX).max(1);
        zmq::poll(&mut items, ms)?;
        Ok(Ready {
            readable: items[0].is_readable(),
            mail: items[1].is_readable(),
        })
    }

    fn read_one(&mut self) -> Result<Taken<Envelope>, ReceiverError> {
        let frames = match self.router.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => frames,
            Err(zmq::Error::EAGAIN) => return Ok(Taken::Nothing),
            Err(e) => return Err(e.into()),
        };
        let received = Instant::now();
        Ok(match judge(frames, self.settings.max_message_bytes) {
            Incoming::Ignore => Taken::Ignored,
            Incoming::Refuse { envelope, reason } => {
                self.reply(Reply {
                    envelope,
                    text: format!("FALSE {reason}").into_bytes().into(),
                    records: 0,
                });
                Taken::Refused
            }
            Incoming::Accept { envelope, records } => Taken::Accepted {
                tag: Envelope {
                    frames: envelope,
                    socket: self.generation,
                    records: records.len(),
                },
                records,
                received,
            },
        })
    }

    fn answer(&mut self, envelope: Envelope, verdict: Verdict) {
        // Of a replaced socket: the client resends.
        if envelope.socket != self.generation {
            return self.lost("replaced", 1);
        }
        let records = match verdict {
            Verdict::Accept { .. } => envelope.records,
            Verdict::Conflict(_) => 0,
        };
        self.last_reply = Some(Instant::now());
        self.reply(Reply {
            envelope: envelope.frames,
            text: record::reply_text(&verdict),
            records,
        });
    }

    fn backlog_full(&self) -> bool {
        self.held.is_full()
    }

    fn tick(&mut self) {
        if !self.held.is_empty() {
            self.flush();
        }
    }

    fn prepare(&mut self, new: ZmqSettings) -> Result<Option<Fresh>, String> {
        // Bound to nothing (a failed reload could not get the old address back): any reload
        // tries to bind again.
        let serving = !self.bound.is_empty();
        if new == self.settings && serving {
            return Ok(None);
        }
        let mut socket = self
            .make_socket(&new)
            .map_err(|e| format!("[zmq]: cannot make a socket: {e}"))?;
        let handed = &self.handed;
        let bound_early = if handed.serves(&new.endpoint) {
            bind_on(handed, &mut socket, &new.endpoint, false)
                .map_err(|e| format!("[zmq] endpoint: cannot bind {}: {e}", new.endpoint))?;
            true
        } else if serving && handed.serves(&self.bound) && overlaps(&new.endpoint, &self.bound) {
            // The handed listener keeps the address taken whatever this process closes:
            // refused before anything is switched.
            return Err(format!(
                "[zmq] endpoint: {} overlaps {}, whose listening socket outlives this process (supervisor or systemd); change it with a restart",
                new.endpoint, self.bound
            ));
        } else if new.endpoint == self.settings.endpoint || !serving {
            false
        } else {
            refuse_live_ipc(&new.endpoint).map_err(|e| e.to_string())?;
            match socket.bind(&new.endpoint) {
                Ok(()) => true,
                // In use by our own listener only if the addresses overlap; else by another.
                Err(zmq::Error::EADDRINUSE) if overlaps(&new.endpoint, &self.bound) => false,
                // Our replaced socket's listener, closing (a reload rolled back): retried.
                Err(zmq::Error::EADDRINUSE)
                    if self
                        .released
                        .as_deref()
                        .is_some_and(|r| ours(r, &new.endpoint)) =>
                {
                    bind_retrying(&socket, &new.endpoint).map_err(|e| {
                        format!("[zmq] endpoint: cannot bind {}: {e}", new.endpoint)
                    })?;
                    true
                }
                Err(e) => return Err(format!("[zmq] endpoint: cannot bind {}: {e}", new.endpoint)),
            }
        };
        Ok(Some(Fresh {
            socket,
            settings: new,
            bound_early,
        }))
    }

    fn commit(&mut self, fresh: Fresh) -> Result<(), String> {
        let Fresh {
            socket,
            settings: new,
            bound_early,
        } = fresh;
        self.flush_before_close("replaced");
        let old = std::mem::replace(&mut self.router, socket);
        // Time for the replies just sent to leave; the listener closes at once regardless.
        let _ = old.set_linger(1000);
        drop(old);
        self.generation += 1;
        if !bound_early {
            if let Err(e) = bind_on(&self.handed, &mut self.router, &new.endpoint, true) {
                self.restore();
                return Err(format!("[zmq] endpoint: cannot bind {}: {e}", new.endpoint));
            }
        }
        let old_bound = std::mem::replace(
            &mut self.bound,
            last_endpoint(&self.router).unwrap_or_else(|| new.endpoint.clone()),
        );
        *self.shared_bound.lock() = self.bound.clone();
        self.released = Some(old_bound.clone());
        if old_bound != self.bound && !self.handed.serves(&old_bound) {
            // Ours until a moment ago; the old listener may still be closing, so the file
            // goes by name (a new instance would have been refused while we held it).
            unlink_ipc(&old_bound);
        }
        log::info!(
            "receiver: now serving {} (was {old_bound}) on a new socket (CURVE {}, size guard {} bytes); clients of the old one reconnect",
            self.bound,
            if new.curve_secret_key.is_some() { "on" } else { "off" },
            guard_bytes(new.max_message_bytes)
        );
        self.settings = new;
        Ok(())
    }

    fn finish(&mut self) {
        self.flush_before_close("shutdown");
        // Open a moment after the last reply, so clients take it before the connection drops.
        if let Some(pause) = self
            .last_reply
            .map(|at| CLOSE_PAUSE.saturating_sub(at.elapsed()))
        {
            std::thread::sleep(pause);
        }
        // Time for the last replies to leave.
        let _ = self.router.set_linger(1000);
        *self.shared_bound.lock() = self.bound.clone();
    }
}
