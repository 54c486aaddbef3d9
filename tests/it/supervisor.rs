//! The supervisor of daemon mode (SPEC §6): a killed serving child is restarted within a second
//! without losing anything, a crash loop backs off, and a killed supervisor takes its child
//! with it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::harness::*;

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
            kill(child, Signal::SIGKILL);
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
        kill(child, Signal::SIGKILL);
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
#[ignore = "needs root"]
fn supervisor_killed_with_user_set_takes_the_serving_child_with_it() {
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
    kill(supervisor, Signal::SIGKILL);
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

/// On SIGHUP the supervisor follows the file's log settings only when the serving child can
/// accept the file: a file refused as invalid leaves both on the running log.
#[test]
fn a_refused_file_moves_neither_the_supervisors_log_nor_the_childs() {
    let db = Db::create("d_sup_log");
    let f = Feedd::prepare(&db, &[]);
    f.start_daemon();
    let moved = f.dir.path().join("moved.log");
    let f = f.prepare_in(
        &db,
        &[
            &format!("daemon.log_file = {}", path_str(&moved)),
            "mysql.no_such_key = 1",
        ],
    );
    kill(f.daemon_pid(), Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || f
            .log()
            .contains("reload failed, keeping the running config")),
        "{}",
        f.log()
    );
    // `stop` reads the file for the pidfile: a valid one again (no SIGHUP follows).
    let f = f.prepare_in(&db, &[]);
    f.stop_daemon();
    assert!(f.log().contains("supervisor: signal 15"), "{}", f.log());
    let elsewhere = std::fs::read_to_string(&moved).unwrap_or_default();
    assert!(
        elsewhere.is_empty(),
        "the supervisor moved to {moved:?}:\n{elsewhere}"
    );
}
