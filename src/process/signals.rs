//! The signal thread: SIGHUP reloads (and reopens the log), SIGUSR1 reopens the log,
//! SIGTERM/SIGINT ask the main thread to shut down.
//!
//! Handlers are registered by `Signals::register` as the very first step of start-up, so a
//! signal that arrives during a slow start waits instead of killing the process.

use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals as HookSignals};

use crate::logging::Logging;
use crate::process::notify::{Heartbeat, Notifier};
use crate::reload::Reloader;

/// What the signal thread asks of the main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Shutdown { signal: i32 },
}

/// The registered handlers; pending signals are kept until the thread runs.
pub struct Signals(HookSignals);

impl Signals {
    pub fn register() -> std::io::Result<Signals> {
        HookSignals::new([SIGHUP, SIGUSR1, SIGTERM, SIGINT]).map(Signals)
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
    pub fn spawn(
        signals: Signals,
        mut reloader: Reloader,
        logging: std::sync::Arc<Logging>,
        control_context: zmq::Context,
        events: Sender<Event>,
        notify: Option<Notifier>,
    ) -> std::io::Result<SignalThread> {
        let mut signals = signals.0;
        let handle = signals.handle();
        let heartbeat = Heartbeat::new("signals");
        let beat = heartbeat.clone();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                // The control socket is created here: it belongs to this thread alone.
                reloader.control = control_context
                    .socket(zmq::PUSH)
                    .and_then(|s| {
                        s.connect(crate::input::receiver::CONTROL_ENDPOINT)
                            .map(|()| s)
                    })
                    .map_err(|e| log::error!("signals: no control socket: {e}"))
                    .ok();
                // `forever()` unrolled, so the watchdog sees this thread waiting (alive) or
                // turning; stuck inside a reload, it sees neither and stops pinging.
                while !signals.is_closed() {
                    let pending = {
                        let _idle = beat.idle();
                        signals.wait()
                    };
                    for signal in pending {
                        match signal {
                            SIGHUP => {
                                if let Some(n) = &notify {
                                    n.reloading();
                                }
                                logging.reopen();
                                log::info!("SIGHUP: reloading");
                                let result = reloader.reload();
                                if let Some(n) = &notify {
                                    match &result {
                                        Ok(()) => n.reload_done(true, "config reloaded"),
                                        Err(reason) => n.reload_done(false, reason),
                                    }
                                }
                            }
                            SIGUSR1 => {
                                logging.reopen();
                                log::info!("SIGUSR1: log file reopened");
                            }
                            SIGTERM | SIGINT => {
                                let _ = events.send(Event::Shutdown { signal });
                            }
                            _ => {}
                        }
                    }
                }
                if let Some(s) = reloader.control.take() {
                    let _ = s.set_linger(0);
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
