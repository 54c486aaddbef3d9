//! The serving process in two steps: `Server::bind` makes everything that can fail (database
//! pool, sockets, listeners) and `Bound::run` starts the threads and serves until told to
//! stop. Between the two the caller drops privileges and reports readiness: from the bind
//! on, messages wait in the socket's buffers until the receiver thread reads them.
//!
//! Threads (all owned and joined here):
//! - main (the caller's): signal events, reloads, thread failures, the drain;
//! - receiver (pinned): owns the ROUTER; applies its part of a reload and answers (absent
//!   when `[zmq] endpoint` is empty);
//! - amqp consumer: owns its broker channel; acks after COMMIT; same commands as the receiver
//!   (idle while `[amqp] url` is empty);
//! - N workers (pinned): end when the queue is closed and drained;
//! - signals: turns signals into events for the main thread, nothing more;
//! - a reload preparer, while a reload is being prepared (parse, new pool, new listener);
//! - zap (CURVE handler) and metrics (HTTP listener), owned through their handles.
//!
//! A reload walks one way: signal → main → preparer (everything that can fail, off to the
//! side, so a SIGTERM is never kept waiting) → main → each owner applies its part and answers
//! → only when every part took is the new config published and the reload counted.
//!
//! Shutdown: stop intake (the consumer sends `basic.cancel`) → workers drain and commit →
//! receiver sends the last replies, consumer acks what committed and closes → join. If `shutdown_timeout_ms` passes first, workers abandon what is uncommitted (never
//! answered, so clients resend) and the process exits anyway.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{select, Receiver as Chan, Sender};

use crate::config::{self, Config};
use crate::heartbeat::Heartbeat;
use crate::input::amqp::{AmqpSettings, Consumer, ConsumerError, ConsumerHandle, Link};
use crate::input::receiver::{Receiver, ReceiverError, ReceiverHandle, ZmqSettings};
use crate::input::zap::ZapHandler;
use crate::logging::Logging;
use crate::metrics::{Metrics, MetricsError, MetricsServer};
use crate::pipeline::queue::Queue;
use crate::pipeline::store::{Store, StoreError};
use crate::pipeline::worker::{self, Shared};
use crate::process::notify::{Notifier, Snapshot, Watchdog};
use crate::process::signals::{Event, SignalThread, Signals};

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
    #[error("CURVE authentication handler: {0}")]
    Zap(zmq::Error),
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

/// Which pipeline thread an exit notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Receiver,
    Consumer,
    Worker(usize),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Receiver => f.write_str("receiver"),
            Role::Consumer => f.write_str("amqp-consumer"),
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

/// Everything bound and proven, no thread serving yet.
pub struct Bound {
    shared: Shared,
    queue: Queue,
    context: zmq::Context,
    zap: ZapHandler,
    receiver: Option<Receiver>,
    receiver_handle: Option<ReceiverHandle>,
    consumer: Consumer,
    consumer_handle: ConsumerHandle,
    metrics_server: Option<MetricsServer>,
    signals: Signals,
    logging: Arc<Logging>,
    workers: usize,
}

pub struct Server;

impl Server {
    /// Connects the database, binds the sockets and the metrics listener. Nothing reads a
    /// message yet, so the caller can still drop privileges.
    pub fn bind(
        config: Config,
        signals: Signals,
        logging: Arc<Logging>,
    ) -> Result<Bound, ServeError> {
        let queue = Queue::new(config.pipeline.queue_capacity);
        let depth = queue.depth_reader();
        let metrics = Metrics::new(Arc::new(move || depth.records()))?;
        let workers = config.pipeline.worker_count();
        let pool_size = config.mysql.pool_size_for(workers);
        let store = Store::connect(&config.mysql, pool_size, &metrics)?;
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
        let settings = ZmqSettings::of(&shared.config.load());
        let (receiver, receiver_handle) = if settings.endpoint.is_empty() {
            log::info!("ZeroMQ input off ([zmq] endpoint is empty)");
            (None, None)
        } else {
            let (r, h) = Receiver::bind(&context, settings, &queue, metrics.clone())?;
            log::info!("listening on {}", r.bound_endpoint());
            (Some(r), Some(h))
        };
        let (consumer, consumer_handle) =
            Consumer::connect(Arc::clone(&shared.config), &queue, metrics)?;
        Ok(Bound {
            shared,
            queue,
            context,
            zap,
            receiver,
            receiver_handle,
            consumer,
            consumer_handle,
            metrics_server,
            signals,
            logging,
            workers,
        })
    }
}

