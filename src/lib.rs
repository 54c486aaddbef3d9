//! feedd: ZeroMQ ROUTER → bounded channel → batched MySQL transactions → reply after COMMIT.
//!
//! Data flows one way: `receiver` → channel → `worker` → `store` (deciding through the pure
//! `classify`), and replies return to the receiver, the socket's only owner. `config` is
//! parsed once; `signals`/`reload` swap it live; `server` starts and stops the threads;
//! `daemon` and `supervisor` wrap the serving process for `--daemon`.

pub mod classify;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod pidfile;
pub mod privileges;
pub mod receiver;
pub mod record;
pub mod reload;
pub mod reply;
pub mod server;
pub mod signals;
pub mod store;
pub mod supervisor;
pub mod worker;
pub mod zap;
