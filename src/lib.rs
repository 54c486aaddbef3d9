//! feedd: ZeroMQ ROUTER → bounded channel → batched MySQL transactions → reply after COMMIT.
//!
//! Layout by idea: `config` (INI → typed, validated config), `input` (the ZeroMQ receiver and
//! the wire format), `pipeline` (workers, store, the pure classifier), `process` (daemon,
//! supervisor, pidfile, privileges, signals). `server` builds and runs them; `commands` is
//! what each command line verb does.

#![deny(unsafe_code)]

pub mod backoff;
pub mod commands;
pub mod config;
pub mod failover;
pub mod heartbeat;
pub mod input;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod process;
pub mod server;
pub mod zmq_ffi;

// Short paths kept for the tests, benches and fuzz targets.
pub use input::{record, zmq as receiver};
pub use pipeline::classify;
pub use process::supervisor;
