//! Zero downtime (SPEC §6): the supervisor owns the listening socket, so a killed serving child
//! and `feedd upgrade` (including one to a binary replaced on disk, and one to a binary that
//! fails readiness) never leave the endpoint refusing connections, and one-in-flight clients
//! that resend after 1 s get every record acknowledged and stored.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::ports;
use crate::harness::*;

const RESEND_AFTER: Duration = Duration::from_secs(1);
const CLIENTS: u64 = 8;

/// Runs `bin ARGS` in the run dir: (status code, stdout + stderr).
fn run(f: &Feedd, bin: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(f.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Puts `content` at `path` the way a package upgrade does: a new file renamed over the old
/// (the running binary's inode is then deleted).
fn replace_file(path: &Path, content: &[u8], mode: u32) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Processes of this run whose executable was deleted from disk.
fn running_deleted(f: &Feedd) -> Vec<(i32, String)> {
    f.processes()
        .into_iter()
        .filter_map(|pid| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let exe = exe.to_string_lossy().into_owned();
            exe.ends_with(" (deleted)").then_some((pid, exe))
        })
        .collect()
}

/// What one client saw: per message, how often it was sent and how long it waited.
#[derive(Default)]
struct Seen {
    /// ticket → (body, sends, wait from first send to its reply)
    messages: HashMap<u64, (String, u32, Duration)>,
    /// When each resend happened.
    resends: Vec<Instant>,
    falses: Vec<String>,
}

/// One DEALER (no `ZMQ_IMMEDIATE`), one message in flight, resent after `RESEND_AFTER`.
fn client(endpoint: String, n: u64, stop: Arc<AtomicBool>) -> Seen {
    let dealer = Dealer::connect(&endpoint);
    let mut seen = Seen::default();
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let ticket = n * 1_000_000 + seq;
        let body = format!("{ticket},{n},{seq}.{n:04}");
        let first = Instant::now();
        let mut sends = 0;
        let reply = loop {
            dealer.send(ticket, &body);
            sends += 1;
            if sends > 1 {
                seen.resends.push(Instant::now());
            }
            let sent = Instant::now();
            let mut answer = None;
            while answer.is_none() && sent.elapsed() < RESEND_AFTER {
                let left = RESEND_AFTER.saturating_sub(sent.elapsed());
                let mut items = [dealer.0.as_poll_item(zmq::POLLIN)];
                zmq::poll(&mut items, left.as_millis().max(1) as i64).unwrap();
                if items[0].is_readable() {
                    // A late reply to an earlier send of an older message is skipped.
                    answer = dealer.recv().filter(|(id, _)| *id == ticket);
                }
            }
            assert!(sends < 30, "ticket {ticket} unanswered after {sends} sends");
            if let Some((_, text)) = answer {
                break text;
            }
        };
        if reply != "TRUE" {
            seen.falses.push(format!("{ticket}: {reply}"));
        }
        seen.messages.insert(ticket, (body, sends, first.elapsed()));
    }
    seen
}

/// A raw TCP connect to the endpoint every 10 ms, counting refusals and other failures.
struct Probe {
    stop: Arc<AtomicBool>,
    /// refused, other failures, attempts
    counts: Arc<[AtomicU64; 3]>,
    thread: std::thread::JoinHandle<()>,
}

impl Probe {
    fn start(port: u16) -> Probe {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let (halt, count) = (Arc::clone(&stop), Arc::clone(&counts));
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                count[2].fetch_add(1, Ordering::Relaxed);
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        count[0].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        count[1].fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Probe {
            stop,
            counts,
            thread,
        }
    }

    /// Stops probing: (refused, other failures, attempts).
    fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let [refused, failed, attempts] = [0, 1, 2].map(|i| self.counts[i].load(Ordering::Relaxed));
        eprintln!("probe: {attempts} connects, {refused} refused, {failed} other failures");
        (refused, failed, attempts)
    }
}

/// A build of feedd whose serving process fails its start-up (readiness) check; everything
/// else runs the real binary.
fn failing_build(real: &str) -> Vec<u8> {
    format!(
        "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = --serve-child ]; then\n    echo 'ERR this build fails its readiness check'\n    exit 1\n  fi\ndone\nexec '{real}' \"$@\"\n"
    )
    .into_bytes()
}

