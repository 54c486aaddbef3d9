//! The AMQP input (SPEC §4b): the consumer, the only user of its broker channel, as an
//! `Input` of the one driver (input/driver.rs), which runs it on the amqp-consumer thread.
//!
//! - `link`: the blocking facade over lapin (connect, next event, ack, reject, dead letter).
//! - `ledger`: which delivery tags to ack and how (pure, unit-tested).
//! - `topology`: what a connect declares (exchange, binding, queue and its type, dead letters).
//! - here: the adapter. Deliveries are taken only while the queue has room (the broker's
//!   prefetch does the rest); each body is parsed like a ZeroMQ body, malformed and oversized
//!   ones are dead-lettered at once, the rest queued. Committed deliveries are acked
//!   (`multiple` where the tags allow), conflicts dead-lettered with their reason and acked
//!   once the broker confirmed the dead letter.
//!
//! Brokers: `[amqp] url` may list a cluster's nodes (`brokers`): feedd starts on the first that
//! answers; a lost connection or a refused connect moves to the next in order at once (one log
//! line per move), the backoff spacing only full rounds; a reload moves it only when its broker
//! left the list.
//!
//! Faults: a lost connection starts a new generation (tags belong to their channel, so
//! verdicts of the old one are dropped and the broker redelivers) and the consumer reconnects
//! with capped backoff, logged once per outage, on a window of one delivery until the
//! deliveries it had in hand and one more are settled (`ledger::Window`): a delivery that
//! breaks the connection is then alone in flight. Every broker call returns within
//! `link::CALL_TIMEOUT`, so the thread keeps turning for the watchdog. A dead letter's original
//! is acked on its own as soon as the broker confirmed the dead letter; one the broker returns
//! unroutable (its queue deleted) is declared again and published once more, else the original
//! stays unacked (the broker redelivers it on the next connection) and the log says so. Stop: `basic.cancel`, then keep acking what
//! commits; finish: ack the rest and close (unacked deliveries return to the queue). Its part
//! of a reload is a link the preparer already connected; the old channel is cancelled, its
//! deliveries in flight answered, then it closes. It runs even while `[amqp] url` is empty
//! (idle), so a reload can turn AMQP on.

pub mod brokers;
pub mod ledger;
pub mod link;
pub mod topology;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lapin::BasicProperties;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::input::driver::{Input, Ready, Taken};
use crate::input::mailbox::Doorbell;
use crate::input::record;
use crate::message::Verdict;
use crate::metrics::Metrics;
use brokers::{Brokers, Next};
use ledger::{Ledger, Window, CULPRIT_STREAK, QUIET};
pub use link::{AmqpSettings, Event, Link, LinkError, Reached};

/// A delivery's reply address: its channel generation and tag, and what a dead letter needs.
pub struct AmqpTag {
    generation: u64,
    tag: u64,
    /// Records of the message, counted as acknowledged when its ack is due.
    records: usize,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// The consumer's part of a reload: new settings (`None`: AMQP off) and the connection the
/// preparer made for them (`None` with settings: the consumer connects itself). The queue
/// and dead letters are declared only at the switch, the reload's last step.
pub type AmqpPart = (Option<AmqpSettings>, Option<Reached>);

pub struct Consumer {
    settings: Option<AmqpSettings>,
    link: Option<Link>,
    /// Bumped with every new channel: verdicts of an older one are dropped.
    generation: u64,
    ledger: Ledger,
    config: Arc<ArcSwap<Config>>,
    /// A delivery the wait received, for the next `read_one`.
    arrived: Option<link::Delivery>,
    /// Intake stopped: no more deliveries, no reconnects.
    stopped: bool,
    /// A switch is pending: the old settings are on their way out, so no reconnect to them.
    switching: bool,
    /// Since when the connection is lost (one log line per outage), failed attempts, and
    /// whether the reconnect was logged; cleared once the window opens again.
    lost: Option<Outage>,
    window: Window,
    /// Last delivery, settlement or reconnect: a window of one quiet for `QUIET` opens.
    stirred: Instant,
    backoff: Backoff,
    next_try: Instant,
    /// Which broker of the list is in use (or tried next).
    brokers: Brokers,
    metrics: Metrics,
}

/// One outage of the broker connection, for its log lines.
struct Outage {
    since: Instant,
    failed: u32,
    reconnected: bool,
    /// A refusal no other broker would lift (`brokers::moves_on`) was logged.
    refusal_said: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("no broker of [amqp] url answered: {}", list(.0))]
    NoBroker(Vec<LinkError>),
}

