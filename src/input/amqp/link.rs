//! A blocking facade over lapin: one connection, one channel, one consumer.
//!
//! Every method blocks its caller (the consumer thread, or the reload preparer for `connect`)
//! with `smol::block_on`; nothing async leaks out of this file. lapin itself runs its socket
//! in a thread of its own (`lapin-io-loop`, one per connection) and its internal callbacks on
//! smol's global executor (one `smol-1` thread, plus async-io's `async-io` timer/reactor
//! thread, started on first use) — the way libzmq runs its I/O threads behind zmq's calls.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use smol::future::FutureExt;
use smol::stream::StreamExt;

use crate::config::{AmqpUrl, Config};

pub use lapin::message::Delivery;

/// Header carrying the FALSE reason on a dead letter.
pub const REASON_HEADER: &str = "feedd-reason";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("AMQP broker {url}: {step}: {source}")]
    Broker {
        url: String,
        step: &'static str,
        source: Box<lapin::Error>,
    },
    #[error("AMQP broker {url}: {step}: no answer within {ms} ms")]
    Timeout {
        url: String,
        step: &'static str,
        ms: u128,
    },
    #[error("AMQP broker {url}: the broker refused the dead letter (publisher nack)")]
    Nacked { url: String },
}

/// The consumer's part of the config: what a connection is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpSettings {
    pub url: AmqpUrl,
    pub queue: String,
    pub prefetch: u16,
    pub dead_letter_exchange: Option<String>,
}

