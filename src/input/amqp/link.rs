//! A blocking facade over lapin: one connection, one channel, one consumer.
//!
//! Every method blocks its caller (the consumer thread, or the reload preparer for `connect`)
//! with `smol::block_on`, except the wait for deliveries: the consumer stream is polled by
//! hand with a waker that rings an eventfd, and the thread sleeps in `poll(2)` on it and its
//! mailbox (a `block_on` per delivery cost more than the delivery; see `next_event`). Nothing
//! async leaks out of this file. lapin itself runs its socket
//! in a thread of its own (`lapin-io-loop`, one per connection) and its internal callbacks on
//! smol's global executor (one `smol-1` thread, plus async-io's `async-io` timer/reactor
//! thread, started on first use) — the way libzmq runs its I/O threads behind zmq's calls.

use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use smol::future::FutureExt;
use smol::stream::Stream;

use super::topology::{self, QueueFound};
use crate::config::{AmqpUrl, BrokerList, Config, ExchangeType, QueueType};
use crate::input::mailbox::Doorbell;
use crate::message::Wake;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;

pub use lapin::message::Delivery;

/// Header carrying the FALSE reason on a dead letter.
pub const REASON_HEADER: &str = "feedd-reason";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    // `error`, not `source`: as a source its text (which holds its own sources' text) would
    // be printed again by a `{:#}` chain.
    #[error("AMQP broker {url}: {step}: {error}")]
    Broker {
        url: String,
        step: &'static str,
        error: Box<lapin::Error>,
    },
    #[error("AMQP broker {url}: {step}: no answer within {ms} ms")]
    Timeout {
        url: String,
        step: &'static str,
        ms: u128,
    },
    #[error("AMQP broker {url}: the broker refused the dead letter (publisher nack)")]
    Nacked { url: String },
    #[error("AMQP broker {url}: dead letter returned: no queue is bound to exchange `{exchange}`")]
    Returned { url: String, exchange: String },
    #[error("AMQP broker {url}: exchange `{exchange}` exists as a {existing} exchange, but [amqp] exchange_type = {configured} (set exchange_type = {existing}, or delete the exchange)")]
    ExchangeType {
        url: String,
        exchange: String,
        configured: &'static str,
        existing: String,
    },
    #[error("[amqp] url lists no broker")]
    NoBroker,
    #[error("AMQP broker {url}: cannot make the consumer's eventfd: {error}")]
    Bell { url: String, error: std::io::Error },
}

/// The consumer's part of the config: what a connection is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpSettings {
    /// The brokers, in failover order (`brokers::` decides which one).
    pub brokers: BrokerList,
    pub queue: String,
    pub prefetch: u16,
    pub dead_letter_exchange: Option<String>,
    pub queue_type: QueueType,
    /// `None`: consume the queue only (publishers use the default exchange).
    pub exchange: Option<String>,
    pub exchange_type: ExchangeType,
    /// The binding key in force (the queue's name when `[amqp] routing_key` is empty).
    pub routing_key: String,
}

impl AmqpSettings {
    /// `None` when the AMQP input is off.
    pub fn of(config: &Config) -> Option<AmqpSettings> {
        let a = &config.amqp;
        Some(AmqpSettings {
            brokers: a.url.clone()?,
            queue: a.queue.clone(),
            prefetch: a.prefetch_for(config.pipeline.batch_size),
            dead_letter_exchange: a.dead_letter_exchange.clone(),
            queue_type: a.queue_type,
            exchange: a.exchange.clone(),
            exchange_type: a.exchange_type,
            routing_key: a.binding_key().to_string(),
        })
    }
}

/// What the consumer thread waits for.
pub enum Event {
    Delivery(Box<Delivery>),
    /// The mailbox bell rang.
    Mail,
    /// Nothing happened for the whole wait.
    Idle,
    /// The connection or channel is gone.
    Lost(String),
}

impl AmqpSettings {
    /// Broker `at` of the list (wrapping, so a stale index still names one).
    pub fn broker(&self, at: usize) -> &AmqpUrl {
        let urls = self.brokers.urls();
        &urls[at % urls.len()]
    }
}

/// A connection to a broker that answered (broker `at` of the list), nothing declared yet.
pub struct Reached {
    connection: Connection,
    pub at: usize,
}

