//! The AMQP input: the consumer thread, the only user of its broker channel (SPEC §4b).
//!
//! - `link`: the blocking facade over lapin (connect, next event, ack, reject, dead letter).
//! - `ledger`: which delivery tags to ack and how (pure, unit-tested).
//! - here: the thread. It takes deliveries only while the queue has room (the broker's
//!   prefetch does the rest), parses each body like a ZeroMQ body, dead-letters malformed and
//!   oversized ones at once, and queues the rest. Workers hand verdicts back through its
//!   outbox and ring its bell; it acks committed deliveries (`multiple` where the tags allow)
//!   and dead-letters conflicts with their reason, acking each only once the broker confirmed
//!   the dead letter.
//!
//! Faults: a lost connection starts a new generation (tags belong to their channel, so
//! verdicts of the old one are dropped and the broker redelivers), and the thread reconnects
//! with capped backoff, logged once per episode. Stop: `basic.cancel`, then keep acking what
//! commits; finish: ack the rest, close (unacked deliveries return to the queue). A reload
//! hands it a link the preparer has already connected; it drains the old one first.
//!
//! The thread runs even while `[amqp] url` is empty (idle), so a reload can turn AMQP on.

pub mod ledger;
pub mod link;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver as Chan, Sender};
use lapin::BasicProperties;

use crate::config::Config;
use crate::heartbeat::Heartbeat;
use crate::input::record;
use crate::message::Verdict;
use crate::metrics::Metrics;
use crate::pipeline::queue::{ChannelOutbox, Intake, Job, Outbox, Queue, ReplyTo, Verdicts, Wake};
use ledger::Ledger;
pub use link::{AmqpSettings, Event, Link, LinkError};

/// Most deliveries taken in one go before the mailbox gets a turn.
const READ_BURST: usize = 256;
/// Longest idle wait, so the thread turns (and notices a dead connection) this often.
const IDLE_WAKE: Duration = Duration::from_millis(500);
/// Reconnect backoff: from the first to the cap, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// The mailbox bell: a one-slot async channel the consumer can wait on beside the broker.
struct Bell(smol::channel::Sender<()>);

impl Wake for Bell {
    fn wake(&self) {
        // Full means a ring is already pending: that is all a ring has to achieve.
        let _ = self.0.try_send(());
    }
}

/// A delivery's reply address: its channel generation and tag, and what a dead letter needs.
struct AmqpTag {
    generation: u64,
    tag: u64,
    body: Vec<u8>,
    properties: BasicProperties,
}

enum Command {
    /// New settings (`None`: AMQP off) with the link the preparer connected for them.
    Apply(
        Box<(Option<AmqpSettings>, Option<Link>)>,
        Sender<Result<(), String>>,
    ),
    Stop,
    Finish,
}

/// The main thread's handle on the consumer.
pub struct ConsumerHandle {
    commands: Sender<Command>,
    bell: Arc<Bell>,
}

impl ConsumerHandle {
    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            self.bell.wake();
        }
    }

    /// Asks the consumer to switch to `settings` over `link` (already connected); the answer
    /// comes on the returned channel once switched, after the old channel's deliveries in
    /// flight are answered (bounded by the running `shutdown_timeout_ms`). A stop sent
    /// meanwhile cuts that wait short.
    pub fn apply(
        &self,
        settings: Option<AmqpSettings>,
        link: Option<Link>,
    ) -> Chan<Result<(), String>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Apply(Box::new((settings, link)), tx));
        rx
    }

    pub fn stop_intake(&self) {
        self.send(Command::Stop);
    }

    pub fn finish(&self) {
        self.send(Command::Finish);
    }
}

