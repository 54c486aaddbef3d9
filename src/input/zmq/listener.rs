//! Listening sockets made outside libzmq, so they can outlive the process serving them: the
//! supervisor makes one for `[zmq] endpoint` and hands it to each serving child, systemd hands
//! them to a socket-activated feedd. The ROUTER listens on a `dup` of one through `ZMQ_USE_FD`
//! (libzmq closes the fd it was given). No threads; used at start-up and by the receiver.
//!
//! Every listener is non-blocking: libzmq never sets `O_NONBLOCK`, and with a blocking fd the
//! process that loses an accept race to another one sharing it leaves its I/O thread stuck in
//! `accept4()` (HAZARDS: ZeroMQ).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, UnixAddr,
};
use parking_lot::Mutex;

/// The environment variable naming the descriptors a supervisor hands its serving child
/// (comma-separated numbers); systemd's `LISTEN_FDS`/`LISTEN_PID` are read too.
pub const HANDED_FDS_VAR: &str = "FEEDD_LISTEN_FDS";

/// Connections the kernel queues while no process accepts (a child restarting).
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot listen on {endpoint}: {error}")]
    Open { endpoint: String, error: nix::Error },
    #[error(
        "the socket handed to feedd (fd {fd}) listens on {actual}, but [zmq] endpoint is {endpoint}"
    )]
    Mismatch {
        fd: RawFd,
        actual: String,
        endpoint: String,
    },
    #[error("handed socket fd {fd}: {reason}")]
    Handed { fd: RawFd, reason: String },
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Tcp(SocketAddr),
    Ipc(PathBuf),
}

impl Address {
    /// The address an endpoint names, for the endpoints feedd can make a listener for:
    /// `tcp://` with an IP literal, `*` or a resolvable name (port `*`: any), and `ipc://` with
    /// a file path. `None` for the rest (interface names, abstract `ipc://@…`), left to libzmq.
    fn of(endpoint: &str) -> Option<Vec<Address>> {
        if let Some(path) = endpoint.strip_prefix("ipc://") {
            return (!path.starts_with('@') && path != "*")
                .then(|| vec![Address::Ipc(PathBuf::from(path))]);
        }
        let (host, port) = endpoint.strip_prefix("tcp://")?.rsplit_once(':')?;
        let port: u16 = if port == "*" { 0 } else { port.parse().ok()? };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ips: Vec<IpAddr> = match host {
            "*" | "0.0.0.0" => vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            "::" => vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
            _ => match host.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => (host, port)
                    .to_socket_addrs()
                    .ok()?
                    .map(|a| a.ip())
                    .collect(),
            },
        };
        (!ips.is_empty()).then(|| {
            ips.into_iter()
                .map(|ip| Address::Tcp(SocketAddr::new(ip, port)))
                .collect()
        })
    }

    fn describe(&self) -> String {
        match self {
            Address::Tcp(a) => format!("tcp://{a}"),
            Address::Ipc(p) => format!("ipc://{}", p.display()),
        }
    }

    /// Whether a socket listening here serves `wanted` (port 0 there: any port).
    fn serves(&self, wanted: &Address) -> bool {
        match (self, wanted) {
            (Address::Tcp(a), Address::Tcp(w)) => {
                a.ip() == w.ip() && (w.port() == 0 || a.port() == w.port())
            }
            (Address::Ipc(a), Address::Ipc(w)) => a == w,
            _ => false,
        }
    }
}

/// A bound, listening, non-blocking, close-on-exec socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    address: Address,
}

