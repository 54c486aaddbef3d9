//! The one loop every input thread runs (the owner protocol): it owns the mailbox (verdicts
//! from workers, room freed in the queue, the main thread's requests), the intake with its
//! held message, the count of messages in flight, and the switch of a reload. An input
//! (`Input`: the ZeroMQ ROUTER, the AMQP consumer) supplies only "wait", "read one message",
//! "answer one verdict", "can I take more" (answers it could not send yet), and "prepare /
//! commit my part of a reload".
//!
//! A reload part walks: `prepare` (may fail: nothing changes) → reading stops while the
//! messages read so far are answered through the old resource (bounded by the drain the
//! main thread hands in) → `commit` (may fail: the input keeps, or goes back to, its old
//! settings) → the answer. A stop or finish cuts the wait short and abandons the part.
//! Stop and finish are flags, not letters, so they are seen at once in every state, and
//! reload parts wait in their channel, in order, while another part is switching.
//!
//! Threads: the caller's (one per input); `Handle` is used from the main thread, the bell
//! from workers and the queue.

use std::any::Any;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as Chan, Sender};

use crate::heartbeat::Heartbeat;
use crate::input::mailbox::Doorbell;
use crate::message::{Job, Outbox, Record, ReplyTo, Verdict, Verdicts, Wake};
use crate::metrics::Metrics;
use crate::pipeline::queue::{ChannelOutbox, Intake, Queue};

/// Most messages read in one go before the mailbox gets a turn (fairness to replies).
const READ_BURST: usize = 256;
/// Longest idle wait, so the thread turns (and shows it is alive) at least this often.
pub const IDLE_WAKE: Duration = Duration::from_millis(500);

/// What one wait saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    /// The bell rang: something is in the mailbox.
    pub mail: bool,
    /// Messages can be read from the input's source.
    pub readable: bool,
}

/// One message read from the source.
pub enum Taken<T> {
    /// Nothing (more) to read now.
    Nothing,
    /// Read, and nothing to answer (a ROUTER message without a body frame).
    Ignored,
    /// Read and refused at once (answered `FALSE`, dead-lettered): counted, not queued.
    Refused,
    /// Read and parsed: queue it; its verdict comes back with `tag`.
    Accepted {
        records: Vec<Record>,
        received: Instant,
        tag: T,
    },
}

/// An input's side of the protocol. Every method runs on the input's own thread.
pub trait Input {
    /// The reply address of one message (a ZeroMQ envelope, an AMQP delivery tag).
    type Tag: Send + 'static;
    /// A reload part as the main thread hands it (new settings, resources made for them).
    type Part: Send + 'static;
    /// A part made ready, waiting for the messages in flight to be answered.
    type Prepared;
    /// A fault that ends the thread (and the process, which the supervisor restarts).
    type Error: std::fmt::Display;

    /// For log lines.
    fn name(&self) -> &'static str;
    /// Waits up to `wait` for the bell (`bell` is its fd) or, when `reading`, for messages.
    fn wait(
        &mut self,
        bell: &Doorbell,
        reading: bool,
        wait: Duration,
    ) -> Result<Ready, Self::Error>;
    /// Reads one message, if one is ready.
    fn read_one(&mut self) -> Result<Taken<Self::Tag>, Self::Error>;
    /// Hands one verdict back (for a message of an older resource, the input drops it).
    fn answer(&mut self, tag: Self::Tag, verdict: Verdict);
    /// The input holds as many answers as it may (its peers read slowly): read no more
    /// messages until it has sent some. Its `wait` wakes when it can send again.
    fn backlog_full(&self) -> bool {
        false
    }
    /// After a round of `answer`s (an AMQP consumer sends its acks here).
    fn answered(&mut self) {}
    /// A message read but dropped before it was queued (intake stopped): no verdict comes.
    fn dropped(&mut self, _tag: Self::Tag) {}
    /// Once per loop turn: housekeeping such as reconnecting.
    fn tick(&mut self) {}
    /// Intake is stopped: take no more from the source (the driver reads no more either).
    fn stop(&mut self) {}
    /// Makes a part ready without disturbing serving; `None`: nothing to switch.
    fn prepare(&mut self, part: Self::Part) -> Result<Option<Self::Prepared>, String>;
    /// Switches to a prepared part; on error the old settings serve on.
    fn commit(&mut self, prepared: Self::Prepared) -> Result<(), String>;
    /// Sends what is still due and closes.
    fn finish(&mut self);
}

