//! Counters and histograms (the `prometheus` crate: atomics, no lock per record) and the
//! `GET /metrics` listener: std sockets, `httparse` for the request, and hard bounds on
//! request size, time and connections (an accept thread and two handler threads).
//!
//! The pipeline only bumps counters; nothing outside this file knows the exposition format.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("metrics: {0}")]
    Register(prometheus::Error),
}

// Not `#[from]`: that would also make it the error's source, printed twice in a `{:#}` chain.
impl From<prometheus::Error> for MetricsError {
    fn from(e: prometheus::Error) -> Self {
        MetricsError::Register(e)
    }
}

/// Reads the queue's depth and its capacity (`[pipeline] queue_capacity`, reloadable), both in
/// records; handed in by whoever owns the queue.
pub type QueueDepth = Arc<dyn Fn() -> (usize, usize) + Send + Sync>;

/// Every metric feedd exports. Cloned handles share the same atomics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub messages_received: IntCounter,
    pub messages_rejected: IntCounter,
    pub records_committed: IntCounter,
    pub records_acknowledged: IntCounter,
    /// Replies that could not be handed to a client, by `reason` (`peer_gone`, …).
    pub replies_dropped: IntCounterVec,
    pub db_errors: IntCounter,
    pub batch_retries: IntCounter,
    pub config_reloads: IntCounter,
    pub config_reload_failures: IntCounter,
    pub curve_refusals: IntCounter,
    /// Moves along the `[mysql] host` list, and which host takes writes (1) or not (0).
    pub db_failovers: IntCounter,
    pub db_host_active: IntGaugeVec,
    /// Which store (by its serial) owns `db_host_active`: the one serving, not one a reload
    /// prepared and dropped, nor one replaced by a reload.
    pub db_hosts_owner: Arc<std::sync::atomic::AtomicU64>,
    pub amqp_deliveries: IntCounter,
    pub amqp_redeliveries: IntCounter,
    pub amqp_acks: IntCounter,
    pub amqp_dead_letters: IntCounter,
    pub amqp_reconnects: IntCounter,
    /// Moves along the `[amqp] url` list, and which broker is in use (1) or not (0).
    pub amqp_failovers: IntCounter,
    pub amqp_broker_active: IntGaugeVec,
    queue_depth_gauge: IntGauge,
    queue_capacity_gauge: IntGauge,
    /// The queue's own depth, read when the gauge is rendered (the queue owns it).
    queue_depth: QueueDepth,
    pub batch_commit_seconds: Histogram,
    pub batch_records: Histogram,
    pub pool_wait_seconds: Histogram,
    pub ack_latency_seconds: Histogram,
}

/// Each metric's help text, by name: one table, so the constructor is a list of names.
const HELP: &[(&str, &str)] = &[
    ("feedd_messages_received_total", "Messages read from the socket"),
    ("feedd_messages_rejected_total", "Messages answered FALSE (malformed, too large, conflict)"),
    ("feedd_records_committed_total", "Rows inserted by committed batches (resends of stored records add none)"),
    ("feedd_records_acknowledged_total", "Records of messages answered TRUE and handed to a live client (resends included)"),
    ("feedd_replies_dropped_total", "Replies not delivered: peer_gone (client disconnected), replaced (socket replaced by a reload), shutdown (not sent by the end of the drain)"),
    ("feedd_db_errors_total", "Failed batch attempts"),
    ("feedd_batch_retries_total", "Batch attempts retried"),
    ("feedd_config_reloads_total", "Successful reloads"),
    ("feedd_config_reload_failures_total", "Reloads refused (invalid file or unusable target)"),
    ("feedd_curve_refusals_total", "CURVE handshakes refused by the allowlist"),
    ("feedd_db_failovers_total", "Moves to the next [mysql] host (refused, lost, read-only, not primary)"),
    ("feedd_amqp_deliveries_total", "AMQP deliveries taken from the broker (redeliveries included)"),
    ("feedd_amqp_redeliveries_total", "AMQP deliveries the broker flagged redelivered (a lost channel, consumer_timeout, another consumer's); on a quorum queue each spent one of its x-delivery-limit"),
    ("feedd_amqp_acks_total", "AMQP deliveries acknowledged (after COMMIT, or after their dead letter was confirmed)"),
    ("feedd_amqp_dead_letters_total", "AMQP deliveries rejected: published to the dead-letter exchange, or dropped when none is set"),
    ("feedd_amqp_reconnects_total", "AMQP connections re-established after a loss"),
    ("feedd_amqp_failovers_total", "Moves to the next [amqp] url broker (connection lost or connect refused)"),
    ("feedd_amqp_broker_active", "1 for the [amqp] url broker in use, 0 for the others of the list"),
    ("feedd_batch_records", "Records per committed batch"),
    ("feedd_ack_latency_seconds", "Message received to reply handed to the socket"),
    ("feedd_batch_commit_seconds", "Time to commit one batch (all attempts)"),
    ("feedd_pool_wait_seconds", "Time to check a connection out of the pool"),
    ("feedd_queue_depth", "Records waiting between the receiver and the workers"),
    ("feedd_queue_capacity", "Records the queue holds before inputs pause ([pipeline] queue_capacity)"),
    ("feedd_db_host_active", "1 for the [mysql] host taking writes, 0 for the others of the list"),
];