fn list(errors: &[LinkError]) -> String {
    let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    texts.join("; ")
}

/// Start-up: the first broker of the list that answers (one error as it is, several listed);
/// the list is walked again while a broker was only slow (`brokers::another_round`).
fn first_answering(s: &AmqpSettings, prefetch: u16) -> Result<(Link, usize), ConsumerError> {
    let started = Instant::now();
    let mut errors = Vec::new();
    loop {
        errors.clear();
        for at in 0..s.brokers.urls().len() {
            match Link::connect(s, at, prefetch) {
                Ok(link) => return Ok((link, at)),
                Err(e) if !brokers::moves_on(&e) => return Err(e.into()),
                Err(e) => {
                    log::warn!("amqp: {e}; trying the next broker of the list");
                    errors.push(e);
                }
            }
        }
        if !brokers::another_round(&errors, started.elapsed()) {
            break;
        }
        log::warn!(
            "amqp: a broker did not answer in time; walking the list again (start-up does for up to {} s)",
            brokers::STARTUP_PATIENCE.as_secs()
        );
    }
    match errors.len() {
        1 => Err(errors.remove(0).into()),
        _ => Err(ConsumerError::NoBroker(errors)),
    }
}

impl Consumer {
    /// Connects when `[amqp] url` is set, so an unreachable broker is a start-up error.
    pub fn connect(
        config: Arc<ArcSwap<Config>>,
        metrics: Metrics,
    ) -> Result<Consumer, ConsumerError> {
        let settings = AmqpSettings::of(&config.load());
        let window = Window::new(settings.as_ref().map_or(1, |s| s.prefetch));
        let mut at = 0;
        let len = settings.as_ref().map_or(1, |s| s.brokers.urls().len());
        let link = match &settings {
            Some(s) => {
                let link;
                (link, at) = first_answering(s, window.prefetch())?;
                log::info!(
                    "consuming {} queue `{}` (prefetch {}, dead letters to {})",
                    s.broker(at),
                    s.queue,
                    s.prefetch,
                    s.dead_letter_exchange
                        .as_deref()
                        .unwrap_or("nowhere: dropped")
                );
                log_topology(s, &link);
                Some(link)
            }
            None => None,
        };
        let mut consumer = Consumer {
            settings,
            link,
            generation: 0,
            ledger: Ledger::new(1),
            config,
            arrived: None,
            stopped: false,
            switching: false,
            lost: None,
            window,
            stirred: Instant::now(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            next_try: Instant::now(),
            brokers: Brokers::new(len, at),
            metrics,
        };
        consumer.ledger = Ledger::new(consumer.hold_limit());
        consumer.show_brokers();
        Ok(consumer)
    }

    fn hold_limit(&self) -> usize {
        self.settings
            .as_ref()
            .map_or(1, |s| usize::from(s.prefetch) / 2)
    }

    /// A new channel (or none): its tags start afresh.
    fn new_generation(&mut self) {
        self.generation += 1;
        self.ledger = Ledger::new(self.hold_limit());
        self.arrived = None;
    }

    /// One delivery: parsed and queued, or dead-lettered at once.
    fn take(&mut self, d: link::Delivery) -> Taken<AmqpTag> {
        self.metrics.amqp_deliveries.inc();
        if d.redelivered {
            // Committed once all the same (idempotent); on a quorum queue it spent budget.
            self.metrics.amqp_redeliveries.inc();
        }
        self.window.arrived();
        self.stirred = Instant::now();
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
                self.reject(tag, &d.data, &d.properties, &reason);
                Taken::Refused
            }
            Ok(records) => Taken::Accepted {
                tag: AmqpTag {
                    generation: self.generation,
                    tag,
                    records: records.len(),
                    body: d.data,
                    properties: d.properties,
                },
                records,
                received: Instant::now(),
            },
        }
    }

    /// Dead-letters a delivery and acks it on its own at once (or rejects it without requeue
    /// when there is no DLX), so a broken connection later cannot dead-letter it twice.
    fn reject(&mut self, tag: u64, body: &[u8], properties: &BasicProperties, reason: &str) {
        let (Some(link), Some(settings)) = (&self.link, &self.settings) else {
            return;
        };
        let Some(dlx) = &settings.dead_letter_exchange else {
            match link.reject(tag) {
                Ok(()) => {
                    log::warn!(
                        "amqp: delivery rejected and dropped (no dead_letter_exchange): {reason}"
                    );
                    self.ledger.forget(tag);
                    self.metrics.amqp_dead_letters.inc();
                    self.settled(1);
                }
                Err(e) => self.lose(e.to_string()),
            }
            return;
        };
        let mut sent = link.dead_letter(dlx, body, properties, reason);
        if let Err(LinkError::Returned { .. }) = &sent {
            log::warn!("amqp: dead letter returned unroutable by exchange `{dlx}`; declaring its queue again");
            sent = link
                .redeclare_dead_letters(dlx, link.queue_found.type_or(settings.queue_type))
                .and_then(|()| link.dead_letter(dlx, body, properties, reason));
        }
        match sent {
            Ok(()) => {
                log::debug!("amqp: delivery dead-lettered to {dlx}: {reason}");
                self.metrics.amqp_dead_letters.inc();
                self.ledger.forget(tag);
                if let Err(e) = link.ack(tag, false) {
                    return self.lose(e.to_string());
                }
                self.metrics.amqp_acks.inc();
                self.settled(1);
            }
            Err(e @ LinkError::Returned { .. }) => {
                // Not acked: the broker redelivers it on the next connection.
                log::error!(
                    "amqp: {e}; the rejected delivery stays in queue `{}` ({reason})",
                    settings.queue
                );
                self.ledger.forget(tag);
            }
            Err(e) => self.lose(e.to_string()),
        }
    }

    /// `n` deliveries were acked or rejected: once the window may open again, the outage
    /// (if any) is over.
    fn settled(&mut self, n: u64) {
        self.stirred = Instant::now();
        if let Some(full) = self.window.settled(n) {
            self.opened(full);
        }
    }

    /// The window opens again: the outage is over.
    fn opened(&mut self, full: u16) {
        self.lost = None;
        self.brokers.worked();
        if let Some(link) = self.link.as_ref().filter(|_| full > 1) {
            if let Err(e) = link.set_prefetch(full) {
                self.lose(e.to_string());
            }
        }
    }

    fn flush_acks(&mut self, drain: bool) {
        for ack in self.ledger.acks(drain) {
            let Some(link) = &self.link else { return };
            if let Err(e) = link.ack(ack.tag, ack.multiple) {
                return self.lose(e.to_string());
            }
            self.metrics.amqp_acks.inc_by(ack.deliveries as u64);
            self.settled(ack.deliveries as u64);
        }
    }

    /// A reload to `settings` that leaves this consumer on its broker: that broker's index in
    /// the new list (see `brokers::stays_on`); never while it has no channel.
    fn stays(&self, settings: &Option<AmqpSettings>) -> Option<usize> {
        match (&self.settings, settings, &self.link) {
            (Some(old), Some(new), Some(_)) => brokers::stays_on(old, self.brokers.current(), new),
            _ => None,
        }
    }

    /// A reload changed only the broker list and the broker in use (now entry `at`) is still
    /// on it: the channel consumes on, the new list is the failover order from now on.
    fn keep_broker(&mut self, settings: Option<AmqpSettings>, at: usize) {
        let was = self.settings.as_ref().map(|s| s.brokers.to_string());
        self.settings = settings;
        let Some(s) = &self.settings else { return };
        self.brokers = Brokers::new(s.brokers.urls().len(), at);
        log::info!(
            "amqp: broker list now {} (was {}); staying on {}",
            s.brokers,
            was.unwrap_or_default(),
            s.broker(at)
        );
        self.show_brokers();
    }

    /// The channel is gone: forget its tags and reconnect later, on a window of one.
    fn lose(&mut self, reason: String) {
        self.lose_on(reason, true);
    }

    /// As `lose`; `broker_failed` false when feedd itself dropped the channel (a switch that
    /// did not happen): the same broker is tried again, after the backoff.
    fn lose_on(&mut self, reason: String, broker_failed: bool) {
        let Some(link) = self.link.take() else { return };
        drop(link);
        self.new_generation();
        let loss = self.window.lost();
        let next = if broker_failed {
            self.brokers.failed()
        } else {
            Next {
                moved: None,
                backoff: true,
            }
        };
        self.moved(next, &format!("connection lost ({reason})"), true);
        let (url, queue) = self
            .settings
            .as_ref()
            .map(|s| {
                (
                    s.broker(self.brokers.current()).to_string(),
                    s.queue.as_str(),
                )
            })
            .unwrap_or_default();
        if loss.new_outage || self.lost.is_none() {
            if next.moved.is_none() {
                log::warn!("amqp: connection to {url} lost ({reason}); reconnecting with backoff, one delivery at a time until those in hand are settled; unacked deliveries will be redelivered");
            }
            self.lost = Some(Outage {
                since: Instant::now(),
                failed: 0,
                reconnected: false,
                refusal_said: false,
            });
            self.backoff.reset();
        } else {
            log::debug!("amqp: connection to {url} lost again ({reason})");
        }
        if loss.streak == CULPRIT_STREAK {
            log::error!("amqp: the delivery at the head of queue `{queue}` breaks the connection each time it is delivered ({reason}); it is redelivered until the queue's delivery limit retires it (quorum queue) or it is removed from the queue by hand");
        }
        // After the first loss of an outage the backoff grows: a culprit is not hammered.
        self.retry(next);
    }

    /// When to try again after `next`: the next broker at once, the backoff after a round.
    fn retry(&mut self, next: Next) {
        self.next_try = Instant::now();
        if next.backoff {
            self.next_try += self.backoff.next_delay();
        }
    }

    /// Logs and counts a move along the broker list (nothing for a list of one).
    fn moved(&mut self, next: Next, why: &str, loud: bool) {
        let (Some((from, to)), Some(s)) = (next.moved, &self.settings) else {
            return;
        };
        let (from, to) = (s.broker(from), s.broker(to));
        if loud {
            log::warn!("amqp: broker {from} → {to}: {why}");
        } else {
            log::debug!("amqp: broker {from} → {to}: {why}");
        }
        if next.backoff {
            log::debug!("amqp: every broker of [amqp] url failed since the last delivery settled; going round again after the backoff");
        }
        self.metrics.amqp_failovers.inc();
        self.show_brokers();
    }

    /// `feedd_amqp_broker_active`: 1 for the broker in use, 0 for the others of the list.
    fn show_brokers(&self) {
        self.metrics.amqp_broker_active.reset();
        let Some(s) = &self.settings else { return };
        let current = self.brokers.current();
        for (i, url) in s.brokers.urls().iter().enumerate() {
            self.metrics
                .amqp_broker_active
                .with_label_values(&[&url.to_string()])
                .set(i64::from(i == current));
        }
    }

    fn reconnect(&mut self) {
        let Some(settings) = &self.settings else {
            return;
        };
        let at = self.brokers.current();
        match Link::connect(settings, at, self.window.prefetch()) {
            Ok(link) => {
                if let Some(o) = self.lost.as_mut().filter(|o| !o.reconnected) {
                    log::info!(
                        "amqp: reconnected to {} after {:.1} s ({} failed attempt(s))",
                        settings.broker(at),
                        o.since.elapsed().as_secs_f64(),
                        o.failed
                    );
                    o.reconnected = true;
                }
                self.link = Some(link);
                self.new_generation();
                self.metrics.amqp_reconnects.inc();
                self.stirred = Instant::now();
            }
            Err(e) => {
                match &mut self.lost {
                    Some(o) => o.failed += 1,
                    None => {
                        log::warn!("amqp: {e}; retrying with backoff");
                        self.lost = Some(Outage {
                            since: Instant::now(),
                            failed: 1,
                            reconnected: false,
                            refusal_said: false,
                        });
                    }
                }
                log::debug!("amqp: reconnect failed: {e}");
                // Loud for the outage's first round, then quiet until it ends.
                let failed = self.lost.as_ref().map_or(0, |o| o.failed as usize);
                let first_round = failed <= settings.brokers.urls().len();
                if !brokers::moves_on(&e) {
                    if let Some(o) = self.lost.as_mut().filter(|o| !o.refusal_said) {
                        o.refusal_said = true;
                        log::error!("amqp: {e}; retrying this broker with backoff (every node of a cluster would refuse the same)");
                    }
                    self.retry(brokers::STAY);
                    return;
                }
                let next = self.brokers.failed();
                self.moved(next, &format!("connect failed ({e})"), first_round);
                self.retry(next);
            }
        }
    }

    fn wants_link(&self) -> bool {
        self.link.is_none() && self.settings.is_some() && !self.stopped && !self.switching
    }
}