#[test]
fn upgrades_and_a_killed_child_refuse_no_connection_and_lose_nothing() {
    let db = Db::create("z_upgrade");
    let f = Feedd::prepare(&db, &[]);
    let bin: PathBuf = f.dir.path().join("bin/feedd");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    let real = std::fs::read(feedd_bin()).unwrap();
    replace_file(&bin, &real, 0o755);
    let _cleanup = Cleanup {
        daemon: Some(&f),
        children: Vec::new(),
    };
    let (code, out) = run(&f, &bin, &["start", "--conf", "feed.ini"]);
    assert_eq!(code, Some(0), "start: {out}\n{}", f.log());
    let supervisor = f.daemon_pid();

    let stop = Arc::new(AtomicBool::new(false));
    let probe = Probe::start(f.port);
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|n| {
            let (endpoint, stop) = (f.endpoint(), Arc::clone(&stop));
            std::thread::spawn(move || client(endpoint, n, stop))
        })
        .collect();
    let events: Mutex<Vec<(&str, Instant)>> = Mutex::new(Vec::new());
    let mark = |name| events.lock().unwrap().push((name, Instant::now()));
    let traffic = || std::thread::sleep(Duration::from_millis(1500));
    let upgrade = || run(&f, &bin, &["upgrade", "--conf", "feed.ini"]);
    let serving = || f.serving_pid().expect("a serving child");
    // An upgrade that must succeed: `feedd upgrade` exits 0, the old child drains and exits.
    let upgrade_ok = |name| {
        let before = serving();
        mark(name);
        let (code, out) = upgrade();
        assert_eq!(code, Some(0), "upgrade: {out}\n{}", f.log());
        assert!(
            wait_until(Duration::from_secs(15), || !alive(before)),
            "the old child drains and exits"
        );
    };

    traffic();
    // 1. An upgrade to the same binary.
    upgrade_ok("upgrade");
    traffic();

    // 2. The binary on disk replaced (a package upgrade), then upgraded to.
    replace_file(&bin, &real, 0o755);
    assert!(
        !running_deleted(&f).is_empty(),
        "the running processes' binary is gone from disk"
    );
    upgrade_ok("upgrade (binary replaced)");
    assert_eq!(
        running_deleted(&f),
        vec![],
        "no feedd runs a deleted binary"
    );
    assert_eq!(f.daemon_pid(), supervisor, "the supervisor's pid stays");
    traffic();

    // 3. The serving child killed.
    let before = serving();
    mark("kill -9");
    kill(before, Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(5), || f
        .serving_pid()
        .is_some_and(|p| p != before)));
    traffic();

    // 4. An upgrade to a build that fails readiness: refused, the old child serves on.
    replace_file(&bin, &failing_build(feedd_bin()), 0o755);
    let before = serving();
    mark("failed upgrade");
    let (code, out) = upgrade();
    assert_eq!(code, Some(1), "a failed upgrade exits 1: {out}");
    assert!(
        out.contains("fails its readiness check"),
        "the reason: {out}"
    );
    assert_eq!(
        children_of(f.daemon_pid()),
        vec![before],
        "the old child serves on alone"
    );
    traffic();

    // 5. The good build back, upgraded to.
    replace_file(&bin, &real, 0o755);
    upgrade_ok("upgrade");
    traffic();

    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let (refused, failed, _) = probe.finish();
    let events = events.into_inner().unwrap();

    // Per event: resends and the longest wait of messages sent from it to the next event.
    let event_of = |at: Instant| events.iter().rposition(|(_, t)| *t <= at);
    let mut per_event = vec![(0u32, Duration::ZERO); events.len()];
    let mut per_client_event: HashMap<(usize, usize), u32> = HashMap::new();
    for (c, s) in seen.iter().enumerate() {
        for at in &s.resends {
            if let Some(e) = event_of(*at) {
                per_event[e].0 += 1;
                *per_client_event.entry((c, e)).or_default() += 1;
            }
        }
    }
    let mut rows = db.rows();
    let mut messages = 0;
    let mut longest = Duration::ZERO;
    for s in &seen {
        assert_eq!(s.falses, Vec::<String>::new(), "no FALSE");
        for (ticket, (body, _, waited)) in &s.messages {
            messages += 1;
            longest = longest.max(*waited);
            let (login, volume) = body.split_once(',').unwrap().1.split_once(',').unwrap();
            let row = rows
                .remove(ticket)
                .unwrap_or_else(|| panic!("ticket {ticket} not stored"));
            assert_eq!(
                (row.0.to_string(), row.1.clone()),
                (login.to_string(), volume_of(volume))
            );
            assert_eq!(row.2, "Y", "ticket {ticket} committed");
        }
    }
    for (i, (name, _)) in events.iter().enumerate() {
        eprintln!("event {i} {name}: {} resends", per_event[i].0);
    }
    eprintln!("{messages} messages from {CLIENTS} clients; longest wait {longest:?}");
    assert_eq!(refused, 0, "connections refused during the events");
    assert_eq!(failed, 0, "probe connects that failed otherwise");
    assert!(
        rows.is_empty(),
        "rows nobody sent: {:?}",
        rows.keys().take(5).collect::<Vec<_>>()
    );
    let worst = per_client_event.values().max().copied().unwrap_or(0);
    assert!(
        worst <= 1,
        "a client resent {worst} times for one event: {per_client_event:?}"
    );
    assert!(
        longest <= RESEND_AFTER + Duration::from_secs(1),
        "a message waited {longest:?}"
    );
    assert!(
        messages > 100,
        "traffic flowed throughout ({messages} messages)"
    );
    assert_eq!(f.daemon_pid(), supervisor);
    f.stop_daemon();
}

