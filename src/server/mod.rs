//! The serving process in two steps: `Server::bind` makes everything that can fail (database
//! pool, sockets, listeners) and `Bound::run` starts the threads and serves until told to
//! stop. Between the two the caller drops privileges and reports readiness: from the bind
//! on, messages wait in the socket's buffers until the receiver thread reads them.
//!
//! - `threads`: spawning with an owner (exit notices); `status`: the systemd watchdog line;
//! - `plan` (pure) and `reload`: a reload, all or nothing; `shutdown`: the drain.
//!
//! Threads (all owned and joined here):
//! - main (the caller's): one event loop for signals, reloads and thread failures, then the
//!   drain;
//! - receiver (pinned): the ZeroMQ input on the one input driver (absent when `[zmq]
//!   endpoint` is empty);
//! - amqp-consumer: the AMQP input on the same driver (idle while `[amqp] url` is empty);
//! - N workers (pinned): end when the queue is closed and drained;
//! - signals: turns signals into events for the main thread, nothing more;
//! - a reload preparer, while a reload is being prepared;
//! - zap (CURVE handler), metrics (HTTP listener) and the watchdog, owned through handles.

mod plan;
mod reload;
mod shutdown;
mod status;
mod threads;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{select, Receiver as Chan};

use crate::config::Config;
use crate::heartbeat::Heartbeat;
use crate::input::amqp::{AmqpPart, Consumer, ConsumerError};
use crate::input::driver::{Driver, Handle};
use crate::input::zap::ZapHandler;
use crate::input::zmq::listener::{Listener, Listeners};
use crate::input::zmq::{BoundEndpoint, Receiver, ReceiverError, ZmqSettings};
use crate::logging::Logging;
use crate::metrics::{Metrics, MetricsError, MetricsServer};
use crate::pipeline::queue::Queue;
use crate::pipeline::store::{Store, StoreError};
use crate::pipeline::worker::{self, Shared};
use crate::process::control::Control;
use crate::process::notify::Notifier;
use crate::process::signals::{Event, Interrupted, SignalThread, Signals};
use reload::{Handoff, Owners, Reload, Running};
use threads::{spawn_pinned, Exit, Role};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Receiver(#[from] ReceiverError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Amqp(#[from] ConsumerError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("input mailbox (eventfd): {0}")]
    Mailbox(std::io::Error),
    #[error("CURVE authentication handler: {0}")]
    Zap(zmq::Error),
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
}

