//! A reload, all or nothing (SPEC §3), in three steps driven by the main thread's one event
//! loop (server/mod.rs); nothing here waits.
//!
//! 1. Prepare, on a preparer thread (everything that can fail or block, off to the side, so a
//!    SIGTERM is never kept waiting): take in the listeners the supervisor handed down for
//!    `[zmq] endpoint` (process/control.rs; the receiver listens on them instead of binding),
//!    read the file, `plan` it (server/plan.rs), prove what the plan names (log file, new pool
//!    and its table, metrics listener, broker link).
//! 2. Walk: hand each input's owner its part in turn and wait for its answer (bounded by the
//!    plan's drain plus the switch itself). Once a part fails or does not answer, every part
//!    applied so far is rolled back (its owner is handed the running settings), in reverse.
//! 3. Publish, only when every part took: the new pool and listener to their owners, the
//!    queue bound, the log, and the config through the `ArcSwap` workers load per batch.
//!
//! Once a reload ends, taken or refused, a supervised process closes the handed listeners it
//! no longer serves and tells the supervisor what it serves, so the supervisor keeps that
//! listener and closes the rest. A SIGHUP that comes meanwhile sets one flag: another reload
//! is prepared once this one ends.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::Receiver as Chan;

use crate::config::Config;
use crate::input::amqp::{AmqpPart, AmqpSettings, Link, Reached};
use crate::input::driver::{Answer, Handle};
use crate::input::zmq::listener::Listeners;
use crate::input::zmq::ZmqSettings;
use crate::logging::Logging;
use crate::metrics::{Metrics, MetricsServer};
use crate::pipeline::queue::Queue;
use crate::pipeline::store::Store;
use crate::pipeline::worker::Shared;
use crate::process::control::Control;
use crate::process::notify::Notifier;
use crate::server::plan::{plan, Plan};

/// Beyond the drain, what an owner's switch itself may take (a bind retry of about 2 s, a
/// broker channel closing) before its part counts as not answered.
const SWITCH_ALLOWANCE: Duration = Duration::from_secs(10);

/// The input owners a reload hands parts to.
pub struct Owners<'a> {
    pub receiver: Option<&'a Handle<ZmqSettings>>,
    pub consumer: &'a Handle<AmqpPart>,
}

/// What the reload reads and publishes to.
pub struct Running<'a> {
    pub shared: &'a Shared,
    pub queue: &'a Queue,
    pub owners: Owners<'a>,
    pub metrics_server: &'a mut Option<MetricsServer>,
    pub logging: &'a Arc<Logging>,
    pub notify: Option<&'a Notifier>,
    pub workers: usize,
    pub file: PathBuf,
    pub base: PathBuf,
    pub handoff: Handoff,
}

/// What a supervisor hands the process for a reload, and where it goes.
pub struct Handoff {
    /// The listeners handed to the process (`None`: ZeroMQ off).
    pub listeners: Option<Listeners>,
    /// The supervisor's control channel (`None`: no supervisor).
    pub control: Option<Arc<Control>>,
}

/// Everything of a reload that had to be proven, ready to walk.
pub struct Prepared {
    plan: Plan,
    store: Option<Store>,
    metrics_server: Option<Option<MetricsServer>>,
    link: Option<Reached>,
}

/// The preparer thread of the reload under way.
pub struct Preparing {
    thread: JoinHandle<()>,
    done: Chan<Result<Prepared, String>>,
}

impl Preparing {
    /// At exit: joined if it is done, else left to the exit, which must not wait for a
    /// reload that was abandoned (it may wait on a database that does not answer).
    pub fn leave(self) {
        if self.done.try_recv().is_ok() {
            let _ = self.thread.join();
        } else {
            log::debug!("the abandoned reload is still connecting; exiting without it");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Receiver,
    Consumer,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Owner::Receiver => "the receiver",
            Owner::Consumer => "the AMQP consumer",
        })
    }
}

enum Part {
    Zmq(ZmqSettings),
    Amqp(Box<AmqpPart>),
}

impl Part {
    fn owner(&self) -> Owner {
        match self {
            Part::Zmq(_) => Owner::Receiver,
            Part::Amqp(_) => Owner::Consumer,
        }
    }
}

/// What is published once every part took.
struct Publish {
    config: Config,
    store: Option<Store>,
    metrics_server: Option<Option<MetricsServer>>,
}

