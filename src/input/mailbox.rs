//! A thread's mailbox that `zmq::poll` can wait on: crossbeam channels for the letters and an
//! eventfd that is written after each letter, polled beside the thread's ZeroMQ sockets.
//!
//! This is how workers (verdicts), the queue (room freed) and the main thread (commands) reach
//! the receiver without sharing its sockets (a ZeroMQ socket belongs to one thread).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::message::Wake;

/// The wake-up half: cheap to call from any thread.
pub struct Doorbell(EventFd);

impl Doorbell {
    pub fn new() -> std::io::Result<Doorbell> {
        EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map(Doorbell)
            .map_err(std::io::Error::from)
    }

    /// The descriptor to poll for POLLIN.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Resets the bell after a wake-up (the owner then reads every channel dry).
    pub fn clear(&self) {
        // EAGAIN means nobody rang since the last clear: nothing to do.
        let _ = self.0.read();
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Wake for Doorbell {
    fn wake(&self) {
        // The counter saturates far beyond any real number of rings; an error here would
        // only mean it is already readable, which is all a ring has to achieve.
        let _ = self.0.write(1);
    }
}