// Not `#[from]`: that would also make it the error's source, printed twice in a `{:#}` chain.
impl From<std::io::Error> for ServeError {
    fn from(e: std::io::Error) -> Self {
        ServeError::Thread(e)
    }
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

/// The ZeroMQ input, bound: its driver (run on the receiver thread) and what stays here.
struct ZmqInput {
    driver: Driver<Receiver>,
    handle: Handle<ZmqSettings>,
    heartbeat: Heartbeat,
    bound: BoundEndpoint,
    listeners: Listeners,
}

/// Everything bound and proven, no thread serving yet.
pub struct Bound {
    shared: Shared,
    queue: Queue,
    context: zmq::Context,
    zap: ZapHandler,
    zmq: Option<ZmqInput>,
    consumer: Driver<Consumer>,
    consumer_handle: Handle<AmqpPart>,
    consumer_beat: Heartbeat,
    metrics_server: Option<MetricsServer>,
    signals: Signals,
    logging: Arc<Logging>,
    workers: usize,
    handoff: Handoff,
}

pub struct Server;

impl Server {
    /// Connects the database, binds the sockets and the metrics listener. Nothing reads a
    /// message yet, so the caller can still drop privileges.
    pub fn bind(
        config: Config,
        mut signals: Signals,
        logging: Arc<Logging>,
        handed: Handed,
    ) -> Result<Bound, ServeError> {
        let queue = Queue::new(config.pipeline.queue_capacity);
        let depth = queue.depth_reader();
        let metrics = Metrics::new(Arc::new(move || (depth.records(), depth.capacity())))?;
        let workers = config.pipeline.worker_count();
        let pool_size = config.mysql.pool_size_for(workers);
        let (mysql, m) = (config.mysql.clone(), metrics.clone());
        let store = signals.interruptible("connecting the database", move || {
            Store::connect(&mysql, pool_size, &m)
        })???;
        store.publish();
        log::info!(
            "database {}/{} table `{}` ready (pool of {pool_size})",
            store.active_host(),
            config.mysql.database,
            config.mysql.table
        );
        let metrics_server = match config.metrics.listen {
            Some(addr) => Some(MetricsServer::start(addr, metrics.clone())?),
            None => None,
        };
        let shared = Shared {
            config: Arc::new(ArcSwap::from_pointee(config)),
            store: Arc::new(ArcSwap::from_pointee(store)),
            metrics: metrics.clone(),
            abandon: Arc::new(AtomicBool::new(false)),
        };
        let context = zmq::Context::new();
        // Bound before the ROUTER, so no CURVE handshake is ever unjudged.
        let zap = ZapHandler::start(&context, Arc::clone(&shared.config), metrics.clone())
            .map_err(ServeError::Zap)?;
        let zmq = bind_zmq(&context, &shared, &queue, handed.listeners)?;
        let handoff = Handoff {
            listeners: zmq.as_ref().map(|z| z.listeners.clone()),
            control: handed.control.map(Arc::new),
        };
        let (c, m) = (Arc::clone(&shared.config), metrics.clone());
        let consumer = signals
            .interruptible("connecting the broker", move || Consumer::connect(c, m))???;
        let consumer_beat = Heartbeat::new("amqp-consumer");
        let (consumer, consumer_handle) =
            Driver::new(consumer, &queue, metrics, consumer_beat.clone())
                .map_err(ServeError::Mailbox)?;
        Ok(Bound {
            shared,
            queue,
            context,
            zap,
            zmq,
            consumer,
            consumer_handle,
            consumer_beat,
            metrics_server,
            signals,
            logging,
            workers,
            handoff,
        })
    }
}

/// What the serving process was handed by whoever started it.
#[derive(Default)]
pub struct Handed {
    /// Listening sockets (supervisor, systemd socket activation), for `[zmq] endpoint`.
    pub listeners: Vec<Listener>,
    /// The supervisor's control channel: listeners for a reload's new endpoint come down it,
    /// what the process serves after each reload goes up.
    pub control: Option<Control>,
}

fn bind_zmq(
    context: &zmq::Context,
    shared: &Shared,
    queue: &Queue,
    handed: Vec<Listener>,
) -> Result<Option<ZmqInput>, ServeError> {
    let settings = ZmqSettings::of(&shared.config.load());
    if settings.endpoint.is_empty() {
        if let Some(l) = handed.first() {
            log::warn!(
                "a listening socket was handed to feedd ({}), but [zmq] endpoint is empty",
                l.endpoint()
            );
        }
        log::info!("ZeroMQ input off ([zmq] endpoint is empty)");
        return Ok(None);
    }
    let owned = handed.len();
    let receiver = Receiver::bind(context, settings, handed, shared.metrics.clone())?;
    log::info!(
        "listening on {}{}",
        receiver.bound_endpoint(),
        if owned > 0 {
            " (a socket handed to this process)"
        } else {
            ""
        }
    );
    let bound = receiver.shared_bound();
    let listeners = receiver.listeners();
    let heartbeat = Heartbeat::new("receiver");
    let (driver, handle) = Driver::new(receiver, queue, shared.metrics.clone(), heartbeat.clone())
        .map_err(ServeError::Mailbox)?;
    Ok(Some(ZmqInput {
        driver,
        handle,
        heartbeat,
        bound,
        listeners,
    }))
}

impl Bound {
    /// The endpoint bound (with a wildcard port resolved); `None` with ZeroMQ off.
    pub fn endpoint(&self) -> Option<String> {
        self.zmq.as_ref().map(|z| z.bound.lock().clone())
    }

    /// Starts the threads and serves until SIGTERM/SIGINT or a thread failure; then drains.
    /// With `notify` (a systemd `Type=notify` unit) it tells systemd each step and runs the
    /// watchdog over the inputs' and the signal thread's heartbeats.
    pub fn run(self, notify: Option<Notifier>) -> Result<Outcome, ServeError> {
        let Bound {
            shared,
            mut queue,
            context,
            zap,
            zmq,
            consumer,
            consumer_handle,
            consumer_beat,
            mut metrics_server,
            signals,
            logging,
            workers,
            handoff,
        } = self;
        let cores = Cores::of(&shared.config.load());
        let (exits_tx, exits_rx) = crossbeam_channel::unbounded();
        let worker_threads = spawn_workers(&queue, &shared, workers, &cores, &exits_tx)?;
        // From here only the inputs' drivers keep the queue open.
        queue.seal();
        let (receiver, receiver_thread, mut beats) = spawn_receiver(zmq, &cores, &exits_tx)?;
        beats.push(consumer_beat);
        // Not pinned: it mostly waits on the broker, and lapin's own threads are not pinned.
        let consumer_thread = spawn_pinned(Role::Consumer, None, &exits_tx, move || {
            consumer.run().map(drop).map_err(|e| e.to_string())
        })?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let signal_thread = SignalThread::spawn(signals, events_tx)?;
        log::info!(
            "serving with {workers} worker(s), pid {}",
            std::process::id()
        );
        // systemd: READY at the moment `--daemon` reports ready; then the watchdog.
        let watchdog = notify.as_ref().and_then(|n| {
            n.ready();
            beats.push(signal_thread.heartbeat());
            status::start_watchdog(n, beats, &shared, &queue)
        });
        let mut running = Running {
            shared: &shared,
            queue: &queue,
            owners: Owners {
                receiver: receiver.as_ref().map(|(handle, _)| handle),
                consumer: &consumer_handle,
            },
            metrics_server: &mut metrics_server,
            logging: &logging,
            notify: notify.as_ref(),
            workers,
            file: shared.config.load().file.clone(),
            base: shared.config.load().base_dir.clone(),
            handoff,
        };
        let (failure, preparing) = serve(&mut running, &events_rx, &exits_rx);
        if let Some(n) = &notify {
            n.stopping();
        }
        let inputs = shutdown::Inputs {
            receiver: receiver.as_ref().map(|(handle, _)| handle),
            consumer: &consumer_handle,
        };
        let outcome = shutdown::shut_down(&shared, &inputs, &exits_rx, workers, failure);
        // Everything below only closes and joins.
        drop(watchdog);
        signal_thread.stop();
        if let Some(p) = preparing {
            p.leave();
        }
        drop(metrics_server);
        drop(zap);
        for t in receiver_thread.into_iter().chain([consumer_thread]) {
            let _ = t.join();
        }
        if outcome == Outcome::Drained {
            for t in worker_threads {
                let _ = t.join();
            }
        }
        // A worker abandoned mid-query holds no socket: the context can close regardless.
        drop(context);
        if let Some((_, bound)) = receiver {
            crate::input::zmq::remove_ipc_file(&bound.lock());
        }
        Ok(outcome)
    }
}

/// Which cores pinned threads go to (none: not pinned).
struct Cores(Vec<core_affinity::CoreId>);

impl Cores {
    fn of(config: &Config) -> Cores {
        Cores(if config.pipeline.pin_threads {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        })
    }