/// Item 1 alone: with the supervisor owning the socket, connects during a child's restart
/// wait in the backlog instead of being refused.
#[test]
fn a_killed_child_leaves_the_endpoint_accepting() {
    let (_db, f) = supervised("z_kill9");
    let _cleanup = Cleanup {
        daemon: Some(&f),
        children: Vec::new(),
    };
    let probe = Probe::start(f.port);
    kill_child_then_ask(&f, &f.endpoint(), "1,1,1");
    let (refused, failed, attempts) = probe.finish();
    assert_eq!((refused, failed), (0, 0), "of {attempts} connects");
    f.stop_daemon();
}

/// Starts feedd the way systemd socket activation does (`systemd-socket-activate`, which
/// listens on `listen` and execs feedd with `LISTEN_FDS` on the first connection).
fn socket_activated(f: &Feedd, listen: u16) -> Option<std::process::Child> {
    let log = std::fs::File::create(f.dir.path().join("stderr.log")).unwrap();
    Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{listen}"),
            feedd_bin(),
            "--conf",
            "feed.ini",
        ])
        .current_dir(f.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .ok()
}

/// Item 3: a socket handed by systemd serves when it is `[zmq] endpoint`, and is refused by
/// name when it is not.
#[test]
fn socket_activation_serves_the_handed_socket_and_refuses_another() {
    let db = Db::create("z_activate");
    let f = Feedd::prepare(&db, &[]);
    let Some(mut activator) = socket_activated(&f, f.port) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-socket-activate missing"
        );
        return eprintln!("skipped: systemd-socket-activate not installed");
    };
    let mut cleanup = Cleanup {
        daemon: None,
        children: Vec::new(),
    };
    // Listening before feedd runs: the first connect waits in the backlog until it serves.
    assert!(wait_until(Duration::from_secs(5), || TcpStream::connect((
        "127.0.0.1",
        f.port
    ))
    .is_ok()));
    let req = Req::connect(&f.endpoint());
    assert_eq!(req.ask("1,1,1"), "TRUE", "{}", f.stderr_log());
    assert!(
        f.stderr_log().contains("a socket handed to this process"),
        "{}",
        f.stderr_log()
    );
    kill(activator.id() as i32, Signal::SIGTERM);
    assert!(activator.wait().unwrap().success(), "{}", f.stderr_log());

    // Handed a socket on another port than [zmq] endpoint: a start-up error naming both.
    let other = ports::port();
    let mut activator = socket_activated(&f, other).unwrap();
    assert!(wait_until(Duration::from_secs(5), || TcpStream::connect((
        "127.0.0.1",
        other
    ))
    .is_ok()));
    let status = activator.wait().unwrap();
    let log = f.stderr_log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "listens on tcp://127.0.0.1:{other}, but [zmq] endpoint is {}",
            f.endpoint()
        )),
        "{log}"
    );
    cleanup.children.clear();
}

/// Item 4: a reload moves the endpoint live on a listener the supervisor made for it and
/// handed to the serving child, so the moved endpoint outlives the child too: an upgrade and
/// a `kill -9` after the move refuse no connection on it, and the old endpoint stops accepting
/// once the reload took (nobody serves it any more).
#[test]
fn after_a_reload_moved_the_endpoint_restarts_and_upgrades_serve_the_new_one() {
    let (_db, f) = supervised("z_moved");
    let _cleanup = Cleanup {
        daemon: Some(&f),
        children: Vec::new(),
    };
    let moved = ports::port();
    let endpoint = format!("tcp://127.0.0.1:{moved}");
    let text = std::fs::read_to_string(f.conf_path()).unwrap();
    reload_with(&f, &text.replace(&f.endpoint(), &endpoint));
    f.wait_for_daemon_log(&format!("now serving {endpoint}"));
    assert_eq!(Req::connect(&endpoint).ask("1,1,1"), "TRUE");

    // An upgrade right after the move, then a `kill -9`: both on the moved endpoint.
    let probe = Probe::start(moved);
    let before = f.serving_pid().expect("a serving child");
    let (status, out, err) = f.command(&["upgrade", "--conf", "feed.ini"]);
    assert_eq!(
        status.code(),
        Some(0),
        "upgrade after the move: {out}{err}\n{}",
        f.log()
    );
    assert!(
        wait_until(Duration::from_secs(15), || !alive(before)),
        "the old child drains and exits"
    );
    assert_eq!(Req::connect(&endpoint).ask("2,1,1"), "TRUE");
    kill_child_then_ask(&f, &endpoint, "3,1,1");
    let (refused, failed, attempts) = probe.finish();
    assert_eq!(
        (refused, failed),
        (0, 0),
        "of {attempts} connects to the moved endpoint"
    );
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect((
            "127.0.0.1",
            f.port
        ))
        .is_err()),
        "the old endpoint stops accepting once the reload took"
    );
    f.stop_daemon();
}

