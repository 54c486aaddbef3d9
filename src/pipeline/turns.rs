//! How many workers commit at once: one, unless a commit's worth is queued per worker at work.
//!
//! Measured here (2 cores, 16 clients × 1 message of 1 record in flight), interleaved: one
//! worker committed 22.2k / 21.8k / 21.0k records/s where two committed 18.3k / 19.4k / 19.1k.
//! A second worker woken for the few messages that arrive during a commit makes a second small
//! commit, a second wake and a second set of replies per cycle; on two cores each costs more
//! than waiting does, since what arrives during a commit rides the next batch anyway. With
//! deep windows or large messages there is a commit's worth for each, and commits overlap.
//!
//! So a worker holds a turn while it works, and keeps it between batches. Another takes one
//! when `WORTH_A_COMMIT` records per worker at work are queued, or for each commit that has run
//! past `MAX_COMMIT` (a slow or remote database, a lost host: overlapping costs nothing then).
//! After a commit a worker gives its turn back when the others' turns suffice.
//! No threads of its own; the queue owns the turns. A waiting worker is woken when a turn is
//! given back and when a push brings the queue to a commit's worth; it looks again when a
//! running commit would pass `MAX_COMMIT`, and every `IDLE_RECHECK` when none runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A commit running longer than this lets one more worker in: local commits of small batches
/// take 0.1–0.5 ms here, 1,000 rows about 2 ms; a remote database's round trips take longer.
pub const MAX_COMMIT: Duration = Duration::from_millis(2);

/// Records queued, per worker already at work, that are worth one more commit beside theirs
/// (at most half a batch): fewer ride the next batch for less than a second commit costs.
pub const WORTH_A_COMMIT: usize = 100;

/// When no commit runs, a waiting worker still looks every so often (a commit that starts and
/// stalls wakes nobody); while one runs it looks when that commit would pass `MAX_COMMIT`.
const IDLE_RECHECK: Duration = Duration::from_millis(100);

/// What a worker sees when it decides whether to work now.
#[derive(Clone, Copy, Debug)]
pub struct Scene {
    /// Turns other workers hold.
    pub others: usize,
    /// Of their commits, those running longer than `MAX_COMMIT`.
    pub overdue: usize,
    /// Records queued.
    pub queued: usize,
    pub batch_size: usize,
}

/// Whether to work now (pure): when no other worker is at work but for overdue commits, or
/// when the queue holds a commit's worth for each that is.
pub fn may_work(s: Scene) -> bool {
    let at_work = s.others.saturating_sub(s.overdue);
    at_work == 0 || s.queued >= worth(s.batch_size).saturating_mul(at_work)
}

/// Records queued that are worth one more commit, for this batch size.
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
    idle_recheck: Duration,
    /// Workers waiting for a turn, and the depth that would let one in: read on every push,
    /// so a push only takes the lock when it should wake somebody.
    waiting: AtomicUsize,
    worth: AtomicUsize,
}

impl Default for Turns {
    fn default() -> Turns {
        Turns::new(MAX_COMMIT, IDLE_RECHECK)
    }
}

impl Turns {
    pub fn new(max_commit: Duration, idle_recheck: Duration) -> Turns {
        Turns {
            state: Mutex::new(State {
                turns: 0,
                commits: Vec::new(),
            }),
            changed: Condvar::new(),
            max_commit,
            idle_recheck,
            waiting: AtomicUsize::new(0),
            worth: AtomicUsize::new(usize::MAX),
        }
    }

    /// The queue now holds `queued` records: wakes one waiting worker if that may let it in.
    /// (The waiter counts itself, then reads the depth; the pusher adds to the depth, then
    /// reads the count: SeqCst on both sides, so one of them sees the other.)
    pub fn grew(&self, queued: usize) {
        if self.waiting.load(Ordering::SeqCst) > 0 && queued >= self.worth.load(Ordering::SeqCst) {
            let _state = self.state.lock();
            self.changed.notify_one();
        }
    }