/// The answer to a reload part: `Ok` once applied, or why not (the old settings serve on).
pub type Answer = Result<(), String>;

struct Request<P> {
    part: P,
    /// How long the messages in flight may take to be answered through the old resource.
    drain: Duration,
    answer: Sender<Answer>,
}

const SERVING: u8 = 0;
const STOPPING: u8 = 1;
const FINISHING: u8 = 2;

/// The main thread's handle on a running input.
pub struct Handle<P> {
    requests: Sender<Request<P>>,
    state: Arc<AtomicU8>,
    bell: Arc<Doorbell>,
}

impl<P> Handle<P> {
    /// Hands the input its part of a reload; the answer comes on the returned channel once
    /// applied or refused (after at most `drain` plus the switch itself).
    pub fn apply(&self, part: P, drain: Duration) -> Chan<Answer> {
        let (answer, rx) = crossbeam_channel::bounded(1);
        if self
            .requests
            .send(Request {
                part,
                drain,
                answer,
            })
            .is_ok()
        {
            self.bell.wake();
        }
        rx
    }

    /// Stop reading new messages; keep answering those in flight.
    pub fn stop_intake(&self) {
        self.raise(STOPPING);
    }

    /// Send what is already answered, then return.
    pub fn finish(&self) {
        self.raise(FINISHING);
    }

    fn raise(&self, to: u8) {
        self.state.fetch_max(to, Ordering::SeqCst);
        self.bell.wake();
    }
}

/// A part waiting for the messages in flight to be answered.
struct Switch<T> {
    prepared: T,
    deadline: Instant,
    answer: Sender<Answer>,
}

/// The loop around one `Input`.
pub struct Driver<I: Input> {
    input: I,
    bell: Arc<Doorbell>,
    requests: Chan<Request<I::Part>>,
    state: Arc<AtomicU8>,
    verdicts: Chan<Verdicts>,
    outbox: Arc<dyn Outbox>,
    intake: Option<Intake>,
    /// A message that found the queue full; reading pauses until it is queued.
    held: Option<Job>,
    /// Messages queued (or held) and not answered yet.
    in_flight: usize,
    switching: Option<Switch<I::Prepared>>,
    metrics: Metrics,
    heartbeat: Heartbeat,
}

impl<I: Input> Driver<I> {
    /// The loop around `input`, with its intake on `queue`, and the main thread's handle.
    pub fn new(
        input: I,
        queue: &Queue,
        metrics: Metrics,
        heartbeat: Heartbeat,
    ) -> std::io::Result<(Driver<I>, Handle<I::Part>)> {
        let bell = Arc::new(Doorbell::new()?);
        let intake = queue.intake(Arc::clone(&bell) as Arc<dyn Wake>);
        let (outbox, verdicts) = ChannelOutbox::open(Arc::clone(&bell) as Arc<dyn Wake>);
        let (requests_tx, requests) = crossbeam_channel::unbounded();
        let state = Arc::new(AtomicU8::new(SERVING));
        let handle = Handle {
            requests: requests_tx,
            state: Arc::clone(&state),
            bell: Arc::clone(&bell),
        };
        let driver = Driver {
            input,
            bell,
            requests,
            state,
            verdicts,
            outbox,
            intake,
            held: None,
            in_flight: 0,
            switching: None,
            metrics,
            heartbeat,
        };
        Ok((driver, handle))
    }

    pub fn input(&self) -> &I {
        &self.input
    }

    /// Serves until told to finish, then sends what is due and returns the input.
    pub fn run(mut self) -> Result<I, I::Error> {
        let result = self.serve();
        self.input.finish();
        result.map(|()| self.input)
    }