/// Item 4, all or nothing: a reload that would move the endpoint but is refused (its database
/// is unreachable) leaves the old endpoint served on the supervisor's listener, which it keeps,
/// and the listener it made for the new endpoint closed.
#[test]
fn a_refused_reload_that_moved_the_endpoint_keeps_the_old_listener() {
    let (db, f) = supervised("z_moved_refused");
    let _cleanup = Cleanup {
        daemon: Some(&f),
        children: Vec::new(),
    };
    let moved = ports::port();
    let good = std::fs::read_to_string(f.conf_path()).unwrap();
    let bad = good
        .replace(&f.endpoint(), &format!("tcp://127.0.0.1:{moved}"))
        .replace(
            &format!("port = {}", db.port),
            &format!("port = {}", ports::port()),
        );
    reload_with(&f, &bad);
    f.wait_for_daemon_log("reload failed");
    f.wait_for_daemon_log(&format!(
        "supervisor: closing the listener on tcp://127.0.0.1:{moved}"
    ));
    assert!(
        TcpStream::connect(("127.0.0.1", moved)).is_err(),
        "nothing listens on the endpoint of the refused reload"
    );
    assert!(
        !f.log()
            .contains(&format!("closing the listener on {}", f.endpoint())),
        "the served listener stays: {}",
        f.log()
    );
    assert_eq!(Req::connect(&f.endpoint()).ask("1,1,1"), "TRUE");
    std::fs::write(f.conf_path(), good).unwrap();
    let probe = Probe::start(f.port);
    kill_child_then_ask(&f, &f.endpoint(), "2,1,1");
    let (refused, failed, attempts) = probe.finish();
    assert_eq!((refused, failed), (0, 0), "of {attempts} connects");
    f.stop_daemon();
}

/// Item 4: widening the port in place (`127.0.0.1:P` to `*:P`) cannot be bound while the
/// supervisor holds the old listener: the reload is refused before anything switches, naming
/// both, and the old endpoint serves on.
#[test]
fn a_reload_widening_the_supervised_port_is_refused_before_it_switches() {
    let (_db, f) = supervised("z_widen");
    let _cleanup = Cleanup {
        daemon: Some(&f),
        children: Vec::new(),
    };
    let req = Req::connect(&f.endpoint());
    assert_eq!(req.ask("1,1,1"), "TRUE");
    let text = std::fs::read_to_string(f.conf_path()).unwrap();
    let wide = format!("tcp://*:{}", f.port);
    reload_with(&f, &text.replace(&f.endpoint(), &wide));
    f.wait_for_daemon_log("reload failed");
    let log = f.log();
    assert!(
        log.contains(&format!("{wide} overlaps {}", f.endpoint())),
        "{log}"
    );
    assert!(!log.contains("now serving"), "nothing switched: {log}");
    assert_eq!(req.ask("2,1,1"), "TRUE", "the old socket serves on");
    f.stop_daemon();
}

/// A database and a `--daemon` feedd under its supervisor, started.
fn supervised(name: &str) -> (Db, Feedd) {
    let db = Db::create(name);
    let f = Feedd::prepare(&db, &[]);
    f.start_daemon();
    (db, f)
}

/// Writes `text` as the daemon's config and has it reloaded (`feedd reload`).
fn reload_with(f: &Feedd, text: &str) {
    std::fs::write(f.conf_path(), text).unwrap();
    let (status, out, err) = f.command(&["reload", "--conf", "feed.ini"]);
    assert!(status.success(), "reload: {out}{err}");
}

/// Kills the serving child, waits for its successor, and asks it `body` on `endpoint`.
fn kill_child_then_ask(f: &Feedd, endpoint: &str, body: &str) {
    let child = f.serving_pid().expect("a serving child");
    kill(child, Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(5), || f
        .serving_pid()
        .is_some_and(|p| p != child)));
    assert_eq!(Req::connect(endpoint).ask(body), "TRUE");
}

/// `12.0003` as the table stores it (DECIMAL(20,4)).
fn volume_of(text: &str) -> String {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    format!("{int}.{frac:0<4}")
}
