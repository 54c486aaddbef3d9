//! Daemon mode (SPEC §2, §3 Reload, §6): every command with its exit status, start failures,
//! single instance, privilege drop, log rotation, the supervisor, reload under load.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

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
        let f = Feedd::prepare(&db, &[&sup, &format!("mysql.port = {}", free_port())]);
        assert_start_fails(&f, "database 127.0.0.1");
        let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
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
    kill(pid, libc::SIGKILL);
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
    kill(f.daemon_pid(), libc::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || f
        .log()
        .contains("log file reopened")));
    let old_len = std::fs::metadata(&rotated).unwrap().len();
    kill(f.daemon_pid(), libc::SIGHUP);
    f.wait_for_daemon_log("config reloaded");
    assert_eq!(
        std::fs::metadata(&rotated).unwrap().len(),
        old_len,
        "the old file gets nothing after the signal"
    );
    f.stop_daemon();
}

#[test]
fn supervisor_restarts_a_killed_child_within_a_second_and_nothing_is_lost() {
    let db = Db::create("d_supervisor");
    let f = Feedd::prepare(&db, &[]);
    f.start_daemon();
    let supervisor = f.daemon_pid();
    let dealer = Dealer::connect(&f.endpoint());
    dealer.0.set_rcvtimeo(2000).unwrap();
    let bodies = one_record_bodies(1, 3000);
    let mut pending: HashMap<u64, &String> = HashMap::new();
    for (i, b) in bodies.iter().enumerate() {
        dealer.send(i as u64, b);
        pending.insert(i as u64, b);
        if i == 1000 {
            let child = f.serving_pid().unwrap();
            kill(child, libc::SIGKILL);
            let killed = Instant::now();
            assert!(
                wait_until(Duration::from_secs(3), || f
                    .serving_pid()
                    .is_some_and(|p| p != child)),
                "a new child"
            );
            let req = Req::connect(&f.endpoint());
            assert_eq!(req.ask("999999,1,1"), "TRUE");
            let took = killed.elapsed();
            assert!(
                took < Duration::from_millis(1500),
                "serving again after {took:?}"
            );
        }
    }
    // Collect, then resend whatever was not answered until everything is.
    let mut rounds = 0;
    while !pending.is_empty() {
        while let Some((id, text)) = dealer.recv() {
            assert_eq!(text, "TRUE");
            pending.remove(&id);
        }
        rounds += 1;
        assert!(rounds < 10, "{} never answered", pending.len());
        for (id, b) in &pending {
            dealer.send(*id, b);
        }
    }
    assert_eq!(db.count(), 3001, "every ticket exactly once");
    assert_eq!(f.daemon_pid(), supervisor);
    assert!(f.log().contains("was killed by signal 9"));
    f.stop_daemon();
}

#[test]
fn crash_loop_backs_off() {
    let db = Db::create("d_crashloop");
    let f = Feedd::prepare(&db, &[]);
    f.start_daemon();
    for _ in 0..3 {
        let child = f.serving_pid().unwrap();
        kill(child, libc::SIGKILL);
        assert!(wait_until(Duration::from_secs(5), || f
            .serving_pid()
            .is_some_and(|p| p != child)));
    }
    let log = f.log();
    assert!(log.contains("restart #1 in 0.2 s"), "{log}");
    assert!(log.contains("restart #2 in 0.4 s"), "{log}");
    assert!(log.contains("restart #3 in 0.8 s"), "{log}");
    f.stop_daemon();
}

