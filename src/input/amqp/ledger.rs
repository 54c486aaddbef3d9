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
//! the next channel takes one at a time until the deliveries the lost channel had in hand and
//! one more are settled, so a delivery that breaks the connection (lapin refuses a frame
//! larger than the negotiated `frame_max`) is the only one redelivered while it is at the
//! head: the others keep their delivery budget on a quorum queue, whose delivery limit then
//! retires the culprit, and on a classic queue the culprit is named in the log.

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

/// Losses in a row, each on a window of one with nothing unsettled, after which the head of
/// the queue is the delivery that breaks the connection.
pub const CULPRIT_STREAK: u32 = 2;

/// How long a window of one waits for a delivery before the queue counts as drained.
pub const QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// The prefetch window after faults (pure). A loss narrows it to one delivery until as many
/// deliveries were settled (acked, or rejected) as the lost channel may have had in flight
/// (the full window: lapin drops what it buffered, so the count it handed over says little),
/// plus one; or until the queue is drained (`quiet`). Those come back first, one at a time,
/// then the culprit alone, then the rest.
#[derive(Debug)]
pub struct Window {
    full: u16,
    /// Settlements still due on a window of one (0: open).
    narrow_for: u64,
    /// Deliveries arrived on the current channel and not settled yet.
    unsettled: u64,
    /// Losses in a row on a window of one with nothing unsettled.
    streak: u32,
}

/// What a lost connection means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    /// The window was open: a new outage (log it, reset the backoff).
    pub new_outage: bool,
    /// Losses in a row that the delivery at the head of the queue caused, as far as can be
    /// told (a window of one, everything that arrived settled).
    pub streak: u32,
}

impl Window {
    pub fn new(full: u16) -> Window {
        Window {
            full: full.max(1),
            narrow_for: 0,
            unsettled: 0,
            streak: 0,
        }
    }

    /// The prefetch for the next channel.
    pub fn prefetch(&self) -> u16 {
        if self.narrow_for > 0 {
            1
        } else {
            self.full
        }
    }

    /// A delivery arrived on the current channel.
    pub fn arrived(&mut self) {
        self.unsettled += 1;
    }

    /// The connection broke: the next channel takes one delivery at a time.
    pub fn lost(&mut self) -> Loss {
        let new_outage = self.narrow_for == 0;
        if !new_outage && self.unsettled == 0 {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        let in_flight = if new_outage { u64::from(self.full) } else { 0 };
        self.narrow_for = self.narrow_for.max(in_flight).max(self.unsettled + 1);
        self.unsettled = 0;
        Loss {
            new_outage,
            streak: self.streak,
        }
    }

    /// `n` deliveries were settled; `Some(full)` once, when the window opens again (the
    /// outage is over).
    pub fn settled(&mut self, n: u64) -> Option<u16> {
        self.unsettled = self.unsettled.saturating_sub(n);
        self.streak = 0;
        if self.narrow_for == 0 {
            return None;
        }
        self.narrow_for = self.narrow_for.saturating_sub(n);
        (self.narrow_for == 0).then_some(self.full)
    }

    /// A window of one with nothing unsettled has waited `QUIET` for a delivery on a live
    /// channel: the queue is drained, nothing breaks the connection; `Some(full)`: open it.
    pub fn quiet(&mut self) -> Option<u16> {
        if self.narrow_for == 0 || self.unsettled > 0 {
            return None;
        }
        self.narrow_for = 0;
        self.streak = 0;
        Some(self.full)
    }

    pub fn is_narrow(&self) -> bool {
        self.narrow_for > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_of_one_until_the_lost_window_is_settled() {
        let mut w = Window::new(60);
        assert_eq!(w.prefetch(), 60);
        for _ in 0..50 {
            w.arrived();
        }
        w.settled(10);
        let loss = w.lost();
        assert_eq!(
            loss,
            Loss {
                new_outage: true,
                streak: 0
            },
            "deliveries were unsettled: no suspect"
        );
        assert_eq!(w.prefetch(), 1);
        // What came before the culprit comes back one at a time.
        for _ in 0..40 {
            w.arrived();
            assert_eq!(w.settled(1), None);
            assert_eq!(w.prefetch(), 1);
        }
        // Then the culprit, alone, again and again.
        for streak in 1..=CULPRIT_STREAK {
            let loss = w.lost();
            assert!(!loss.new_outage, "still the same outage");
            assert_eq!(loss.streak, streak, "nothing unsettled on a window of one");
        }
        // Retired: the rest of the lost window, one at a time.
        for _ in 0..19 {
            w.arrived();
            assert_eq!(w.settled(1), None);
        }
        w.arrived();
        assert_eq!(w.settled(1), Some(60));
        assert_eq!(w.prefetch(), 60);
        assert_eq!(w.settled(1), None, "already open");
        assert!(w.lost().new_outage);
    }

    #[test]
    fn a_drained_queue_opens_the_window() {
        let mut w = Window::new(2000);
        w.lost();
        w.arrived();
        assert_eq!(w.quiet(), None, "a delivery in hand");
        w.settled(1);
        assert_eq!(w.quiet(), Some(2000));
        assert_eq!(w.prefetch(), 2000);
        assert_eq!(w.quiet(), None, "already open");
    }

    #[test]
    fn a_loss_with_a_delivery_in_hand_is_no_suspect() {
        let mut w = Window::new(1);
        w.lost();
        w.arrived();
        assert_eq!(w.lost().streak, 0, "the one in hand got through");
        assert_eq!(w.lost().streak, 1);
        w.arrived();
        w.settled(1);
        assert_eq!(w.prefetch(), 1, "two losses each ask for one past them");
        w.arrived();
        assert_eq!(w.settled(1), Some(1));
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