impl Reached {
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Declares what is missing and starts consuming, as `Link::connect` does.
    pub fn consume(self, s: &AmqpSettings, prefetch: u16) -> Result<Link, LinkError> {
        smol::block_on(async {
            let d = Deadline::new(&s.broker(self.at).to_string());
            Link::open(self.connection, s, prefetch, &d).await
        })
    }

    /// Closes the connection unused (a reload kept the consumer on its broker); `s` the
    /// settings it was reached for.
    pub fn close(self, s: &AmqpSettings) {
        let r = smol::block_on(async {
            let d = Deadline::new(&s.broker(self.at).to_string());
            d.step("close", self.connection.close(200, "unused".into()))
                .await
        });
        if let Err(e) = r {
            log::debug!("amqp: {e}");
        }
    }
}

async fn reach(url: &AmqpUrl, d: &Deadline) -> Result<Connection, LinkError> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("feedd {}", std::process::id())));
    d.step("connect", Connection::connect(url.expose(), props))
        .await
}

/// A connected channel consuming `queue` with manual acks.
pub struct Link {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    consumer_tag: ShortString,
    url: String,
    consuming: bool,
    /// What the queue was found to be at this connect, for the log.
    pub queue_found: QueueFound,
    /// Rung by lapin's thread when the consumer stream has news (the waker of `poll_stream`).
    stream_bell: Arc<StreamBell>,
    /// The last wait ended with a delivery: the next one lingers first.
    flowing: bool,
}

/// How long a wait lets deliveries gather while they flow: a few at tens of thousands a
/// second, and a small part of a batch's commit.
const LINGER: Duration = Duration::from_micros(200);

