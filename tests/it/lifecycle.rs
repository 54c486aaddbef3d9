//! Start-up, shutdown and the control commands (SPEC §2, §6): every command with its exit
//! status, start failures that leave nothing behind, stale pidfiles, SIGTERM draining what is in
//! flight, signals during start-up and to the lock holder only, log rotation, and the privilege
//! drop.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::ports;
use crate::harness::*;

#[test]
fn every_command_with_its_exit_status() {
    let db = Db::create("d_commands");
    let f = Feedd::prepare(&db, &[]);
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--conf", "feed.ini"]);
        let (status, out, err) = f.command(&all);
        (status.code(), format!("{out}{err}"))
    };
    assert_eq!(run(&["status"]), (Some(3), "not running\n".into()));
    assert_eq!(run(&["stop"]).0, Some(0));
    let (code, text) = run(&["reload"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("not running"), "{text}");

    f.start_daemon();
    let pid = f.daemon_pid();
    assert!(pid > 0 && f.pidfile().exists());
    // Ready means serving: a client is answered at once.
    assert_eq!(Req::connect(&f.endpoint()).ask("1,1,1"), "TRUE");
    let (code, text) = run(&["status"]);
    assert_eq!(code, Some(0));
    let child = f
        .serving_pid()
        .expect("a serving child under the supervisor");
    assert_eq!(
        text.trim(),
        format!("running (pid {pid}, serving pid {child})")
    );

    let (code, text) = run(&["start"]);
    assert_eq!(code, Some(1));
    assert!(
        text.contains(&format!("already running (pid {pid})")),
        "{text}"
    );
    let (code, text) = run(&["--daemon"]);
    assert_eq!((code, text.contains("already running")), (Some(1), true));

    assert_eq!(run(&["reload"]).0, Some(0));
    f.wait_for_daemon_log("config reloaded");
    assert_eq!(f.daemon_pid(), pid, "reload keeps the pid");

    let (code, _) = run(&["restart"]);
    assert_eq!(code, Some(0));
    let new_pid = f.daemon_pid();
    assert_ne!(new_pid, pid);
    assert_eq!(Req::connect(&f.endpoint()).ask("2,1,1"), "TRUE");

    assert_eq!(run(&["stop"]).0, Some(0));
    assert!(!f.pidfile().exists(), "pidfile removed on exit");
    assert!(f.processes().is_empty(), "nothing left running");
    assert_eq!(run(&["status"]).0, Some(3));
    assert_eq!(db.count(), 2);
}

fn assert_start_fails(f: &Feedd, needle: &str) {
    let (status, out, err) = f.command(&["start", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!f.pidfile().exists(), "no pidfile left behind");
    assert!(
        wait_until(Duration::from_secs(2), || f.processes().is_empty()),
        "no process left behind"
    );
}

#[test]
fn start_failures_report_the_reason_and_leave_nothing_behind() {
    let db = Db::create("d_start_failures");
    for supervise in ["true", "false"] {
        let sup = format!("daemon.supervise = {supervise}");
        let f = Feedd::prepare(&db, &[&sup, "mysql.password = wrong"]);
        assert_start_fails(&f, "Access denied");
        let f = Feedd::prepare(&db, &[&sup, &format!("mysql.port = {}", ports::port())]);
        assert_start_fails(&f, "database 127.0.0.1");
        let blocker = ports::listener();
        let taken = blocker.local_addr().unwrap().port();
        let f = Feedd::prepare(
            &db,
            &[&sup, &format!("zmq.endpoint = tcp://127.0.0.1:{taken}")],
        );
        assert_start_fails(&f, "cannot bind");
        let f = Feedd::prepare(&db, &[&sup, "daemon.pidfile = /dev/null/feedd.pid"]);
        let (status, _, err) = f.command(&["start", "--conf", "feed.ini"]);
        assert_eq!(status.code(), Some(1));
        assert!(err.contains("pidfile /dev/null/feedd.pid"), "{err}");
        assert!(f.processes().is_empty());
        let f = Feedd::prepare(&db, &[&sup, "pipeline.workers = lots"]);
        assert_start_fails(&f, "[pipeline] workers");
    }
}

#[test]
fn stale_pidfile_never_blocks_a_start() {
    let db = Db::create("d_stale");
    let f = Feedd::prepare(&db, &[]);
    std::fs::create_dir_all(f.pidfile().parent().unwrap()).unwrap();
    std::fs::write(f.pidfile(), "999999\n").unwrap();
    let (status, out, _) = f.command(&["status", "--conf", "feed.ini"]);
    assert_eq!((status.code(), out.trim()), (Some(3), "not running"));
    f.start_daemon();
    let pid = f.daemon_pid();
    assert_ne!(pid, 999999);
    // kill -9 of the whole daemon leaves a stale pidfile; a new start still works.
    let child = f.serving_pid().unwrap();
    kill(pid, Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(5), || f.processes().is_empty()),
        "the child follows its supervisor"
    );
    let _ = child;
    assert!(f.pidfile().exists());
    f.start_daemon();
    assert_eq!(Req::connect(&f.endpoint()).ask("5,5,5"), "TRUE");
    f.stop_daemon();
}

