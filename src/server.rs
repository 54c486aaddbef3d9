//! The serving process: builds the pipeline, runs it, and shuts it down in order.
//!
//! Threads and owners (all started and joined here):
//! - receiver (pinned): owns the ROUTER; stops intake on `stop`, returns on `finish`;
//! - N workers (pinned): end when the channel is closed and drained;
//! - signals: reload / reopen, and shutdown requests to this thread;
//! - metrics: the HTTP listener (owned through the reloader's slot).
//!
//! Shutdown: stop intake → workers drain and commit → receiver sends the last replies →
//! join. If `shutdown_timeout_ms` passes first, workers abandon what is uncommitted (never
//! answered, so clients resend) and the process exits anyway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{select, Receiver as Chan, Sender};
use parking_lot::Mutex;

use crate::config::Config;
use crate::input::receiver::{self, Receiver, ReceiverError};
use crate::input::zap::ZapHandler;
use crate::logging::Logging;
use crate::metrics::{Metrics, MetricsError, MetricsServer};
use crate::pipeline::store::{Store, StoreError};
use crate::pipeline::worker::{self, Shared};
use crate::process::notify::{Notifier, Snapshot, Watchdog};
use crate::process::signals::{Event, SignalThread, Signals};
use crate::reload::Reloader;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Receiver(#[from] ReceiverError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{0}")]
    Startup(String),
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("CURVE authentication handler: {0}")]
    Zap(zmq::Error),
}

/// How serving ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every queued message committed and answered.
    Drained,
    /// The shutdown deadline passed with work uncommitted (never answered).
    Abandoned,
    /// A pipeline thread died; the process should exit non-zero (a supervisor restarts it).
    Failed(String),
}

/// Steps the daemon wraps around start-up.
pub struct Hooks {
    /// Runs once sockets are bound and the database checked, before any message is read
    /// (privilege drop).
    pub before_serving: Box<dyn FnOnce() -> Result<(), String>>,
    /// Runs once serving has begun (readiness report to the invoking process).
    pub ready: Box<dyn FnOnce()>,
    /// systemd's notify socket (foreground under `Type=notify`), if any.
    pub notify: Option<Notifier>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            before_serving: Box::new(|| Ok(())),
            ready: Box::new(|| {}),
            notify: None,
        }
    }
}

/// Which pipeline thread an exit notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Receiver,
    Worker(usize),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Receiver => f.write_str("receiver"),
            Role::Worker(id) => write!(f, "worker-{id}"),
        }
    }
}

/// A pipeline thread's end: who, and its error if it failed.
type Exit = (Role, Result<(), String>);

/// A thread's end, reported to the main thread (also on panic, from `Drop`).
struct ExitNotice {
    role: Role,
    tx: Sender<Exit>,
    result: Option<Result<(), String>>,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err("panicked".to_string()));
        let _ = self.tx.send((self.role, result));
    }
}

fn spawn_pinned<F>(
    role: Role,
    core: Option<core_affinity::CoreId>,
    exits: &Sender<Exit>,
    body: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let tx = exits.clone();
    std::thread::Builder::new()
        .name(role.to_string())
        .spawn(move || {
            let mut notice = ExitNotice {
                role,
                tx,
                result: None,
            };
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    log::debug!("{}: could not pin to core {}", notice.role, core.id);
                }
            }
            notice.result = Some(body());
        })
}

