//! The load generator behind `feedd-load` (and the benchmark): C DEALER clients, each keeping
//! up to W messages in flight, K records per message, over its own ticket range.
//!
//! Each client thread owns its socket. A message carries an 8-byte sequence number as its
//! first envelope frame, which feedd echoes, so replies are matched without ordering.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use feedd::config::CurveKey;
use feedd::input::record::{Record, Volume};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub endpoint: String,
    pub records: u64,
    pub clients: usize,
    pub window: usize,
    pub per_msg: usize,
    pub start_ticket: u64,
    /// Give up on replies after this long without any.
    pub reply_timeout: Duration,
    /// CURVE: the server's public key and this client's secret key.
    pub curve: Option<(CurveKey, CurveKey)>,
    /// Total records/s to offer (paced per client); `None`: as fast as the window allows.
    pub rate: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("client socket: {0}")]
    Socket(zmq::Error),
    #[error("client thread panicked")]
    Panic,
    #[error("histogram: {0}")]
    Histogram(String),
}

// Not `#[from]`: that would also make it the error's source, printed twice in a `{:#}` chain.
impl From<zmq::Error> for LoadError {
    fn from(e: zmq::Error) -> Self {
        LoadError::Socket(e)
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadReport {
    pub records_sent: u64,
    pub records_acked: u64,
    pub messages_sent: u64,
    pub messages_acked: u64,
    pub falses: u64,
    /// Messages without a reply when the run gave up.
    pub missing: u64,
    pub first_false: Option<String>,
    pub elapsed: Duration,
    /// Ack latency in microseconds.
    pub latency_us: Histogram<u64>,
}

impl LoadReport {
    pub fn records_per_sec(&self) -> f64 {
        self.records_acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn ok(&self) -> bool {
        self.falses == 0 && self.missing == 0
    }

    pub fn latency_ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// A human summary: rate and latency percentiles.
    pub fn summary(&self) -> String {
        format!(
            "{} records in {} messages acknowledged in {:.2} s: {:.0} records/s\n\
             ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
             FALSE: {}  missing replies: {}{}",
            self.records_acked,
            self.messages_acked,
            self.elapsed.as_secs_f64(),
            self.records_per_sec(),
            self.latency_ms(0.5),
            self.latency_ms(0.9),
            self.latency_ms(0.99),
            self.latency_ms(0.999),
            self.latency_us.max() as f64 / 1000.0,
            self.falses,
            self.missing,
            self.first_false
                .as_ref()
                .map(|f| format!(" (first: {f})"))
                .unwrap_or_default()
        )
    }
}

/// Counters shared with a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub records_acked: AtomicU64,
}

struct ClientResult {
    messages_sent: u64,
    messages_acked: u64,
    records_sent: u64,
    records_acked: u64,
    falses: u64,
    missing: u64,
    first_false: Option<String>,
    latency_us: Histogram<u64>,
}

/// Runs the load to completion.
pub fn run(options: &LoadOptions, progress: Arc<Progress>) -> Result<LoadReport, LoadError> {
    let context = zmq::Context::new();
    let clients = options.clients.max(1) as u64;
    let per_client = options.records / clients;
    let started = Instant::now();
    let mut threads = Vec::new();
    for c in 0..clients {
        let records = if c == clients - 1 {
            options.records - per_client * (clients - 1)
        } else {
            per_client
        };
        let first = options.start_ticket + c * per_client;
        let (ctx, opts, progress) = (context.clone(), options.clone(), Arc::clone(&progress));
        threads.push(std::thread::spawn(move || {
            client(&ctx, &opts, first, records, &progress)
        }));
    }
    let mut latency_us = new_histogram()?;
    let mut report = LoadReport {
        records_sent: 0,
        records_acked: 0,
        messages_sent: 0,
        messages_acked: 0,
        falses: 0,
        missing: 0,
        first_false: None,
        elapsed: Duration::ZERO,
        latency_us: new_histogram()?,
    };
    for t in threads {
        let r = t.join().map_err(|_| LoadError::Panic)??;
        report.records_sent += r.records_sent;
        report.records_acked += r.records_acked;
        report.messages_sent += r.messages_sent;
        report.messages_acked += r.messages_acked;
        report.falses += r.falses;
        report.missing += r.missing;
        if report.first_false.is_none() {
            report.first_false = r.first_false;
        }
        latency_us
            .add(&r.latency_us)
            .map_err(|e| LoadError::Histogram(e.to_string()))?;
    }
    report.elapsed = started.elapsed();
    report.latency_us = latency_us;
    Ok(report)
}

fn new_histogram() -> Result<Histogram<u64>, LoadError> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| LoadError::Histogram(e.to_string()))
}

/// The record the load sends for `ticket` (the benchmark writes the same rows directly).
pub fn record_for(ticket: u64) -> Record {
    Record {
        ticket,
        login: ticket % 100_000,
        // (ticket % 10,000).(ticket % 100), in 1/10,000 units
        volume: Volume(u128::from(ticket % 10_000) * 10_000 + u128::from(ticket % 100) * 100),
    }
}

