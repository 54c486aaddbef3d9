//! The harness of the integration tests, one file per role: `ports` (ports no other test
//! process uses), `database` (a database per test, private servers), `daemon` (the feedd binary
//! under test), `notify` (the service manager's notify socket, for readiness), `clients`
//! (ZeroMQ and HTTP clients, test data), `broker` (RabbitMQ), `relay` (a TCP relay that cuts or
//! goes silent), `cluster` (Galera), `rabbit_cluster` (RabbitMQ nodes clustered), `prometheus`
//! (a real Prometheus scraping feedd) and `tls`
//! (a throwaway PKI and a TLS-only server).

pub mod broker;
pub mod clients;
pub mod cluster;
pub mod daemon;
pub mod database;
pub mod notify;
pub mod ports;
pub mod prometheus;
pub mod rabbit_cluster;
pub mod relay;
pub mod tls;

use std::time::{Duration, Instant};

pub use clients::*;
pub use daemon::*;
pub use database::*;
pub use nix::sys::signal::Signal;

/// Polls `f` every 20 ms until it holds or `timeout` passed; whether it held. The caller must
/// look at the answer (usually `assert!`), or a wait that ran out passes silently.
#[must_use]
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
