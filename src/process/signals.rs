//! The signal thread: turns SIGHUP, SIGUSR1, SIGUSR2, SIGTERM and SIGINT into events for the main
//! thread, and does nothing else (it never connects to anything, so it never blocks).
//!
//! Handlers are registered by `Signals::register` as the very first step of start-up, so a
//! signal that arrives during a slow start waits instead of killing the process.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::{Handle, Signals as HookSignals};

use crate::heartbeat::Heartbeat;

/// What a signal asks of the main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: reopen the log, re-read the config and apply it.
    Reload,
    /// SIGUSR1: reopen the log file only.
    ReopenLog,
    /// SIGUSR2: an upgrade, which only a supervisor can do (its default action would kill).
    Upgrade,
    /// SIGTERM or SIGINT: drain and exit.
    Shutdown { signal: i32 },
}

/// The registered handlers; pending signals are kept until the thread runs.
pub struct Signals(HookSignals);

/// SIGTERM or SIGINT came while a start-up step was running.
#[derive(Debug, thiserror::Error)]
#[error("signal {signal} during start-up ({step}): not serving")]
pub struct Interrupted {
    pub signal: i32,
    pub step: &'static str,
}

/// How often a start-up step's watcher looks at the pending signals.
const STEP_POLL: Duration = Duration::from_millis(20);

impl Signals {
    pub fn register() -> std::io::Result<Signals> {
        HookSignals::new([SIGHUP, SIGUSR1, SIGUSR2, SIGTERM, SIGINT]).map(Signals)
    }

    /// Runs a slow start-up step (connecting a database or a broker) on a thread of its own
    /// while this one watches for SIGTERM/SIGINT, so a signal ends start-up at once. On a
    /// signal the step's thread is left behind: its waits are bounded and the process exits.
    /// SIGHUP/SIGUSR1 seen meanwhile are raised again afterwards for the signal thread.
    pub fn interruptible<T: Send + 'static>(
        &mut self,
        step: &'static str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<Result<T, Interrupted>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("start-up".into())
            .spawn(move || {
                let _ = tx.send(f());
            })?;
        let mut later = Vec::new();
        let result = loop {
            if let Some(signal) = self.0.pending().find(|s| {
                let shutdown = *s == SIGTERM || *s == SIGINT;
                if !shutdown {
                    later.push(*s);
                }
                shutdown
            }) {
                break Err(Interrupted { signal, step });
            }
            match rx.recv_timeout(STEP_POLL) {
                Ok(t) => break Ok(t),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The step panicked: resume the panic here, where start-up fails.
                    let panic = thread.join().err();
                    std::panic::resume_unwind(
                        panic.unwrap_or_else(|| Box::new("a start-up step ended unanswered")),
                    )
                }
            }
        };
        for s in later {
            let _ = signal_hook::low_level::raise(s);
        }
        Ok(result)
    }

    /// The signal-hook iterator, for a thread that handles the signals itself (supervisor).
    pub fn into_inner(self) -> HookSignals {
        self.0
    }
}

/// The running signal thread; `stop` closes the iterator and joins.
pub struct SignalThread {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
    heartbeat: Heartbeat,
}

impl SignalThread {
    pub fn spawn(signals: Signals, events: Sender<Event>) -> std::io::Result<SignalThread> {
        let mut signals = signals.0;
        let handle = signals.handle();
        let heartbeat = Heartbeat::new("signals");
        let beat = heartbeat.clone();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                // `forever()` unrolled, so the watchdog sees this thread waiting (alive) or
                // turning; wedged, it sees neither and stops pinging.
                while !signals.is_closed() {
                    let pending = {
                        let _idle = beat.idle();
                        signals.wait()
                    };
                    for signal in pending {
                        let event = match signal {
                            SIGHUP => Event::Reload,
                            SIGUSR1 => Event::ReopenLog,
                            SIGUSR2 => Event::Upgrade,
                            _ => Event::Shutdown { signal },
                        };
                        if events.send(event).is_err() {
                            return;
                        }
                    }
                }
            })?;
        Ok(SignalThread {
            handle,
            thread: Some(thread),
            heartbeat,
        })
    }

    /// The signal thread's heartbeat, for the watchdog.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    pub fn stop(mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("signal thread panicked");
            }
        }
    }
}
