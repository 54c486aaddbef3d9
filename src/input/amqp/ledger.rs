//! Which deliveries of one channel to acknowledge, and how (pure; no I/O).
//!
//! The consumer records every delivery tag it takes (`received`), marks it `done` once its
//! records are committed (or its dead letter confirmed), or `forget`s it (rejected, or never
//! queued). `acks` then says which `basic.ack` frames to send: the run of done tags at the
//! bottom of the window goes in one `multiple` ack; done tags above a tag still pending are
//! held (one multiple ack covers them once the gap closes) unless too many are held or the
//! channel is being drained, when each is acked on its own. A ledger belongs to one channel:
//! after a reconnect the consumer starts a new one (tags are per channel).
//!
//! `Window` is how many deliveries the broker may have in flight: after a connection error
//! the next channel takes one at a time until a delivery is acked, so a delivery that breaks
//! the connection (lapin refuses a frame larger than the negotiated `frame_max`) is the only
//! one redelivered: the others keep their delivery budget on a quorum queue, whose delivery
//! limit then retires the culprit, and on a classic queue the culprit is named in the log.

use std::collections::BTreeMap;

/// One `basic.ack` frame: `multiple` acks every unacked tag up to and including `tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub tag: u64,
    pub multiple: bool,
    /// Deliveries this frame acknowledges.
    pub deliveries: usize,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// Unacked deliveries of the channel: tag → done (committed or dead-lettered).
    open: BTreeMap<u64, bool>,
    done: usize,
    /// Most done tags held behind a pending one before they are acked one by one.
    hold_limit: usize,
}

impl Ledger {
    pub fn new(hold_limit: usize) -> Ledger {
        Ledger {
            open: BTreeMap::new(),
            done: 0,
            hold_limit: hold_limit.max(1),
        }
    }

    pub fn received(&mut self, tag: u64) {
        self.open.insert(tag, false);
    }

    /// The delivery may be acked (its records are committed, or its dead letter confirmed).
    pub fn done(&mut self, tag: u64) {
        if let Some(done) = self.open.get_mut(&tag) {
            if !*done {
                *done = true;
                self.done += 1;
            }
        }
    }

    /// The delivery needs no ack from us (rejected, or left to the broker to redeliver).
    pub fn forget(&mut self, tag: u64) {
        if self.open.remove(&tag) == Some(true) {
            self.done -= 1;
        }
    }

    /// Deliveries taken and not yet done.
    pub fn pending(&self) -> usize {
        self.open.len() - self.done
    }

    /// Deliveries taken and not acked yet (pending or done).
    pub fn unacked(&self) -> usize {
        self.open.len()
    }

    /// The acks to send now; the ledger forgets what they cover. `drain`: ack every done tag
    /// now, held or not (the channel is about to close).
    pub fn acks(&mut self, drain: bool) -> Vec<Ack> {
        let mut acks = Vec::new();
        let prefix: Vec<u64> = self
            .open
            .iter()
            .take_while(|(_, done)| **done)
            .map(|(tag, _)| *tag)
            .collect();
        if let Some(&last) = prefix.last() {
            for tag in &prefix {
                self.open.remove(tag);
            }
            self.done -= prefix.len();
            acks.push(Ack {
                tag: last,
                multiple: prefix.len() > 1,
                deliveries: prefix.len(),
            });
        }
        if self.done > 0 && (drain || self.done > self.hold_limit) {
            let held: Vec<u64> = self
                .open
                .iter()
                .filter(|(_, done)| **done)
                .map(|(tag, _)| *tag)
                .collect();
            for tag in held {
                self.open.remove(&tag);
                acks.push(Ack {
                    tag,
                    multiple: false,
                    deliveries: 1,
                });
            }
            self.done = 0;
        }
        acks
    }
}

/// Losses in a row, each on a window of one before anything arrived, after which the head of
/// the queue is the delivery that breaks the connection.
pub const CULPRIT_STREAK: u32 = 3;

/// The prefetch window after faults (pure).
#[derive(Debug)]
pub struct Window {
    full: u16,
    narrow: bool,
    /// A delivery arrived on the current channel.
    arrived: bool,
    /// Losses in a row on a window of one with nothing arrived.
    streak: u32,
}

/// What a lost connection means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    /// The first loss since deliveries were last acked: a new outage (log it, reset backoff).
    pub new_outage: bool,
    /// Losses in a row that the delivery at the head of the queue caused, as far as can be
    /// told (a window of one, nothing arrived).
    pub streak: u32,
}

impl Window {
    pub fn new(full: u16) -> Window {
        Window {
            full: full.max(1),
            narrow: false,
            arrived: false,
            streak: 0,
        }
    }

    /// The prefetch for the next channel.
    pub fn prefetch(&self) -> u16 {
        if self.narrow {
            1
        } else {
            self.full
        }
    }