impl AmqpSettings {
    /// `None` when the AMQP input is off.
    pub fn of(config: &Config) -> Option<AmqpSettings> {
        let a = &config.amqp;
        Some(AmqpSettings {
            url: a.url.clone()?,
            queue: a.queue.clone(),
            prefetch: a.prefetch_for(config.pipeline.batch_size),
            dead_letter_exchange: a.dead_letter_exchange.clone(),
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

/// A connected channel consuming `queue` with manual acks.
pub struct Link {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    consumer_tag: ShortString,
    url: String,
    consuming: bool,
}

/// Every broker step waits at most this long (a broker that accepts TCP but never answers).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

fn timed<T>(
    url: &str,
    step: &'static str,
    f: impl std::future::Future<Output = lapin::Result<T>>,
) -> impl std::future::Future<Output = Result<T, LinkError>> {
    let url = url.to_string();
    let url2 = url.clone();
    async move {
        f.await.map_err(|source| LinkError::Broker {
            url,
            step,
            source: Box::new(source),
        })
    }
    .or(async move {
        smol::Timer::after(STEP_TIMEOUT).await;
        Err(LinkError::Timeout {
            url: url2,
            step,
            ms: STEP_TIMEOUT.as_millis(),
        })
    })
}

impl Link {
    /// Connects, declares what is missing (the durable queue; the dead-letter exchange and
    /// its queue), sets the prefetch and starts consuming. Blocks at most a few seconds.
    pub fn connect(s: &AmqpSettings) -> Result<Link, LinkError> {
        smol::block_on(Self::open(s))
    }

    async fn open(s: &AmqpSettings) -> Result<Link, LinkError> {
        let url = s.url.to_string();
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("feedd {}", std::process::id())));
        let connection = timed(&url, "connect", Connection::connect(s.url.expose(), props)).await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ensure_queue(&connection, &url, &s.queue, durable).await?;
        if let Some(dlx) = &s.dead_letter_exchange {
            let ch = timed(&url, "open a channel", connection.create_channel()).await?;
            let options = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            timed(
                &url,
                "declare the dead-letter exchange",
                ch.exchange_declare(
                    dlx.as_str().into(),
                    ExchangeKind::Fanout,
                    options,
                    FieldTable::default(),
                ),
            )
            .await?;
            ensure_queue(&connection, &url, dlx, durable).await?;
            let ch = timed(&url, "open a channel", connection.create_channel()).await?;
            timed(
                &url,
                "bind the dead-letter queue",
                ch.queue_bind(
                    dlx.as_str().into(),
                    dlx.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            let _ = ch.close(200, "declared".into()).await;
        }
        let channel = timed(&url, "open a channel", connection.create_channel()).await?;
        timed(
            &url,
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        timed(
            &url,
            "basic.qos",
            channel.basic_qos(s.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consumer = timed(
            &url,
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
        Ok(Link {
            connection,
            channel,
            consumer,
            consumer_tag,
            url,
            consuming: true,
        })
    }

    /// Waits up to `wait` for the bell, or (when `want`) a delivery. The bell goes first.
    pub fn next_event(
        &mut self,
        want: bool,
        bell: &smol::Async<std::os::fd::OwnedFd>,
        wait: Duration,
    ) -> Event {
        let want = want && self.consuming;
        let consumer = &mut self.consumer;
        smol::block_on(
            async {
                // An error here (never seen on an eventfd) reads as the bell: the owner looks.
                let _ = bell.readable().await;
                Event::Mail
            }
            .or(async {
                if !want {
                    return std::future::pending().await;
                }
                match consumer.next().await {
                    Some(Ok(d)) => Event::Delivery(Box::new(d)),
                    Some(Err(e)) => Event::Lost(e.to_string()),
                    None => Event::Lost("the broker ended the consumer".into()),
                }
            })
            .or(async {
                smol::Timer::after(wait).await;
                Event::Idle
            }),
        )
    }

    /// A delivery already received, without waiting.
    pub fn try_delivery(&mut self) -> Option<Result<Delivery, String>> {
        if !self.consuming {
            return None;
        }
        match smol::block_on(smol::future::poll_once(self.consumer.next())) {
            Some(Some(Ok(d))) => Some(Ok(d)),
            Some(Some(Err(e))) => Some(Err(e.to_string())),
            Some(None) => Some(Err("the broker ended the consumer".into())),
            None => None,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    pub fn ack(&self, tag: u64, multiple: bool) -> Result<(), LinkError> {
        smol::block_on(timed(
            &self.url,
            "basic.ack",
            self.channel.basic_ack(tag, BasicAckOptions { multiple }),
        ))
    }

    /// `basic.reject` without requeue: the broker drops it (no poison loop).
    pub fn reject(&self, tag: u64) -> Result<(), LinkError> {
        smol::block_on(timed(
            &self.url,
            "basic.reject",
            self.channel
                .basic_reject(tag, BasicRejectOptions { requeue: false }),
        ))
    }

    /// Publishes `body` with the original properties and headers plus `feedd-reason` to
    /// `exchange`, and returns once the broker confirmed it.
    pub fn dead_letter(
        &self,
        exchange: &str,
        body: &[u8],
        properties: &BasicProperties,
        reason: &str,
    ) -> Result<(), LinkError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        let properties = properties.clone().with_headers(headers);
        smol::block_on(async {
            let confirm = timed(
                &self.url,
                "publish a dead letter",
                self.channel.basic_publish(
                    exchange.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                ),
            )
            .await?;
            let confirmation = timed(&self.url, "confirm a dead letter", confirm).await?;
            if confirmation.is_ack() {
                Ok(())
            } else {
                Err(LinkError::Nacked {
                    url: self.url.clone(),
                })
            }
        })
    }

    /// `basic.cancel`: the broker sends no more; unacked deliveries stay ours until close.
    pub fn cancel(&mut self) {
        if !self.consuming {
            return;
        }
        self.consuming = false;
        let r = smol::block_on(timed(
            &self.url,
            "basic.cancel",
            self.channel
                .basic_cancel(self.consumer_tag.clone(), BasicCancelOptions::default()),
        ));
        if let Err(e) = r {
            log::debug!("amqp: {e}");
        }
    }

    /// Closes the channel and the connection; unacked deliveries go back to the queue.
    pub fn close(self) {
        let r = smol::block_on(async {
            let _ = timed(
                &self.url,
                "close the channel",
                self.channel.close(200, "bye".into()),
            )
            .await;
            timed(
                &self.url,
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

/// Declares `queue` durable unless it exists (a passive check first, so a queue the operator
/// declared with other arguments is used as it is). A failed passive declare closes its
/// channel, hence a channel per step.
async fn ensure_queue(
    connection: &Connection,
    url: &str,
    queue: &str,
    durable: QueueDeclareOptions,
) -> Result<(), LinkError> {
    let ch = timed(url, "open a channel", connection.create_channel()).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let exists = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    if exists {
        let _ = ch.close(200, "declared".into()).await;
        return Ok(());
    }
    let ch = timed(url, "open a channel", connection.create_channel()).await?;
    timed(
        url,
        "declare the queue",
        ch.queue_declare(queue.into(), durable, FieldTable::default()),
    )
    .await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}
