//! The ZeroMQ input: the ROUTER socket's owner, as an `Input` of the one driver
//! (input/driver.rs), which runs it on the pinned receiver thread.
//!
//! Messages are judged on arrival (`judge`, pure), so malformed and oversized ones are
//! answered at once and never occupy the queue; replies go out after COMMIT.
//!
//! Its part of a reload (endpoint, CURVE key, size limit) moves serving to a fresh socket:
//! libzmq copies a socket's options into each listener at bind, and unbinding may leave
//! messages of closed connections readable (committed with nobody to answer). A different
//! address is bound before the old socket stops (no gap); the same address, or the same port
//! widened, only once the old socket has closed, and on failure the old settings are bound
//! again. The old socket is read no more and answers what it read before it closes; what
//! clients sent it that was not read is neither stored nor answered: they resend.

mod judge;
mod socket;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, CurveKey};
use crate::input::driver::{Input, Ready, Taken};
use crate::input::mailbox::Doorbell;
use crate::input::record;
use crate::message::Verdict;

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
    /// `feedd_replies_dropped_total`.
    replies_dropped: prometheus::IntCounter,
}

impl Receiver {
    /// Creates and binds the socket, so a bind failure is a start-up error.
    pub fn bind(
        context: &zmq::Context,
        settings: ZmqSettings,
        replies_dropped: prometheus::IntCounter,
    ) -> Result<Receiver, ReceiverError> {
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
        Ok(Receiver {
            context: context.clone(),
            router,
            generation: 0,
            released: None,
            settings,
            shared_bound: Arc::new(parking_lot::Mutex::new(bound.clone())),
            bound,
            replies_dropped,
        })
    }

    /// The endpoint bound (with a wildcard port resolved).
    pub fn bound_endpoint(&self) -> &str {
        &self.bound
    }

    /// The endpoint served, kept up to date through reloads.
    pub fn shared_bound(&self) -> BoundEndpoint {
        Arc::clone(&self.shared_bound)
    }

    fn make_socket(&self, settings: &ZmqSettings) -> Result<zmq::Socket, zmq::Error> {
        let mut s = self.context.socket(zmq::ROUTER)?;
        configure_router(&mut s, settings)?;
        Ok(s)
    }

    /// After a failed late bind: the old settings on a fresh socket again, so nothing of the
    /// reload stays applied (or, if even that fails, bound to nothing until a reload binds).
    fn restore(&mut self) {
        let restored = self
            .make_socket(&self.settings)
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
        let events = if read {
            zmq::POLLIN
        } else {
            zmq::PollEvents::empty()
        };
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
                let text = format!("FALSE {reason}");
                if !send(&self.router, &envelope, text.as_bytes()) {
                    self.replies_dropped.inc();
                }
                Taken::Refused
            }
            Incoming::Accept { envelope, records } => Taken::Accepted {
                records,
                received,
                tag: Envelope {
                    frames: envelope,
                    socket: self.generation,
                },
            },
        })
    }

    fn answer(&mut self, envelope: Envelope, verdict: Verdict) {
        // Of a replaced socket: the client resends.
        let text = record::reply_text(&verdict);
        if envelope.socket != self.generation || !send(&self.router, &envelope.frames, &text) {
            self.replies_dropped.inc();
        }
    }

    fn prepare(&mut self, new: ZmqSettings) -> Result<Option<Fresh>, String> {
        // Bound to nothing (a failed reload could not get the old address back): any reload
        // tries to bind again.
        let serving = !self.bound.is_empty();
        if new == self.settings && serving {
            return Ok(None);
        }
        let socket = self
            .make_socket(&new)
            .map_err(|e| format!("[zmq]: cannot make a socket: {e}"))?;
        let bound_early = if new.endpoint == self.settings.endpoint || !serving {
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
        let old = std::mem::replace(&mut self.router, socket);
        // Time for the replies just sent to leave; the listener closes at once regardless.
        let _ = old.set_linger(1000);
        drop(old);
        self.generation += 1;
        if !bound_early {
            if let Err(e) = bind_retrying(&self.router, &new.endpoint) {
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
        if old_bound != self.bound {
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
        // Time for the last replies to leave.
        let _ = self.router.set_linger(1000);
        *self.shared_bound.lock() = self.bound.clone();
    }
}
