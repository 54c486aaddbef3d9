//! Counters and histograms (the `prometheus` crate: atomics, no lock per record) and the
//! `GET /metrics` listener, a `tiny_http` server on its own thread.
//!
//! The pipeline only bumps counters; nothing outside this file knows the exposition format.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::pipeline::queue::DepthReader;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("metrics: {0}")]
    Register(#[from] prometheus::Error),
}

/// Every metric feedd exports. Cloned handles share the same atomics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub messages_received: IntCounter,
    pub messages_rejected: IntCounter,
    pub records_committed: IntCounter,
    pub db_errors: IntCounter,
    pub batch_retries: IntCounter,
    pub config_reloads: IntCounter,
    pub config_reload_failures: IntCounter,
    pub curve_refusals: IntCounter,
    pub amqp_deliveries: IntCounter,
    pub amqp_acks: IntCounter,
    pub amqp_dead_letters: IntCounter,
    pub amqp_reconnects: IntCounter,
    queue_depth_gauge: IntGauge,
    /// The queue's own depth, read when the gauge is rendered (the queue owns it).
    queue_depth: DepthReader,
    pub batch_commit_seconds: Histogram,
    pub batch_records: Histogram,
    pub pool_wait_seconds: Histogram,
    pub ack_latency_seconds: Histogram,
}

impl Metrics {
    pub fn new(queue_depth: DepthReader) -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, MetricsError> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let seconds = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ];
        let queue_depth_gauge = IntGauge::new(
            "feedd_queue_depth",
            "Records waiting between the receiver and the workers",
        )?;
        registry.register(Box::new(queue_depth_gauge.clone()))?;
        let build = IntGaugeVec::new(Opts::new("feedd_build_info", "feedd version"), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        Ok(Metrics {
            messages_received: counter(
                "feedd_messages_received_total",
                "Messages read from the socket",
            )?,
            messages_rejected: counter(
                "feedd_messages_rejected_total",
                "Messages answered FALSE (malformed, too large, conflict)",
            )?,
            records_committed: counter(
                "feedd_records_committed_total",
                "Records of accepted messages committed (resends included)",
            )?,
            db_errors: counter("feedd_db_errors_total", "Failed batch attempts")?,
            batch_retries: counter("feedd_batch_retries_total", "Batch attempts retried")?,
            config_reloads: counter("feedd_config_reloads_total", "Successful reloads")?,
            config_reload_failures: counter(
                "feedd_config_reload_failures_total",
                "Reloads refused (invalid file or unusable target)",
            )?,
            curve_refusals: counter(
                "feedd_curve_refusals_total",
                "CURVE handshakes refused by the allowlist",
            )?,
            amqp_deliveries: counter(
                "feedd_amqp_deliveries_total",
                "AMQP deliveries taken from the broker (redeliveries included)",
            )?,
            amqp_acks: counter(
                "feedd_amqp_acks_total",
                "AMQP deliveries acknowledged (after COMMIT, or after their dead letter was confirmed)",
            )?,
            amqp_dead_letters: counter(
                "feedd_amqp_dead_letters_total",
                "AMQP deliveries rejected: published to the dead-letter exchange, or dropped when none is set",
            )?,
            amqp_reconnects: counter(
                "feedd_amqp_reconnects_total",
                "AMQP connections re-established after a loss",
            )?,
            queue_depth_gauge,
            queue_depth,
            batch_commit_seconds: histogram(
                "feedd_batch_commit_seconds",
                "Time to commit one batch (all attempts)",
                seconds.clone(),
            )?,
            batch_records: histogram(
                "feedd_batch_records",
                "Records per committed batch",
                vec![1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0],
            )?,
            pool_wait_seconds: histogram(
                "feedd_pool_wait_seconds",
                "Time to check a connection out of the pool",
                seconds.clone(),
            )?,
            ack_latency_seconds: histogram(
                "feedd_ack_latency_seconds",
                "Message received to reply handed to the socket",
                seconds,
            )?,
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let depth = self.queue_depth.records();
        self.queue_depth_gauge
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::warn!("metrics: encoding failed: {e}");
        }
        out
    }
}

/// The HTTP listener thread. Dropping it stops and joins the thread.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, metrics: Metrics) -> Result<MetricsServer, MetricsError> {
        let server = tiny_http::Server::http(addr).map_err(|e| MetricsError::Listen {
            addr,
            reason: e.to_string(),
        })?;
        let server = Arc::new(server);
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&serving, &metrics))
            .map_err(|e| MetricsError::Listen {
                addr,
                reason: e.to_string(),
            })?;
        log::info!("metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            server,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("metrics thread panicked");
            }
        }
    }
}

fn serve(server: &tiny_http::Server, metrics: &Metrics) {
    // `incoming_requests` ends when `unblock` is called from Drop.
    for request in server.incoming_requests() {
        let response = if request.url() == "/metrics" || request.url().starts_with("/metrics?") {
            let header = tiny_http::Header::from_bytes(
                &b"Content-Type"[..],
                &b"text/plain; version=0.0.4; charset=utf-8"[..],
            );
            let mut r = tiny_http::Response::from_data(metrics.render());
            if let Ok(h) = header {
                r = r.with_header(h);
            }
            r
        } else {
            tiny_http::Response::from_data(b"not found; try /metrics\n".to_vec())
                .with_status_code(404)
        };
        if let Err(e) = request.respond(response) {
            log::debug!("metrics: reply failed: {e}");
        }
    }
}

/// Seconds as f64 for histograms.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
