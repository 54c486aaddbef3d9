//! The lifecycle bugs of issue 10, one test each: reloads that must fail whole (and be
//! retried), endpoint and size changes that must take, an endpoint change under load that
//! must not drop a reply, signals during start-up, and a supervisor killed under `user`.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use mysql::prelude::Queryable;

fn reload_counts(addr: &str) -> (f64, f64) {
    let text = http_get(addr, "/metrics");
    (
        metric(&text, "feedd_config_reloads_total"),
        metric(&text, "feedd_config_reload_failures_total"),
    )
}

fn wait_counts(addr: &str, want: (f64, f64)) {
    assert!(
        wait_until(Duration::from_secs(20), || reload_counts(addr) == want),
        "reload counts {:?}, wanted {want:?}",
        reload_counts(addr)
    );
}

fn rewrite(f: &Feedd, from: &str, to: &str) {
    let text = std::fs::read_to_string(f.conf_path()).unwrap();
    assert!(text.contains(from), "{from} not in the config");
    std::fs::write(f.conf_path(), text.replace(from, to)).unwrap();
}

#[test]
fn reload_to_a_busy_port_fails_whole_and_the_same_file_applies_once_it_is_free() {
    let db = Db::create("l_busy_port");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let new_port = busy.local_addr().unwrap().port();
    rewrite(
        &f,
        &format!("127.0.0.1:{}", f.port),
        &format!("127.0.0.1:{new_port}"),
    );
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (0.0, 1.0));
    // The old endpoint still serves, and nothing of the failed reload is applied.
    assert_eq!(Req::connect(&f.endpoint()).ask("1,1,1"), "TRUE");
    drop(busy);
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (1.0, 1.0));
    let moved = format!("tcp://127.0.0.1:{new_port}");
    assert_eq!(Req::connect(&moved).ask("2,1,1"), "TRUE");
    assert_eq!(db.count(), 2);
}

#[test]
fn widening_the_endpoint_to_every_interface_applies() {
    let db = Db::create("l_widen");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    assert_eq!(Req::connect(&f.endpoint()).ask("1,1,1"), "TRUE");
    rewrite(
        &f,
        &format!("tcp://127.0.0.1:{}", f.port),
        &format!("tcp://*:{}", f.port),
    );
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (1.0, 0.0));
    f.wait_for_log(
        &format!("now serving tcp://0.0.0.0:{}", f.port),
        Duration::from_secs(5),
    );
    assert_eq!(Req::connect(&f.endpoint()).ask("2,1,1"), "TRUE");
}

/// A body of about `bytes` bytes of valid records, tickets from `first`.
fn big_body(first: u64, bytes: usize) -> String {
    let mut body = String::new();
    let mut t = first;
    while body.len() < bytes {
        body.push_str(&format!("{t},7,1.5\n"));
        t += 1;
    }
    body
}

#[test]
fn the_size_guard_follows_max_message_bytes_both_ways() {
    let db = Db::create("l_guard");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen, "zmq.max_message_bytes = 1000"]);
    let body = big_body(1, 90_000);
    rewrite(
        &f,
        "max_message_bytes = 1000",
        "max_message_bytes = 1048576",
    );
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (1.0, 0.0));
    // A connection made after the reload gets the new guard: the 90 kB message is stored.
    assert_eq!(Req::connect(&f.endpoint()).ask(&body), "TRUE");
    rewrite(
        &f,
        "max_message_bytes = 1048576",
        "max_message_bytes = 1000",
    );
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (2.0, 0.0));
    // Lowered: libzmq's guard (4 × the limit + 64 KiB) drops the sender of 90 kB again.
    let dealer = Dealer::connect(&f.endpoint());
    dealer.0.set_rcvtimeo(2000).unwrap();
    assert_eq!(dealer.ask(&big_body(100_000, 90_000)), None);
    // And a message between the limit and the guard is answered `FALSE too large`.
    assert_eq!(
        Req::connect(&f.endpoint()).ask(&big_body(200_000, 5_000)),
        "FALSE too large"
    );
}

#[test]
fn endpoint_change_under_load_drops_no_reply_of_a_committed_message() {
    let db = Db::create("l_move_load");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    let old = f.endpoint();
    let new_port = free_port();
    let new = format!("tcp://127.0.0.1:{new_port}");
    let clients = 4u64;
    let per_client = 1500u64;
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (old, new, name) = (old.clone(), new.clone(), db.name.clone());
            std::thread::spawn(move || {
                let bodies = bodies(1 + c * per_client * 2, per_client, 2);
                run_moving_client(&old, &new, &bodies, &name)
            })
        })
        .collect();
    // Reload once the clients are well under way.
    assert!(wait_until(Duration::from_secs(20), || db.count() > 1000));
    rewrite(&f, &old, &new);
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (1.0, 0.0));
    let mut dropped = 0;
    for t in threads {
        let (answers, lost) = t.join().unwrap();
        assert_eq!(answers.len() as u64, per_client, "every message answered");
        assert!(answers.values().all(|r| r == "TRUE"), "{answers:?}");
        dropped += lost;
    }
    assert_eq!(
        dropped, 0,
        "committed messages whose reply never came (the reload dropped it)"
    );
    assert_eq!(db.count(), clients * per_client * 2);
    eprintln!("moved under load in {:?}", started.elapsed());
}

