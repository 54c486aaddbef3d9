//! The drain: stop intake (the consumer sends `basic.cancel`) → workers drain and commit →
//! the inputs send the last replies and acks, then close → the caller joins. If
//! `shutdown_timeout_ms` passes first, workers abandon what is uncommitted (never answered,
//! so clients resend) and the process exits anyway.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver as Chan;

use crate::input::amqp::AmqpPart;
use crate::input::driver::Handle;
use crate::input::zmq::ZmqSettings;
use crate::pipeline::worker::Shared;
use crate::server::threads::{Exit, Role};
use crate::server::Outcome;

/// The inputs' handles, for the drain.
pub struct Inputs<'a> {
    pub receiver: Option<&'a Handle<ZmqSettings>>,
    pub consumer: &'a Handle<AmqpPart>,
}

pub fn shut_down(
    shared: &Shared,
    inputs: &Inputs<'_>,
    exits: &Chan<Exit>,
    workers: usize,
    failure: Option<(Option<Role>, String)>,
) -> Outcome {
    let timeout = shared.config.load().daemon.shutdown_timeout();
    let deadline = Instant::now() + timeout;
    if let Some(receiver) = inputs.receiver {
        receiver.stop_intake();
    }
    inputs.consumer.stop_intake();
    let failed_role = failure.as_ref().and_then(|(role, _)| *role);
    let mut receiver_gone = failed_role == Some(Role::Receiver) || inputs.receiver.is_none();
    let mut consumer_gone = failed_role == Some(Role::Consumer);
    let mut workers_left = workers - usize::from(matches!(failed_role, Some(Role::Worker(_))));
    while workers_left > 0 {
        match exits.recv_deadline(deadline) {
            Ok((role, result)) => {
                if let Err(e) = result {
                    log::error!("{role} failed during shutdown: {e}");
                }
                match role {
                    Role::Receiver => receiver_gone = true,
                    Role::Consumer => consumer_gone = true,
                    Role::Worker(_) => workers_left -= 1,
                }
            }
            Err(_) => break,
        }
    }
    let drained = workers_left == 0;
    if !drained {
        log::warn!(
            "shutdown_timeout_ms ({} ms) passed; uncommitted messages are not answered (clients resend)",
            timeout.as_millis()
        );
        shared.abandon.store(true, Ordering::Relaxed);
    }
    if let Some(receiver) = inputs.receiver.filter(|_| !receiver_gone) {
        receiver.finish();
    }
    if !consumer_gone {
        inputs.consumer.finish();
    }
    // The inputs only send what is already delivered (and close); this wait is short.
    let until = Instant::now() + Duration::from_secs(5);
    while !(receiver_gone && consumer_gone) {
        match exits.recv_deadline(until) {
            Ok((Role::Receiver, _)) => receiver_gone = true,
            Ok((Role::Consumer, _)) => consumer_gone = true,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    match failure {
        Some((_, reason)) => Outcome::Failed(reason),
        None if drained => {
            log::info!("drained: every queued message committed and answered");
            Outcome::Drained
        }
        None => Outcome::Abandoned,
    }
}
