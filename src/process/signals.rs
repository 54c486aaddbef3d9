//! The signal thread: turns SIGHUP, SIGUSR1, SIGUSR2, SIGTERM and SIGINT into events for the main
//! thread, and does nothing else (it never connects to anything, so it never blocks).
//!
//! Handlers are registered by `Signals::register` as the very first step of start-up, so a
//! signal that arrives during a slow start waits instead of killing the process.

use std::thread::JoinHandle;

use crossbeam_channel::Sender;
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

impl Signals {
    pub fn register() -> std::io::Result<Signals> {
        HookSignals::new([SIGHUP, SIGUSR1, SIGUSR2, SIGTERM, SIGINT]).map(Signals)
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