/// Runs the pipeline until SIGTERM/SIGINT (or a thread failure), then drains.
pub fn serve(
    config: Config,
    signals: Signals,
    logging: Arc<Logging>,
    hooks: Hooks,
) -> Result<Outcome, ServeError> {
    let metrics = Metrics::new()?;
    let workers = config.pipeline.worker_count();
    let pool_size = config.mysql.pool_size_for(workers);
    let store = Store::connect(&config.mysql, pool_size)?;
    log::info!(
        "database {}:{}/{} table `{}` ready (pool of {pool_size})",
        config.mysql.host,
        config.mysql.port,
        config.mysql.database,
        config.mysql.table
    );
    let shared = Shared {
        config: Arc::new(ArcSwap::from_pointee(config.clone())),
        store: Arc::new(ArcSwap::from_pointee(store)),
        metrics: metrics.clone(),
        abandon: Arc::new(AtomicBool::new(false)),
    };

    let context = zmq::Context::new();
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(config.pipeline.queue_capacity);
    // Bound before the ROUTER, so no CURVE handshake is ever unjudged.
    let zap = ZapHandler::start(&context, Arc::clone(&shared.config), metrics.clone())
        .map_err(ServeError::Zap)?;
    let receiver = Receiver::bind(
        &context,
        Arc::clone(&shared.config),
        jobs_tx,
        metrics.clone(),
    )?;
    log::info!("listening on {}", receiver.bound_endpoint());
    let metrics_server = match config.metrics.listen {
        Some(addr) => Some(MetricsServer::start(addr, metrics.clone())?),
        None => None,
    };
    let control = context.socket(zmq::PUSH).map_err(ReceiverError::from)?;
    control
        .connect(receiver::CONTROL_ENDPOINT)
        .map_err(ReceiverError::from)?;

    (hooks.before_serving)().map_err(ServeError::Startup)?;

    let cores = if config.pipeline.pin_threads {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let core = |i: usize| (!cores.is_empty()).then(|| cores[i % cores.len()]);
    let (exits_tx, exits_rx) = crossbeam_channel::unbounded();
    let mut worker_threads = Vec::with_capacity(workers);
    for id in 0..workers {
        let (jobs, ctx, shared) = (jobs_rx.clone(), context.clone(), shared.clone());
        worker_threads.push(spawn_pinned(
            Role::Worker(id),
            core(id + 1),
            &exits_tx,
            move || {
                worker::run(id, jobs, &ctx, receiver::REPLY_ENDPOINT, &shared)
                    .map_err(|e| e.to_string())
            },
        )?);
    }
    drop(jobs_rx);
    let receiver_beat = receiver.heartbeat();
    let receiver_thread = spawn_pinned(Role::Receiver, core(0), &exits_tx, move || {
        receiver.run().map_err(|e| e.to_string())
    })?;

    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let reloader = Reloader {
        config_file: config.file.clone(),
        base_dir: config.base_dir.clone(),
        config: Arc::clone(&shared.config),
        store: Arc::clone(&shared.store),
        logging: Arc::clone(&logging),
        metrics: metrics.clone(),
        metrics_server: Arc::new(Mutex::new(metrics_server)),
        workers,
        control: None,
    };
    let metrics_slot = Arc::clone(&reloader.metrics_server);
    let signal_thread = SignalThread::spawn(
        signals,
        reloader,
        logging,
        context.clone(),
        events_tx,
        hooks.notify.clone(),
    )?;
    log::info!(
        "serving with {workers} worker(s), pid {}",
        std::process::id()
    );
    (hooks.ready)();
    // systemd: READY at the moment `--daemon` reports ready; then the watchdog.
    let watchdog = hooks.notify.as_ref().and_then(|n| {
        n.ready();
        let beats = vec![receiver_beat, signal_thread.heartbeat()];
        start_watchdog(n, beats, &shared)
    });

    let failure = wait_for_stop(&events_rx, &exits_rx);
    if let Some(n) = &hooks.notify {
        n.stopping();
    }
    let outcome = shut_down(&shared, &control, &exits_rx, workers, failure);
    drop(watchdog);
    signal_thread.stop();
    *metrics_slot.lock() = None;
    drop(zap);
    if outcome == Outcome::Drained {
        for t in worker_threads {
            let _ = t.join();
        }
        let _ = receiver_thread.join();
        drop(control);
        drop(context);
    } else {
        // Threads may still hold sockets: terminating the context would wait for them forever.
        std::mem::forget(control);
        std::mem::forget(context);
    }
    Ok(outcome)
}

/// The systemd watchdog over `beats`, with a status line from the config and metrics. A thread
/// that cannot start is logged, not fatal: serving matters more than the pings.
fn start_watchdog(
    notifier: &Notifier,
    beats: Vec<crate::process::notify::Heartbeat>,
    shared: &Shared,
) -> Option<Watchdog> {
    let (config, metrics) = (Arc::clone(&shared.config), shared.metrics.clone());
    let snapshot = move || {
        let c = config.load();
        Snapshot {
            inputs: format!("zmq {}", c.zmq.endpoint),
            committed: metrics.records_committed.get(),
            queue_depth: metrics.queue_depth.load(Ordering::Relaxed),
            database: format!("{}:{}/{}", c.mysql.host, c.mysql.port, c.mysql.database),
        }
    };
    notifier
        .start_watchdog(beats, snapshot)
        .map_err(|e| log::error!("cannot start the systemd watchdog thread: {e}"))
        .ok()
}

/// Blocks until a shutdown signal (`None`) or a pipeline thread's unexpected end (which one,
/// and why).
fn wait_for_stop(events: &Chan<Event>, exits: &Chan<Exit>) -> Option<(Option<Role>, String)> {
    select! {
        recv(events) -> event => {
            if let Ok(Event::Shutdown { signal }) = event {
                log::info!("signal {signal}: shutting down, draining the queue");
            }
            None
        }
        recv(exits) -> exit => {
            let (role, reason) = match exit {
                Ok((role, Ok(()))) => (Some(role), format!("{role} stopped unexpectedly")),
                Ok((role, Err(e))) => (Some(role), format!("{role} failed: {e}")),
                Err(_) => (None, "pipeline threads gone".to_string()),
            };
            log::error!("{reason}; shutting down");
            Some((role, reason))
        }
    }
}

fn shut_down(
    shared: &Shared,
    control: &zmq::Socket,
    exits: &Chan<Exit>,
    workers: usize,
    failure: Option<(Option<Role>, String)>,
) -> Outcome {
    let timeout = shared.config.load().daemon.shutdown_timeout();
    let deadline = Instant::now() + timeout;
    if let Err(e) = control.send(receiver::STOP, 0) {
        log::error!("cannot tell the receiver to stop: {e}");
    }
    let failed_role = failure.as_ref().and_then(|(role, _)| *role);
    let mut receiver_gone = failed_role == Some(Role::Receiver);
    let mut workers_left = workers - usize::from(matches!(failed_role, Some(Role::Worker(_))));
    while workers_left > 0 {
        match exits.recv_deadline(deadline) {
            Ok((role, result)) => {
                if let Err(e) = result {
                    log::error!("{role} failed during shutdown: {e}");
                }
                match role {
                    Role::Receiver => receiver_gone = true,
                    Role::Worker(_) => workers_left -= 1,
                }
            }
            Err(_) => break,
        }
    }
    let drained = workers_left == 0;
    if !drained {
        log::warn!(
            "shutdown_timeout_ms ({} ms) passed; uncommitted messages are not answered (clients resend)",
            timeout.as_millis()
        );
        shared.abandon.store(true, Ordering::Relaxed);
    }
    if !receiver_gone {
        if let Err(e) = control.send(receiver::FINISH, 0) {
            log::error!("cannot tell the receiver to finish: {e}");
        }
        // The receiver only forwards what is already pushed; this wait is short.
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok((role, _)) = exits.recv_deadline(until) {
            if role == Role::Receiver {
                break;
            }
        }
    }
    match failure {
        Some((_, reason)) => Outcome::Failed(reason),
        None if drained => {
            log::info!("drained: every queued message committed and answered");
            Outcome::Drained
        }
        None => Outcome::Abandoned,
    }
}