/// A prepared reload being walked, part by part.
struct Walk {
    todo: VecDeque<Part>,
    /// Owners whose part took, in order: rolled back in reverse if a later part fails.
    applied: Vec<Owner>,
    waiting: Option<(Owner, Chan<Answer>, Instant)>,
    /// Why the reload failed; from then on the walk is rolling back.
    failed: Option<String>,
    publish: Publish,
    drain: Duration,
    /// The running config: what a rolled-back owner is handed (it reconnects a broker itself).
    rollback_to: Arc<Config>,
}

enum State {
    Idle,
    Preparing(Preparing),
    Walking(Box<Walk>),
}

/// The reload under way (if any), driven by the main thread's event loop.
pub struct Reload {
    state: State,
    /// Another SIGHUP came: prepare again once this reload ends.
    again: bool,
    daemon: bool,
}

impl Reload {
    pub fn new(daemon: bool) -> Reload {
        Reload {
            state: State::Idle,
            again: false,
            daemon,
        }
    }

    /// The preparer's result, when one is preparing.
    pub fn prepared(&self) -> Chan<Result<Prepared, String>> {
        match &self.state {
            State::Preparing(p) => p.done.clone(),
            _ => crossbeam_channel::never(),
        }
    }

    /// The answer awaited from an owner, and when waiting for it ends.
    pub fn awaited(&self) -> (Chan<Answer>, Chan<Instant>) {
        match &self.state {
            State::Walking(w) => match &w.waiting {
                Some((_, answer, deadline)) => (answer.clone(), crossbeam_channel::at(*deadline)),
                None => (crossbeam_channel::never(), crossbeam_channel::never()),
            },
            _ => (crossbeam_channel::never(), crossbeam_channel::never()),
        }
    }

    /// SIGHUP: start a reload, or ask for another once this one is through.
    pub fn request(&mut self, running: &Running) {
        match self.state {
            State::Idle => self.start(running),
            _ => self.again = true,
        }
    }

    /// SIGTERM: what is under way is abandoned (owners told to stop cut their switch short);
    /// a preparer still running is handed back to be left at exit.
    pub fn abandon(self) -> Option<Preparing> {
        match self.state {
            State::Idle => None,
            State::Preparing(p) => {
                log::info!("the reload under way is abandoned");
                Some(p)
            }
            State::Walking(_) => {
                log::info!("the reload being applied is abandoned");
                None
            }
        }
    }