    /// A delivery arrived on the current channel.
    pub fn arrived(&mut self) {
        self.arrived = true;
    }

    /// The connection broke: the next channel takes one delivery at a time.
    pub fn lost(&mut self) -> Loss {
        let new_outage = !self.narrow;
        if self.narrow && !self.arrived {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        self.narrow = true;
        self.arrived = false;
        Loss {
            new_outage,
            streak: self.streak,
        }
    }

    /// A delivery was acked; `Some(full)` once, when the window may open again.
    pub fn acked(&mut self) -> Option<u16> {
        self.streak = 0;
        if self.narrow {
            self.narrow = false;
            (self.full > 1).then_some(self.full)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_of_one_after_a_loss_until_an_ack() {
        let mut w = Window::new(200);
        assert_eq!(w.prefetch(), 200);
        w.arrived();
        assert_eq!(
            w.lost(),
            Loss {
                new_outage: true,
                streak: 0
            },
            "deliveries had arrived: no suspect"
        );
        assert_eq!(w.prefetch(), 1);
        for streak in 1..=CULPRIT_STREAK {
            let loss = w.lost();
            assert!(!loss.new_outage, "still the same outage");
            assert_eq!(loss.streak, streak, "nothing arrived on a window of one");
        }
        w.arrived();
        assert_eq!(
            w.lost().streak,
            0,
            "a delivery arrived: the head got through"
        );
        assert_eq!(w.acked(), Some(200));
        assert_eq!(w.prefetch(), 200);
        assert_eq!(w.acked(), None, "already open");
        assert!(w.lost().new_outage);
    }

    #[test]
    fn a_window_of_one_stays_one() {
        let mut w = Window::new(1);
        w.lost();
        assert_eq!(w.acked(), None, "nothing to widen");
        assert_eq!(w.prefetch(), 1);
    }

    fn ledger(tags: std::ops::RangeInclusive<u64>, hold: usize) -> Ledger {
        let mut l = Ledger::new(hold);
        for t in tags {
            l.received(t);
        }
        l
    }

    #[test]
    fn a_done_prefix_is_one_multiple_ack() {
        let mut l = ledger(1..=5, 10);
        for t in [2, 1, 3] {
            l.done(t);
        }
        assert_eq!(
            l.acks(false),
            vec![Ack {
                tag: 3,
                multiple: true,
                deliveries: 3
            }]
        );
        assert_eq!(l.pending(), 2);
        assert_eq!(l.acks(false), vec![], "nothing more is done");
        l.done(4);
        assert_eq!(
            l.acks(false),
            vec![Ack {
                tag: 4,
                multiple: false,
                deliveries: 1
            }],
            "a single tag needs no multiple"
        );
    }

    #[test]
    fn done_tags_behind_a_pending_one_wait_for_the_gap() {
        let mut l = ledger(1..=6, 10);
        for t in [2, 3, 5] {
            l.done(t);
        }
        assert_eq!(
            l.acks(false),
            vec![],
            "tag 1 is pending: a multiple ack would cover it"
        );
        l.done(1);
        assert_eq!(
            l.acks(false),
            vec![Ack {
                tag: 3,
                multiple: true,
                deliveries: 3
            }]
        );
        l.done(4);
        l.done(6);
        assert_eq!(
            l.acks(false),
            vec![Ack {
                tag: 6,
                multiple: true,
                deliveries: 3
            }]
        );
        assert_eq!(l.unacked(), 0);
    }

    #[test]
    fn too_many_held_or_a_drain_acks_them_one_by_one() {
        let mut l = ledger(1..=5, 2);
        for t in [2, 3, 4] {
            l.done(t);
        }
        let acks = l.acks(false);
        assert_eq!(
            acks.iter().map(|a| a.tag).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(acks.iter().all(|a| !a.multiple), "never over pending tag 1");
        l.done(5);
        assert_eq!(l.acks(false), vec![], "one held, under the limit");
        assert_eq!(l.acks(true).len(), 1, "a drain acks it");
        assert_eq!(l.pending(), 1);
    }

    #[test]
    fn forgotten_tags_leave_no_gap() {
        let mut l = ledger(1..=3, 10);
        l.forget(1); // rejected without requeue: the broker holds it no more
        l.done(2);
        l.done(3);
        assert_eq!(
            l.acks(false),
            vec![Ack {
                tag: 3,
                multiple: true,
                deliveries: 2
            }]
        );
        l.received(4);
        l.done(4);
        l.forget(4);
        assert_eq!(l.acks(true), vec![]);
        assert_eq!((l.pending(), l.unacked()), (0, 0));
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut l = ledger(1..=1, 10);
        l.done(7);
        l.done(1);
        l.done(1);
        assert_eq!(l.acks(false).len(), 1);
        assert_eq!(l.pending(), 0);
    }
}