#[test]
fn sigterm_with_thousands_in_flight_drains_and_exits_0() {
    let db = Db::create("sigterm_drain");
    let mut feedd = Feedd::start(&db, &["pipeline.batch_size = 100"]);
    let dealer = Dealer::connect(&feedd.endpoint());
    let bodies = one_record_bodies(1, 5000);
    for (i, b) in bodies.iter().enumerate() {
        dealer.send(i as u64, b);
    }
    // Let part of it be committed, then ask for a stop.
    assert!(wait_until(Duration::from_secs(20), || db.count() > 0));
    feedd.signal(Signal::SIGTERM);
    let status = feedd.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", feedd.stderr_log());
    let mut acked = Vec::new();
    dealer.0.set_rcvtimeo(500).unwrap();
    while let Some((id, text)) = dealer.recv() {
        assert_eq!(text, "TRUE");
        acked.push(id + 1); // ticket of message id
    }
    assert!(
        !acked.is_empty(),
        "some messages were answered before the exit"
    );
    let rows = db.rows();
    for t in &acked {
        assert!(
            rows.contains_key(t),
            "ticket {t} was acknowledged but is missing"
        );
    }
    assert!(feedd.stderr_log().contains("drained"));
}

#[test]
fn startup_errors_exit_1_with_one_line_reason() {
    let db = Db::create("startup_errors");
    // Database unreachable.
    let feedd = Feedd::prepare(&db, &[&format!("mysql.port = {}", ports::port())]);
    let (status, _, stderr) = feedd.command(&["--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("feedd: database 127.0.0.1:"), "{stderr}");
    // Bad config.
    let feedd = Feedd::prepare(&db, &["pipeline.batch_size = 0"]);
    let (status, _, stderr) = feedd.command(&["--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("[pipeline] batch_size"), "{stderr}");
    // Endpoint already bound.
    let running = Feedd::start(&db, &[]);
    let clash = Feedd::prepare(
        &db,
        &[&format!("zmq.endpoint = tcp://127.0.0.1:{}", running.port)],
    );
    let (status, _, stderr) = clash.command(&["--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("cannot bind"), "{stderr}");
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
                kill(pid, Signal::SIGHUP);
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
fn signals_go_to_the_lock_holder_only() {
    let db = Db::create("hostile_pidfile");
    let f = Feedd::prepare(&db, &[]);
    f.start_daemon();
    let holder = f.daemon_pid();
    assert!(holder > 0);
    let decoy = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let decoy_pid = decoy.id() as i32;
    let mut cleanup = Cleanup {
        daemon: Some(&f),
        children: vec![decoy],
    };
    // Rewritten in place: the same inode, still locked by the daemon.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(f.pidfile())
        .unwrap();
    writeln!(file, "{decoy_pid}").unwrap();
    drop(file);
    let disagreement = format!("says {decoy_pid}, lock held by {holder}");

    let (status, out, err) = f.command(&["status", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(0), "{out}{err}");
    assert!(out.starts_with(&format!("running (pid {holder}")), "{out}");
    assert!(err.contains(&disagreement), "{err}");

    let (status, out, err) = f.command(&["reload", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("reload sent (pid {holder})")),
        "{out}"
    );
    assert!(err.contains(&disagreement), "{err}");
    f.wait_for_daemon_log("config reloaded");
    let decoy = &mut cleanup.children[0];
    assert!(decoy.try_wait().unwrap().is_none(), "the decoy got no HUP");

    let (status, out, err) = f.command(&["stop", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(0), "{out}{err}");
    assert!(out.contains(&format!("stopped (pid {holder})")), "{out}");
    assert!(decoy.try_wait().unwrap().is_none(), "the decoy got no TERM");
    assert!(wait_until(Duration::from_secs(5), || f
        .processes()
        .is_empty()));
}

#[test]
#[ignore = "needs root"]
fn privileges_are_dropped_and_umask_applies() {
    let db = Db::create("d_privileges");
    let f = Feedd::prepare(
        &db,
        &[
            "daemon.user = nobody",
            "daemon.group = nogroup",
            "daemon.umask = 027",
        ],
    );
    // The run dir must be reachable by `nobody` for the log reopen.
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    f.start_daemon();
    let child = f.serving_pid().unwrap();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    assert_eq!(proc_ids(child, "Uid:"), vec![nobody; 3]);
    assert_eq!(proc_ids(child, "Gid:"), vec![nogroup; 3]);
    let groups = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    let groups = groups.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert!(
        !groups.split_whitespace().any(|g| g == "0"),
        "no root group left: {groups}"
    );
    assert_eq!(Req::connect(&f.endpoint()).ask("1,1,1"), "TRUE");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&f.pidfile()), 0o640);
    assert_eq!(mode(&f.log_file()), 0o640);
    assert_eq!(mode(f.log_file().parent().unwrap()), 0o750);
    f.stop_daemon();
}

#[test]
fn log_rotation_reopens_the_file() {
    let db = Db::create("d_logrotate");
    let f = Feedd::prepare(&db, &[]);
    f.start_daemon();
    let rotated = f.log_file().with_extension("log.1");
    std::fs::rename(f.log_file(), &rotated).unwrap();
    kill(f.daemon_pid(), Signal::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || f
        .log()
        .contains("log file reopened")));
    let old_len = std::fs::metadata(&rotated).unwrap().len();
    kill(f.daemon_pid(), Signal::SIGHUP);
    f.wait_for_daemon_log("config reloaded");
    assert_eq!(
        std::fs::metadata(&rotated).unwrap().len(),
        old_len,
        "the old file gets nothing after the signal"
    );
    f.stop_daemon();
}

/// `feedd stop` returns only once the process it stopped has exited, not merely once the lock
/// is released (a daemon releases it a moment before it ends: then its log is flushed). A
/// stand-in daemon holds the pidfile lock and, on SIGTERM, releases it and lives 2 s more.
#[test]
fn stop_returns_once_the_daemon_has_exited_not_when_the_lock_goes() {
    let db = Db::create("d_stop_exited");
    let f = Feedd::prepare(&db, &[]);
    let pidfile = f.pidfile();
    std::fs::create_dir_all(pidfile.parent().unwrap()).unwrap();
    let script = r#"
import fcntl, os, signal, sys, time
f = open(sys.argv[1], "w")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(str(os.getpid())); f.flush()
def term(*_):
    fcntl.flock(f, fcntl.LOCK_UN)
    time.sleep(2)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("locked", flush=True)
while True:
    time.sleep(0.1)
"#;
    let mut stand_in = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&pidfile)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(stand_in.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "locked\n");
    let pid = stand_in.id() as i32;
    let t = std::time::Instant::now();
    let (status, out, err) = f.command(&["stop", "--conf", "feed.ini"]);
    let took = t.elapsed();
    let still = alive(pid);
    println!("`stop` returned after {took:?}; stand-in still running: {still}");
    assert_eq!(status.code(), Some(0), "{out}{err}");
    assert!(out.contains(&format!("stopped (pid {pid})")), "{out}");
    assert!(!still, "`stop` returned while pid {pid} was running");
    let _ = stand_in.wait();
}