impl Listener {
    /// Makes a listener for `endpoint` (SO_REUSEADDR, bind, listen with a real backlog);
    /// `Ok(None)` for an endpoint only libzmq can bind (see `Address::of`).
    pub fn open(endpoint: &str) -> Result<Option<Listener>, ListenerError> {
        let Some(addresses) = Address::of(endpoint) else {
            return Ok(None);
        };
        let open = |e| ListenerError::Open {
            endpoint: endpoint.to_string(),
            error: e,
        };
        let address = addresses
            .into_iter()
            .next()
            .ok_or(open(nix::Error::EINVAL))?;
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let fd = match &address {
            Address::Tcp(a) => {
                let family = if a.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let fd = socket::socket(family, SockType::Stream, flags, None).map_err(open)?;
                socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true).map_err(open)?;
                socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(*a)).map_err(open)?;
                fd
            }
            Address::Ipc(path) => {
                // A stale file of a dead listener goes (libzmq does the same); the receiver
                // has refused a live one by then.
                if std::os::unix::net::UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
                let fd = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None)
                    .map_err(open)?;
                socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).map_err(open)?).map_err(open)?;
                fd
            }
        };
        let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
        socket::listen(&fd, backlog).map_err(open)?;
        let address = local_address(&fd).unwrap_or(address);
        Ok(Some(Listener { fd, address }))
    }

    /// The listeners handed to this process: by a supervisor (`FEEDD_LISTEN_FDS`) or by
    /// systemd (`LISTEN_FDS`, for this pid). Each is made non-blocking and close-on-exec.
    pub fn inherited() -> Result<Vec<Listener>, ListenerError> {
        let mut fds: Vec<RawFd> = std::env::var(HANDED_FDS_VAR)
            .unwrap_or_default()
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        if let Ok(systemd) = sd_notify::listen_fds() {
            fds.extend(systemd);
        }
        fds.into_iter().map(Listener::adopt).collect()
    }

    fn adopt(raw: RawFd) -> Result<Listener, ListenerError> {
        let fd = crate::zmq_ffi::adopt_inherited_fd(raw).ok_or(ListenerError::Handed {
            fd: raw,
            reason: "not open".into(),
        })?;
        Listener::from_fd(fd)
    }

    /// A listening socket handed over (inherited, or received from the supervisor), made
    /// non-blocking and close-on-exec.
    pub fn from_fd(fd: OwnedFd) -> Result<Listener, ListenerError> {
        let raw = fd.as_raw_fd();
        let handed = |reason: String| ListenerError::Handed { fd: raw, reason };
        let listening = socket::getsockopt(&fd, socket::sockopt::AcceptConn)
            .map_err(|e| handed(format!("not a socket: {e}")))?;
        if !listening {
            return Err(handed("not a listening socket".into()));
        }
        let address = local_address(&fd).ok_or(handed("not a TCP or Unix socket".into()))?;
        let status = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| handed(e.to_string()))?;
        let nonblocking = OFlag::from_bits_truncate(status) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(nonblocking)).map_err(|e| handed(e.to_string()))?;
        set_cloexec(&fd, true).map_err(|e| handed(e.to_string()))?;
        Ok(Listener { fd, address })
    }

    /// Whether this listener is the one for `endpoint`.
    pub fn serves(&self, endpoint: &str) -> bool {
        Address::of(endpoint).is_some_and(|all| all.iter().any(|w| self.address.serves(w)))
    }

    /// The address listened on, as an endpoint (`tcp://127.0.0.1:5555`).
    pub fn endpoint(&self) -> String {
        self.address.describe()
    }

    /// A close-on-exec copy for libzmq, which closes what it is given.
    pub fn dup_for_zmq(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// The descriptor number, for the child's environment.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Close-on-exec on or off: off only while the supervisor execs a process that must
    /// inherit the listener (a serving child, or itself on upgrade).
    pub fn set_inherited(&self, inherited: bool) -> nix::Result<()> {
        set_cloexec(&self.fd, !inherited)
    }
}

/// The listeners handed to the serving process, shared by the receiver (which listens on
/// `dup`s of them) and the reload (which adds those the supervisor hands down for a new
/// endpoint, and closes the ones no longer served once a reload is over).
#[derive(Debug, Clone, Default)]
pub struct Listeners(Arc<Mutex<Vec<Listener>>>);

impl Listeners {
    pub fn new(first: Option<Listener>) -> Listeners {
        Listeners(Arc::new(Mutex::new(first.into_iter().collect())))
    }