#[test]
fn reload_under_load_answers_everything_exactly_once() {
    let db_a = Db::create("d_reload_a");
    let db_b = Db::create("d_reload_b");
    let (metrics_addr, listen) = metrics_listen();
    let f = Feedd::prepare(&db_a, &[&listen]);
    f.start_daemon();
    let pid = f.daemon_pid();
    let base = std::fs::read_to_string(f.conf_path()).unwrap();
    let endpoint = f.endpoint();
    let streamer = std::thread::spawn(move || {
        let dealer = Dealer::connect(&endpoint);
        let bodies: Vec<String> = (0..4000u64)
            .map(|m| format!("{},{},1.5\n{},{},2", m * 2 + 1, m, m * 2 + 2, m))
            .collect();
        let mut replies = HashMap::new();
        for (i, b) in bodies.iter().enumerate() {
            dealer.send(i as u64, b);
            if i % 200 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            while let Ok(frames) = dealer.0.recv_multipart(zmq::DONTWAIT) {
                let id: u64 = String::from_utf8_lossy(&frames[0]).parse().unwrap();
                let text = String::from_utf8_lossy(frames.last().unwrap()).into_owned();
                assert!(replies.insert(id, text).is_none(), "answered twice");
            }
        }
        while replies.len() < bodies.len() {
            let (id, text) = dealer.recv().expect("every message answered");
            assert!(replies.insert(id, text).is_none(), "answered twice");
        }
        (bodies, replies)
    });
    let mut invalid = 0;
    for i in 0..20 {
        let text = match i % 5 {
            0 => base.replace(
                "[pipeline]\n",
                &format!("[pipeline]\nbatch_size = {}\n", 10 + i),
            ),
            1 => base.replace("log_level = debug", "log_level = info"),
            2 => base.replace(
                &format!("database = {}", db_a.name),
                &format!("database = {}", db_b.name),
            ),
            3 => {
                invalid += 1;
                base.replace("[pipeline]\n", "[pipeline]\nbatch_size = zero\n")
            }
            _ => base.clone(),
        };
        std::fs::write(f.conf_path(), text).unwrap();
        kill(pid, libc::SIGHUP);
        // One reload at a time: wait until this one is counted (applied or refused).
        let counted = || {
            let text = http_get(&metrics_addr, "/metrics");
            metric(&text, "feedd_config_reloads_total")
                + metric(&text, "feedd_config_reload_failures_total")
        };
        assert!(wait_until(Duration::from_secs(20), || counted() == (i + 1) as f64));
    }
    let (bodies, replies) = streamer.join().unwrap();
    assert!(
        replies.values().all(|r| r == "TRUE"),
        "{:?}",
        replies.values().find(|r| *r != "TRUE")
    );
    let (a, b) = (db_a.rows(), db_b.rows());
    for body in &bodies {
        for line in body.lines() {
            let t: u64 = line.split(',').next().unwrap().parse().unwrap();
            assert!(
                a.contains_key(&t) || b.contains_key(&t),
                "acknowledged ticket {t} missing"
            );
        }
    }
    assert!(!b.is_empty(), "some batches went to the switched database");
    assert_eq!(f.daemon_pid(), pid);
    let text = http_get(&metrics_addr, "/metrics");
    assert_eq!(
        metric(&text, "feedd_config_reload_failures_total"),
        invalid as f64
    );
    assert_eq!(
        metric(&text, "feedd_config_reloads_total"),
        (20 - invalid) as f64
    );

    // An endpoint change: the new one serves, the old one no longer does.
    let new_port = free_port();
    let moved = base.replace(
        &format!("127.0.0.1:{}", f.port),
        &format!("127.0.0.1:{new_port}"),
    );
    std::fs::write(f.conf_path(), moved).unwrap();
    kill(pid, libc::SIGHUP);
    f.wait_for_daemon_log(&format!("now serving tcp://127.0.0.1:{new_port}"));
    assert_eq!(
        Req::connect(&format!("tcp://127.0.0.1:{new_port}")).ask("777777,1,1"),
        "TRUE"
    );
    let old = Req::connect(&f.endpoint());
    old.0.set_rcvtimeo(300).unwrap();
    old.0.send("888888,1,1", 0).unwrap();
    assert!(old.0.recv_bytes(0).is_err(), "the old endpoint is closed");
    f.stop_daemon();
}

#[test]
fn reload_to_an_unreachable_database_fails_and_keeps_the_old_target() {
    let db = Db::create("d_reload_unreachable");
    let (metrics_addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    let req = Req::connect(&f.endpoint());
    assert_eq!(req.ask("1,1,1"), "TRUE");
    let conf = std::fs::read_to_string(f.conf_path()).unwrap();
    let dead = conf.replace(
        &format!("port = {}", db.port),
        &format!("port = {}", free_port()),
    );
    assert_ne!(dead, conf);
    std::fs::write(f.conf_path(), dead).unwrap();
    f.signal(libc::SIGHUP);
    f.wait_for_log("new database target not usable", Duration::from_secs(10));
    assert_eq!(req.ask("2,1,1"), "TRUE", "still writing to the old target");
    assert_eq!(db.count(), 2);
    let text = http_get(&metrics_addr, "/metrics");
    assert_eq!(metric(&text, "feedd_config_reload_failures_total"), 1.0);
    assert_eq!(metric(&text, "feedd_config_reloads_total"), 0.0);
}
