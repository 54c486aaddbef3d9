//! `feedd-load --amqp`: publishes records to a queue with publisher confirms, then waits
//! until feedd has drained it, and reports the publish rate and the end-to-end rate.
//!
//! "Drained" is the queue holding no ready message and, when feedd's metrics address is
//! given, feedd having acked every delivery published (AMQP 0-9-1 itself cannot tell
//! unacked messages of another consumer). Blocking lapin calls on the caller's thread.

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use super::load::record_for;

#[derive(Debug, Clone)]
pub struct AmqpLoadOptions {
    pub url: String,
    pub queue: String,
    pub records: u64,
    pub per_msg: usize,
    pub start_ticket: u64,
    /// feedd's metrics address (host:port), to wait for its acks too.
    pub metrics: Option<String>,
    /// Give up when the queue has not moved for this long.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AmqpLoadError {
    #[error("AMQP: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused a publish (nack)")]
    Nacked,
    #[error("feedd did not drain the queue: {ready} message(s) still ready, {acked} of {messages} acked, after {secs} s without progress")]
    Stalled {
        ready: u32,
        acked: u64,
        messages: u64,
        secs: u64,
    },
}

#[derive(Debug)]
pub struct AmqpLoadReport {
    pub records: u64,
    pub messages: u64,
    pub publish: Duration,
    pub end_to_end: Duration,
    /// Whether feedd's acks were counted (a metrics address was given).
    pub acks_checked: bool,
}

impl AmqpLoadReport {
    pub fn summary(&self) -> String {
        format!(
            "{} records in {} messages published with confirms in {:.2} s: {:.0} records/s\n\
             drained by feedd{}: {:.2} s end to end, {:.0} records/s",
            self.records,
            self.messages,
            self.publish.as_secs_f64(),
            self.records as f64 / self.publish.as_secs_f64().max(1e-9),
            if self.acks_checked {
                " (queue empty, every delivery acked)"
            } else {
                " (queue empty; pass --metrics to also wait for every ack)"
            },
            self.end_to_end.as_secs_f64(),
            self.records as f64 / self.end_to_end.as_secs_f64().max(1e-9),
        )
    }
}

/// The body of `count` records from ticket `first` (the same rows as the ZeroMQ load).
pub fn body(first: u64, count: u64) -> String {
    (first..first + count)
        .map(|t| {
            let r = record_for(t);
            format!("{},{},{}", r.ticket, r.login, r.volume)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Publishes `records` records (`per_msg` per message) with confirms; returns the time taken.
pub fn publish(o: &AmqpLoadOptions) -> Result<(u64, Duration), AmqpLoadError> {
    smol::block_on(async {
        let conn = Connection::connect(&o.url, ConnectionProperties::default()).await?;
        // An existing queue (a quorum queue, say) is used as it is: a passive look first (a
        // failed one closes its channel), else declared durable.
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let mut ch = conn.create_channel().await?;
        let found = ch
            .queue_declare(o.queue.as_str().into(), passive, FieldTable::default())
            .await;
        if found.is_err() {
            ch = conn.create_channel().await?;
            ch.queue_declare(
                o.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        }
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let per = o.per_msg.max(1) as u64;
        let started = Instant::now();
        let mut confirms = Vec::new();
        let mut messages = 0u64;
        let mut t = o.start_ticket;
        let end = o.start_ticket + o.records;
        while t < end {
            let n = per.min(end - t);
            let c = ch
                .basic_publish(
                    "".into(),
                    o.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body(t, n).as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            confirms.push(c);
            messages += 1;
            t += n;
            // A bounded window of unconfirmed publishes.
            if confirms.len() >= 2000 {
                for c in confirms.drain(..) {
                    if !c.await?.is_ack() {
                        return Err(AmqpLoadError::Nacked);
                    }
                }
            }
        }
        for c in confirms {
            if !c.await?.is_ack() {
                return Err(AmqpLoadError::Nacked);
            }
        }
        let took = started.elapsed();
        let _ = conn.close(200, "done".into()).await;
        Ok((messages, took))
    })
}

/// Ready messages in `queue` (passive declare).
pub fn ready(url: &str, queue: &str) -> Result<u32, AmqpLoadError> {
    smol::block_on(async {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = conn.close(200, "done".into()).await;
        Ok(q.message_count())
    })
}

/// feedd's `feedd_amqp_acks_total` at `addr`, if it answers.
pub fn feedd_acks(addr: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with("feedd_amqp_acks_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Publishes, then waits until feedd drained the queue (and acked all, with `metrics`).
pub fn run(o: &AmqpLoadOptions) -> Result<AmqpLoadReport, AmqpLoadError> {
    let acks_before = o.metrics.as_deref().and_then(feedd_acks);
    let started = Instant::now();
    let (messages, publish) = publish(o)?;
    let mut last = (u32::MAX, 0u64);
    let mut moved = Instant::now();
    loop {
        let r = ready(&o.url, &o.queue)?;
        let acked = match (&o.metrics, acks_before) {
            (Some(addr), Some(before)) => feedd_acks(addr).unwrap_or(before) - before,
            _ => messages,
        };
        if r == 0 && acked >= messages {
            break;
        }
        if (r, acked) != last {
            last = (r, acked);
            moved = Instant::now();
        } else if moved.elapsed() > o.timeout {
            return Err(AmqpLoadError::Stalled {
                ready: r,
                acked,
                messages,
                secs: o.timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(AmqpLoadReport {
        records: o.records,
        messages,
        publish,
        end_to_end: started.elapsed(),
        acks_checked: acks_before.is_some(),
    })
}