    fn serve(&mut self) -> Result<(), I::Error> {
        loop {
            self.heartbeat.beat();
            let reading = self.switching.is_none() && self.has_room();
            let wait = match &self.switching {
                Some(s) => s.deadline.saturating_duration_since(Instant::now()),
                None => IDLE_WAKE,
            };
            let ready = self.input.wait(&self.bell, reading, wait.min(IDLE_WAKE))?;
            if ready.mail {
                self.bell.clear();
            }
            // Every turn, not only when the wait saw the bell: a source that is always ready
            // (a backlog of deliveries) may win every wait, and stop, finish and verdicts
            // must not wait for it to run dry. Each check is one atomic load or try_recv.
            self.settle();
            if self.obey_state() {
                self.settle();
                return Ok(());
            }
            self.retry_held();
            if ready.readable && reading {
                self.read_burst()?;
            }
            self.input.tick();
            self.advance_switch();
            if self.switching.is_none() {
                if self.intake.is_some() {
                    self.take_request();
                } else {
                    self.refuse_requests();
                }
            }
        }
    }

    fn has_room(&self) -> bool {
        self.held.is_none()
            && self.intake.as_ref().is_some_and(|i| i.has_room(1))
            && !self.input.backlog_full()
    }

    fn read_burst(&mut self) -> Result<(), I::Error> {
        for _ in 0..READ_BURST {
            // A stop is acted on between two messages (a refused one may cost a broker round
            // trip), not after the burst.
            if !self.has_room() || self.state.load(Ordering::SeqCst) >= STOPPING {
                return Ok(());
            }
            match self.input.read_one()? {
                Taken::Nothing => return Ok(()),
                Taken::Ignored => self.metrics.messages_received.inc(),
                Taken::Refused => {
                    self.metrics.messages_received.inc();
                    self.metrics.messages_rejected.inc();
                }
                Taken::Accepted {
                    records,
                    received,
                    tag,
                } => {
                    self.metrics.messages_received.inc();
                    self.enqueue(records, received, tag);
                }
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, records: Vec<Record>, received: Instant, tag: I::Tag) {
        let Some(intake) = &self.intake else {
            self.input.dropped(tag);
            return;
        };
        self.in_flight += 1;
        let job = Job {
            records,
            received,
            reply: ReplyTo {
                outbox: Arc::clone(&self.outbox),
                tag: Box::new(tag),
            },
        };
        intake.push_or_hold(job, &mut self.held);
    }

    fn retry_held(&mut self) {
        if let Some(intake) = &self.intake {
            intake.retry(&mut self.held);
        }
    }

    /// Hands every verdict delivered so far to the input.
    fn settle(&mut self) {
        let mut any = false;
        while let Ok(verdicts) = self.verdicts.try_recv() {
            for (tag, verdict) in verdicts {
                let Some(tag) = downcast::<I::Tag>(tag) else {
                    continue;
                };
                self.in_flight = self.in_flight.saturating_sub(1);
                self.input.answer(tag, verdict);
                any = true;
            }
        }
        if any {
            self.input.answered();
        }
    }

    /// Acts on a stop or finish; true when told to finish.
    fn obey_state(&mut self) -> bool {
        let state = self.state.load(Ordering::SeqCst);
        if state >= STOPPING && self.intake.is_some() {
            log::info!("{}: intake stopped, draining", self.input.name());
            // Dropping the intake lets workers finish the queue and exit.
            self.intake = None;
            if let Some(job) = self.held.take() {
                self.in_flight -= 1;
                if let Some(tag) = downcast::<I::Tag>(job.reply.tag) {
                    self.input.dropped(tag);
                }
            }
            self.input.stop();
            if let Some(s) = self.switching.take() {
                let _ = s.answer.send(Err("abandoned: shutting down".into()));
            }
            self.refuse_requests();
        }
        state == FINISHING
    }

    /// Starts the next reload part, if one came.
    fn take_request(&mut self) {
        let Ok(Request {
            part,
            drain,
            answer,
        }) = self.requests.try_recv()
        else {
            return;
        };
        match self.input.prepare(part) {
            Err(reason) => {
                let _ = answer.send(Err(reason));
            }
            Ok(None) => {
                let _ = answer.send(Ok(()));
            }
            Ok(Some(prepared)) => {
                if self.in_flight > 0 {
                    log::info!(
                        "{}: answering {} message(s) in flight before switching (at most {} ms)",
                        self.input.name(),
                        self.in_flight,
                        drain.as_millis()
                    );
                }
                self.switching = Some(Switch {
                    prepared,
                    deadline: Instant::now() + drain,
                    answer,
                });
                self.advance_switch();
            }
        }
    }

    /// Commits the switch under way once every message read before it is answered, or its
    /// drain is over (those left are not answered: clients resend, the broker redelivers).
    fn advance_switch(&mut self) {
        let due = self
            .switching
            .as_ref()
            .is_some_and(|s| self.in_flight == 0 || Instant::now() >= s.deadline);
        if !due {
            return;
        }
        let Some(Switch {
            prepared, answer, ..
        }) = self.switching.take()
        else {
            return;
        };
        if self.in_flight > 0 {
            log::warn!(
                "{}: {} message(s) of the old settings not answered in time; they are resent or redelivered",
                self.input.name(),
                self.in_flight
            );
        }
        let _ = answer.send(self.input.commit(prepared));
    }

    /// After a stop no part is applied: each waiting one is answered at once.
    fn refuse_requests(&mut self) {
        while let Ok(r) = self.requests.try_recv() {
            let _ = r.answer.send(Err("abandoned: shutting down".into()));
        }
    }
}

fn downcast<T: 'static>(tag: Box<dyn Any + Send>) -> Option<T> {
    tag.downcast::<T>().ok().map(|t| *t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Volume;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use parking_lot::Mutex;
    use std::collections::VecDeque;

    /// An input without a source of its own: the test feeds its inbox and reads its log.
    #[derive(Clone, Default)]
    struct Fake {
        inbox: Arc<Mutex<VecDeque<u32>>>,
        log: Arc<Mutex<Vec<String>>>,
        /// What `backlog_full` says.
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Fake {
        fn note(&self, line: String) {
            self.log.lock().push(line);
        }
        fn lines(&self) -> Vec<String> {
            self.log.lock().clone()
        }
    }

    impl Input for Fake {
        type Tag = u32;
        type Part = &'static str;
        type Prepared = &'static str;
        type Error = std::io::Error;

        fn name(&self) -> &'static str {
            "fake"
        }
        fn wait(
            &mut self,
            bell: &Doorbell,
            reading: bool,
            wait: Duration,
        ) -> std::io::Result<Ready> {
            let until = Instant::now() + wait;
            loop {
                let readable = reading && !self.inbox.lock().is_empty();
                let mut fds = [PollFd::new(bell.as_fd(), PollFlags::POLLIN)];
                let mail = poll(&mut fds, PollTimeout::from(5u8))? > 0;
                if mail || readable || Instant::now() >= until {
                    return Ok(Ready { mail, readable });
                }
            }
        }
        fn read_one(&mut self) -> std::io::Result<Taken<u32>> {
            Ok(match self.inbox.lock().pop_front() {
                Some(id) => Taken::Accepted {
                    records: vec![crate::message::Record {
                        ticket: u64::from(id),
                        login: 1,
                        volume: Volume(1),
                    }],
                    received: Instant::now(),
                    tag: id,
                },
                None => Taken::Nothing,
            })
        }
        fn answer(&mut self, tag: u32, _: Verdict) {
            self.note(format!("answer {tag}"));
        }
        fn backlog_full(&self) -> bool {
            self.full.load(Ordering::SeqCst)
        }
        fn prepare(&mut self, part: &'static str) -> Result<Option<&'static str>, String> {
            self.note(format!("prepare {part}"));
            Ok(Some(part))
        }
        fn commit(&mut self, part: &'static str) -> Result<(), String> {
            self.note(format!("commit {part}"));
            Ok(())
        }
        fn finish(&mut self) {
            self.note("finish".into());
        }
    }

    use std::os::fd::AsFd;

    struct Rig {
        fake: Fake,
        handle: Handle<&'static str>,
        take: crate::pipeline::queue::Take,
        thread: std::thread::JoinHandle<()>,
        _queue: Queue,
    }

    fn rig() -> Rig {
        let fake = Fake::default();
        let depth: crate::metrics::QueueDepth = Arc::new(|| (0, 0));
        let metrics = Metrics::new(depth).unwrap();
        let queue = Queue::new(100);
        let (driver, handle) =
            Driver::new(fake.clone(), &queue, metrics, Heartbeat::new("fake")).unwrap();
        let take = queue.take();
        let thread = std::thread::spawn(move || {
            let _ = driver.run();
        });
        Rig {
            fake,
            handle,
            take,
            thread,
            _queue: queue,
        }
    }

    impl Rig {
        /// Feeds messages and waits until they are queued.
        fn read(&self, ids: &[u32]) -> Vec<Job> {
            self.fake.inbox.lock().extend(ids);
            ids.iter()
                .map(|_| self.take.rx.recv_timeout(Duration::from_secs(5)).unwrap())
                .collect()
        }
        fn wait_for(&self, line: &str) {
            let until = Instant::now() + Duration::from_secs(5);
            while !self.fake.lines().iter().any(|l| l == line) {
                assert!(
                    Instant::now() < until,
                    "no `{line}` in {:?}",
                    self.fake.lines()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        fn answer(&self, job: Job) {
            let verdict = Verdict::Accept { inserted: 1 };
            job.reply.outbox.deliver(vec![(job.reply.tag, verdict)]);
        }
        fn stop(self) -> Vec<String> {
            self.handle.stop_intake();
            self.handle.finish();
            self.thread.join().unwrap();
            self.fake.lines()
        }
    }

    fn answered(rx: &Chan<Answer>) -> Answer {
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn a_switch_commits_once_every_message_read_before_it_is_answered() {
        let r = rig();
        let jobs = r.read(&[1, 2]);
        let answer = r.handle.apply("A", Duration::from_secs(30));
        assert!(
            answer.recv_timeout(Duration::from_millis(100)).is_err(),
            "two in flight"
        );
        for job in jobs {
            r.answer(job);
        }
        assert_eq!(answered(&answer), Ok(()));
        assert_eq!(
            r.stop(),
            ["prepare A", "answer 1", "answer 2", "commit A", "finish"]
        );
    }

    #[test]
    fn a_switch_commits_when_its_drain_is_over() {
        let r = rig();
        let _unanswered = r.read(&[1]);
        let answer = r.handle.apply("A", Duration::from_millis(50));
        assert_eq!(answered(&answer), Ok(()));
        assert_eq!(r.stop(), ["prepare A", "commit A", "finish"]);
    }

    #[test]
    fn a_stop_abandons_the_switch_and_every_part_waiting() {
        let r = rig();
        let _unanswered = r.read(&[1]);
        let first = r.handle.apply("A", Duration::from_secs(30));
        let second = r.handle.apply("B", Duration::from_secs(30));
        r.wait_for("prepare A");
        r.handle.stop_intake();
        assert_eq!(answered(&first), Err("abandoned: shutting down".into()));
        assert_eq!(answered(&second), Err("abandoned: shutting down".into()));
        assert_eq!(r.stop(), ["prepare A", "finish"]);
    }

    #[test]
    fn parts_wait_their_turn_while_one_is_switching() {
        let r = rig();
        let jobs = r.read(&[1]);
        let first = r.handle.apply("A", Duration::from_secs(30));
        let second = r.handle.apply("B", Duration::from_secs(30));
        assert!(
            second.recv_timeout(Duration::from_millis(100)).is_err(),
            "not refused"
        );
        for job in jobs {
            r.answer(job);
        }
        assert_eq!(answered(&first), Ok(()));
        assert_eq!(answered(&second), Ok(()));
        assert_eq!(
            r.stop(),
            [
                "prepare A",
                "answer 1",
                "commit A",
                "prepare B",
                "commit B",
                "finish"
            ]
        );
    }

    #[test]
    fn reading_pauses_during_a_switch() {
        let r = rig();
        let jobs = r.read(&[1]);
        let answer = r.handle.apply("A", Duration::from_secs(30));
        r.wait_for("prepare A");
        r.fake.inbox.lock().push_back(2);
        assert!(
            r.take.rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "nothing read while switching"
        );
        for job in jobs {
            r.answer(job);
        }
        assert_eq!(answered(&answer), Ok(()));
        let after = r.take.rx.recv_timeout(Duration::from_secs(5)).unwrap();
        r.answer(after);
        let lines = r.stop();
        assert_eq!(lines[..3], ["prepare A", "answer 1", "commit A"]);
    }

    #[test]
    fn reading_pauses_while_the_input_holds_all_the_answers_it_may() {
        let r = rig();
        r.fake.full.store(true, Ordering::SeqCst);
        r.fake.inbox.lock().push_back(1);
        assert!(
            r.take.rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "nothing read while the backlog is full"
        );
        r.fake.full.store(false, Ordering::SeqCst);
        let job = r.take.rx.recv_timeout(Duration::from_secs(5)).unwrap();
        r.answer(job);
        r.wait_for("answer 1");
        r.stop();
    }
}