impl Input for Consumer {
    type Tag = AmqpTag;
    type Part = AmqpPart;
    type Prepared = AmqpPart;
    type Error = std::convert::Infallible;

    fn name(&self) -> &'static str {
        "amqp"
    }

    fn wait(&mut self, bell: &Doorbell, read: bool, max: Duration) -> Result<Ready, Self::Error> {
        // The bell first: a backlog of deliveries would otherwise win every wait.
        let rung = bell_rung(bell);
        if rung || (read && self.arrived.is_some()) {
            return Ok(Ready {
                mail: rung,
                readable: read && self.arrived.is_some(),
            });
        }
        let max = if self.wants_link() {
            max.min(self.next_try.saturating_duration_since(Instant::now()))
        } else {
            max
        };
        let event = match &mut self.link {
            Some(link) => link.next_event(read, bell, max),
            None => link::wait_bell(bell, max),
        };
        Ok(match event {
            Event::Delivery(d) => {
                self.arrived = Some(*d);
                Ready {
                    mail: false,
                    readable: true,
                }
            }
            Event::Mail => Ready {
                mail: true,
                readable: false,
            },
            Event::Idle => Ready::default(),
            Event::Lost(reason) => {
                self.lose(reason);
                Ready::default()
            }
        })
    }

    fn read_one(&mut self) -> Result<Taken<AmqpTag>, Self::Error> {
        let next = match self.arrived.take() {
            Some(d) => Some(Ok(d)),
            None => self.link.as_mut().and_then(Link::try_delivery),
        };
        Ok(match next {
            Some(Ok(d)) => self.take(d),
            Some(Err(reason)) => {
                self.lose(reason);
                Taken::Nothing
            }
            None => Taken::Nothing,
        })
    }

    fn answer(&mut self, t: AmqpTag, verdict: Verdict) {
        if t.generation != self.generation || self.link.is_none() {
            return; // its channel is gone: the broker redelivers it
        }
        match verdict {
            Verdict::Accept { .. } => {
                self.metrics.records_acknowledged.inc_by(t.records as u64);
                self.ledger.done(t.tag);
            }
            Verdict::Conflict(reason) => self.reject(t.tag, &t.body, &t.properties, &reason),
        }
    }

    fn answered(&mut self) {
        self.flush_acks(false);
    }

    fn dropped(&mut self, t: AmqpTag) {
        if t.generation == self.generation {
            self.ledger.forget(t.tag);
        }
    }

    fn tick(&mut self) {
        if self.link.as_ref().is_some_and(|l| !l.is_connected()) {
            self.lose("the connection closed".into());
        }
        if self.wants_link() && Instant::now() >= self.next_try {
            self.reconnect();
        }
        self.flush_acks(false);
        if self.link.is_some() && self.window.is_narrow() && self.stirred.elapsed() >= QUIET {
            if let Some(full) = self.window.quiet() {
                self.opened(full);
            }
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
        if let Some(link) = &mut self.link {
            link.cancel();
            log::info!("amqp: consumer cancelled, draining");
        }
    }

    fn prepare(&mut self, part: AmqpPart) -> Result<Option<AmqpPart>, String> {
        if part.0 == self.settings && part.1.is_none() {
            return Ok(None);
        }
        if self.stays(&part.0).is_some() {
            return Ok(Some(part)); // the channel keeps consuming through the switch
        }
        // The old channel takes no more deliveries; those in flight are still answered.
        if let Some(old) = &mut self.link {
            old.cancel();
        }
        self.switching = true;
        Ok(Some(part))
    }

    fn commit(&mut self, (settings, link): AmqpPart) -> Result<(), String> {
        if let Some(at) = self.stays(&settings) {
            if let (Some(reached), Some(s)) = (link, &settings) {
                reached.close(s);
            }
            self.keep_broker(settings, at);
            return Ok(());
        }
        let was = self.settings.as_ref().map(|s| s.brokers.to_string());
        let was = was.as_deref().unwrap_or("off");
        if link.as_ref().is_some_and(|l| !l.is_connected()) {
            // The old channel was cancelled: what it committed is acked, then a new one on the
            // old settings consumes again.
            self.flush_acks(true);
            self.switching = false;
            self.lose_on("cancelled for a switch that did not happen".into(), false);
            return Err(format!(
                "[amqp]: the new broker connection was lost before the switch; staying on {was}"
            ));
        }
        let at = link.as_ref().map_or(0, |r| r.at);
        let link = match (link, &settings) {
            (Some(reached), Some(s)) => match reached.consume(s, s.prefetch) {
                Ok(link) => Some(link),
                Err(e) => {
                    self.lose_on("cancelled for a switch that did not happen".into(), false);
                    return Err(format!(
                        "[amqp]: new target not usable: {e}; staying on {was}"
                    ));
                }
            },
            _ => None,
        };
        self.flush_acks(true);
        if let Some(old) = self.link.take() {
            old.close();
        }
        self.switching = false;
        self.settings = settings;
        self.link = link;
        self.window = Window::new(self.settings.as_ref().map_or(1, |s| s.prefetch));
        self.new_generation();
        self.lost = None;
        self.brokers = Brokers::new(
            self.settings.as_ref().map_or(1, |s| s.brokers.urls().len()),
            at,
        );
        self.show_brokers();
        match (&self.settings, &self.link) {
            (Some(s), link) => {
                log::info!(
                    "amqp: now consuming {} queue `{}` (prefetch {}; was {was})",
                    s.broker(at),
                    s.queue,
                    s.prefetch
                );
                if let Some(link) = link {
                    log_topology(s, link);
                }
            }
            (None, _) => log::info!("amqp: input off (was {was})"),
        }
        Ok(())
    }

    fn finish(&mut self) {
        self.flush_acks(true);
        if let Some(link) = self.link.take() {
            link.close();
        }
    }
}

/// What the queue was found to be, and the binding: logged at start and at a reload's switch.
fn log_topology(s: &AmqpSettings, link: &Link) {
    let bound = match &s.exchange {
        Some(x) => format!(
            "; bound to {} exchange `{x}` with key `{}`",
            s.exchange_type.as_str(),
            s.routing_key
        ),
        None => String::new(),
    };
    log::info!("amqp: queue `{}`: {}{bound}", s.queue, link.queue_found);
    if link.queue_found.differs_from(s.queue_type) {
        log::warn!(
            "amqp: [amqp] queue_type = {} is not applied to the existing queue `{}` ({}): it is consumed as it is; to change its type, drain and delete it and feedd declares it anew",
            s.queue_type.as_str(),
            s.queue,
            link.queue_found
        );
    }
}

/// Whether the doorbell has rung (a poll that does not wait).
fn bell_rung(bell: &Doorbell) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(bell.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}