    fn start(&mut self, running: &Running) {
        let (tx, done) = crossbeam_channel::bounded(1);
        let (file, base) = (running.file.clone(), running.base.clone());
        let old = running.shared.config.load_full();
        let metrics = running.shared.metrics.clone();
        let store = Arc::clone(&running.shared.store);
        let logging = Arc::clone(running.logging);
        let (workers, daemon) = (running.workers, self.daemon);
        let h = &running.handoff;
        let (listeners, control) = (h.listeners.clone(), h.control.clone());
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                // Sent before the SIGHUP was forwarded: waiting already.
                if let Some(c) = &control {
                    take_handed(c, listeners.as_ref());
                }
                let proof = Proof {
                    store: &store,
                    logging: &logging,
                    metrics: &metrics,
                    workers,
                    daemon,
                };
                let _ = tx.send(prepare(&file, &base, &old, &proof));
            });
        match spawned {
            Ok(thread) => self.state = State::Preparing(Preparing { thread, done }),
            Err(e) => self.end(running, Err(format!("cannot start its thread: {e}"))),
        }
    }

    /// The preparer is done: walk what it proved, or report why not.
    pub fn on_prepared(&mut self, result: Option<Result<Prepared, String>>, running: &mut Running) {
        if let State::Preparing(p) = std::mem::replace(&mut self.state, State::Idle) {
            let _ = p.thread.join();
        }
        match result.unwrap_or_else(|| Err("the reload preparer died".into())) {
            Err(reason) => self.end(running, Err(reason)),
            Ok(prepared) => {
                let mut walk = Box::new(Walk::new(prepared, running.shared.config.load_full()));
                match walk.advance(running) {
                    Some(result) => self.finish(walk, result, running),
                    None => self.state = State::Walking(walk),
                }
            }
        }
    }

    /// An owner answered (`None`: its channel closed, the owner is gone).
    pub fn on_answer(&mut self, answer: Option<Answer>, running: &mut Running) {
        let result = answer.unwrap_or_else(|| Err("is gone".into()));
        self.step(running, |walk, owner| walk.answered(owner, result));
    }

    /// The awaited owner did not answer in time.
    pub fn on_timeout(&mut self, running: &mut Running) {
        self.step(running, |walk, owner| walk.timed_out(owner));
    }

    fn step(&mut self, running: &mut Running, f: impl FnOnce(&mut Walk, Owner)) {
        let State::Walking(mut walk) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        if let Some((owner, _, _)) = walk.waiting.take() {
            f(&mut walk, owner);
        }
        match walk.advance(running) {
            Some(result) => self.finish(walk, result, running),
            None => self.state = State::Walking(walk),
        }
    }

    fn finish(&mut self, walk: Box<Walk>, result: Result<(), String>, running: &mut Running) {
        let result = result.map(|()| publish(walk.publish, running));
        self.end(running, result);
    }

    /// Counts and reports the reload; prepares the next one if another SIGHUP came.
    fn end(&mut self, running: &Running, result: Result<(), String>) {
        self.state = State::Idle;
        let metrics = &running.shared.metrics;
        match &result {
            Ok(()) => {
                metrics.config_reloads.inc();
                log::info!("config reloaded from {}", running.file.display());
                crate::process::daemon::report_reloaded();
            }
            Err(reason) => {
                metrics.config_reload_failures.inc();
                log::error!("reload failed, keeping the running config: {reason}");
            }
        }
        if let Some(n) = running.notify {
            match &result {
                Ok(()) => n.reload_done(true, "config reloaded"),
                Err(reason) => n.reload_done(false, reason),
            }
        }
        if let Some(c) = &running.handoff.control {
            // Taken or refused, the supervisor keeps the listener of what is served and
            // closes the others; so does this process.
            let endpoint = running.shared.config.load().zmq.endpoint.clone();
            if let Some(l) = &running.handoff.listeners {
                l.keep_only(&endpoint);
            }
            c.report(&endpoint);
        }
        if std::mem::take(&mut self.again) {
            self.start(running);
        }
    }
}

impl Walk {
    fn new(prepared: Prepared, rollback_to: Arc<Config>) -> Walk {
        let Prepared {
            plan,
            store,
            metrics_server,
            link,
        } = prepared;
        let mut todo = VecDeque::new();
        todo.extend(plan.zmq.map(Part::Zmq));
        todo.extend(
            plan.amqp
                .map(|settings| Part::Amqp(Box::new((settings, link)))),
        );
        Walk {
            todo,
            applied: Vec::new(),
            waiting: None,
            failed: None,
            drain: plan.drain,
            rollback_to,
            publish: Publish {
                config: plan.config,
                store,
                metrics_server,
            },
        }
    }

    /// Hands the next part to its owner; `Some` once the walk is over.
    fn advance(&mut self, running: &Running) -> Option<Result<(), String>> {
        let part = match self.todo.pop_front() {
            Some(part) => part,
            None => return Some(self.failed.take().map_or(Ok(()), Err)),
        };
        let owner = part.owner();
        let answer = match (part, &running.owners) {
            (
                Part::Zmq(s),
                Owners {
                    receiver: Some(r), ..
                },
            ) => r.apply(s, self.drain),
            (Part::Amqp(p), Owners { consumer, .. }) => consumer.apply(*p, self.drain),
            // ZeroMQ off: the plan asks no receiver, and nothing to roll back.
            (Part::Zmq(_), _) => return self.advance(running),
        };
        let deadline = Instant::now() + self.drain + SWITCH_ALLOWANCE;
        self.waiting = Some((owner, answer, deadline));
        None
    }

    fn answered(&mut self, owner: Owner, result: Answer) {
        match (result, &self.failed) {
            (Ok(()), None) => self.applied.push(owner),
            (Ok(()), Some(_)) => log::info!("reload: {owner} is back on the running settings"),
            (Err(reason), None) => self.roll_back(reason, None),
            (Err(reason), Some(_)) => {
                log::error!("reload: {owner} could not go back to the running settings: {reason}");
            }
        }
    }