/// A reload made ready off to the side: the new config and the parts that had to be proven.
struct Prepared {
    config: Config,
    /// A new pool, when `[mysql]` changed.
    store: Option<Store>,
    /// A new listener (or none), when `[metrics] listen` changed.
    metrics_server: Option<Option<MetricsServer>>,
    /// New AMQP settings (`None`: off) and their connected link, when `[amqp]` changed.
    amqp: Option<(Option<AmqpSettings>, Option<Link>)>,
}

/// The preparer thread of the reload under way.
struct Preparing {
    thread: JoinHandle<()>,
    done: Chan<Result<Prepared, String>>,
    /// Another SIGHUP came meanwhile: prepare again once this one is through.
    again: bool,
}

impl Bound {
    /// The endpoint bound (with a wildcard port resolved); `None` with ZeroMQ off.
    pub fn endpoint(&self) -> Option<&str> {
        self.receiver.as_ref().map(Receiver::bound_endpoint)
    }

    /// Starts the threads and serves until SIGTERM/SIGINT or a thread failure; then drains.
    /// With `notify` (a systemd `Type=notify` unit) it tells systemd each step and runs the
    /// watchdog over the receiver's and the signal thread's heartbeats.
    pub fn run(self, notify: Option<Notifier>) -> Result<Outcome, ServeError> {
        let Bound {
            shared,
            mut queue,
            context,
            zap,
            receiver,
            receiver_handle,
            consumer,
            consumer_handle,
            mut metrics_server,
            signals,
            logging,
            workers,
        } = self;
        let config = shared.config.load_full();
        let cores = if config.pipeline.pin_threads {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let core = |i: usize| (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let (exits_tx, exits_rx) = crossbeam_channel::unbounded();
        let mut worker_threads = Vec::with_capacity(workers);
        for id in 0..workers {
            let (take, shared) = (queue.take(), shared.clone());
            worker_threads.push(spawn_pinned(
                Role::Worker(id),
                core(id + 1),
                &exits_tx,
                move || {
                    worker::run(id, take, &shared);
                    Ok(())
                },
            )?);
        }
        // From here only the inputs' intakes keep the queue open.
        queue.seal();
        let receiver_beat = receiver.as_ref().map(Receiver::heartbeat);
        let receiver_thread = match receiver {
            Some(receiver) => Some(spawn_pinned(
                Role::Receiver,
                core(0),
                &exits_tx,
                move || receiver.run().map_err(|e| e.to_string()),
            )?),
            None => None,
        };
        let consumer_beat = consumer.heartbeat();
        // Not pinned: it mostly waits on the broker, and lapin's own threads are not pinned.
        let consumer_thread = spawn_pinned(Role::Consumer, None, &exits_tx, move || {
            consumer.run();
            Ok(())
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
            let mut beats = vec![consumer_beat, signal_thread.heartbeat()];
            beats.extend(receiver_beat);
            start_watchdog(n, beats, &shared, &queue)
        });

        let mut main = Main {
            shared: &shared,
            queue: &queue,
            receiver: receiver_handle.as_ref(),
            consumer: &consumer_handle,
            metrics_server: &mut metrics_server,
            logging: &logging,
            notify: notify.as_ref(),
            reload_again: false,
            workers,
            file: config.file.clone(),
            base: config.base_dir.clone(),
        };
        drop(config);
        let (failure, preparing) = main.serve(&events_rx, &exits_rx);
        if let Some(n) = &notify {
            n.stopping();
        }
        let inputs = Inputs {
            receiver: receiver_handle.as_ref(),
            consumer: &consumer_handle,
        };
        let outcome = shut_down(&shared, &inputs, &exits_rx, workers, failure);
        drop(watchdog);
        signal_thread.stop();
        if let Some(p) = preparing {
            // It may be waiting on a database that does not answer (up to the pool's connect
            // timeout): joined if it is done by now, else left to the exit, which must not wait
            // for a reload that was abandoned.
            if p.done.try_recv().is_ok() {
                let _ = p.thread.join();
            } else {
                log::debug!("the abandoned reload is still connecting; exiting without it");
            }
        }
        drop(metrics_server);
        drop(zap);
        if let Some(t) = receiver_thread {
            let _ = t.join();
        }
        let _ = consumer_thread.join();
        if outcome == Outcome::Drained {
            for t in worker_threads {
                let _ = t.join();
            }
        }
        // A worker abandoned mid-query holds no socket: the context can close regardless.
        drop(context);
        if let Some(receiver) = &receiver_handle {
            crate::input::receiver::remove_ipc_file(&receiver.bound());
        }
        Ok(outcome)
    }
}

/// The main thread's view while serving: what it owns for applying reloads.
struct Main<'a> {
    shared: &'a Shared,
    queue: &'a Queue,
    receiver: Option<&'a ReceiverHandle>,
    consumer: &'a ConsumerHandle,
    metrics_server: &'a mut Option<MetricsServer>,
    logging: &'a Arc<Logging>,
    notify: Option<&'a Notifier>,
    /// A SIGHUP came while a reload was being applied: prepare another one after it.
    reload_again: bool,
    workers: usize,
    file: PathBuf,
    base: PathBuf,
}

impl Main<'_> {
    /// Handles events until a shutdown signal (failure `None`) or a pipeline thread's
    /// unexpected end (which one, and why). Returns a reload still being prepared.
    fn serve(
        &mut self,
        events: &Chan<Event>,
        exits: &Chan<Exit>,
    ) -> (Option<(Option<Role>, String)>, Option<Preparing>) {
        let mut preparing: Option<Preparing> = None;
        loop {
            let done = preparing
                .as_ref()
                .map_or_else(crossbeam_channel::never, |p| p.done.clone());
            select! {
                recv(events) -> event => match event {
                    Ok(Event::Reload) => {
                        if let Some(n) = self.notify {
                            n.reloading();
                        }
                        self.logging.reopen();
                        log::info!("SIGHUP: reloading");
                        match &mut preparing {
                            Some(p) => p.again = true,
                            None => preparing = self.prepare(),
                        }
                    }
                    Ok(Event::ReopenLog) => {
                        self.logging.reopen();
                        log::info!("SIGUSR1: log file reopened");
                    }
                    Ok(Event::Shutdown { signal }) => {
                        log::info!("signal {signal}: shutting down, draining the queue");
                        if preparing.is_some() {
                            log::info!("the reload under way is abandoned");
                        }
                        return (None, preparing);
                    }
                    Err(_) => return (Some((None, "signal thread gone".into())), preparing),
                },
                recv(done) -> result => {
                    let again = preparing.take().is_some_and(|p| {
                        let _ = p.thread.join();
                        p.again
                    });
                    let result = result.unwrap_or_else(|_| Err("the reload preparer died".into()));
                    let applied = match result {
                        Ok(prepared) => self.apply(prepared, events),
                        Err(reason) => Err(Interrupted::Failed(reason)),
                    };
                    let again = again || std::mem::take(&mut self.reload_again);
                    let applied = match applied {
                        Ok(()) => Ok(()),
                        Err(Interrupted::Failed(reason)) => Err(reason),
                        Err(Interrupted::Shutdown(signal)) => {
                            log::info!(
                                "signal {signal}: shutting down, draining the queue; the reload being applied is abandoned"
                            );
                            return (None, None);
                        }
                    };
                    match &applied {
                        Ok(()) => {
                            self.shared.metrics.config_reloads.inc();
                            log::info!("config reloaded from {}", self.file.display());
                        }
                        Err(reason) => {
                            self.shared.metrics.config_reload_failures.inc();
                            log::error!("reload failed, keeping the running config: {reason}");
                        }
                    }
                    if let Some(n) = self.notify {
                        match &applied {
                            Ok(()) => n.reload_done(true, "config reloaded"),
                            Err(reason) => n.reload_done(false, reason),
                        }
                    }
                    if again {
                        preparing = self.prepare();
                    }
                }
                recv(exits) -> exit => {
                    let (role, reason) = match exit {
                        Ok((role, Ok(()))) => (Some(role), format!("{role} stopped unexpectedly")),
                        Ok((role, Err(e))) => (Some(role), format!("{role} failed: {e}")),
                        Err(_) => (None, "pipeline threads gone".to_string()),
                    };
                    log::error!("{reason}; shutting down");
                    return (Some((role, reason)), preparing);
                }
            }
        }
    }

