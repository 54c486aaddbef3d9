//! The queue between inputs and workers: one bound, in records (`queue_capacity`).
//!
//! Inputs push parsed messages (`Job`) through an `Intake`; workers pull them through a
//! `Take`. Each job carries its input's `ReplyTo` (an `Outbox` plus an opaque tag), so a worker
//! hands verdicts back without knowing any input's wire format, and several inputs (ZeroMQ,
//! AMQP) feed the same workers. When the queue is full, `push` gives the job back and the
//! input pauses; the worker whose take frees room wakes every paused input through its `Wake`
//! (no polling). The queue owns the depth; the metrics gauge only reads it. It also owns the
//! workers' turns (`turns`): how many of them pull and commit at once.
//!
//! Closing: the channel disconnects when every `Intake` is dropped, so workers drain what is
//! queued and end. No threads of its own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::pipeline::turns::{Turn, Turns};

pub use crate::message::{Job, Outbox, ReplyTo, Tag, Verdicts, Wake};

/// The outbox every input uses: verdicts go into a channel the input's own thread drains,
/// then its bell rings. (Fails only once that thread has returned: its clients resend, its
/// broker redelivers.)
pub struct ChannelOutbox {
    verdicts: Sender<Verdicts>,
    bell: Arc<dyn Wake>,
}

impl ChannelOutbox {
    /// The outbox, and the receiving end for the input's thread.
    pub fn open(bell: Arc<dyn Wake>) -> (Arc<dyn Outbox>, Receiver<Verdicts>) {
        let (verdicts, rx) = crossbeam_channel::unbounded();
        (Arc::new(ChannelOutbox { verdicts, bell }), rx)
    }
}

impl Outbox for ChannelOutbox {
    fn deliver(&self, verdicts: Verdicts) {
        if self.verdicts.send(verdicts).is_ok() {
            self.bell.wake();
        }
    }
}

/// `push` found no room: the job comes back, and the input is woken when room frees.
#[derive(Debug)]
pub struct Full(pub Job);

struct Paused {
    flag: Arc<AtomicBool>,
    wake: Arc<dyn Wake>,
}

/// The pause/wake handshake (an input sets its flag then reads the depth; a worker lowers the
/// depth then reads the flags) is store-then-load on both sides: SeqCst, or both could miss.
struct State {
    depth: AtomicUsize,
    capacity: AtomicUsize,
    /// Inputs registered for wake-ups; `any_paused` spares workers the lock when nobody waits.
    inputs: Mutex<Vec<Paused>>,
    any_paused: AtomicBool,
    /// How many workers pull at once.
    turns: Turns,
}

impl State {
    fn wake_paused(&self) {
        if !self.any_paused.swap(false, Ordering::SeqCst) {
            return;
        }
        for input in self.inputs.lock().iter() {
            if input.flag.swap(false, Ordering::SeqCst) {
                input.wake.wake();
            }
        }
    }

    fn has_room(&self, records: usize) -> bool {
        let depth = self.depth.load(Ordering::SeqCst);
        // An empty queue takes any message, so one larger than the capacity cannot stall.
        depth == 0 || depth + records <= self.capacity.load(Ordering::Relaxed)
    }
}

/// The queue's owner side (held by the server): makes intakes and takes, follows reloads.
pub struct Queue {
    state: Arc<State>,
    tx: Option<Sender<Job>>,
    rx: Receiver<Job>,
}

impl Queue {
    pub fn new(capacity_records: usize) -> Queue {
        let (tx, rx) = crossbeam_channel::unbounded();
        Queue {
            state: Arc::new(State {
                depth: AtomicUsize::new(0),
                capacity: AtomicUsize::new(capacity_records.max(1)),
                inputs: Mutex::new(Vec::new()),
                any_paused: AtomicBool::new(false),
                turns: Turns::default(),
            }),
            tx: Some(tx),
            rx,
        }
    }

    /// A push handle for one input; `wake` is called when the input paused and room frees.
    pub fn intake(&self, wake: Arc<dyn Wake>) -> Option<Intake> {
        let tx = self.tx.as_ref()?.clone();
        let flag = Arc::new(AtomicBool::new(false));
        self.state.inputs.lock().push(Paused {
            flag: Arc::clone(&flag),
            wake,
        });
        Some(Intake {
            tx,
            state: Arc::clone(&self.state),
            paused: flag,
        })
    }

    /// A pull handle for one worker.
    pub fn take(&self) -> Take {
        Take {
            rx: self.rx.clone(),
            state: Arc::clone(&self.state),
        }
    }

    /// Drops the owner's own sender: from now on only the intakes keep the queue open.
    pub fn seal(&mut self) {
        self.tx = None;
    }

    /// Follows a reloaded `queue_capacity`; a larger one wakes paused inputs at once.
    pub fn set_capacity(&self, capacity_records: usize) {
        self.state
            .capacity
            .store(capacity_records.max(1), Ordering::Relaxed);
        self.state.wake_paused();
    }

    /// A reader of the depth in records (for the metrics gauge and status lines).
    pub fn depth_reader(&self) -> DepthReader {
        DepthReader(Arc::clone(&self.state))
    }
}

