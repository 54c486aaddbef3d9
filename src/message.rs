//! The ground floor: what travels from an input through the queue to a worker and back.
//!
//! `Record` (one parsed line), a `Job` (one message's records and where its verdict goes) and
//! the `Verdict` a worker hands back through the input's `Outbox`. Pure data and two traits;
//! this module imports nothing of the crate, so inputs, pipeline and metrics all stand on it.

use std::any::Any;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Instant;

/// A volume as an integer count of 1/10,000 units: DECIMAL(20,4) exactly, never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Volume(pub u128);

/// Most integer digits of a volume (DECIMAL(20,4) keeps 16 before the point).
const VOLUME_INT_DIGITS: usize = 16;
const VOLUME_FRAC_DIGITS: usize = 4;
const VOLUME_SCALE: u128 = 10_000;

impl Volume {
    /// Parses the decimal text of a volume; the error says what is wrong.
    pub fn parse(text: &[u8]) -> Result<Volume, &'static str> {
        if text.is_empty() {
            return Err("empty");
        }
        let (int, frac) = match text.iter().position(|&b| b == b'.') {
            Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
            None => (text, None),
        };
        if int.is_empty() {
            return Err("no digits before the decimal point");
        }
        if !int.iter().all(u8::is_ascii_digit) {
            return Err("not a non-negative decimal number");
        }
        let significant = int.iter().skip_while(|&&b| b == b'0').count();
        if significant > VOLUME_INT_DIGITS {
            return Err("more than 16 integer digits");
        }
        let mut value: u128 = int
            .iter()
            .fold(0u128, |acc, &b| acc * 10 + u128::from(b - b'0'));
        value *= VOLUME_SCALE;
        if let Some(frac) = frac {
            if frac.is_empty() {
                return Err("no digits after the decimal point");
            }
            if !frac.iter().all(u8::is_ascii_digit) {
                return Err("not a non-negative decimal number");
            }
            if frac.len() > VOLUME_FRAC_DIGITS {
                return Err("more than 4 fraction digits");
            }
            let mut scale = VOLUME_SCALE;
            for &b in frac {
                scale /= 10;
                value += u128::from(b - b'0') * scale;
            }
        }
        Ok(Volume(value))
    }
}

impl fmt::Display for Volume {
    /// Always with 4 fraction digits, as DECIMAL(20,4) prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:04}", self.0 / VOLUME_SCALE, self.0 % VOLUME_SCALE)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub ticket: u64,
    pub login: u64,
    pub volume: Volume,
}

impl Record {
    /// The record as one wire line (without newline).
    pub fn to_line(&self) -> String {
        let mut s = String::with_capacity(48);
        let _ = write!(s, "{},{},{}", self.ticket, self.login, self.volume);
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every record is (or will be, at COMMIT) in the table; `inserted` of them are new rows
    /// this batch adds (the rest were stored already, or sent earlier in the batch).
    Accept { inserted: usize },
    /// Refused whole; the text follows `FALSE `.
    Conflict(String),
}

/// An input's opaque reference to one message (a ZeroMQ envelope, an AMQP delivery tag).
pub type Tag = Box<dyn Any + Send>;

/// Where a job's verdict goes: its input's outbox, and the tag the input gave it.
pub struct ReplyTo {
    pub outbox: Arc<dyn Outbox>,
    pub tag: Tag,
}

/// A batch's verdicts for one input, each with the tag its input gave the message.
pub type Verdicts = Vec<(Tag, Verdict)>;

/// Receives the verdicts of an input's messages, a batch at a time, from worker threads.
/// `deliver` must not block for long: it runs on a worker between two commits.
pub trait Outbox: Send + Sync {
    fn deliver(&self, verdicts: Verdicts);
}

/// Wakes an input's thread (paused for room, or to read its outbox).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// One parsed message on its way to a worker.
pub struct Job {
    pub records: Vec<Record>,
    pub received: Instant,
    pub reply: ReplyTo,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("records", &self.records.len())
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}