    /// Starts preparing a reload on its own thread (it may wait on an unreachable database).
    fn prepare(&self) -> Option<Preparing> {
        let (tx, done) = crossbeam_channel::bounded(1);
        let (file, base) = (self.file.clone(), self.base.clone());
        let old = self.shared.config.load_full();
        let metrics = self.shared.metrics.clone();
        let store = Arc::clone(&self.shared.store);
        let logging = Arc::clone(self.logging);
        let workers = self.workers;
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                let running = Running {
                    config: &old,
                    store: &store,
                    logging: &logging,
                    metrics: &metrics,
                    workers,
                };
                let _ = tx.send(prepare(&file, &base, &running));
            });
        match spawned {
            Ok(thread) => Some(Preparing {
                thread,
                done,
                again: false,
            }),
            Err(e) => {
                self.shared.metrics.config_reload_failures.inc();
                log::error!("reload failed: cannot start its thread: {e}");
                None
            }
        }
    }

    /// Each owner applies its part; the new config is published only when every part took.
    fn apply(&mut self, prepared: Prepared, events: &Chan<Event>) -> Result<(), Interrupted> {
        let Prepared {
            config: new,
            store,
            metrics_server,
            amqp,
        } = prepared;
        // Always asked: the receiver may be bound to nothing after an earlier failure.
        if self.receiver.is_some() {
            self.apply_receiver(ZmqSettings::of(&new), events)?;
        }
        if let Some((settings, link)) = amqp {
            // The new broker already answered (in the preparer); the switch itself only
            // drains the old channel for the running shutdown_timeout_ms, so it cannot fail
            // half way: the wait here is bounded by that drain, not by the new file's value.
            let drain = self.shared.config.load().daemon.shutdown_timeout();
            let answer = self.consumer.apply(settings, link);
            self.await_part(
                &answer,
                drain + Duration::from_secs(10),
                events,
                "the AMQP consumer",
            )?;
        }
        // Nothing below can fail: from here the reload is applied whole.
        if let Some(store) = store {
            store.publish();
            log::info!(
                "database target now {}/{}.{}",
                store.active_host(),
                new.mysql.database,
                new.mysql.table
            );
            self.shared.store.store(Arc::new(store));
        }
        if let Some(server) = metrics_server {
            // Dropping the old listener stops it; the new one is already bound.
            *self.metrics_server = server;
        }
        if let Err(e) = self.logging.apply(&new) {
            log::error!("reload: {e}; keeping the old log file");
        }
        self.queue.set_capacity(new.pipeline.queue_capacity);
        self.shared.config.store(Arc::new(new));
        Ok(())
    }
}

