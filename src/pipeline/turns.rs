//! How many workers commit at once: one, unless a batch's worth is waiting.
//!
//! Measured here (2 cores, 16 clients × 1 message of 1 record in flight), interleaved: one
//! worker committed 22.2k / 21.8k / 21.0k records/s where two committed 18.3k / 19.4k / 19.1k.
//! A second worker woken for the few messages that arrive during a commit makes a second small
//! commit, a second wake and a second set of replies per cycle; on two cores each costs more
//! than waiting does, since what arrives during a commit rides the next batch anyway. With
//! deep windows or large messages a batch's worth waits and commits must overlap.
//!
//! So a worker holds a turn while it works, and keeps it between batches; another worker
//! takes one only when half a batch is queued, or when a commit has run longer than
//! `MAX_COMMIT` (slow or stuck on a lost host: ours costs nothing extra then). A worker gives
//! its turn back after a commit when another holds one and the queue is short again.
//! No threads of its own. The queue owns the turns: a waiting worker is woken when a turn
//! ends and when a push brings the queue to what is worth a commit; it also looks again every
//! `RECHECK`, for a commit that has outlasted `MAX_COMMIT`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A commit running longer than this no longer keeps other workers waiting.
pub const MAX_COMMIT: Duration = Duration::from_millis(10);

/// How often a waiting worker looks again without being woken (a commit outlasting
/// `MAX_COMMIT` wakes nobody).
const RECHECK: Duration = Duration::from_millis(2);

/// Records queued that are worth a commit of their own beside a running one (at most half a
/// batch): fewer ride the next batch for less than a second commit costs.
pub const WORTH_A_COMMIT: usize = 100;

/// What a worker sees when it decides whether to work now.
#[derive(Clone, Copy, Debug)]
pub struct Scene {
    /// Turns other workers hold.
    pub others: usize,
    /// Records queued.
    pub queued: usize,
    pub batch_size: usize,
    /// How long the oldest commit now at the database has run (zero: none).
    pub longest_commit: Duration,
    pub max_commit: Duration,
}

/// Whether to work now (pure): alone, or when half a batch is queued, or when another's
/// commit has outlasted `max_commit`.
pub fn may_work(s: Scene) -> bool {
    s.others == 0 || s.queued >= worth(s.batch_size) || s.longest_commit >= s.max_commit
}

/// Records queued that take a second worker, for this batch size.
fn worth(batch_size: usize) -> usize {
    WORTH_A_COMMIT.min(batch_size / 2).max(1)
}

struct State {
    turns: usize,
    /// Start of each commit at the database now.
    commits: Vec<Instant>,
}

/// The workers' turns, owned by the queue.
pub struct Turns {
    state: Mutex<State>,
    changed: Condvar,
    max_commit: Duration,
    /// Workers waiting for a turn, and the depth that would let one in: read on every push,
    /// so a push only takes the lock when it should wake somebody.
    waiting: AtomicUsize,
    worth: AtomicUsize,
}

impl Default for Turns {
    fn default() -> Turns {
        Turns::new(MAX_COMMIT)
    }
}

impl Turns {
    pub fn new(max_commit: Duration) -> Turns {
        Turns {
            state: Mutex::new(State {
                turns: 0,
                commits: Vec::new(),
            }),
            changed: Condvar::new(),
            max_commit,
            waiting: AtomicUsize::new(0),
            worth: AtomicUsize::new(usize::MAX),
        }
    }

    /// The queue now holds `queued` records: wakes waiting workers if that lets one in.
    /// (The waiter counts itself, then reads the depth; the pusher adds to the depth, then
    /// reads the count: SeqCst on both sides, so one of them sees the other.)
    pub fn grew(&self, queued: usize) {
        if self.waiting.load(Ordering::SeqCst) > 0 && queued >= self.worth.load(Ordering::SeqCst) {
            let _state = self.state.lock();
            self.changed.notify_all();
        }
    }

    fn scene(&self, state: &State, others: usize, queued: usize, batch_size: usize) -> Scene {
        let now = Instant::now();
        Scene {
            others,
            queued,
            batch_size,
            longest_commit: state
                .commits
                .iter()
                .map(|&started| now.saturating_duration_since(started))
                .max()
                .unwrap_or_default(),
            max_commit: self.max_commit,
        }
    }

    /// Waits until `may_work` says go (`queued` reads the queue's depth in records), then
    /// holds a turn until the returned `Turn` is dropped or given back.
    pub fn wait(&self, batch_size: usize, queued: impl Fn() -> usize) -> Turn<'_> {
        let mut state = self.state.lock();
        self.worth.store(worth(batch_size), Ordering::SeqCst);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        loop {
            let scene = self.scene(&state, state.turns, queued(), batch_size);
            if may_work(scene) {
                break;
            }
            self.changed.wait_for(&mut state, RECHECK);
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        state.turns += 1;
        Turn {
            turns: self,
            commit: None,
        }
    }
}

/// One worker's turn.
pub struct Turn<'a> {
    turns: &'a Turns,
    /// Start of this worker's commit, while it runs.
    commit: Option<Instant>,
}