/// Waits up to `wait` for any of `fds` to be readable; which are. An error (EINTR) reads as
/// all readable: the owner looks and waits again.
fn wait_fds<const N: usize>(fds: &[BorrowedFd<'_>; N], wait: Duration) -> [bool; N] {
    let mut polled = fds.map(|fd| PollFd::new(fd, PollFlags::POLLIN));
    // ppoll: `poll`'s milliseconds would round a linger down to no wait at all.
    match ppoll(&mut polled, Some(TimeSpec::from_duration(wait)), None) {
        Ok(_) => polled.map(|p| p.revents().is_some_and(|r| !r.is_empty())),
        Err(_) => [true; N],
    }
}

/// Waits up to `wait` for the bell alone (no link, or nothing wanted from it).
pub fn wait_bell(bell: &Doorbell, wait: Duration) -> Event {
    match wait_fds(&[bell.as_fd()], wait) {
        [true] => Event::Mail,
        [false] => Event::Idle,
    }
}

/// The consumer stream's waker: an eventfd the consumer thread polls beside its mailbox.
struct StreamBell(Doorbell);

impl std::task::Wake for StreamBell {
    fn wake(self: Arc<Self>) {
        self.0.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake();
    }
}

/// The prefetch applies to each consumer, never to the channel (`global`): quorum queues
/// refuse a global QoS with 540 NOT_IMPLEMENTED, which closes the connection.
const PER_CONSUMER: BasicQosOptions = BasicQosOptions { global: false };

/// Every facade call (a whole connect with its declares, a dead letter and its confirm, a
/// close) returns within this: well under half the shortest watchdog period the README allows
/// (4 s), so the consumer thread keeps turning while a broker stops answering.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// The time left to one facade call; each broker step it takes waits at most what is left.
pub(super) struct Deadline {
    pub(super) url: String,
    at: Instant,
}

impl Deadline {
    fn new(url: &str) -> Deadline {
        Deadline {
            url: url.to_string(),
            at: Instant::now() + CALL_TIMEOUT,
        }
    }

    pub(super) async fn step<T>(
        &self,
        step: &'static str,
        f: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T, LinkError> {
        let left = self.at.saturating_duration_since(Instant::now());
        async {
            f.await.map_err(|error| LinkError::Broker {
                url: self.url.clone(),
                step,
                error: Box::new(error),
            })
        }
        .or(async {
            smol::Timer::after(left).await;
            Err(LinkError::Timeout {
                url: self.url.clone(),
                step,
                ms: CALL_TIMEOUT.as_millis(),
            })
        })
        .await
    }

    /// Closes a side channel, best effort within what is left.
    pub(super) async fn close(&self, ch: &Channel) {
        if let Err(e) = self
            .step("close a channel", ch.close(200, "done".into()))
            .await
        {
            log::debug!("amqp: {e}");
        }
    }
}

impl Link {
    /// Connects to broker `at` of the list, declares what is missing (the durable queue; the
    /// dead-letter exchange and its queue), sets the prefetch (`prefetch`: the settings' or a
    /// narrower window) and starts consuming. Blocks at most `CALL_TIMEOUT`.
    pub fn connect(s: &AmqpSettings, at: usize, prefetch: u16) -> Result<Link, LinkError> {
        let url = s.broker(at);
        smol::block_on(async {
            let d = Deadline::new(&url.to_string());
            let connection = reach(url, &d).await?;
            Self::open(connection, s, prefetch, &d).await
        })
    }

    /// Connects only (login, vhost), declaring nothing, to the first broker of the list that
    /// answers: what a reload's preparer proves, so a reload refused later leaves nothing on
    /// the broker; an existing `exchange` of another type refuses it here (the same on every
    /// node of a cluster, so not a reason to try the next). Blocks at most `CALL_TIMEOUT` per
    /// broker; the error is the last broker's.
    pub fn reach(s: &AmqpSettings) -> Result<Reached, LinkError> {
        let mut failed = None;
        for (at, url) in s.brokers.urls().iter().enumerate() {
            let d = Deadline::new(&url.to_string());
            let reached = smol::block_on(async {
                let connection = reach(url, &d).await?;
                if let Err(e) = topology::check_exchange(&connection, &d, s).await {
                    let _ = d
                        .step("close", connection.close(200, "refused".into()))
                        .await;
                    return Err(e);
                }
                Ok(connection)
            });
            match reached {
                Ok(connection) => return Ok(Reached { connection, at }),
                // A refusal every node would give (the exchange's type) ends the walk; a node
                // that did not answer, or timed out mid-check, is passed like at a reconnect.
                Err(e) if !super::brokers::moves_on(&e) => return Err(e),
                Err(e) => {
                    log::debug!("amqp: {e}");
                    failed = Some(e);
                }
            }
        }
        Err(failed.unwrap_or(LinkError::NoBroker))
    }

    async fn open(
        connection: Connection,
        s: &AmqpSettings,
        prefetch: u16,
        d: &Deadline,
    ) -> Result<Link, LinkError> {
        let url = d.url.clone();
        let queue_found = topology::declare(&connection, d, s).await?;
        let channel = d
            .step("open a channel", connection.create_channel())
            .await?;
        d.step(
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        d.step("basic.qos", channel.basic_qos(prefetch, PER_CONSUMER))
            .await?;
        let consumer = d
            .step(
                "basic.consume",
                channel.basic_consume(
                    s.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        let consumer_tag = consumer.tag();
        let stream_bell = Doorbell::new().map_err(|error| LinkError::Bell {
            url: url.clone(),
            error,
        })?;
        Ok(Link {
            connection,
            channel,
            consumer,
            consumer_tag,
            url,
            consuming: true,
            queue_found,
            stream_bell: Arc::new(StreamBell(stream_bell)),
            flowing: false,
        })
    }

    /// Waits up to `wait` for the bell, or (when `want`) a delivery. The bell goes first.
    /// A plain `poll(2)` on the bell and the stream's own eventfd: no executor, reactor or
    /// timer is touched per delivery (each `block_on` woke async-io's thread on its way out).
    /// While deliveries flow, the wait first lingers `LINGER` on the bell alone, so that one
    /// wake-up (this thread's, and a worker's for the jobs it queues) carries several.
    pub fn next_event(&mut self, want: bool, bell: &Doorbell, wait: Duration) -> Event {
        let want = want && self.consuming;
        if want {
            if let Some(event) = self.poll_stream() {
                return event;
            }
            if std::mem::take(&mut self.flowing) {
                if wait_fds(&[bell.as_fd()], LINGER.min(wait))[0] {
                    return Event::Mail;
                }
                if let Some(event) = self.poll_stream() {
                    self.flowing = true;
                    return event;
                }
            }
        }
        if !want {
            // Not the stream's eventfd: rung and not cleared (nothing is read), it would turn
            // the wait into a spin while the queue is full.
            return wait_bell(bell, wait);
        }
        match wait_fds(&[bell.as_fd(), self.stream_bell.0.as_fd()], wait) {
            [true, _] => Event::Mail,
            [false, true] => match self.poll_stream() {
                Some(event) => {
                    self.flowing = true;
                    event
                }
                None => Event::Idle,
            },
            [false, false] => Event::Idle,
        }
    }

    /// A delivery already received, without waiting.
    pub fn try_delivery(&mut self) -> Option<Result<Delivery, String>> {
        if !self.consuming {
            return None;
        }
        match self.poll_stream()? {
            Event::Delivery(d) => Some(Ok(*d)),
            Event::Lost(reason) => Some(Err(reason)),
            Event::Mail | Event::Idle => None,
        }
    }

    /// Polls the consumer stream once; when it has nothing, lapin rings `stream_bell` on the
    /// next delivery (or error). The bell is cleared first, so no ring is lost.
    fn poll_stream(&mut self) -> Option<Event> {
        self.stream_bell.0.clear();
        let waker = Waker::from(Arc::clone(&self.stream_bell));
        let mut cx = Context::from_waker(&waker);
        match Pin::new(&mut self.consumer).poll_next(&mut cx) {
            Poll::Pending => None,
            Poll::Ready(Some(Ok(d))) => Some(Event::Delivery(Box::new(d))),
            Poll::Ready(Some(Err(e))) => Some(Event::Lost(e.to_string())),
            Poll::Ready(None) => Some(Event::Lost("the broker ended the consumer".into())),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Runs one facade call on this link's channel within `CALL_TIMEOUT`.
    fn call<T>(
        &self,
        f: impl AsyncFnOnce(&Deadline) -> Result<T, LinkError>,
    ) -> Result<T, LinkError> {
        let d = Deadline::new(&self.url);
        smol::block_on(f(&d))
    }

    pub fn ack(&self, tag: u64, multiple: bool) -> Result<(), LinkError> {
        self.call(async |d| {
            d.step(
                "basic.ack",
                self.channel.basic_ack(tag, BasicAckOptions { multiple }),
            )
            .await
        })
    }

    /// `basic.reject` without requeue: the broker drops it (no poison loop).
    pub fn reject(&self, tag: u64) -> Result<(), LinkError> {
        self.call(async |d| {
            d.step(
                "basic.reject",
                self.channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false }),
            )
            .await
        })
    }

    /// Another prefetch window for the consumer (`basic.qos`).
    pub fn set_prefetch(&self, prefetch: u16) -> Result<(), LinkError> {
        self.call(async |d| {
            d.step("basic.qos", self.channel.basic_qos(prefetch, PER_CONSUMER))
                .await
        })
    }

    /// Declares the dead-letter exchange, its queue and the binding again (the operator
    /// deleted them under a running feedd, so a dead letter came back unroutable).
    pub fn redeclare_dead_letters(
        &self,
        exchange: &str,
        queue_type: QueueType,
    ) -> Result<(), LinkError> {
        self.call(async |d| {
            topology::declare_dead_letters(&self.connection, d, exchange, queue_type).await
        })
    }

    /// Publishes `body` with the original properties and headers plus `feedd-reason` to
    /// `exchange`, mandatory, and returns once the broker confirmed it; `Returned` when the
    /// broker found no queue bound to the exchange.
    pub fn dead_letter(
        &self,
        exchange: &str,
        body: &[u8],
        properties: &BasicProperties,
        reason: &str,
    ) -> Result<(), LinkError> {
        let frame_max = self.connection.configuration().frame_max();
        let properties = dead_letter_properties(properties, reason, frame_max);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        self.call(async |d| {
            let confirm = d
                .step(
                    "publish a dead letter",
                    self.channel.basic_publish(
                        exchange.into(),
                        "".into(),
                        options,
                        body,
                        properties,
                    ),
                )
                .await?;
            match d.step("confirm a dead letter", confirm).await? {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(LinkError::Returned {
                    url: self.url.clone(),
                    exchange: exchange.to_string(),
                }),
                _ => Err(LinkError::Nacked {
                    url: self.url.clone(),
                }),
            }
        })
    }

    /// `basic.cancel`: the broker sends no more; unacked deliveries stay ours until close.
    pub fn cancel(&mut self) {
        if !self.consuming {
            return;
        }
        self.consuming = false;
        let tag = self.consumer_tag.clone();
        let r = self.call(async |d| {
            d.step(
                "basic.cancel",
                self.channel
                    .basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await
        });
        if let Err(e) = r {
            log::debug!("amqp: {e}");
        }
    }

    /// Closes the channel and the connection; unacked deliveries go back to the queue.
    pub fn close(self) {
        let r = self.call(async |d| {
            d.close(&self.channel).await;
            d.step(
                "close the connection",
                self.connection.close(200, "bye".into()),
            )
            .await
        });
        if let Err(e) = r {
            log::debug!("amqp: {e}");
        }
    }
}

/// Marks a dead letter whose original headers had to be left out.
pub const HEADERS_DROPPED_HEADER: &str = "feedd-headers-dropped";

/// The dead letter's properties: the original ones plus `feedd-reason`. When that makes the
/// content-header frame larger than `frame_max` (the broker would close the connection on
/// it, and the original come back again and again), the original headers are left out and
/// `feedd-headers-dropped` says so.
fn dead_letter_properties(
    original: &BasicProperties,
    reason: &str,
    frame_max: u32,
) -> BasicProperties {
    let reason_value = AMQPValue::LongString(LongString::from(reason));
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(REASON_HEADER.into(), reason_value.clone());
    let full = original.clone().with_headers(headers);
    if header_frame_size(&full).is_some_and(|n| n <= u64::from(frame_max)) {
        return full;
    }
    let mut headers = FieldTable::default();
    headers.insert(REASON_HEADER.into(), reason_value);
    headers.insert(
        HEADERS_DROPPED_HEADER.into(),
        AMQPValue::LongString(LongString::from(format!(
            "the original headers made the message larger than the broker's frame_max ({frame_max} bytes)"
        ))),
    );
    original.clone().with_headers(headers)
}

/// The size of the content-header frame that carries `properties`: frame header (7) and end
/// (1), class id, weight and body size (12), the encoded properties. `None`: not encodable.
fn header_frame_size(properties: &BasicProperties) -> Option<u64> {
    let encoded = lapin::protocol::basic::gen_properties(properties)(Vec::new().into()).ok()?;
    Some(8 + 12 + encoded.position)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_pad(n: usize) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert("x-pad".into(), AMQPValue::LongString("p".repeat(n).into()));
        h.insert("x-origin".into(), AMQPValue::LongString("test".into()));
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn a_linger_waits_its_sub_millisecond_time_and_a_rung_bell_ends_a_wait_at_once() {
        let (quiet, rung) = (Doorbell::new().unwrap(), Doorbell::new().unwrap());
        let started = Instant::now();
        assert_eq!(wait_fds(&[quiet.as_fd()], LINGER), [false]);
        // poll(2)'s milliseconds would have rounded the linger down to no wait at all.
        assert!(started.elapsed() >= LINGER, "{:?}", started.elapsed());
        rung.wake();
        let started = Instant::now();
        let seen = wait_fds(&[quiet.as_fd(), rung.as_fd()], Duration::from_secs(5));
        assert_eq!(seen, [false, true]);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_dead_letter_keeps_the_original_headers_while_they_fit() {
        let p = dead_letter_properties(&with_pad(10), "line 1: bad", 131_072);
        let h = p.headers().clone().unwrap();
        assert!(h.inner().contains_key("x-origin"));
        assert!(h.inner().contains_key(REASON_HEADER));
        assert!(!h.inner().contains_key(HEADERS_DROPPED_HEADER));
        let size = header_frame_size(&p).unwrap();
        assert!(size > 10 && size < 200, "{size}");
    }

    #[test]
    fn headers_that_would_break_the_frame_limit_are_left_out() {
        let p = dead_letter_properties(&with_pad(131_000), "line 1: bad", 131_072);
        let h = p.headers().clone().unwrap();
        assert!(!h.inner().contains_key("x-pad"));
        assert!(h.inner().contains_key(REASON_HEADER));
        assert!(h.inner().contains_key(HEADERS_DROPPED_HEADER));
        assert!(header_frame_size(&p).unwrap() < 1000);
    }
}