/// What a reload is prepared against (read only).
struct Running<'a> {
    config: &'a Config,
    store: &'a ArcSwap<Store>,
    logging: &'a Logging,
    metrics: &'a Metrics,
    workers: usize,
}

/// The systemd watchdog over `beats`, with a status line from the config, metrics and queue.
/// A thread that cannot start is logged, not fatal: serving matters more than the pings.
fn start_watchdog(
    notifier: &Notifier,
    beats: Vec<Heartbeat>,
    shared: &Shared,
    queue: &Queue,
) -> Option<Watchdog> {
    let (config, metrics) = (Arc::clone(&shared.config), shared.metrics.clone());
    let store = Arc::clone(&shared.store);
    let depth = queue.depth_reader();
    let snapshot = move || {
        let c = config.load();
        Snapshot {
            inputs: match (&c.zmq.endpoint, &c.amqp.url) {
                (z, None) => format!("zmq {z}"),
                (z, Some(url)) if z.is_empty() => format!("amqp {url}"),
                (z, Some(url)) => format!("zmq {z}, amqp {url}"),
            },
            committed: metrics.records_committed.get(),
            queue_depth: depth.records(),
            // The host taking writes, which a host list may have moved to.
            database: format!("{}/{}", store.load().active_host(), c.mysql.database),
        }
    };
    notifier
        .start_watchdog(beats, snapshot)
        .map_err(|e| log::error!("cannot start the systemd watchdog thread: {e}"))
        .ok()
}