/// Reads the queue depth without any control over the queue.
#[derive(Clone)]
pub struct DepthReader(Arc<State>);

impl DepthReader {
    pub fn records(&self) -> usize {
        self.0.depth.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity.load(Ordering::Relaxed)
    }
}

/// An input's push handle. Dropping every intake closes the queue.
pub struct Intake {
    tx: Sender<Job>,
    state: Arc<State>,
    paused: Arc<AtomicBool>,
}

impl Intake {
    /// Whether a message of `records` would be taken now (the input reads only while true).
    /// When not, the input is woken once room frees.
    pub fn has_room(&self, records: usize) -> bool {
        if self.state.has_room(records) {
            return true;
        }
        self.paused.store(true, Ordering::SeqCst);
        self.state.any_paused.store(true, Ordering::SeqCst);
        // Room may have freed between the check and the flag: look once more.
        if self.state.has_room(records) {
            self.paused.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Queues `job`, or gives it back when full; the input is then woken once room frees.
    pub fn push(&self, job: Job) -> Result<(), Full> {
        let n = job.records.len();
        if !self.has_room(n) {
            return Err(Full(job));
        }
        let depth = self.state.depth.fetch_add(n, Ordering::SeqCst) + n;
        if let Err(e) = self.tx.send(job) {
            // Unreachable while this intake lives (the queue owns a receiver), but never lose
            // the count if it happens.
            self.state.depth.fetch_sub(n, Ordering::SeqCst);
            return Err(Full(e.0));
        }
        self.state.turns.grew(depth);
        Ok(())
    }
}

impl Intake {
    /// Queues `job`, or keeps it in `held` when full (the input reads nothing more until it
    /// is woken and `retry` queues it).
    pub fn push_or_hold(&self, job: Job, held: &mut Option<Job>) {
        if let Err(Full(job)) = self.push(job) {
            *held = Some(job);
        }
    }

    /// Queues the held job if there is room now.
    pub fn retry(&self, held: &mut Option<Job>) {
        if let Some(job) = held.take() {
            self.push_or_hold(job, held);
        }
    }
}

/// A worker's pull handle: the channel, plus `taken` to free room after a batch is gathered.
pub struct Take {
    pub rx: Receiver<Job>,
    state: Arc<State>,
}

impl Take {
    /// Records queued now (a batch being gathered included).
    pub fn queued(&self) -> usize {
        self.state.depth.load(Ordering::SeqCst)
    }

    /// Waits until this worker may pull and commit (`Turns`); the turn lasts until it is
    /// dropped or not kept.
    pub fn turn(&self, batch_size: usize) -> Turn<'_> {
        self.state.turns.wait(batch_size, || self.queued())
    }

    /// Frees `records` of room (called once a batch is gathered) and wakes paused inputs.
    pub fn taken(&self, records: usize) {
        self.state.depth.fetch_sub(records, Ordering::SeqCst);
        self.state.wake_paused();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Record, Volume};
    use std::time::Instant;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    struct Drop_;
    impl Outbox for Drop_ {
        fn deliver(&self, _: Verdicts) {}
    }

    fn job(records: usize) -> Job {
        let r = Record {
            ticket: 1,
            login: 1,
            volume: Volume(1),
        };
        Job {
            records: vec![r; records],
            received: Instant::now(),
            reply: ReplyTo {
                outbox: Arc::new(Drop_),
                tag: Box::new(()),
            },
        }
    }

    #[test]
    fn bound_in_records_pauses_and_wakes() {
        let mut q = Queue::new(10);
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let intake = q.intake(woken.clone()).unwrap();
        q.seal();
        let take = q.take();
        intake.push(job(6)).unwrap();
        assert!(intake.has_room(4));
        assert!(intake.push(job(6)).is_err(), "6 + 6 > 10 records");
        assert_eq!(q.depth_reader().records(), 6);
        let got = take.rx.recv().unwrap();
        take.taken(got.records.len());
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            1,
            "the paused input was woken"
        );
        take.taken(0);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "woken once per pause");
        intake.push(job(6)).unwrap();
        intake.push(job(4)).unwrap();
        assert!(!intake.has_room(1), "full: the input pauses");
        let got = take.rx.recv().unwrap();
        take.taken(got.records.len());
        assert_eq!(woken.0.load(Ordering::SeqCst), 2, "woken when room frees");
    }

    #[test]
    fn an_oversized_message_passes_an_empty_queue_and_capacity_follows_reload() {
        let q = Queue::new(4);
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let intake = q.intake(woken.clone()).unwrap();
        intake.push(job(9)).unwrap();
        assert!(intake.push(job(1)).is_err());
        q.set_capacity(100);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        intake.push(job(1)).unwrap();
        assert_eq!(q.depth_reader().records(), 10);
    }

    #[test]
    fn dropping_every_intake_closes_the_queue() {
        let mut q = Queue::new(4);
        let intake = q.intake(Arc::new(Count(AtomicUsize::new(0)))).unwrap();
        q.seal();
        let take = q.take();
        intake.push(job(1)).unwrap();
        drop(intake);
        assert!(take.rx.recv().is_ok(), "queued work is still drained");
        assert!(take.rx.recv().is_err(), "then the queue is closed");
    }
}
