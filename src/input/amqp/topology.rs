//! What feedd declares on the broker (SPEC §3 `[amqp]`), run by `link.rs` on the thread that
//! connects (the consumer, or the reload preparer for `check_exchange`): the exchange and
//! the queue's binding to it, the queue itself (or what an existing one is), the dead-letter
//! exchange and its queue. A refused declare closes its channel (406/404), so every step that
//! may be refused gets a fresh channel.
//!
//! AMQP cannot read an existing queue's or exchange's type; the broker names it only when a
//! declare with another type is refused (`inequivalent arg …: received X but current is Y`).
//! `inequivalent` reads that reply (pure, unit-tested on the broker's own texts).

use std::fmt;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

use super::link::{AmqpSettings, Deadline, LinkError};
use crate::config::{ExchangeType, QueueType};

/// What `ensure_queue` found or did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueFound {
    /// Missing: declared durable with this type.
    Declared(QueueType),
    /// There already: used as it is. Its type as the broker named it, or why it is unknown.
    Existing(Result<String, String>),
}

impl QueueFound {
    /// The queue's type when known, else `configured`: what the dead-letter queue is declared
    /// as, so a quorum queue's consumer never hangs on a classic queue's one home node.
    pub fn type_or(&self, configured: QueueType) -> QueueType {
        let found = match self {
            QueueFound::Declared(t) => return *t,
            QueueFound::Existing(Ok(t)) => t,
            QueueFound::Existing(Err(_)) => return configured,
        };
        let mut all = QueueType::ALL.into_iter();
        all.find(|t| t.as_str() == found).unwrap_or(configured)
    }

    /// An existing queue of another type than `queue_type` (the setting is not applied to it).
    pub fn differs_from(&self, queue_type: QueueType) -> bool {
        matches!(self, QueueFound::Existing(Ok(t)) if t != queue_type.as_str())
    }
}

impl fmt::Display for QueueFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueFound::Declared(t) => write!(f, "declared, {} queue", t.as_str()),
            QueueFound::Existing(Ok(t)) => write!(f, "existing {t} queue, used as is"),
            QueueFound::Existing(Err(why)) => {
                write!(f, "existing queue, used as is; its type not learnt: {why}")
            }
        }
    }
}

