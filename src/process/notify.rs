//! systemd's notify protocol (SPEC §6): readiness, reload, stop, status, and a watchdog that
//! pings only while the threads it watches are turning.
//!
//! `Notifier::from_env()` is `None` without `NOTIFY_SOCKET`, so callers hold an
//! `Option<Notifier>` and nothing changes outside systemd. The datagrams are sent by the
//! `sd-notify` crate; a failed send is logged and never stops serving.
//!
//! Liveness: each watched thread (the inputs, signals) holds a
//! `Heartbeat` (src/heartbeat.rs) and calls `beat()` each time round its loop; a thread that blocks waiting for
//! outside events (the signal thread in `wait()`) marks that wait with `idle()`. One thread,
//! `Watchdog` (owned, stopped and joined by whoever started it), sends `WATCHDOG=1` every half
//! `WATCHDOG_USEC` only if every heartbeat advanced, or sat idle, since the previous check, so a
//! wedged input thread stops the pings and systemd restarts feedd (HAZARDS: systemd). The same
//! thread sends a `STATUS=` line every few seconds from a `Snapshot`.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use sd_notify::NotifyState;

use crate::heartbeat::Heartbeat;

/// How often the `STATUS=` line is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Below this `WATCHDOG_USEC`, an idle receiver (one turn per second) may miss a ping window.
const SHORTEST_SAFE_WATCHDOG: Duration = Duration::from_secs(3);

/// A handle on the service manager's notify socket (only made when `NOTIFY_SOCKET` is set).
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Half of `WATCHDOG_USEC` (for this pid), if systemd wants pings.
    ping_every: Option<Duration>,
}

impl Notifier {
    /// `None` when feedd does not run under a notify-type service manager.
    pub fn from_env() -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        if let Some(d) = watchdog {
            if d < SHORTEST_SAFE_WATCHDOG {
                log::warn!(
                    "WATCHDOG_USEC is {} ms; below {} ms an idle receiver may miss a ping",
                    d.as_millis(),
                    SHORTEST_SAFE_WATCHDOG.as_millis()
                );
            }
        }
        Some(Notifier {
            ping_every: watchdog.map(|d| d / 2),
        })
    }

    /// Start-up is complete: feedd serves (the moment `--daemon` reports ready).
    pub fn ready(&self) {
        self.send("READY", &[NotifyState::Ready]);
    }

    /// A reload begins. systemd 253+ needs `MONOTONIC_USEC` (CLOCK_MONOTONIC) in the same
    /// datagram to tell this reload from an older one.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send("RELOADING", &[NotifyState::Reloading, now]),
            Err(e) => {
                log::warn!("sd_notify: no monotonic clock ({e}); RELOADING=1 sent without it");
                self.send("RELOADING", &[NotifyState::Reloading]);
            }
        }
    }

    /// The reload is over, applied or refused: serving again either way, and `status` says which.
    pub fn reload_done(&self, applied: bool, status: &str) {
        let line = if applied {
            format!("reload applied; {status}")
        } else {
            format!("reload refused, running config kept: {status}")
        };
        self.send("READY", &[NotifyState::Ready, NotifyState::Status(&line)]);
    }

    /// The drain begins (SIGTERM/SIGINT or a failed pipeline thread).
    pub fn stopping(&self) {
        self.send("STOPPING", &[NotifyState::Stopping]);
    }

    /// A free-form `STATUS=` line (one line: newlines would end the field).
    pub fn status(&self, line: &str) {
        let line = line.replace('\n', " ");
        self.send("STATUS", &[NotifyState::Status(&line)]);
    }

    fn ping(&self) {
        self.send("WATCHDOG", &[NotifyState::Watchdog]);
    }

    fn send(&self, what: &str, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            log::warn!("sd_notify: cannot send {what}: {e}");
        }
    }

    /// Starts the watchdog/status thread over `beats`; `snapshot` is called on that thread.
    pub fn start_watchdog<F>(&self, beats: Vec<Heartbeat>, snapshot: F) -> std::io::Result<Watchdog>
    where
        F: FnMut() -> Snapshot + Send + 'static,
    {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let notifier = self.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || notifier.watch(beats, snapshot, &stop_rx))?;
        Ok(Watchdog {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    fn watch<F>(
        &self,
        beats: Vec<Heartbeat>,
        mut snapshot: F,
        stop: &crossbeam_channel::Receiver<()>,
    ) where
        F: FnMut() -> Snapshot,
    {
        let mut seen: Vec<u64> = beats.iter().map(Heartbeat::load).collect();
        let mut rate = Rate::new(snapshot().committed);
        let start = Instant::now();
        let mut next_ping = self.ping_every.map(|p| start + p);
        let mut next_status = start + STATUS_EVERY;
        loop {
            let wake = next_ping.map_or(next_status, |p| p.min(next_status));
            match stop.recv_deadline(wake) {
                Err(RecvTimeoutError::Timeout) => {}
                // A message or a dropped sender: both mean stop.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if let (Some(at), Some(every)) = (next_ping, self.ping_every) {
                if now >= at {
                    let stalled = stalled(&beats, &mut seen);
                    if stalled.is_empty() {
                        self.ping();
                    } else {
                        log::warn!(
                            "watchdog: no ping, {} made no progress for {} ms",
                            stalled.join(", "),
                            every.as_millis()
                        );
                    }
                    // Fixed rate: a late wake-up does not push later pings back.
                    let mut next = at + every;
                    while next <= now {
                        next += every;
                    }
                    next_ping = Some(next);
                }
            }
            if now >= next_status {
                let s = snapshot();
                let per_second = rate.update(s.committed, now);
                self.status(&s.line(per_second));
                next_status = now + STATUS_EVERY;
            }
        }
    }
}

/// The names of the heartbeats that neither advanced nor sat idle since the last check;
/// `seen` is updated to the current values.
fn stalled(beats: &[Heartbeat], seen: &mut [u64]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (beat, last) in beats.iter().zip(seen.iter_mut()) {
        let now = beat.load();
        let advanced = now >> 1 != *last >> 1;
        let idle = now & 1 == 1;
        if !advanced && !idle {
            out.push(beat.name());
        }
        *last = now;
    }
    out
}

/// What the `STATUS=` line reports, gathered by the caller (config and metrics live there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The inputs served, e.g. `zmq tcp://127.0.0.1:5555`.
    pub inputs: String,
    /// Records committed since start (the rate is computed from its change).
    pub committed: u64,
    /// Records waiting between the inputs and the workers.
    pub queue_depth: usize,
    /// The database host in use, e.g. `127.0.0.1:3306/test`.
    pub database: String,
}