/// Buckets of the latency histograms, in seconds.
const SECONDS: [f64; 13] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// Makes metrics and registers them in one registry.
struct Registrar(Registry);

impl Registrar {
    fn help(name: &str) -> &'static str {
        HELP.iter().find(|(n, _)| *n == name).map_or("", |(_, h)| h)
    }

    fn counter(&self, name: &str) -> Result<IntCounter, MetricsError> {
        let c = IntCounter::new(name, Self::help(name))?;
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn histogram(&self, name: &str, buckets: &[f64]) -> Result<Histogram, MetricsError> {
        let opts = HistogramOpts::new(name, Self::help(name)).buckets(buckets.to_vec());
        let h = Histogram::with_opts(opts)?;
        self.0.register(Box::new(h.clone()))?;
        Ok(h)
    }

    fn gauge(&self, name: &str) -> Result<IntGauge, MetricsError> {
        let g = IntGauge::new(name, Self::help(name))?;
        self.0.register(Box::new(g.clone()))?;
        Ok(g)
    }

    fn counter_vec(
        &self,
        name: &str,
        label: &str,
        values: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        let c = IntCounterVec::new(Opts::new(name, Self::help(name)), &[label])?;
        // Every value shown from the start, at 0.
        for v in values {
            c.with_label_values(&[v]);
        }
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn gauge_vec(&self, name: &str, label: &str) -> Result<IntGaugeVec, MetricsError> {
        let g = IntGaugeVec::new(Opts::new(name, Self::help(name)), &[label])?;
        self.0.register(Box::new(g.clone()))?;
        Ok(g)
    }
}

impl Metrics {
    pub fn new(queue_depth: QueueDepth) -> Result<Metrics, MetricsError> {
        let r = Registrar(Registry::new());
        let build = IntGaugeVec::new(Opts::new("feedd_build_info", "feedd version"), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.0.register(Box::new(build))?;
        Ok(Metrics {
            messages_received: r.counter("feedd_messages_received_total")?,
            messages_rejected: r.counter("feedd_messages_rejected_total")?,
            records_committed: r.counter("feedd_records_committed_total")?,
            records_acknowledged: r.counter("feedd_records_acknowledged_total")?,
            replies_dropped: r.counter_vec(
                "feedd_replies_dropped_total",
                "reason",
                &["peer_gone", "replaced", "shutdown"],
            )?,
            db_errors: r.counter("feedd_db_errors_total")?,
            batch_retries: r.counter("feedd_batch_retries_total")?,
            config_reloads: r.counter("feedd_config_reloads_total")?,
            config_reload_failures: r.counter("feedd_config_reload_failures_total")?,
            curve_refusals: r.counter("feedd_curve_refusals_total")?,
            db_failovers: r.counter("feedd_db_failovers_total")?,
            amqp_deliveries: r.counter("feedd_amqp_deliveries_total")?,
            amqp_redeliveries: r.counter("feedd_amqp_redeliveries_total")?,
            amqp_acks: r.counter("feedd_amqp_acks_total")?,
            amqp_dead_letters: r.counter("feedd_amqp_dead_letters_total")?,
            amqp_reconnects: r.counter("feedd_amqp_reconnects_total")?,
            amqp_failovers: r.counter("feedd_amqp_failovers_total")?,
            amqp_broker_active: r.gauge_vec("feedd_amqp_broker_active", "broker")?,
            db_host_active: r.gauge_vec("feedd_db_host_active", "host")?,
            db_hosts_owner: Arc::default(),
            queue_depth_gauge: r.gauge("feedd_queue_depth")?,
            queue_capacity_gauge: r.gauge("feedd_queue_capacity")?,
            queue_depth,
            batch_records: r.histogram(
                "feedd_batch_records",
                &[1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0],
            )?,
            batch_commit_seconds: r.histogram("feedd_batch_commit_seconds", &SECONDS)?,
            pool_wait_seconds: r.histogram("feedd_pool_wait_seconds", &SECONDS)?,
            ack_latency_seconds: r.histogram("feedd_ack_latency_seconds", &SECONDS)?,
            registry: r.0,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let (depth, capacity) = (self.queue_depth)();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.queue_depth_gauge.set(gauge(depth));
        self.queue_capacity_gauge.set(gauge(capacity));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::warn!("metrics: encoding failed: {e}");
        }
        out
    }
}

/// Most bytes of one request (request line and headers); a larger one is cut off with 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Longest time one connection may take to send its request and read the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Connections served at once; as many more may wait, any beyond that are closed with 503.
pub const MAX_CONNECTIONS: usize = 2;

/// The HTTP listener: an accept thread and `MAX_CONNECTIONS` handler threads. Every request
/// costs at most `MAX_REQUEST_BYTES` and `REQUEST_DEADLINE`, so a slow or huge client cannot
/// grow memory or hold the listener. Dropping it stops and joins every thread.
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, metrics: Metrics) -> Result<MetricsServer, MetricsError> {
        let listen_error = |e: std::io::Error| MetricsError::Listen {
            addr,
            reason: e.to_string(),
        };
        let listener = TcpListener::bind(addr).map_err(listen_error)?;
        // Non-blocking, so the accept loop can look at `stop` between polls.
        listener.set_nonblocking(true).map_err(listen_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (connections, waiting) = crossbeam_channel::bounded::<TcpStream>(MAX_CONNECTIONS);
        let mut threads = Vec::with_capacity(MAX_CONNECTIONS + 1);
        let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map(|t| threads.push(t))
                .map_err(listen_error)
        };
        for i in 0..MAX_CONNECTIONS {
            let waiting = waiting.clone();
            let metrics = metrics.clone();
            // Ends when the accept thread drops the sender.
            spawn(
                format!("metrics-{i}"),
                Box::new(move || {
                    for stream in waiting {
                        answer(stream, &metrics);
                    }
                }),
            )?;
        }
        let stopping = Arc::clone(&stop);
        spawn(
            "metrics".into(),
            Box::new(move || accept_loop(&listener, &connections, &stopping)),
        )?;
        log::info!("metrics on http://{addr}/metrics");
        Ok(MetricsServer { stop, threads })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The accept thread first (it drops the sender), then the handlers.
        while let Some(t) = self.threads.pop() {
            if t.join().is_err() {
                log::error!("metrics thread panicked");
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, connections: &Sender<TcpStream>, stop: &AtomicBool) {
    use std::os::fd::AsFd;
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Err(e) = poll(&mut fds, PollTimeout::from(100u8)) {
            if e != nix::errno::Errno::EINTR {
                log::warn!("metrics: poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => match connections.try_send(stream) {
                    Ok(()) => {}
                    Err(TrySendError::Full(stream) | TrySendError::Disconnected(stream)) => {
                        busy(stream)
                    }
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("metrics: accept: {e}");
                    break;
                }
            }
        }
    }
}

/// Every handler busy and as many waiting: a one-line 503, never blocking the accept thread.
fn busy(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write_all(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
}

/// What one request is answered with.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Metrics,
    NotFound,
    NotAllowed,
    TooLarge,
    Bad,
    Timeout,
}

/// Reads one request within the bounds and answers it; the connection is closed after.
fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let answer = read_request(&mut stream, deadline);
    let (status, body): (&str, Vec<u8>) = match answer {
        Some(Answer::Metrics) => ("200 OK", metrics.render()),
        Some(Answer::NotFound) => ("404 Not Found", b"not found; try /metrics\n".to_vec()),
        Some(Answer::NotAllowed) => ("405 Method Not Allowed", b"GET only\n".to_vec()),
        Some(Answer::TooLarge) => (
            "431 Request Header Fields Too Large",
            b"request too large\n".to_vec(),
        ),
        Some(Answer::Bad) => ("400 Bad Request", b"bad request\n".to_vec()),
        Some(Answer::Timeout) => ("408 Request Timeout", Vec::new()),
        None => return, // the client went away
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let remaining = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_write_timeout(Some(remaining.max(Duration::from_millis(100))));
    if let Err(e) = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&body))
    {
        log::debug!("metrics: reply failed: {e}");
    }
}

/// Reads until a whole request head is in (at most `MAX_REQUEST_BYTES`, until `deadline`).
fn read_request(stream: &mut TcpStream, deadline: Instant) -> Option<Answer> {
    let mut buf = [0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Some(Answer::Timeout);
        }
        stream.set_read_timeout(Some(remaining)).ok()?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return None,
            Ok(n) => len += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Some(Answer::Timeout)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
        if let Some(answer) = judge_request(&buf[..len]) {
            return Some(answer);
        }
        if len == buf.len() {
            return Some(Answer::TooLarge);
        }
    }
}

/// The answer to a request head, or `None` while it is incomplete (pure).
fn judge_request(bytes: &[u8]) -> Option<Answer> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Answer::TooLarge),
        Err(_) => Some(Answer::Bad),
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or("");
            Some(if request.method != Some("GET") {
                Answer::NotAllowed
            } else if path == "/metrics" || path.starts_with("/metrics?") {
                Answer::Metrics
            } else {
                Answer::NotFound
            })
        }
    }
}

/// Seconds as f64 for histograms.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_judged() {
        assert_eq!(
            judge_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Answer::Metrics)
        );
        assert_eq!(
            judge_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Answer::Metrics)
        );
        assert_eq!(judge_request(b"GET /metrics HTTP/1.1\r\nHost: "), None);
        assert_eq!(
            judge_request(b"GET / HTTP/1.1\r\n\r\n"),
            Some(Answer::NotFound)
        );
        assert_eq!(
            judge_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Answer::NotAllowed)
        );
        assert_eq!(judge_request(b"\x00\x01garbage\r\n\r\n"), Some(Answer::Bad));
        let many: String = (0..40).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(
            judge_request(format!("GET /metrics HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Some(Answer::TooLarge)
        );
    }
}