    /// The core for the `i`-th pinned thread (the receiver is 0, worker `n` is `n + 1`).
    fn nth(&self, i: usize) -> Option<core_affinity::CoreId> {
        (!self.0.is_empty()).then(|| self.0[i % self.0.len()])
    }
}

fn spawn_workers(
    queue: &Queue,
    shared: &Shared,
    workers: usize,
    cores: &Cores,
    exits: &crossbeam_channel::Sender<Exit>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    (0..workers)
        .map(|id| {
            let (take, shared) = (queue.take(), shared.clone());
            spawn_pinned(Role::Worker(id), cores.nth(id + 1), exits, move || {
                worker::run(id, take, &shared);
                Ok(())
            })
        })
        .collect()
}

/// The receiver thread, when ZeroMQ is on: its handle and endpoint, the thread, and the
/// heartbeats the watchdog follows.
type Started = (
    Option<(Handle<ZmqSettings>, BoundEndpoint)>,
    Option<std::thread::JoinHandle<()>>,
    Vec<Heartbeat>,
);

fn spawn_receiver(
    zmq: Option<ZmqInput>,
    cores: &Cores,
    exits: &crossbeam_channel::Sender<Exit>,
) -> std::io::Result<Started> {
    let Some(z) = zmq else {
        return Ok((None, None, Vec::new()));
    };
    let driver = z.driver;
    let thread = spawn_pinned(Role::Receiver, cores.nth(0), exits, move || {
        driver.run().map(drop).map_err(|e| e.to_string())
    })?;
    Ok((Some((z.handle, z.bound)), Some(thread), vec![z.heartbeat]))
}

/// Why serving stops: `None` for a shutdown signal, else which thread ended (if known) and why.
type Failure = Option<(Option<Role>, String)>;

/// The main thread's one event loop: signals, the reload under way, thread failures. Returns
/// on a shutdown signal or a pipeline thread's end, with a reload preparer still running.
fn serve(
    running: &mut Running,
    events: &Chan<Event>,
    exits: &Chan<Exit>,
) -> (Failure, Option<reload::Preparing>) {
    let mut reload = Reload::new(running.logging.daemon());
    loop {
        let prepared = reload.prepared();
        let (answer, timer) = reload.awaited();
        select! {
            recv(events) -> event => match event {
                Ok(Event::Reload) => {
                    if let Some(n) = running.notify {
                        n.reloading();
                    }
                    running.logging.reopen();
                    log::info!("SIGHUP: reloading");
                    reload.request(running);
                }
                Ok(Event::ReopenLog) => {
                    running.logging.reopen();
                    log::info!("SIGUSR1: log file reopened");
                }
                Ok(Event::Upgrade) => {
                    let reason = "SIGUSR2: an upgrade needs the supervisor (--daemon with supervise = true); use restart";
                    log::warn!("{reason}");
                    let pidfile = running.shared.config.load().daemon.pidfile.clone();
                    crate::process::upgrade::report(&pidfile, &Err(reason.into()));
                }
                Ok(Event::Shutdown { signal }) => {
                    log::info!("signal {signal}: shutting down, draining the queue");
                    return (None, reload.abandon());
                }
                Err(_) => {
                    return (Some((None, "signal thread gone".into())), reload.abandon());
                }
            },
            recv(prepared) -> result => reload.on_prepared(result.ok(), running),
            recv(answer) -> result => reload.on_answer(result.ok(), running),
            recv(timer) -> _ => reload.on_timeout(running),
            recv(exits) -> exit => {
                let (role, reason) = match exit {
                    Ok((role, Ok(()))) => (Some(role), format!("{role} stopped unexpectedly")),
                    Ok((role, Err(e))) => (Some(role), format!("{role} failed: {e}")),
                    Err(_) => (None, "pipeline threads gone".to_string()),
                };
                log::error!("{reason}; shutting down");
                return (Some((role, reason)), reload.abandon());
            }
        }
    }
}