/// Streams `bodies` (64 in flight) to `old`; a message unanswered for 3 s is checked in the
/// table (present = its reply was dropped: counted) and resent through `new`.
fn run_moving_client(
    old: &str,
    new: &str,
    bodies: &[String],
    database: &str,
) -> (HashMap<u64, String>, u64) {
    let first = Dealer::connect(old);
    first.0.set_rcvtimeo(20).unwrap();
    let second = Dealer::connect(new);
    second.0.set_rcvtimeo(20).unwrap();
    let mut conn = mysql::Conn::new(
        mysql::OptsBuilder::new()
            .ip_or_hostname(Some(mysql_host()))
            .tcp_port(mysql_port())
            .user(Some("root"))
            .db_name(Some(database)),
    )
    .unwrap();
    let mut answers = HashMap::new();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut resent: HashSet<u64> = HashSet::new();
    let mut lost = 0;
    let mut next = 0u64;
    // Once a message had to be resent the old endpoint is gone: send the rest to the new one.
    let mut moved = false;
    let end = Instant::now() + Duration::from_secs(120);
    while (answers.len() as u64) < bodies.len() as u64 && Instant::now() < end {
        while sent.len() < 64 && next < bodies.len() as u64 {
            if moved {
                second.send(next, &bodies[next as usize]);
            } else {
                first.send(next, &bodies[next as usize]);
            }
            sent.insert(next, Instant::now());
            next += 1;
        }
        for dealer in [&first, &second] {
            while let Some((id, text)) = dealer.recv() {
                if sent.remove(&id).is_some() {
                    answers.insert(id, text);
                }
            }
        }
        let stale: Vec<u64> = sent
            .iter()
            .filter(|(id, at)| at.elapsed() > Duration::from_secs(3) && !resent.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let ticket: u64 = bodies[id as usize]
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let stored: Option<u64> = mysql::prelude::Queryable::exec_first(
                &mut conn,
                "SELECT ticket FROM fee WHERE ticket = ?",
                (ticket,),
            )
            .unwrap();
            if stored.is_some() {
                lost += 1;
            }
            resent.insert(id);
            moved = true;
            second.send(id, &bodies[id as usize]);
        }
    }
    (answers, lost)
}