    pub fn add(&self, listener: Listener) {
        self.0.lock().push(listener);
    }

    /// Whether one of them serves `endpoint`.
    pub fn serves(&self, endpoint: &str) -> bool {
        self.0.lock().iter().any(|l| l.serves(endpoint))
    }

    /// A copy for libzmq of the one serving `endpoint`, if any.
    pub fn dup_for(&self, endpoint: &str) -> Option<std::io::Result<OwnedFd>> {
        let all = self.0.lock();
        all.iter()
            .find(|l| l.serves(endpoint))
            .map(Listener::dup_for_zmq)
    }

    /// Closes this process's copies of the listeners that do not serve `endpoint`.
    pub fn keep_only(&self, endpoint: &str) {
        let mut all = self.0.lock();
        let mut kept: Vec<Listener> = Vec::new();
        for l in all.drain(..) {
            // One copy per socket is enough (the supervisor hands the same one again).
            if l.serves(endpoint) && !kept.iter().any(|k| k.address == l.address) {
                kept.push(l);
            }
        }
        *all = kept;
    }
}

fn set_cloexec(fd: &OwnedFd, on: bool) -> nix::Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_SETFD(flags)).map(drop)
}

/// Checks the listeners handed to this process against `endpoint`: the one serving it, or a
/// start-up error naming both when a socket was handed for something else.
pub fn take_for(handed: Vec<Listener>, endpoint: &str) -> Result<Option<Listener>, ListenerError> {
    let mut found = None;
    for l in handed {
        if found.is_none() && l.serves(endpoint) {
            found = Some(l);
        } else {
            return Err(ListenerError::Mismatch {
                fd: l.raw_fd(),
                actual: l.endpoint(),
                endpoint: endpoint.to_string(),
            });
        }
    }
    Ok(found)
}

fn local_address(fd: &OwnedFd) -> Option<Address> {
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).ok()?;
    if let Some(a) = addr.as_sockaddr_in() {
        return Some(Address::Tcp(SocketAddr::V4((*a).into())));
    }
    if let Some(a) = addr.as_sockaddr_in6() {
        return Some(Address::Tcp(SocketAddr::V6((*a).into())));
    }
    addr.as_unix_addr()
        .and_then(UnixAddr::path)
        .map(|p| Address::Ipc(p.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_addresses_or_are_left_to_libzmq() {
        let tcp = |s: &str| Address::Tcp(s.parse().unwrap());
        assert_eq!(
            Address::of("tcp://127.0.0.1:5555"),
            Some(vec![tcp("127.0.0.1:5555")])
        );
        assert_eq!(Address::of("tcp://*:5555"), Some(vec![tcp("0.0.0.0:5555")]));
        assert_eq!(Address::of("tcp://[::1]:7"), Some(vec![tcp("[::1]:7")]));
        assert_eq!(
            Address::of("tcp://127.0.0.1:*"),
            Some(vec![tcp("127.0.0.1:0")])
        );
        assert_eq!(
            Address::of("ipc:///run/feedd/in"),
            Some(vec![Address::Ipc("/run/feedd/in".into())])
        );
        assert_eq!(Address::of("ipc://@abstract"), None);
        assert_eq!(Address::of("tcp://127.0.0.1:notaport"), None);
    }

    #[test]
    fn a_listener_serves_its_own_endpoint_only() {
        let l = Listener::open("tcp://127.0.0.1:*").unwrap().unwrap();
        let mine = l.endpoint();
        assert!(mine.starts_with("tcp://127.0.0.1:") && !mine.ends_with(":0"));
        assert!(l.serves(&mine));
        assert!(l.serves("tcp://127.0.0.1:*"));
        assert!(!l.serves("tcp://127.0.0.2:*"));
        assert!(!l.serves("ipc:///tmp/x"));
        let err = take_for(vec![l], "tcp://127.0.0.2:1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&mine) && err.contains("tcp://127.0.0.2:1"),
            "{err}"
        );
    }
}