impl Turn<'_> {
    /// This worker's commit is at the database from now until `committed`.
    pub fn committing(&mut self) {
        let started = Instant::now();
        self.turns.state.lock().commits.push(started);
        self.commit = Some(started);
    }

    pub fn committed(&mut self) {
        if let Some(started) = self.commit.take() {
            let mut state = self.turns.state.lock();
            if let Some(i) = state.commits.iter().position(|&s| s == started) {
                state.commits.swap_remove(i);
            }
        }
    }

    /// Keeps the turn for the next batch, or gives it back (`None`) when another worker
    /// holds one and the queue no longer needs two.
    pub fn keep(mut self, batch_size: usize, queued: usize) -> Option<Self> {
        self.committed();
        let state = self.turns.state.lock();
        let scene = self
            .turns
            .scene(&state, state.turns - 1, queued, batch_size);
        drop(state);
        may_work(scene).then_some(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.committed();
        let mut state = self.turns.state.lock();
        state.turns = state.turns.saturating_sub(1);
        self.turns.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn scene(others: usize, queued: usize, commit_ms: u64) -> Scene {
        Scene {
            others,
            queued,
            batch_size: 1000,
            longest_commit: Duration::from_millis(commit_ms),
            max_commit: MAX_COMMIT,
        }
    }

    #[test]
    fn alone_a_worker_works_at_once() {
        assert!(may_work(scene(0, 0, 0)));
    }

    #[test]
    fn a_short_queue_waits_for_the_worker_at_it() {
        assert!(!may_work(scene(1, 0, 0)));
        assert!(!may_work(scene(1, 99, 9)));
    }

    #[test]
    fn a_commit_s_worth_queued_takes_a_second_worker() {
        assert!(may_work(scene(1, 100, 0)));
        assert!(may_work(scene(2, 5000, 0)));
        // A small batch size lowers the bar to half a batch.
        assert!(may_work(Scene {
            batch_size: 10,
            ..scene(1, 5, 0)
        }));
        assert!(!may_work(Scene {
            batch_size: 10,
            ..scene(1, 4, 0)
        }));
    }

    #[test]
    fn a_commit_that_outlasts_max_commit_does_not_hold_others() {
        assert!(may_work(scene(1, 0, 10)));
    }

    #[test]
    fn a_second_worker_waits_until_the_first_gives_its_turn_back() {
        let turns = Arc::new(Turns::new(Duration::from_secs(600)));
        let first = turns.wait(1000, || 0);
        let (looked, seen) = crossbeam_channel::unbounded();
        let (started, start) = crossbeam_channel::bounded(1);
        let waiting = Arc::clone(&turns);
        let waiter = std::thread::spawn(move || {
            let _turn = waiting.wait(1000, || {
                let _ = looked.send(());
                0
            });
            let _ = started.send(());
        });
        // The waiter has read the queue and found the first worker's turn: it must wait.
        assert!(seen.recv_timeout(Duration::from_secs(5)).is_ok());
        assert!(start.try_recv().is_err(), "worked beside the first worker");
        drop(first);
        assert!(
            start.recv_timeout(Duration::from_secs(5)).is_ok(),
            "worked once the first gave its turn back"
        );
        assert!(waiter.join().is_ok());
        assert_eq!(turns.state.lock().turns, 0);
    }

    #[test]
    fn a_queue_that_fills_lets_a_second_worker_in() {
        let turns = Turns::new(Duration::from_secs(600));
        let _first = turns.wait(1000, || 0);
        let looks = std::sync::atomic::AtomicUsize::new(0);
        // A commit's worth is queued at the third look (the waiter reads the queue again).
        let _second = turns.wait(1000, || {
            if looks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 2 {
                10
            } else {
                100
            }
        });
        assert_eq!(turns.state.lock().turns, 2);
    }

    #[test]
    fn a_push_that_brings_a_commit_s_worth_wakes_the_waiting_worker() {
        let turns = Arc::new(Turns::new(Duration::from_secs(600)));
        let _first = turns.wait(1000, || 0);
        let depth = Arc::new(AtomicUsize::new(0));
        let (looked, seen) = crossbeam_channel::unbounded();
        let (waiting, queue) = (Arc::clone(&turns), Arc::clone(&depth));
        let waiter = std::thread::spawn(move || {
            let _turn = waiting.wait(1000, || {
                let _ = looked.send(());
                queue.load(Ordering::SeqCst)
            });
        });
        assert!(seen.recv_timeout(Duration::from_secs(5)).is_ok());
        depth.store(100, Ordering::SeqCst);
        turns.grew(100);
        assert!(waiter.join().is_ok());
        assert_eq!(turns.state.lock().turns, 1, "the waiter's turn has ended");
    }

    #[test]
    fn a_long_commit_lets_a_second_worker_in() {
        let turns = Turns::new(Duration::from_millis(1));
        let mut first = turns.wait(1000, || 0);
        first.committing();
        let _second = turns.wait(1000, || 0);
        assert_eq!(turns.state.lock().turns, 2);
    }

    #[test]
    fn after_a_commit_the_turn_is_kept_alone_and_given_back_beside_another() {
        let turns = Turns::new(Duration::from_secs(600));
        let first = turns.wait(1000, || 0);
        let first = first.keep(1000, 0).expect("alone: kept");
        let second = turns.wait(1000, || 600);
        assert_eq!(turns.waiting.load(Ordering::SeqCst), 0);
        assert!(
            first.keep(1000, 10).is_none(),
            "two, short queue: given back"
        );
        assert_eq!(turns.state.lock().turns, 1);
        assert!(
            second.keep(1000, 10).is_some(),
            "the other, alone again: kept"
        );
    }
}