pub struct Consumer {
    settings: Option<AmqpSettings>,
    link: Option<Link>,
    /// Bumped with every new channel: verdicts of an older one are dropped.
    generation: u64,
    ledger: Ledger,
    config: Arc<ArcSwap<Config>>,
    bell_rx: smol::channel::Receiver<()>,
    commands: Chan<Command>,
    verdicts: Chan<Verdicts>,
    outbox: Arc<dyn Outbox>,
    intake: Option<Intake>,
    held: Option<Job>,
    metrics: Metrics,
    /// Since when the connection is lost (one log line per episode), and the next try.
    lost: Option<(Instant, u32)>,
    backoff: Duration,
    next_try: Instant,
    heartbeat: Heartbeat,
    /// A stop or finish that came while a switch waited for answers: carried out next.
    interrupted: Option<Command>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl Consumer {
    /// Connects when `[amqp] url` is set, so an unreachable broker is a start-up error.
    pub fn connect(
        config: Arc<ArcSwap<Config>>,
        queue: &Queue,
        metrics: Metrics,
    ) -> Result<(Consumer, ConsumerHandle), ConsumerError> {
        let settings = AmqpSettings::of(&config.load());
        let link = match &settings {
            Some(s) => {
                let link = Link::connect(s)?;
                log::info!(
                    "consuming {} queue `{}` (prefetch {}, dead letters to {})",
                    s.url,
                    s.queue,
                    s.prefetch,
                    s.dead_letter_exchange
                        .as_deref()
                        .unwrap_or("nowhere: dropped")
                );
                Some(link)
            }
            None => None,
        };
        let (bell_tx, bell_rx) = smol::channel::bounded(1);
        let bell = Arc::new(Bell(bell_tx));
        let intake = queue.intake(Arc::clone(&bell) as Arc<dyn Wake>);
        let (commands_tx, commands) = crossbeam_channel::unbounded();
        let (outbox, verdicts) = ChannelOutbox::open(Arc::clone(&bell) as Arc<dyn Wake>);
        let hold = settings.as_ref().map_or(1, |s| usize::from(s.prefetch) / 2);
        Ok((
            Consumer {
                settings,
                link,
                generation: 0,
                ledger: Ledger::new(hold),
                config,
                bell_rx,
                commands,
                verdicts,
                outbox,
                intake,
                held: None,
                metrics,
                lost: None,
                backoff: BACKOFF_FIRST,
                next_try: Instant::now(),
                heartbeat: Heartbeat::new("amqp-consumer"),
                interrupted: None,
            },
            ConsumerHandle {
                commands: commands_tx,
                bell,
            },
        ))
    }

    /// The consumer's heartbeat, for the watchdog (it turns at least every `IDLE_WAKE`).
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Serves until told `finish`.
    pub fn run(mut self) {
        loop {
            self.heartbeat.beat();
            if self.link.is_none() && self.settings.is_some() && self.intake.is_some() {
                self.reconnect();
            }
            let want = self.held.is_none() && self.intake.as_ref().is_some_and(|i| i.has_room(1));
            let event = match &mut self.link {
                Some(link) => link.next_event(want, &self.bell_rx, IDLE_WAKE),
                None => {
                    let wait = if self.settings.is_some() && self.intake.is_some() {
                        self.next_try.saturating_duration_since(Instant::now())
                    } else {
                        IDLE_WAKE
                    };
                    wait_bell(&self.bell_rx, wait.min(IDLE_WAKE))
                }
            };
            match event {
                Event::Delivery(d) => {
                    self.take(*d);
                    self.take_burst();
                    self.flush_acks(false);
                }
                Event::Mail => {
                    while self.bell_rx.try_recv().is_ok() {}
                    self.settle_verdicts();
                    if self.obey() {
                        self.settle_verdicts();
                        self.flush_acks(true);
                        if let Some(link) = self.link.take() {
                            link.close();
                        }
                        return;
                    }
                    self.retry_held();
                }
                Event::Idle => {
                    if self.link.as_ref().is_some_and(|l| !l.is_connected()) {
                        self.lose("the connection closed".into());
                    }
                }
                Event::Lost(reason) => self.lose(reason),
            }
        }
    }

    fn take_burst(&mut self) {
        for _ in 0..READ_BURST {
            let room = self.held.is_none() && self.intake.as_ref().is_some_and(|i| i.has_room(1));
            if !room {
                return;
            }
            match self.link.as_mut().and_then(Link::try_delivery) {
                Some(Ok(d)) => self.take(d),
                Some(Err(reason)) => return self.lose(reason),
                None => return,
            }
        }
    }

    /// One delivery: parsed and queued, or dead-lettered at once.
    fn take(&mut self, d: link::Delivery) {
        self.metrics.amqp_deliveries.inc();
        self.metrics.messages_received.inc();
        let tag = d.delivery_tag;
        self.ledger.received(tag);
        let max_bytes = self.config.load().zmq.max_message_bytes;
        let parsed = if d.data.len() > max_bytes {
            Err("too large".to_string())
        } else {
            record::parse_body(&d.data).map_err(|e| e.to_string())
        };
        match parsed {
            Err(reason) => {
                self.metrics.messages_rejected.inc();
                self.reject(tag, &d.data, &d.properties, &reason);
            }
            Ok(records) => {
                let Some(intake) = &self.intake else {
                    self.ledger.forget(tag);
                    return;
                };
                let job = Job {
                    records,
                    received: Instant::now(),
                    reply: ReplyTo {
                        outbox: Arc::clone(&self.outbox),
                        tag: Box::new(AmqpTag {
                            generation: self.generation,
                            tag,
                            body: d.data,
                            properties: d.properties,
                        }),
                    },
                };
                intake.push_or_hold(job, &mut self.held);
            }
        }
    }

    fn retry_held(&mut self) {
        if let Some(intake) = &self.intake {
            intake.retry(&mut self.held);
        }
    }

    /// Dead-letters a delivery (or rejects it without requeue when there is no DLX).
    fn reject(&mut self, tag: u64, body: &[u8], properties: &BasicProperties, reason: &str) {
        let (Some(link), Some(settings)) = (&self.link, &self.settings) else {
            return;
        };
        let result = match &settings.dead_letter_exchange {
            Some(dlx) => link.dead_letter(dlx, body, properties, reason).map(|()| {
                log::debug!("amqp: delivery dead-lettered to {dlx}: {reason}");
                self.ledger.done(tag);
            }),
            None => link.reject(tag).map(|()| {
                log::warn!(
                    "amqp: delivery rejected and dropped (no dead_letter_exchange): {reason}"
                );
                self.ledger.forget(tag);
            }),
        };
        match result {
            Ok(()) => self.metrics.amqp_dead_letters.inc(),
            Err(e) => self.lose(e.to_string()),
        }
    }

    /// Applies the verdicts delivered so far, then sends the acks they allow.
    fn settle_verdicts(&mut self) {
        while let Ok(verdicts) = self.verdicts.try_recv() {
            for (tag, verdict) in verdicts {
                let Ok(t) = tag.downcast::<AmqpTag>() else {
                    continue;
                };
                if t.generation != self.generation || self.link.is_none() {
                    continue; // its channel is gone: the broker redelivers it
                }
                match verdict {
                    Verdict::Accept { .. } => self.ledger.done(t.tag),
                    Verdict::Conflict(reason) => {
                        self.reject(t.tag, &t.body, &t.properties, &reason)
                    }
                }
            }
        }
        self.flush_acks(false);
    }

    fn flush_acks(&mut self, drain: bool) {
        if self.link.is_none() {
            return;
        }
        for ack in self.ledger.acks(drain) {
            let Some(link) = &self.link else { return };
            if let Err(e) = link.ack(ack.tag, ack.multiple) {
                return self.lose(e.to_string());
            }
            self.metrics.amqp_acks.inc_by(ack.deliveries as u64);
        }
    }

    /// The channel is gone: forget its tags and reconnect later.
    fn lose(&mut self, reason: String) {
        let Some(link) = self.link.take() else { return };
        drop(link);
        self.generation += 1;
        self.ledger = Ledger::new(self.hold_limit());
        self.held = None; // of the dead channel: the broker redelivers it
        if self.lost.is_none() {
            let url = self
                .settings
                .as_ref()
                .map(|s| s.url.to_string())
                .unwrap_or_default();
            log::warn!("amqp: connection to {url} lost ({reason}); reconnecting with backoff, unacked deliveries will be redelivered");
            self.lost = Some((Instant::now(), 0));
        }
        self.backoff = BACKOFF_FIRST;
        self.next_try = Instant::now() + self.backoff;
    }

    fn hold_limit(&self) -> usize {
        self.settings
            .as_ref()
            .map_or(1, |s| usize::from(s.prefetch) / 2)
    }

    fn reconnect(&mut self) {
        if Instant::now() < self.next_try {
            return;
        }
        let Some(settings) = &self.settings else {
            return;
        };
        match Link::connect(settings) {
            Ok(link) => {
                self.link = Some(link);
                self.generation += 1;
                self.ledger = Ledger::new(self.hold_limit());
                self.metrics.amqp_reconnects.inc();
                let (since, tries) = self.lost.take().unwrap_or((Instant::now(), 0));
                log::info!(
                    "amqp: reconnected to {} after {:.1} s ({} failed attempt(s))",
                    settings.url,
                    since.elapsed().as_secs_f64(),
                    tries
                );
                self.backoff = BACKOFF_FIRST;
            }
            Err(e) => {
                match &mut self.lost {
                    Some((_, tries)) => *tries += 1,
                    None => {
                        log::warn!("amqp: {e}; retrying with backoff");
                        self.lost = Some((Instant::now(), 1));
                    }
                }
                log::debug!("amqp: reconnect failed: {e}");
                self.backoff = (self.backoff * 2).min(BACKOFF_CAP);
                self.next_try = Instant::now() + self.backoff;
            }
        }
    }

    /// Carries out the main thread's commands; true when told to finish.
    fn obey(&mut self) -> bool {
        while let Some(command) = self
            .interrupted
            .take()
            .or_else(|| self.commands.try_recv().ok())
        {
            match command {
                Command::Apply(new, answer) => {
                    let (settings, link) = *new;
                    self.switch(settings, link);
                    let _ = answer.send(Ok(()));
                }
                Command::Stop => {
                    if let Some(link) = &mut self.link {
                        link.cancel();
                        log::info!("amqp: consumer cancelled, draining");
                    }
                    self.intake = None;
                    if let Some(job) = self.held.take() {
                        self.forget_job(job);
                    }
                }
                Command::Finish => return true,
            }
        }
        false
    }

    fn forget_job(&mut self, job: Job) {
        if let Ok(t) = job.reply.tag.downcast::<AmqpTag>() {
            if t.generation == self.generation {
                self.ledger.forget(t.tag);
            }
        }
    }

    /// Moves to new settings: the old channel stops taking deliveries, its in-flight ones
    /// are answered (bounded by `shutdown_timeout_ms`) and acked, then it closes.
    fn switch(&mut self, settings: Option<AmqpSettings>, link: Option<Link>) {
        if let Some(job) = self.held.take() {
            self.forget_job(job);
        }
        if let Some(old) = &mut self.link {
            old.cancel();
        }
        let drain = self.config.load().daemon.shutdown_timeout();
        let deadline = Instant::now() + drain;
        if self.ledger.pending() > 0 {
            log::info!(
                "amqp: answering {} delivery(ies) of the old channel before switching",
                self.ledger.pending()
            );
        }
        while self.link.is_some() && self.ledger.pending() > 0 && Instant::now() < deadline {
            // The watchdog must see this wait as progress, and a stop must cut it short.
            self.heartbeat.beat();
            if let Ok(command) = self.commands.try_recv() {
                match command {
                    Command::Apply(_, answer) => {
                        let _ = answer.send(Err("another reload is being applied".into()));
                    }
                    other => {
                        self.interrupted = Some(other);
                        break;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Event::Mail = wait_bell(&self.bell_rx, left.min(IDLE_WAKE)) {
                while self.bell_rx.try_recv().is_ok() {}
                self.settle_verdicts();
            }
        }
        if self.ledger.pending() > 0 {
            log::warn!(
                "amqp: {} delivery(ies) of the old connection not committed in time; the broker redelivers them",
                self.ledger.pending()
            );
        }
        self.flush_acks(true);
        if let Some(old) = self.link.take() {
            old.close();
        }
        let was = self.settings.as_ref().map(|s| s.url.to_string());
        self.settings = settings;
        self.link = link;
        self.generation += 1;
        self.ledger = Ledger::new(self.hold_limit());
        self.lost = None;
        match &self.settings {
            Some(s) => log::info!(
                "amqp: now consuming {} queue `{}` (prefetch {}; was {})",
                s.url,
                s.queue,
                s.prefetch,
                was.as_deref().unwrap_or("off")
            ),
            None => log::info!("amqp: input off (was {})", was.as_deref().unwrap_or("off")),
        }
    }
}

fn wait_bell(bell: &smol::channel::Receiver<()>, wait: Duration) -> Event {
    use smol::future::FutureExt;
    smol::block_on(
        async {
            let _ = bell.recv().await;
            Event::Mail
        }
        .or(async {
            smol::Timer::after(wait).await;
            Event::Idle
        }),
    )
}