impl Snapshot {
    /// The status line for a records/s rate over the last interval.
    pub fn line(&self, per_second: f64) -> String {
        format!(
            "serving {}; {:.0} records/s; queue {}; database {}",
            self.inputs, per_second, self.queue_depth, self.database
        )
    }
}

/// Records/s between two readings of the committed counter.
struct Rate {
    last: u64,
    at: Instant,
}

impl Rate {
    fn new(committed: u64) -> Rate {
        Rate {
            last: committed,
            at: Instant::now(),
        }
    }

    fn update(&mut self, committed: u64, now: Instant) -> f64 {
        let secs = now.duration_since(self.at).as_secs_f64();
        let delta = committed.saturating_sub(self.last);
        self.last = committed;
        self.at = now;
        if secs > 0.0 {
            delta as f64 / secs
        } else {
            0.0
        }
    }
}

/// The running watchdog/status thread; `stop` (or drop) ends and joins it.
pub struct Watchdog {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn shut(&mut self) {
        // Dropping the sender wakes the thread at once.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("watchdog thread panicked");
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_must_advance_or_idle_between_checks() {
        let a = Heartbeat::new("receiver");
        let b = Heartbeat::new("signals");
        let beats = vec![a.clone(), b.clone()];
        let mut seen: Vec<u64> = beats.iter().map(Heartbeat::load).collect();
        assert_eq!(stalled(&beats, &mut seen), vec!["receiver", "signals"]);
        a.beat();
        let guard = b.idle();
        assert!(stalled(&beats, &mut seen).is_empty());
        // Still idle, no new turn: alive.
        assert_eq!(stalled(&beats, &mut seen), vec!["receiver"]);
        drop(guard);
        a.beat();
        assert!(
            stalled(&beats, &mut seen).is_empty(),
            "leaving idle is a turn"
        );
        assert_eq!(stalled(&beats, &mut seen), vec!["receiver", "signals"]);
        assert_eq!(a.turns(), 2);
    }

    #[test]
    fn status_line_and_rate() {
        let s = Snapshot {
            inputs: "zmq tcp://127.0.0.1:5555".into(),
            committed: 10,
            queue_depth: 3,
            database: "db1:3306/test".into(),
        };
        assert_eq!(
            s.line(1234.4),
            "serving zmq tcp://127.0.0.1:5555; 1234 records/s; queue 3; database db1:3306/test"
        );
        let mut r = Rate::new(100);
        let at = r.at + Duration::from_secs(2);
        assert_eq!(r.update(1100, at), 500.0);
    }
}
