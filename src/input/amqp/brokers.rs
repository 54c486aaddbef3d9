//! Which broker of `[amqp] url` the consumer uses (SPEC §9 RabbitMQ cluster): the decisions the
//! consumer (mod.rs) acts on, pure (no threads, no I/O), on the shared `Failover` order.
//!
//! On a lost connection or a refused connect the next broker in order is tried at once; the
//! consumer's backoff spaces only full rounds (every broker failed since the last success).
//! A reload keeps the consumer on its broker while that broker is still listed.

use std::time::Duration;

use super::link::{AmqpSettings, LinkError};
use crate::failover::Failover;

/// What follows a failure of the broker in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    /// `(from, to)` when another broker is tried next (never for a list of one).
    pub moved: Option<(usize, usize)>,
    /// Every broker failed since the last success: wait the backoff before the next try.
    pub backoff: bool,
}

#[derive(Debug)]
pub struct Brokers(Failover);

impl Brokers {
    /// Broker `at` of a list of `len` in use.
    pub fn new(len: usize, at: usize) -> Brokers {
        Brokers(Failover::new(len, at))
    }

    pub fn current(&self) -> usize {
        self.0.current()
    }

    /// The broker in use was lost or refused the connect.
    pub fn failed(&mut self) -> Next {
        let at = self.0.current();
        match self.0.failed(at) {
            Some(m) => Next {
                moved: (m.from != m.to).then_some((m.from, m.to)),
                backoff: m.full_round,
            },
            // Never: `at` is the current broker.
            None => Next {
                moved: None,
                backoff: true,
            },
        }
    }

    /// Deliveries flow again on the broker in use: the next failure starts a fresh round.
    pub fn worked(&mut self) {
        self.0.worked();
    }
}

/// Whether a refused connect is a reason to try the next broker. An existing exchange of
/// another type is not: exchanges are cluster-wide, so every node refuses the same way.
pub fn moves_on(e: &LinkError) -> bool {
    !matches!(e, LinkError::ExchangeType { .. })
}

/// Start-up walks the list again while some broker was slow rather than down and less than
/// this has passed: a loaded live broker can take longer than one call's `CALL_TIMEOUT` (seen
/// in CI: a queue bind on the shared broker beside three cluster tests), and a second try on a
/// fresh connection usually gets through. Short, so a silent broker still fails start-up in
/// about two `CALL_TIMEOUT`s (one broker) and a long list of them costs one extra walk at most.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(3);

/// Whether start-up walks the list once more (pure): some broker of the round did not answer
/// in time (a refusal or a closed port would not change), and the patience is not spent.
pub fn another_round(round: &[LinkError], elapsed: Duration) -> bool {
    elapsed < STARTUP_PATIENCE && round.iter().any(|e| matches!(e, LinkError::Timeout { .. }))
}

/// What follows a refused connect that `moves_on` says the next broker would refuse too.
pub const STAY: Next = Next {
    moved: None,
    backoff: true,
};

/// Where a reload to `new` leaves a consumer on broker `at` of `old`: `Some(index in new)`
/// when only the list changed and the broker in use is still on it (same URL, password
/// included), so the consumer stays; `None`: it switches to what the reload's preparer reached.
pub fn stays_on(old: &AmqpSettings, at: usize, new: &AmqpSettings) -> Option<usize> {
    let only_the_list = AmqpSettings {
        brokers: new.brokers.clone(),
        ..old.clone()
    } == *new;
    let current = old.broker(at);
    only_the_list
        .then(|| new.brokers.urls().iter().position(|u| u == current))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    /// Through the config, so the settings' other fields keep their defaults.
    fn settings(list: &str) -> AmqpSettings {
        let text = format!("[amqp]\nurl = {list}\n");
        let config = Config::parse(&text, Path::new("/etc/feed.ini"), Path::new("/")).unwrap();
        AmqpSettings::of(&config).unwrap()
    }

    fn timeout() -> LinkError {
        LinkError::Timeout {
            url: "amqp://mq1".into(),
            step: "bind the queue to the exchange",
            ms: 1500,
        }
    }

    #[test]
    fn start_up_walks_the_list_again_only_for_a_broker_that_was_slow_and_only_for_a_while() {
        let refused = LinkError::Nacked {
            url: "amqp://mq2".into(),
        };
        let early = Duration::from_secs(2);
        assert!(another_round(&[timeout()], early));
        assert!(another_round(&[refused, timeout()], early));
        assert!(!another_round(
            &[LinkError::Nacked {
                url: "amqp://mq2".into()
            }],
            early
        ));
        assert!(!another_round(&[timeout()], STARTUP_PATIENCE));
        assert!(!another_round(&[], early));
    }

    #[test]
    fn the_next_broker_at_once_and_the_backoff_after_a_full_round() {
        let mut b = Brokers::new(3, 0);
        let steps: Vec<Next> = (0..4).map(|_| b.failed()).collect();
        let moved: Vec<_> = steps.iter().map(|n| n.moved).collect();
        assert_eq!(
            moved,
            [Some((0, 1)), Some((1, 2)), Some((2, 0)), Some((0, 1))]
        );
        let backoff: Vec<_> = steps.iter().map(|n| n.backoff).collect();
        assert_eq!(backoff, [false, false, true, false]);
        assert_eq!(b.current(), 1);
    }

    #[test]
    fn a_success_starts_a_fresh_round() {
        let mut b = Brokers::new(2, 0);
        assert!(!b.failed().backoff);
        b.worked();
        // Broker 1 worked, then failed: broker 0 is tried at once, not after the backoff.
        assert_eq!(
            b.failed(),
            Next {
                moved: Some((1, 0)),
                backoff: false
            }
        );
    }

    #[test]
    fn one_broker_never_moves_and_always_backs_off() {
        let mut b = Brokers::new(1, 0);
        for _ in 0..3 {
            assert_eq!(
                b.failed(),
                Next {
                    moved: None,
                    backoff: true
                }
            );
        }
    }

    #[test]
    fn a_reload_keeps_the_broker_while_it_is_listed() {
        let old = settings("amqp://u:p@a/%2f, amqp://u:p@b/%2f, amqp://u:p@c/%2f");
        // On b: b is still listed (now first), so the consumer stays.
        let new = settings("amqp://u:p@b/%2f, amqp://u:p@d/%2f");
        assert_eq!(stays_on(&old, 1, &new), Some(0));
        // On a: a left the list.
        assert_eq!(stays_on(&old, 0, &new), None);
        // b with another password is a new target to prove.
        let new = settings("amqp://u:q@b/%2f, amqp://u:p@d/%2f");
        assert_eq!(stays_on(&old, 1, &new), None);
        // Another queue: every consumer switches.
        let mut other = settings("amqp://u:p@b/%2f");
        other.queue = "other".into();
        assert_eq!(stays_on(&old, 1, &other), None);
    }
}