/// Why a reload was not applied.
enum Interrupted {
    /// A part did not take (the reason); nothing of the reload stays applied.
    Failed(String),
    /// SIGTERM/SIGINT came while an owner was applying its part: abandon it and drain.
    Shutdown(i32),
}

impl Main<'_> {
    /// The receiver's part of a reload. It may wait for the old socket's messages to be
    /// answered; signals are still handled meanwhile, and a shutdown abandons the reload.
    fn apply_receiver(
        &mut self,
        settings: ZmqSettings,
        events: &Chan<Event>,
    ) -> Result<(), Interrupted> {
        // The drain of the messages in flight, then a bind retry loop (about 2 s).
        let wait = settings.drain + Duration::from_secs(10);
        let Some(receiver) = self.receiver else {
            return Ok(()); // ZeroMQ input off
        };
        let answer = receiver.apply(settings);
        self.await_part(&answer, wait, events, "the receiver")
    }

    /// Waits for an owner's answer to its part of a reload, handling signals meanwhile: a
    /// shutdown abandons the reload (the owner, told to stop, cuts its wait short).
    fn await_part(
        &mut self,
        answer: &Chan<Result<(), String>>,
        wait: Duration,
        events: &Chan<Event>,
        owner: &str,
    ) -> Result<(), Interrupted> {
        let deadline = Instant::now() + wait;
        loop {
            select! {
                recv(answer) -> result => {
                    return match result {
                        Ok(result) => result.map_err(Interrupted::Failed),
                        Err(_) => Err(Interrupted::Failed(format!("{owner} is gone"))),
                    };
                }
                recv(events) -> event => match event {
                    Ok(Event::Shutdown { signal }) => return Err(Interrupted::Shutdown(signal)),
                    Ok(Event::ReopenLog) => self.logging.reopen(),
                    Ok(Event::Reload) => self.reload_again = true,
                    Err(_) => return Err(Interrupted::Failed("signal thread gone".into())),
                },
                default(deadline.saturating_duration_since(Instant::now())) => {
                    return Err(Interrupted::Failed(format!("{owner} did not answer")));
                }
            }
        }
    }
}

