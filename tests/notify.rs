//! systemd's notify protocol (SPEC §6): the test plays the service manager. It binds a Unix
//! datagram socket, starts the real `feedd --conf F` with `NOTIFY_SOCKET` and `WATCHDOG_USEC`
//! pointing at it, and checks what arrives and when: READY only once the endpoint answers,
//! RELOADING + MONOTONIC_USEC then READY on SIGHUP (applied and refused), STOPPING on SIGTERM,
//! STATUS lines, the watchdog rate, and no ping while the receiver thread is wedged.
//!
//! The wedge is real and comes from outside: the test ptrace-stops feedd's `receiver` thread
//! alone (PTRACE_SEIZE + PTRACE_INTERRUPT on that thread id); every other thread keeps running,
//! so only a watchdog that checks the receiver can notice. No test hook is built into feedd.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// What the "service manager" received: (when, datagram text).
struct Manager {
    rx: mpsc::Receiver<(Instant, String)>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Manager {
    fn bind() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        // Timestamps are taken as datagrams arrive, so intervals are measured, not guessed.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    return;
                }
            }
        });
        Manager {
            rx,
            _dir: dir,
            path,
        }
    }

    /// The next datagram other than a watchdog ping or a periodic status line.
    fn next_state(&self, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let (_, text) = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no state change within {timeout:?}"));
            if text != "WATCHDOG=1\n" && !text.starts_with("STATUS=") {
                return text;
            }
        }
    }

    /// Every datagram for `span`.
    fn collect(&self, span: Duration) -> Vec<(Instant, String)> {
        let until = Instant::now() + span;
        let mut out = Vec::new();
        while let Ok(m) = self
            .rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            out.push(m);
        }
        out
    }
}

/// Starts feedd in the foreground like a `Type=notify` unit does, watchdog at `watchdog`.
fn spawn_notified(mut f: Feedd, manager: &Manager, watchdog: Duration) -> Feedd {
    let log = std::fs::File::create(f.dir.path().join("stderr.log")).unwrap();
    let child = Command::new(feedd_bin())
        .args(["--conf", "feed.ini"])
        .current_dir(f.dir.path())
        .env("NOTIFY_SOCKET", &manager.path)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    f.child = Some(child);
    f
}

fn monotonic_usec() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer to a timespec on this stack.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1_000
}

/// RELOADING=1 with a MONOTONIC_USEC= taken now (±5 s), then READY=1 with a status.
fn expect_reload(manager: &Manager, status_start: &str) {
    let reloading = manager.next_state(Duration::from_secs(10));
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading:?}");
    let usec: i128 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in the same datagram: {reloading:?}"));
    assert!(
        (monotonic_usec() - usec).abs() < 5_000_000,
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC now ({})",
        monotonic_usec()
    );
    let ready = manager.next_state(Duration::from_secs(20));
    assert!(
        ready.starts_with(&format!("READY=1\nSTATUS={status_start}")),
        "{ready:?}"
    );
}

#[test]
fn ready_reload_status_watchdog_and_stopping() {
    let db = Db::create("n_states");
    let manager = Manager::bind();
    let watchdog = Duration::from_secs(4);
    let mut f = spawn_notified(Feedd::prepare(&db, &[]), &manager, watchdog);

    // READY comes first, and only once the endpoint answers: a client asking right after it
    // is served, and the serving line is already logged.
    let first = manager.next_state(Duration::from_secs(20));
    assert_eq!(first, "READY=1\n");
    assert!(
        f.stderr_log().contains("serving with"),
        "{}",
        f.stderr_log()
    );
    let req = Req::connect(&f.endpoint());
    req.0.set_rcvtimeo(2_000).unwrap();
    assert_eq!(req.ask("1,1,1.5"), "TRUE");

    f.signal(libc::SIGHUP);
    expect_reload(&manager, "reload applied");

    // A refused reload (invalid file) reports READY too, saying it was refused.
    let good = std::fs::read_to_string(f.conf_path()).unwrap();
    std::fs::write(f.conf_path(), format!("{good}[bogus]\nkey = 1\n")).unwrap();
    f.signal(libc::SIGHUP);
    expect_reload(&manager, "reload refused");
    std::fs::write(f.conf_path(), good).unwrap();
    assert_eq!(
        req.ask("2,1,1.5"),
        "TRUE",
        "still serving after a refused reload"
    );

    // Watchdog rate and the status line, measured over 9 s.
    let span = Duration::from_secs(9);
    let start = Instant::now();
    let seen = manager.collect(span);
    let pings: Vec<Instant> = seen
        .iter()
        .filter(|(_, t)| t == "WATCHDOG=1\n")
        .map(|(at, _)| *at)
        .collect();
    let gaps: Vec<u128> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    eprintln!(
        "watchdog: WATCHDOG_USEC {} ms, {} pings in {} ms, gaps {gaps:?} ms",
        watchdog.as_millis(),
        pings.len(),
        span.as_millis()
    );
    // At least two per WATCHDOG_USEC: every gap (and the edges) at most half of it, plus slack.
    let limit = watchdog / 2 + Duration::from_millis(300);
    assert!(pings.len() >= 4, "{} pings in {span:?}", pings.len());
    assert!(
        gaps.iter().all(|g| *g <= limit.as_millis()),
        "a gap above {limit:?}: {gaps:?}"
    );
    assert!(pings[0] - start <= limit, "first ping late");
    let status = seen
        .iter()
        .find(|(_, t)| t.starts_with("STATUS=serving"))
        .map(|(_, t)| t.clone())
        .expect("a STATUS line within 9 s");
    eprintln!("status: {status:?}");
    for part in [
        format!("zmq tcp://127.0.0.1:{}", f.port),
        " records/s; queue 0; database ".to_string(),
        format!("/{}", db.name),
    ] {
        assert!(status.contains(&part), "{part:?} not in {status:?}");
    }

    f.signal(libc::SIGTERM);
    assert_eq!(manager.next_state(Duration::from_secs(10)), "STOPPING=1\n");
    assert_eq!(f.wait(Duration::from_secs(20)).code(), Some(0));
    assert_eq!(db.count(), 2);
}

