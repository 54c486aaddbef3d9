//! The systemd watchdog over the watched threads' heartbeats, and its `STATUS=` line read
//! from the published config, the metrics and the queue (runs on the watchdog thread).

use std::sync::Arc;

use crate::heartbeat::Heartbeat;
use crate::pipeline::queue::Queue;
use crate::pipeline::worker::Shared;
use crate::process::notify::{Notifier, Snapshot, Watchdog};

/// The systemd watchdog over `beats`, with a status line from the config, metrics and queue.
/// A thread that cannot start is logged, not fatal: serving matters more than the pings.
pub fn start_watchdog(
    notifier: &Notifier,
    beats: Vec<Heartbeat>,
    shared: &Shared,
    queue: &Queue,
) -> Option<Watchdog> {
    let (config, metrics) = (Arc::clone(&shared.config), shared.metrics.clone());
    let store = Arc::clone(&shared.store);
    let depth = queue.depth_reader();
    let snapshot = move || {
        let c = config.load();
        Snapshot {
            inputs: match (&c.zmq.endpoint, &c.amqp.url) {
                (z, None) => format!("zmq {z}"),
                (z, Some(url)) if z.is_empty() => format!("amqp {url}"),
                (z, Some(url)) => format!("zmq {z}, amqp {url}"),
            },
            committed: metrics.records_committed.get(),
            queue_depth: depth.records(),
            // The host taking writes, which a host list may have moved to.
            database: format!("{}/{}", store.load().active_host(), c.mysql.database),
        }
    };
    notifier
        .start_watchdog(beats, snapshot)
        .map_err(|e| log::error!("cannot start the systemd watchdog thread: {e}"))
        .ok()
}