    /// The owner may still be switching: once it is, it is handed the running settings too.
    fn timed_out(&mut self, owner: Owner) {
        let reason = format!("{owner} did not answer in time");
        match self.failed {
            None => self.roll_back(reason, Some(owner)),
            Some(_) => log::error!("reload: rolling back, {reason}"),
        }
    }

    /// From now on the walk hands every applied owner (and `also`) its running settings.
    fn roll_back(&mut self, reason: String, also: Option<Owner>) {
        if !self.applied.is_empty() || also.is_some() {
            log::warn!("reload: {reason}; rolling back what was applied");
        }
        self.failed = Some(reason);
        self.todo.clear();
        let owners: Vec<Owner> = self.applied.drain(..).rev().chain(also).collect();
        let to = &self.rollback_to;
        self.todo.extend(owners.into_iter().map(|o| match o {
            Owner::Receiver => Part::Zmq(ZmqSettings::of(to)),
            Owner::Consumer => Part::Amqp(Box::new((AmqpSettings::of(to), None))),
        }));
    }
}

/// Everything that is published once every part took; none of it can fail half way.
fn publish(publish: Publish, running: &mut Running) {
    let Publish {
        config: new,
        store,
        metrics_server,
    } = publish;
    if let Some(store) = store {
        store.publish();
        log::info!(
            "database target now {}/{}.{}",
            store.active_host(),
            new.mysql.database,
            new.mysql.table
        );
        running.shared.store.store(Arc::new(store));
    }
    if let Some(server) = metrics_server {
        // Dropping the old listener stops it; the new one is already bound.
        *running.metrics_server = server;
    }
    if let Err(e) = running.logging.apply(&new.log()) {
        log::error!("reload: {e}; keeping the old log file");
    }
    running.queue.set_capacity(new.pipeline.queue_capacity);
    running.shared.config.store(Arc::new(new));
}

/// The listeners the supervisor handed down for this reload, for the receiver to listen on
/// instead of binding (none with ZeroMQ off: turning it on is restart-only).
fn take_handed(control: &Control, listeners: Option<&Listeners>) {
    for l in control.take_handed() {
        log::info!(
            "reload: the supervisor handed down a listener on {}",
            l.endpoint()
        );
        if let Some(all) = listeners {
            all.add(l);
        }
    }
}

/// What a reload is proven against (read only, on the preparer thread).
struct Proof<'a> {
    store: &'a ArcSwap<Store>,
    logging: &'a Logging,
    metrics: &'a Metrics,
    workers: usize,
    daemon: bool,
}

/// Everything of a reload that can fail, done without touching the running daemon.
fn prepare(file: &Path, base: &Path, old: &Config, proof: &Proof) -> Result<Prepared, String> {
    let new = Config::load(file, base).map_err(|e| e.to_string())?;
    let plan = plan(old, new, proof.daemon);
    for key in &plan.restart_only {
        log::warn!("{key} changed: takes effect only after a restart; keeping the old value");
    }
    proof
        .logging
        .check(&plan.config.log())
        .map_err(|e| e.to_string())?;
    let metrics_server = match plan.metrics {
        None => None,
        Some(None) => Some(None),
        Some(Some(addr)) => Some(Some(
            MetricsServer::start(addr, proof.metrics.clone()).map_err(|e| e.to_string())?,
        )),
    };
    let store = if plan.mysql {
        let pool_size = plan.config.mysql.pool_size_for(proof.workers);
        Some(
            Store::connect(&plan.config.mysql, pool_size, proof.metrics)
                .map_err(|e| format!("new database target not usable: {e}"))?,
        )
    } else {
        // Same target: the table is judged again all the same (it may have been altered).
        // An outage does not fail the reload; a table that no longer fits does.
        if let Err(e) = proof.store.load().ensure_table() {
            if !e.is_transient() {
                return Err(e.to_string());
            }
            log::warn!("reload: table not checked: {e}");
        }
        None
    };
    // Last, and only connected: the queue and dead letters are declared at the switch, so a
    // reload refused here or by another part leaves nothing on the broker.
    let link = match &plan.amqp {
        Some(Some(s)) => {
            Some(Link::reach(s).map_err(|e| format!("new AMQP target not usable: {e}"))?)
        }
        _ => None,
    };
    Ok(Prepared {
        plan,
        store,
        metrics_server,
        link,
    })
}
