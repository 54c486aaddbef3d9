//! Which entry of an ordered failover list is in use, and how that changes (SPEC §9): stay
//! while it works; on a failure of the current entry, the next one in order, wrapping around.
//! Used for the `[mysql] host` list (pipeline/store) and the `[amqp] url` broker list
//! (input/amqp). Pure, no threads or I/O; each owner keeps one and is its only caller.

/// A move from one entry of the list to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: usize,
    pub to: usize,
    /// Every entry has failed since the last success (the caller's backoff is what spaces
    /// the rounds; this is for saying so once per round).
    pub full_round: bool,
}

/// Which entry of the list is in use, and how it changes: stay while it works; on a failure
/// of the current entry, the next one in order, wrapping around.
#[derive(Debug)]
pub struct Failover {
    len: usize,
    current: usize,
    /// Entries that failed since the last success.
    failed_in_round: usize,
}

impl Failover {
    /// The entry in use.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Starts at entry `current` of a list of `len` (at least 1).
    pub fn new(len: usize, current: usize) -> Failover {
        let len = len.max(1);
        Failover {
            len,
            current: current % len,
            failed_in_round: 0,
        }
    }

    /// Entry `host` failed for a reason to move. A failure reported for an entry that is no
    /// longer the current one (a connection older than the last move) changes nothing.
    pub fn failed(&mut self, host: usize) -> Option<Move> {
        if host != self.current {
            return None;
        }
        let from = self.current;
        self.current = (self.current + 1) % self.len;
        self.failed_in_round += 1;
        let full_round = self.failed_in_round >= self.len;
        if full_round {
            self.failed_in_round = 0;
        }
        Some(Move {
            from,
            to: self.current,
            full_round,
        })
    }

    /// The current entry worked (a write, a settled delivery): the next failure starts a
    /// fresh round.
    pub fn worked(&mut self) {
        self.failed_in_round = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_in_order_and_wraps() {
        let mut f = Failover::new(3, 0);
        assert_eq!(f.failed(0).map(|m| (m.from, m.to)), Some((0, 1)));
        assert_eq!(f.failed(1).map(|m| (m.from, m.to)), Some((1, 2)));
        let m = f.failed(2).unwrap();
        assert_eq!((m.from, m.to, m.full_round), (2, 0, true));
    }

    #[test]
    fn stale_failures_do_not_move_again() {
        let mut f = Failover::new(3, 0);
        assert!(f.failed(0).is_some());
        // Other workers' connections to host 0 fail too: they must not push past host 1.
        assert_eq!(f.failed(0), None);
        assert_eq!(f.failed(2), None);
        assert_eq!(f.failed(1).map(|m| (m.from, m.to)), Some((1, 2)));
    }

    #[test]
    fn sticks_to_a_working_host() {
        let mut f = Failover::new(2, 0);
        f.failed(0);
        f.worked();
        // Host 0 may be back: no move unless host 1 fails, and that starts a fresh round.
        assert_eq!(f.failed(0), None);
        let m = f.failed(1).unwrap();
        assert_eq!((m.from, m.to, m.full_round), (1, 0, false));
    }

    #[test]
    fn a_round_is_every_host_failing_without_a_success_between() {
        let mut f = Failover::new(2, 0);
        let mut at = 0;
        let mut fail = |f: &mut Failover| {
            let m = f.failed(at).unwrap();
            at = m.to;
            m.full_round
        };
        let rounds: Vec<bool> = (0..4).map(|_| fail(&mut f)).collect();
        assert_eq!(rounds, [false, true, false, true]);
        fail(&mut f);
        f.worked();
        assert!(!fail(&mut f));
    }

    #[test]
    fn a_single_host_is_its_own_round() {
        let mut f = Failover::new(1, 0);
        let m = f.failed(0).unwrap();
        assert_eq!((m.from, m.to, m.full_round), (0, 0, true));
    }
}