/// Everything of a reload that can fail, done without touching the running daemon.
fn prepare(
    file: &std::path::Path,
    base: &std::path::Path,
    running: &Running,
) -> Result<Prepared, String> {
    let Running {
        config: old,
        store: running_store,
        logging,
        metrics,
        workers,
    } = *running;
    let mut new = Config::load(file, base).map_err(|e| e.to_string())?;
    for key in config::keep_restart_only(old, &mut new) {
        log::warn!("{key} changed: takes effect only after a restart; keeping the old value");
    }
    logging.check(&new).map_err(|e| e.to_string())?;
    if old.zmq.endpoint.is_empty() != new.zmq.endpoint.is_empty() {
        // The receiver exists or not for the process's life.
        log::warn!("[zmq] endpoint: turning the ZeroMQ input on or off takes effect only after a restart; keeping the old value");
        new.zmq.endpoint = old.zmq.endpoint.clone();
    }
    let amqp = match AmqpSettings::of(&new) {
        s if s == AmqpSettings::of(old) => None,
        None => Some((None, None)),
        Some(s) => {
            let link = Link::connect(&s).map_err(|e| format!("new AMQP target not usable: {e}"))?;
            Some((Some(s), Some(link)))
        }
    };
    let metrics_server = if new.metrics.listen != old.metrics.listen {
        match new.metrics.listen {
            None => Some(None),
            Some(addr) => Some(Some(
                MetricsServer::start(addr, metrics.clone()).map_err(|e| e.to_string())?,
            )),
        }
    } else {
        None
    };
    let store = if new.mysql != old.mysql {
        let pool_size = new.mysql.pool_size_for(workers);
        Some(
            Store::connect(&new.mysql, pool_size, metrics)
                .map_err(|e| format!("new database target not usable: {e}"))?,
        )
    } else {
        // Same target: the table is judged again all the same (it may have been altered).
        // An outage does not fail the reload; a table that no longer fits does.
        if let Err(e) = running_store.load().ensure_table() {
            if !e.is_transient() {
                return Err(e.to_string());
            }
            log::warn!("reload: table not checked: {e}");
        }
        None
    };
    Ok(Prepared {
        config: new,
        store,
        metrics_server,
        amqp,
    })
}

/// The inputs' handles, for the drain.
struct Inputs<'a> {
    receiver: Option<&'a ReceiverHandle>,
    consumer: &'a ConsumerHandle,
}

fn shut_down(
    shared: &Shared,
    inputs: &Inputs<'_>,
    exits: &Chan<Exit>,
    workers: usize,
    failure: Option<(Option<Role>, String)>,
) -> Outcome {
    let timeout = shared.config.load().daemon.shutdown_timeout();
    let deadline = Instant::now() + timeout;
    if let Some(receiver) = inputs.receiver {
        receiver.stop_intake();
    }
    inputs.consumer.stop_intake();
    let failed_role = failure.as_ref().and_then(|(role, _)| *role);
    let mut receiver_gone = failed_role == Some(Role::Receiver) || inputs.receiver.is_none();
    let mut consumer_gone = failed_role == Some(Role::Consumer);
    let mut workers_left = workers - usize::from(matches!(failed_role, Some(Role::Worker(_))));
    while workers_left > 0 {
        match exits.recv_deadline(deadline) {
            Ok((role, result)) => {
                if let Err(e) = result {
                    log::error!("{role} failed during shutdown: {e}");
                }
                match role {
                    Role::Receiver => receiver_gone = true,
                    Role::Consumer => consumer_gone = true,
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
    if let Some(receiver) = inputs.receiver.filter(|_| !receiver_gone) {
        receiver.finish();
    }
    if !consumer_gone {
        inputs.consumer.finish();
    }
    // The inputs only send what is already delivered (and close); this wait is short.
    let until = Instant::now() + Duration::from_secs(5);
    while !(receiver_gone && consumer_gone) {
        match exits.recv_deadline(until) {
            Ok((Role::Receiver, _)) => receiver_gone = true,
            Ok((Role::Consumer, _)) => consumer_gone = true,
            Ok(_) => {}
            Err(_) => break,
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
