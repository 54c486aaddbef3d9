//! The control channel between the supervisor and one serving child: a Unix `SEQPACKET`
//! socketpair made at spawn, the child's end inherited by number (`FEEDD_CONTROL_FD`).
//!
//! - Down: listening sockets the supervisor made for the `[zmq] endpoint` a reload is about to
//!   read (SCM_RIGHTS), each numbered; sent before the SIGHUP is forwarded, so the child's
//!   reload preparer finds them waiting. The child listens on those instead of binding, so
//!   every listener a serving child uses is also the supervisor's and outlives the child.
//! - Up: after every reload (taken or refused), the endpoint the child serves and the last
//!   number it took in: the supervisor then keeps the listener serving it and closes the rest.
//!
//! No threads of its own: the supervisor reads its end on the child's waiter thread; the child
//! reads on its reload preparer and writes from its main thread. Both ends are close-on-exec
//! except while the supervisor spawns that child (or execs itself on upgrade).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::input::zmq::listener::Listener;

/// The environment variable naming the child's end.
pub const CONTROL_FD_VAR: &str = "FEEDD_CONTROL_FD";

const LISTENER: &str = "LISTENER ";
const SERVING: &str = "SERVING ";

/// One end of the channel.
#[derive(Debug)]
pub struct Control {
    fd: OwnedFd,
    /// The child's end: the number of the last listener taken in.
    taken: AtomicU64,
}

/// What a child reports after a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// Every listener numbered up to this one was seen by a reload that is over.
    pub taken: u64,
    /// `[zmq] endpoint` as the child serves it now (empty: ZeroMQ off).
    pub endpoint: String,
}

impl Control {
    /// A new channel: the supervisor's end, and the child's end to hand down (both
    /// close-on-exec until `set_inherited`).
    pub fn pair() -> nix::Result<(Control, Control)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Control::of(ours), Control::of(theirs)))
    }

    fn of(fd: OwnedFd) -> Control {
        Control {
            fd,
            taken: AtomicU64::new(0),
        }
    }

    /// The child's end, handed down by the supervisor (`None`: not a supervised child).
    pub fn inherited() -> Option<Control> {
        let raw: RawFd = std::env::var(CONTROL_FD_VAR).ok()?.parse().ok()?;
        let fd = crate::zmq_ffi::adopt_inherited_fd(raw)?;
        if let Err(e) = set_inherited(&fd, false) {
            log::warn!("control channel (fd {raw}): {e}");
        }
        Some(Control::of(fd))
    }

    /// The supervisor's end handed down across an upgrade's exec.
    pub fn adopt(raw: RawFd) -> Option<Control> {
        let fd = crate::zmq_ffi::adopt_inherited_fd(raw)?;
        set_inherited(&fd, false).ok()?;
        Some(Control::of(fd))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Close-on-exec off only while the supervisor spawns the child this end is for, or execs
    /// itself on upgrade (its own end).
    pub fn set_inherited(&self, inherited: bool) -> nix::Result<()> {
        set_inherited(&self.fd, inherited)
    }

    /// A second handle on this end (for the supervisor's waiter thread).
    pub fn try_clone(&self) -> std::io::Result<Control> {
        Ok(Control::of(self.fd.try_clone()?))
    }

    /// Supervisor: hands `listener` down as number `seq` (the child gets its own copy).
    pub fn hand(&self, seq: u64, listener: &Listener) -> nix::Result<()> {
        let text = format!("{LISTENER}{seq}");
        let fds = [listener.raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(text.as_bytes())],
            &cmsg,
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map(drop)
    }

    /// Child: the listeners handed down and not yet taken in (never waits).
    pub fn take_handed(&self) -> Vec<Listener> {
        let mut taken = Vec::new();
        loop {
            let mut buf = [0u8; 64];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let (bytes, fds) =
                match recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut space), flags) {
                    Ok(msg) if msg.bytes == 0 => break, // the supervisor is gone
                    Ok(msg) => (msg.bytes, received_fds(&msg)),
                    Err(nix::Error::EAGAIN | nix::Error::EINTR) => break,
                    Err(e) => {
                        log::warn!("control channel: {e}");
                        break;
                    }
                };
            let Some(seq) = std::str::from_utf8(&buf[..bytes])
                .ok()
                .and_then(|t| t.strip_prefix(LISTENER)?.parse::<u64>().ok())
            else {
                continue; // not for this end; its fds close with `fds`
            };
            for fd in fds {
                match Listener::from_fd(fd) {
                    Ok(l) => taken.push(l),
                    Err(e) => log::warn!("control channel: listener #{seq}: {e}"),
                }
            }
            self.taken.fetch_max(seq, Ordering::Relaxed);
        }
        taken
    }

    /// Child: after a reload, what it serves now (never waits: a full channel only delays
    /// the supervisor's closing of a listener nobody uses until the next report).
    pub fn report(&self, endpoint: &str) {
        let text = format!("{SERVING}{} {endpoint}", self.taken.load(Ordering::Relaxed));
        let sent = sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(text.as_bytes())],
            &[],
            MsgFlags::MSG_DONTWAIT,
            None,
        );
        if let Err(e) = sent {
            log::warn!("control channel: cannot report to the supervisor: {e}");
        }
    }

    /// Supervisor: waits for the child's next report; `None` once the child's end closed.
    pub fn next_report(&self) -> Option<Serving> {
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let bytes = match recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, None, MsgFlags::empty())
            {
                Ok(msg) if msg.bytes == 0 => return None,
                Ok(msg) => msg.bytes,
                Err(nix::Error::EINTR) => continue,
                Err(_) => return None,
            };
            if let Some(serving) = parse_serving(&buf[..bytes]) {
                return Some(serving);
            }
        }
    }
}

fn received_fds<S>(msg: &nix::sys::socket::RecvMsg<'_, '_, S>) -> Vec<OwnedFd> {
    let Ok(cmsgs) = msg.cmsgs() else {
        return Vec::new(); // truncated: the kernel closed what did not fit
    };
    cmsgs
        .filter_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => Some(fds),
            _ => None,
        })
        .flatten()
        .filter_map(crate::zmq_ffi::adopt_inherited_fd)
        .collect()
}

fn parse_serving(bytes: &[u8]) -> Option<Serving> {
    let text = std::str::from_utf8(bytes).ok()?.strip_prefix(SERVING)?;
    let (taken, endpoint) = text.split_once(' ').unwrap_or((text, ""));
    Some(Serving {
        taken: taken.parse().ok()?,
        endpoint: endpoint.to_string(),
    })
}

fn set_inherited(fd: &OwnedFd, inherited: bool) -> nix::Result<()> {
    let flags = if inherited {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(flags)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_goes_down_and_the_served_endpoint_comes_up() {
        let (supervisor, child) = Control::pair().unwrap();
        assert!(child.take_handed().is_empty(), "nothing handed yet");
        let l = Listener::open("tcp://127.0.0.1:*").unwrap().unwrap();
        supervisor.hand(7, &l).unwrap();
        let handed = child.take_handed();
        assert_eq!(handed.len(), 1);
        assert_eq!(handed[0].endpoint(), l.endpoint(), "the same socket");
        assert_ne!(handed[0].raw_fd(), l.raw_fd(), "the child's own copy");
        child.report(&l.endpoint());
        assert_eq!(
            supervisor.next_report(),
            Some(Serving {
                taken: 7,
                endpoint: l.endpoint()
            })
        );
        drop(child);
        assert_eq!(supervisor.next_report(), None, "the child's end closed");
    }
}