#[test]
fn hup_during_start_never_kills_the_serving_child() {
    let db = Db::create("l_early_hup");
    for round in 0..3 {
        let f = Feedd::prepare(&db, &[]);
        let mut start = std::process::Command::new(feedd_bin())
            .args(["start", "--conf", "feed.ini"])
            .current_dir(f.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut hups = 0;
        let status = loop {
            if let Some(status) = start.try_wait().unwrap() {
                break status;
            }
            let pid = f.daemon_pid();
            if pid > 0 {
                kill(pid, libc::SIGHUP);
                hups += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(status.success(), "start failed:\n{}", f.log());
        assert!(
            hups > 0,
            "round {round}: the pidfile never appeared before ready"
        );
        let serving = f.serving_pid();
        assert!(serving.is_some());
        assert_eq!(
            Req::connect(&f.endpoint()).ask(&format!("{},1,1", round + 1)),
            "TRUE"
        );
        let log = f.log();
        assert!(
            !log.contains("was killed by signal"),
            "round {round}: a HUP killed the serving child:\n{log}"
        );
        assert_eq!(f.serving_pid(), serving, "no restart happened");
        f.stop_daemon();
    }
}

#[test]
fn supervisor_killed_with_user_set_takes_the_serving_child_with_it() {
    if !nix_is_root() {
        eprintln!("skipped: needs root to drop to nobody");
        return;
    }
    let db = Db::create("l_orphan");
    let f = Feedd::prepare(&db, &["daemon.user = nobody", "daemon.group = nogroup"]);
    // The unprivileged child must be able to reach its log and config.
    std::fs::set_permissions(
        f.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    f.start_daemon();
    let supervisor = f.daemon_pid();
    let child = f.serving_pid().expect("a serving child");
    assert_eq!(
        proc_ids(child, "Uid:")[0],
        65534,
        "the child runs as nobody"
    );
    kill(supervisor, libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(1), || !alive(child)),
        "the serving child (user nobody) outlived its supervisor:\n{}",
        f.log()
    );
    // Nothing holds the port: a new start works at once.
    f.start_daemon();
    assert_eq!(Req::connect(&f.endpoint()).ask("1,1,1"), "TRUE");
    f.stop_daemon();
}

fn nix_is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn sigterm_right_behind_a_slow_reload_is_acted_on_at_once() {
    let db = Db::create("l_slow_reload");
    let mut f = Feedd::start(&db, &["daemon.shutdown_timeout_ms = 500"]);
    // A "database" that accepts connections and never says a word: proving it takes the
    // pool's whole connect timeout (3 s).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    rewrite(
        &f,
        &format!("port = {}", db.port),
        &format!("port = {port}"),
    );
    f.signal(libc::SIGHUP);
    f.wait_for_log("SIGHUP: reloading", Duration::from_secs(5));
    let asked = Instant::now();
    f.signal(libc::SIGTERM);
    let status = f.wait(Duration::from_secs(10));
    let took = asked.elapsed();
    assert!(status.success(), "{}", f.stderr_log());
    assert!(
        took < Duration::from_millis(2000),
        "SIGTERM waited {took:?} for the reload"
    );
    assert!(f.stderr_log().contains("the reload under way is abandoned"));
}

#[test]
fn ipc_endpoints_never_delete_a_file_and_leave_no_socket_behind() {
    let db = Db::create("l_ipc");
    let (addr, listen) = metrics_listen();
    let f = Feedd::prepare(&db, &[&listen]);
    let sock = f.dir.path().join("feedd.sock");
    let plain = f.dir.path().join("plain");
    std::fs::write(&plain, "not a socket").unwrap();
    let ipc = format!("ipc://{}", sock.display());
    let f = f.prepare_in(&db, &[&listen, &format!("zmq.endpoint = {ipc}")]);
    let mut f = f.spawn_foreground();
    assert_eq!(Req::connect(&ipc).ask("1,1,1"), "TRUE");
    // A second instance on the same path is refused, the first keeps serving.
    let other = Feedd::prepare(&db, &[&format!("zmq.endpoint = {ipc}")]);
    let (status, _, err) = other.command(&["--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("already listening"), "{err}");
    assert_eq!(Req::connect(&ipc).ask("2,1,1"), "TRUE");
    // A reload to a path that is a regular file fails and leaves the file alone.
    rewrite(&f, &ipc, &format!("ipc://{}", plain.display()));
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (0.0, 1.0));
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "not a socket");
    // A reload to another path moves there and removes the old socket file.
    let moved = f.dir.path().join("moved.sock");
    rewrite(
        &f,
        &format!("ipc://{}", plain.display()),
        &format!("ipc://{}", moved.display()),
    );
    f.signal(libc::SIGHUP);
    wait_counts(&addr, (1.0, 1.0));
    assert!(!sock.exists(), "the old socket file is removed");
    let moved_ipc = format!("ipc://{}", moved.display());
    assert_eq!(Req::connect(&moved_ipc).ask("3,1,1"), "TRUE");
    f.signal(libc::SIGTERM);
    assert!(f.wait(Duration::from_secs(10)).success());
    assert!(!moved.exists(), "no socket file left after a clean exit");
}

#[test]
fn sigterm_during_an_endpoint_move_abandons_it_at_once() {
    let db = Db::create("l_move_term");
    let (addr, listen) = metrics_listen();
    let mut f = Feedd::start(&db, &[&listen, "daemon.shutdown_timeout_ms = 3000"]);
    // A message that cannot commit (its ticket is locked): the move waits for its answer.
    let mut other = db.conn();
    other.query_drop("BEGIN").unwrap();
    other
        .query_drop("INSERT INTO fee (ticket, login, volume, status) VALUES (1, 1, 1, 'Y')")
        .unwrap();
    let dealer = Dealer::connect(&f.endpoint());
    dealer.send(1, "1,1,1");
    assert!(wait_until(Duration::from_secs(10), || {
        metric(
            &http_get(&addr, "/metrics"),
            "feedd_messages_received_total",
        ) >= 1.0
    }));
    rewrite(
        &f,
        &format!("127.0.0.1:{}", f.port),
        &format!("127.0.0.1:{}", free_port()),
    );
    f.signal(libc::SIGHUP);
    f.wait_for_log("SIGHUP: reloading", Duration::from_secs(5));
    f.wait_for_log("before switching", Duration::from_secs(5));
    let asked = Instant::now();
    f.signal(libc::SIGTERM);
    let status = f.wait(Duration::from_secs(20));
    let took = asked.elapsed();
    other.query_drop("ROLLBACK").unwrap();
    assert!(status.success(), "{}", f.stderr_log());
    assert!(
        took < Duration::from_millis(3500),
        "SIGTERM waited {took:?} (the drain is 3 s)"
    );
    assert!(
        f.stderr_log().contains("reload being applied is abandoned"),
        "{}",
        f.stderr_log()
    );
}