/// The thread of `pid` named `name` (from /proc/PID/task/TID/comm).
fn thread_id(pid: i32, name: &str) -> i32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .map(|c| c.trim() == name)
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no `{name}` thread in pid {pid}"))
}

/// The raw ptrace(2) calls the wedge needs (libc, so no test-only features reach feedd's deps).
fn ptrace(request: libc::c_uint, tid: i32) -> std::io::Result<()> {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: requests without address or data arguments, on a thread of our own child.
    if unsafe { libc::ptrace(request, tid, null, null) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Stops thread `tid` alone (PTRACE_SEIZE + PTRACE_INTERRUPT) and waits until it is stopped.
fn stop_thread(tid: i32) {
    ptrace(libc::PTRACE_SEIZE, tid).expect("ptrace (needs root or to be the parent)");
    ptrace(libc::PTRACE_INTERRUPT, tid).unwrap();
    let mut status = 0;
    // SAFETY: a valid out-pointer; __WALL waits for a thread (clone) tracee.
    let waited = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(waited, tid, "{}", std::io::Error::last_os_error());
}

#[test]
fn a_wedged_receiver_stops_the_watchdog() {
    let db = Db::create("n_wedge");
    let manager = Manager::bind();
    let watchdog = Duration::from_secs(4);
    let every = watchdog / 2;
    let mut f = spawn_notified(Feedd::prepare(&db, &[]), &manager, watchdog);
    assert_eq!(manager.next_state(Duration::from_secs(20)), "READY=1\n");
    let before = manager.collect(every * 2 + Duration::from_millis(300));
    assert!(
        before.iter().filter(|(_, t)| t == "WATCHDOG=1\n").count() >= 2,
        "pings while healthy: {before:?}"
    );

    // Stop the receiver thread alone; the watchdog, signal and worker threads run on.
    let tid = thread_id(f.pid(), "receiver");
    stop_thread(tid);
    let wedged_at = Instant::now();
    let during = manager.collect(every * 3);
    // One check may still see a turn made just before the stop; none after that.
    let late: Vec<u128> = during
        .iter()
        .filter(|(at, t)| t == "WATCHDOG=1\n" && *at > wedged_at + every)
        .map(|(at, _)| (*at - wedged_at).as_millis())
        .collect();
    eprintln!(
        "wedged for {} ms: pings at {:?} ms after the stop",
        (every * 3).as_millis(),
        during
            .iter()
            .filter(|(_, t)| t == "WATCHDOG=1\n")
            .map(|(at, _)| (*at - wedged_at).as_millis())
            .collect::<Vec<_>>()
    );
    assert!(
        late.is_empty(),
        "pinged while the receiver was wedged: {late:?}"
    );
    assert!(
        f.stderr_log()
            .contains("watchdog: no ping, receiver made no progress"),
        "{}",
        f.stderr_log()
    );

    // Released, it turns again and so do the pings.
    ptrace(libc::PTRACE_DETACH, tid).unwrap();
    let released_at = Instant::now();
    let after = manager.collect(every * 2 + Duration::from_millis(300));
    let resumed = after
        .iter()
        .find(|(_, t)| t == "WATCHDOG=1\n")
        .map(|(at, _)| (*at - released_at).as_millis())
        .expect("pings resume once the receiver turns again");
    eprintln!("released: first ping after {resumed} ms");
    let req = Req::connect(&f.endpoint());
    req.0.set_rcvtimeo(5_000).unwrap();
    assert_eq!(req.ask("7,1,1"), "TRUE", "the receiver serves again");

    f.signal(libc::SIGTERM);
    assert_eq!(f.wait(Duration::from_secs(20)).code(), Some(0));
}