    /// What a worker sees, `others` holding turns; and how long until a running commit would
    /// turn overdue (`None`: none runs).
    fn scene(
        &self,
        state: &State,
        others: usize,
        queued: usize,
        batch_size: usize,
    ) -> (Scene, Option<Duration>) {
        let now = Instant::now();
        let ran = state
            .commits
            .iter()
            .map(|&started| now.saturating_duration_since(started));
        let overdue = ran.clone().filter(|&d| d >= self.max_commit).count();
        let next_overdue = ran
            .filter(|&d| d < self.max_commit)
            .map(|d| self.max_commit - d)
            .min();
        let scene = Scene {
            others,
            overdue,
            queued,
            batch_size,
        };
        (scene, next_overdue)
    }

    /// Waits until `may_work` says go (`queued` reads the queue's depth in records, and
    /// `batch_size` is read once, when the wait begins), then holds a turn until the returned
    /// `Turn` is dropped or not kept.
    pub fn wait(&self, batch_size: usize, queued: impl Fn() -> usize) -> Turn<'_> {
        let mut state = self.state.lock();
        self.worth.store(worth(batch_size), Ordering::SeqCst);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        loop {
            let (scene, next_overdue) = self.scene(&state, state.turns, queued(), batch_size);
            if may_work(scene) {
                break;
            }
            let timeout = next_overdue.unwrap_or(self.idle_recheck);
            self.changed.wait_for(&mut state, timeout);
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
    /// This worker's commit is at the database from now until `keep` (or the drop).
    pub fn committing(&mut self) {
        let started = Instant::now();
        self.turns.state.lock().commits.push(started);
        self.commit = Some(started);
    }

    fn end_commit(&mut self, state: &mut State) {
        if let Some(started) = self.commit.take() {
            if let Some(i) = state.commits.iter().position(|&s| s == started) {
                state.commits.swap_remove(i);
            }
        }
    }

    /// Ends the commit, then keeps the turn for the next batch, or gives it back (`None`) when
    /// the others' turns suffice for what is queued. Decided and done under one lock, so two
    /// workers ending at once cannot both give theirs back.
    pub fn keep(mut self, batch_size: usize, queued: usize) -> Option<Self> {
        let turns = self.turns;
        let mut state = turns.state.lock();
        self.end_commit(&mut state);
        let (scene, _) = turns.scene(&state, state.turns - 1, queued, batch_size);
        if may_work(scene) {
            drop(state);
            return Some(self);
        }
        state.turns -= 1;
        turns.changed.notify_one();
        drop(state);
        // Given back above: the drop must not give it back again (a turn holds nothing else).
        std::mem::forget(self);
        None
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut state = self.turns.state.lock();
        self.end_commit(&mut state);
        state.turns = state.turns.saturating_sub(1);
        self.turns.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Turns whose waiters look again only when woken (a wake-up path that is missing hangs
    /// the waiter instead of being covered by a timed look).
    fn woken_only() -> Turns {
        Turns::new(Duration::from_secs(600), Duration::from_secs(600))
    }

    fn scene(others: usize, overdue: usize, queued: usize) -> Scene {
        Scene {
            others,
            overdue,
            queued,
            batch_size: 1000,
        }
    }

    #[test]
    fn alone_a_worker_works_at_once() {
        assert!(may_work(scene(0, 0, 0)));
    }

    #[test]
    fn a_short_queue_waits_for_the_worker_at_it() {
        assert!(!may_work(scene(1, 0, 0)));
        assert!(!may_work(scene(1, 0, 99)));
    }

    #[test]
    fn each_worker_more_takes_another_commit_s_worth_queued() {
        assert!(may_work(scene(1, 0, 100)));
        assert!(!may_work(scene(2, 0, 199)), "a third needs 200");
        assert!(may_work(scene(2, 0, 200)));
        // A small batch size lowers the bar to half a batch.
        let small = |queued| Scene {
            batch_size: 10,
            ..scene(1, 0, queued)
        };
        assert!(may_work(small(5)));
        assert!(!may_work(small(4)));
    }

    #[test]
    fn each_overdue_commit_lets_one_more_worker_in() {
        assert!(may_work(scene(1, 1, 0)));
        assert!(!may_work(scene(2, 1, 0)), "one overdue, one at work");
        assert!(may_work(scene(2, 2, 0)));
    }

    #[test]
    fn a_second_worker_waits_until_the_first_gives_its_turn_back() {
        let turns = Arc::new(woken_only());
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
        // The waiter read the queue under the lock and decided before letting it go: once we
        // hold the lock, its decision shows in the count.
        assert!(seen.recv_timeout(Duration::from_secs(5)).is_ok());
        assert_eq!(
            turns.state.lock().turns,
            1,
            "worked beside the first worker"
        );
        drop(first);
        assert!(
            start.recv_timeout(Duration::from_secs(5)).is_ok(),
            "worked once the first gave its turn back"
        );
        assert!(waiter.join().is_ok());
        assert_eq!(turns.state.lock().turns, 0);
    }

    #[test]
    fn a_push_that_brings_a_commit_s_worth_wakes_the_waiting_worker() {
        let turns = Arc::new(woken_only());
        let _first = turns.wait(1000, || 0);
        let depth = Arc::new(AtomicUsize::new(0));
        let (looked, seen) = crossbeam_channel::unbounded();
        let (started, start) = crossbeam_channel::bounded(1);
        let (waiting, queue) = (Arc::clone(&turns), Arc::clone(&depth));
        std::thread::spawn(move || {
            let _turn = waiting.wait(1000, || {
                let _ = looked.send(());
                queue.load(Ordering::SeqCst)
            });
            let _ = started.send(());
        });
        assert!(seen.recv_timeout(Duration::from_secs(5)).is_ok());
        depth.store(99, Ordering::SeqCst);
        turns.grew(99);
        depth.store(100, Ordering::SeqCst);
        turns.grew(100);
        assert!(
            start.recv_timeout(Duration::from_secs(5)).is_ok(),
            "woken by the push"
        );
    }

    #[test]
    fn a_commit_that_runs_long_lets_a_second_worker_in() {
        let turns = Arc::new(Turns::new(
            Duration::from_millis(1),
            Duration::from_secs(600),
        ));
        let mut first = turns.wait(1000, || 0);
        first.committing();
        let (started, start) = crossbeam_channel::bounded(1);
        let waiting = Arc::clone(&turns);
        std::thread::spawn(move || {
            // Woken by its own timeout when the commit turns overdue, not by anybody.
            let turn = waiting.wait(1000, || 0);
            let _ = started.send(());
            std::mem::forget(turn);
        });
        assert!(start.recv_timeout(Duration::from_secs(5)).is_ok());
        assert_eq!(turns.state.lock().turns, 2);
    }

    #[test]
    fn after_a_commit_one_of_two_gives_its_turn_back_and_the_other_keeps_it() {
        let turns = woken_only();
        let first = turns.wait(1000, || 0).keep(1000, 0).expect("alone: kept");
        let second = turns.wait(1000, || 100);
        assert!(
            first.keep(1000, 10).is_none(),
            "two, short queue: given back"
        );
        assert_eq!(turns.state.lock().turns, 1);
        assert!(
            second.keep(1000, 10).is_some(),
            "the other, alone again: kept"
        );
        assert_eq!(turns.waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_queue_of_workers_drains_when_each_turn_ends() {
        let turns = Arc::new(woken_only());
        let first = turns.wait(1000, || 0);
        let (done, finished) = crossbeam_channel::unbounded();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (turns, done) = (Arc::clone(&turns), done.clone());
                std::thread::spawn(move || {
                    drop(turns.wait(1000, || 0));
                    let _ = done.send(());
                })
            })
            .collect();
        drop(first);
        for _ in 0..3 {
            assert!(finished.recv_timeout(Duration::from_secs(5)).is_ok());
        }
        for w in waiters {
            assert!(w.join().is_ok());
        }
        assert_eq!(turns.state.lock().turns, 0);
    }
}
