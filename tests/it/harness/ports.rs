//! Ports for everything a test starts or points feedd at, from a range no other process of this
//! harness uses at the same time.
//!
//! Binding port 0 and dropping the listener (the old `free_port`) races: the kernel hands the
//! same ephemeral port to the next bind anywhere on the machine, so two tests running in
//! parallel could both get it. Instead 20000–31999 (below the kernel's ephemeral range, see
//! `/proc/sys/net/ipv4/ip_local_port_range`: 32768–60999 here) is split into blocks; a process
//! claims one (a lock file, held until it exits; the first tried is derived from the pid) and
//! hands its ports out in order from an atomic counter, never twice. A port is only handed out
//! if it is bindable on 127.0.0.1 right then, which skips whatever a service already listens on
//! (RabbitMQ's distribution port 25672 is in the range).

use std::fs::File;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;

use nix::fcntl::{Flock, FlockArg};

const FIRST: u16 = 20_000;
const BLOCK: u16 = 1_000;
const BLOCKS: u16 = 12;

/// This process's block: the next port to hand out, the end, and the lock that keeps the block
/// ours while the process lives.
struct Range {
    next: AtomicU16,
    end: u16,
    _claim: Flock<File>,
}

fn range() -> &'static Range {
    static RANGE: OnceLock<Range> = OnceLock::new();
    RANGE.get_or_init(|| {
        let dir = std::env::temp_dir().join("feedd-test-ports");
        std::fs::create_dir_all(&dir).expect("a directory for the port block locks");
        let start = (std::process::id() % u32::from(BLOCKS)) as u16;
        for i in 0..BLOCKS {
            let block = (start + i) % BLOCKS;
            let file = File::create(dir.join(format!("{block}.lock"))).expect("a lock file");
            if let Ok(claim) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                let first = FIRST + block * BLOCK;
                return Range {
                    next: AtomicU16::new(first),
                    end: first + BLOCK,
                    _claim: claim,
                };
            }
        }
        panic!("every port block is claimed by another test process");
    })
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The first of `n` consecutive ports, each bindable now and never handed out before in this
/// process (a Galera node needs several ports a fixed distance apart).
pub fn block(n: u16) -> u16 {
    let range = range();
    loop {
        let first = range.next.fetch_add(n, Ordering::Relaxed);
        assert!(
            u32::from(first) + u32::from(n) <= u32::from(range.end),
            "this process used up its {BLOCK} test ports"
        );
        if (first..first + n).all(bindable) {
            return first;
        }
    }
}

/// One port for something to listen on (feedd's endpoint, metrics, a private server), or for
/// nothing to listen on (a dead database or broker address).
pub fn port() -> u16 {
    block(1)
}

/// A listener the test holds on a port of its own: a busy port, or a server that never answers.
pub fn listener() -> TcpListener {
    loop {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port())) {
            return l;
        }
    }
}