fn body(first: u64, count: u64) -> Vec<u8> {
    let mut s = String::with_capacity(count as usize * 32);
    for t in first..first + count {
        if t > first {
            s.push('\n');
        }
        let r = record_for(t);
        let _ = write!(s, "{},{},{}", r.ticket, r.login, r.volume);
    }
    s.into_bytes()
}

/// A DEALER connected to the endpoint (with CURVE when asked), unbounded both ways.
fn dealer(context: &zmq::Context, options: &LoadOptions) -> Result<zmq::Socket, zmq::Error> {
    let socket = context.socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.set_sndhwm(0)?;
    socket.set_rcvhwm(0)?;
    if let Some((server, secret)) = &options.curve {
        let public = curve_public_key(secret).ok_or(zmq::Error::EINVAL)?;
        socket.set_curve_serverkey(&server.0)?;
        socket.set_curve_secretkey(&secret.0)?;
        socket.set_curve_publickey(&public.0)?;
    }
    socket.connect(&options.endpoint)?;
    Ok(socket)
}

fn client(
    context: &zmq::Context,
    options: &LoadOptions,
    first_ticket: u64,
    records: u64,
    progress: &Progress,
) -> Result<ClientResult, LoadError> {
    let socket = dealer(context, options)?;
    let per_msg = options.per_msg.max(1) as u64;
    let messages = records.div_ceil(per_msg);
    let mut sent_at: Vec<Option<Instant>> = vec![None; messages as usize];
    let mut r = ClientResult {
        messages_sent: 0,
        messages_acked: 0,
        records_sent: 0,
        records_acked: 0,
        falses: 0,
        missing: 0,
        first_false: None,
        latency_us: new_histogram()?,
    };
    let size_of = |seq: u64| per_msg.min(records - seq * per_msg);
    // Pacing: message k of this client is due at start + k / (its share of the rate).
    let messages_per_sec = options
        .rate
        .map(|rate| rate / options.clients.max(1) as f64 / per_msg as f64);
    let start = Instant::now();
    let due = |seq: u64| messages_per_sec.map(|m| start + Duration::from_secs_f64(seq as f64 / m));
    let mut in_flight = 0usize;
    let mut next = 0u64;
    while r.messages_acked + r.falses < messages {
        while in_flight < options.window.max(1) && next < messages {
            if due(next).is_some_and(|at| at > Instant::now()) {
                break;
            }
            let count = size_of(next);
            socket.send_multipart(
                [
                    next.to_le_bytes().to_vec(),
                    Vec::new(),
                    body(first_ticket + next * per_msg, count),
                ],
                0,
            )?;
            sent_at[next as usize] = Some(Instant::now());
            r.messages_sent += 1;
            r.records_sent += count;
            in_flight += 1;
            next += 1;
        }
        let wait_ms =
            match due(next).filter(|_| next < messages && in_flight < options.window.max(1)) {
                // Paced and allowed to send: wake when the next message is due, rounded up to
                // poll's millisecond: rounding down made every wait under 1 ms a busy loop that
                // took a core from feedd and the database (a reply still wakes it at once).
                Some(at) => at
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000) as i64,
                None => options.reply_timeout.as_millis() as i64,
            };
        if socket.poll(zmq::POLLIN, wait_ms)? == 0 {
            if wait_ms < options.reply_timeout.as_millis() as i64 {
                continue;
            }
            r.missing = in_flight as u64 + (messages - next);
            break;
        }
        let frames = socket.recv_multipart(0)?;
        let seq = frames
            .first()
            .and_then(|f| <[u8; 8]>::try_from(f.as_slice()).ok())
            .map(u64::from_le_bytes);
        let Some(seq) = seq.filter(|s| *s < messages) else {
            continue;
        };
        let Some(at) = sent_at[seq as usize].take() else {
            continue; // a duplicate reply; feedd never sends one, but do not count it twice
        };
        in_flight -= 1;
        let reply = frames
            .last()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .unwrap_or_default();
        r.record(reply, size_of(seq), at.elapsed(), progress);
    }
    Ok(r)
}

impl ClientResult {
    /// One reply to a message of `records` records, sent `took` ago.
    fn record(&mut self, reply: String, records: u64, took: Duration, progress: &Progress) {
        let _ = self.latency_us.record(took.as_micros().max(1) as u64);
        if reply == "TRUE" {
            self.messages_acked += 1;
            self.records_acked += records;
            progress.records_acked.fetch_add(records, Ordering::Relaxed);
        } else {
            self.falses += 1;
            self.first_false.get_or_insert(reply);
        }
    }
}

/// The public key belonging to a CURVE secret key (libzmq's `zmq_curve_public`).
pub fn curve_public_key(secret: &CurveKey) -> Option<CurveKey> {
    let public = feedd::zmq_ffi::curve_public_z85(&secret.to_z85())?;
    CurveKey::from_z85(&public).ok()
}