fn exchange_kind(t: ExchangeType) -> ExchangeKind {
    match t {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

/// A channel for one step that the broker may refuse (a refusal closes it).
async fn channel(connection: &Connection, d: &Deadline) -> Result<Channel, LinkError> {
    d.step("open a channel", connection.create_channel()).await
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// `x-queue-type` for a declare. Classic is declared without it, as before: a queue stored
/// with an explicit `x-queue-type` would refuse other clients' declares that omit it.
fn queue_arguments(t: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if t != QueueType::Classic {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(t.as_str().into()),
        );
    }
    args
}

/// The broker's reply text of a refused step (`PRECONDITION_FAILED - …`), if it was one.
fn refusal(e: &LinkError) -> Option<&str> {
    match e {
        LinkError::Broker { error, .. } => match error.kind() {
            ErrorKind::ProtocolError(amqp) => Some(amqp.get_message().as_str()),
            _ => None,
        },
        _ => None,
    }
}

/// From the broker's `inequivalent arg 'ARG' for … : received X but current is Y`, the
/// values (`None` for the broker's `none`: not set) when the reply is about `arg`.
fn inequivalent(reply: &str, arg: &str) -> Option<(Option<String>, Option<String>)> {
    let rest = reply.split_once(&format!("inequivalent arg '{arg}'"))?.1;
    let (received, current) = rest
        .split_once("received ")?
        .1
        .split_once(" but current is ")?;
    let value = |text: &str| -> Option<String> {
        let text = text.trim();
        if text.starts_with("none") {
            return None;
        }
        let quoted = text.split_once('\'')?.1;
        Some(
            quoted
                .split_once('\'')
                .map_or(quoted, |(v, _)| v)
                .to_string(),
        )
    };
    Some((value(received), value(current)))
}

/// Declares everything feedd consumes through, in order: the exchange (an existing one of
/// another type is `ExchangeType`), the queue, its binding, the dead letters.
pub(super) async fn declare(
    connection: &Connection,
    d: &Deadline,
    s: &AmqpSettings,
) -> Result<QueueFound, LinkError> {
    if let Some(x) = &s.exchange {
        declare_exchange(connection, d, s, x).await?;
    }
    let found = ensure_queue(connection, d, &s.queue, s.queue_type, true).await?;
    if let Some(x) = &s.exchange {
        let ch = channel(connection, d).await?;
        d.step(
            "bind the queue to the exchange",
            ch.queue_bind(
                s.queue.as_str().into(),
                x.as_str().into(),
                s.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        d.close(&ch).await;
    }
    if let Some(dlx) = &s.dead_letter_exchange {
        declare_dead_letters(connection, d, dlx, found.type_or(s.queue_type)).await?;
    }
    Ok(found)
}

/// `exchange.declare` durable with the configured type; the broker's refusal of another
/// type becomes an error naming the exchange and both types.
async fn declare_exchange(
    connection: &Connection,
    d: &Deadline,
    s: &AmqpSettings,
    exchange: &str,
) -> Result<(), LinkError> {
    let ch = channel(connection, d).await?;
    let declared = d
        .step(
            "declare the exchange",
            ch.exchange_declare(
                exchange.into(),
                exchange_kind(s.exchange_type),
                durable_exchange(),
                FieldTable::default(),
            ),
        )
        .await;
    if let Err(e) = declared {
        let existing = refusal(&e).and_then(|r| inequivalent(r, "type"));
        return Err(match existing {
            Some((_, Some(existing))) => LinkError::ExchangeType {
                url: d.url.clone(),
                exchange: exchange.to_string(),
                configured: s.exchange_type.as_str(),
                existing,
            },
            _ => e,
        });
    }
    d.close(&ch).await;
    Ok(())
}

/// For a reload's preparer, declaring nothing: an existing `exchange` of another type fails
/// the reload before the running consumer is touched. (Declaring an existing exchange with
/// its own type changes nothing; a missing one is left to the switch.)
pub(super) async fn check_exchange(
    connection: &Connection,
    d: &Deadline,
    s: &AmqpSettings,
) -> Result<(), LinkError> {
    let Some(x) = &s.exchange else { return Ok(()) };
    let ch = channel(connection, d).await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let exists = d.step(
        "look for the exchange",
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Direct,
            passive,
            FieldTable::default(),
        ),
    );
    match exists.await {
        Ok(()) => {
            d.close(&ch).await;
            declare_exchange(connection, d, s, x).await
        }
        Err(e @ LinkError::Timeout { .. }) => Err(e),
        Err(_) => Ok(()),
    }
}

/// Declares `queue` durable with `queue_type` unless it exists (a passive check first, so a
/// queue the operator declared with other arguments is used as it is); with `learn`, an
/// existing queue's type is asked of the broker by a declare with `queue_type`, which the
/// broker either accepts (same type: nothing changes) or refuses naming the current type.
async fn ensure_queue(
    connection: &Connection,
    d: &Deadline,
    queue: &str,
    queue_type: QueueType,
    learn: bool,
) -> Result<QueueFound, LinkError> {
    let ch = channel(connection, d).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let looked = d
        .step(
            "look for the queue",
            ch.queue_declare(queue.into(), passive, FieldTable::default()),
        )
        .await;
    match looked {
        Ok(_) => {
            d.close(&ch).await;
            if !learn {
                return Ok(QueueFound::Existing(Err("not asked".into())));
            }
            return existing_type(connection, d, queue, queue_type).await;
        }
        // A silent broker is no missing queue.
        Err(e @ LinkError::Timeout { .. }) => return Err(e),
        Err(_) => {}
    }
    let ch = channel(connection, d).await?;
    d.step(
        "declare the queue",
        ch.queue_declare(queue.into(), durable_queue(), queue_arguments(queue_type)),
    )
    .await?;
    d.close(&ch).await;
    Ok(QueueFound::Declared(queue_type))
}

/// The type of the existing `queue`, as the broker names it (see `ensure_queue`).
async fn existing_type(
    connection: &Connection,
    d: &Deadline,
    queue: &str,
    queue_type: QueueType,
) -> Result<QueueFound, LinkError> {
    let ch = channel(connection, d).await?;
    // Classic is asked for by name here: the broker accepts it for a queue declared without.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    let asked = d
        .step(
            "ask the queue's type",
            ch.queue_declare(queue.into(), durable_queue(), args),
        )
        .await;
    let found = match asked {
        Ok(_) => {
            d.close(&ch).await;
            Ok(queue_type.as_str().to_string())
        }
        Err(e @ LinkError::Timeout { .. }) => return Err(e),
        Err(e) => match refusal(&e).and_then(|r| inequivalent(r, "x-queue-type")) {
            // Declared without `x-queue-type`: the broker's default, classic.
            Some((_, current)) => Ok(current.unwrap_or_else(|| "classic".to_string())),
            None => Err(refusal(&e).map_or_else(|| e.to_string(), str::to_string)),
        },
    };
    Ok(QueueFound::Existing(found))
}

/// The dead-letter exchange (fanout, durable), its queue of the same name and the binding.
/// The queue follows the consumed queue's type (`QueueFound::type_or`): a classic queue whose home node is down answers 404 to
/// every declare, which would fail every reconnect of a cluster's consumer.
pub(super) async fn declare_dead_letters(
    connection: &Connection,
    d: &Deadline,
    dlx: &str,
    queue_type: QueueType,
) -> Result<(), LinkError> {
    let ch = channel(connection, d).await?;
    d.step(
        "declare the dead-letter exchange",
        ch.exchange_declare(
            dlx.into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        ),
    )
    .await?;
    ensure_queue(connection, d, dlx, queue_type, false).await?;
    d.step(
        "bind the dead-letter queue",
        ch.queue_bind(
            dlx.into(),
            dlx.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    d.close(&ch).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The replies of RabbitMQ 3.10.8, as a declare with another type got them.
    const EXCHANGE: &str = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'probe_x' in vhost '/': received 'fanout' but current is 'direct'";
    const CLASSIC: &str = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'probe_cq' in vhost '/': received the value 'quorum' of type 'longstr' but current is none";
    const QUORUM: &str = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'probe_qq' in vhost '/': received 'classic' but current is 'quorum'";
    const DURABLE: &str = "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'probe_x' in vhost '/': received 'false' but current is 'true'";

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn the_brokers_refusal_names_both_values() {
        assert_eq!(
            inequivalent(EXCHANGE, "type"),
            Some((s("fanout"), s("direct")))
        );
        assert_eq!(
            inequivalent(CLASSIC, "x-queue-type"),
            Some((s("quorum"), None))
        );
        assert_eq!(
            inequivalent(QUORUM, "x-queue-type"),
            Some((s("classic"), s("quorum")))
        );
    }

    #[test]
    fn a_refusal_about_another_argument_is_not_read_as_a_type() {
        assert_eq!(inequivalent(DURABLE, "type"), None);
        assert_eq!(inequivalent(EXCHANGE, "x-queue-type"), None);
        assert_eq!(inequivalent("NOT_FOUND - no queue 'q'", "type"), None);
    }

    #[test]
    fn an_existing_queue_of_another_type_is_told() {
        let classic = QueueFound::Existing(Ok("classic".into()));
        assert!(classic.differs_from(QueueType::Quorum));
        assert!(!classic.differs_from(QueueType::Classic));
        assert!(!QueueFound::Declared(QueueType::Quorum).differs_from(QueueType::Classic));
        assert!(!QueueFound::Existing(Err("x".into())).differs_from(QueueType::Quorum));
        assert_eq!(classic.to_string(), "existing classic queue, used as is");
    }

    #[test]
    fn dead_letters_follow_the_type_the_queue_is() {
        let existing = |t: &str| QueueFound::Existing(Ok(t.into()));
        assert_eq!(
            existing("quorum").type_or(QueueType::Classic),
            QueueType::Quorum
        );
        assert_eq!(
            existing("classic").type_or(QueueType::Quorum),
            QueueType::Classic
        );
        let unknown = [existing("stream"), QueueFound::Existing(Err("x".into()))];
        for found in unknown {
            assert_eq!(found.type_or(QueueType::Quorum), QueueType::Quorum);
        }
        let declared = QueueFound::Declared(QueueType::Classic);
        assert_eq!(declared.type_or(QueueType::Quorum), QueueType::Classic);
    }

    #[test]
    fn classic_is_declared_without_the_argument() {
        assert!(queue_arguments(QueueType::Classic).inner().is_empty());
        let q = queue_arguments(QueueType::Quorum);
        assert!(matches!(
            q.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(s)) if s.to_string() == "quorum"
        ));
    }
}
