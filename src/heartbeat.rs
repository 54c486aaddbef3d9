//! A watched thread's sign of life: the thread bumps it each time round its loop, the
//! systemd watchdog (process/notify.rs) pings only while every heartbeat moves. A leaf: the
//! inputs are handed one without knowing who watches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct BeatInner {
    name: &'static str,
    /// Turns × 2, plus 1 while the thread is idle-waiting (see `idle`).
    value: AtomicU64,
}

/// A watched thread's sign of life; clones share one counter.
#[derive(Clone)]
pub struct Heartbeat {
    inner: Arc<BeatInner>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Heartbeat({}, {})", self.inner.name, self.load())
    }
}

impl Heartbeat {
    pub fn new(name: &'static str) -> Heartbeat {
        Heartbeat {
            inner: Arc::new(BeatInner {
                name,
                value: AtomicU64::new(0),
            }),
        }
    }

    /// Whose heartbeat this is, for the watchdog's "stalled" line.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// One more turn of the thread's loop (one relaxed add: cheap enough for every wake-up).
    pub fn beat(&self) {
        self.inner.value.fetch_add(2, Ordering::Relaxed);
    }

    /// Marks a blocking wait for outside events (a signal): alive while it lasts. The mark
    /// ends, and counts as a turn, when the guard drops.
    pub fn idle(&self) -> Idle<'_> {
        self.inner.value.fetch_or(1, Ordering::Relaxed);
        Idle(self)
    }

    /// Turns so far.
    pub fn turns(&self) -> u64 {
        self.load() >> 1
    }

    /// The raw counter, for the watchdog to compare between checks.
    pub fn load(&self) -> u64 {
        self.inner.value.load(Ordering::Relaxed)
    }
}

/// While alive, the heartbeat's thread is waiting for events, not wedged.
pub struct Idle<'a>(&'a Heartbeat);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.inner.value.fetch_and(!1, Ordering::Relaxed);
        self.0.beat();
    }
}
