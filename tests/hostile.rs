//! A careless operator and a hostile client (issue 11): tables that do not fit, a pidfile that
//! lies, a metrics client that never ends its request, log files that cannot be written,
//! frame and size limits, config mistakes, and what the counters mean. Each test failed on the
//! code before the fix.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::mariadb::PrivateMariadb;
use common::*;
use mysql::prelude::Queryable;

const FEE: &str = "ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY, login BIGINT UNSIGNED NOT NULL,
                   volume DECIMAL(20,4) NOT NULL, status CHAR(1) NOT NULL DEFAULT 'N'";

/// Stops a daemon started by a test and kills helper processes, even when the test fails.
struct Cleanup<'a> {
    daemon: Option<&'a Feedd>,
    children: Vec<std::process::Child>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.daemon {
            if !f.processes().is_empty() {
                let _ = f.command(&["stop", "--conf", "feed.ini"]);
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `feedd start`, which must fail; a daemon that started anyway is stopped before panicking.
fn start_must_fail(f: &Feedd) -> String {
    let (status, out, err) = f.command(&["start", "--conf", "feed.ini"]);
    if status.success() {
        f.stop_daemon();
        panic!("started although it should not: {out}");
    }
    err
}

#[test]
fn a_table_that_does_not_fit_refuses_start() {
    let db = Db::create("hostile_schema");
    let f = Feedd::prepare(&db, &[]);
    let cases = [
        (
            FEE.replace("DECIMAL(20,4)", "DECIMAL(20,2)"),
            "`volume` is decimal(20,2), needs an exact DECIMAL",
        ),
        (
            FEE.replace("DECIMAL(20,4)", "DOUBLE"),
            "`volume` is double, needs an exact DECIMAL",
        ),
        (
            FEE.replace("login BIGINT UNSIGNED", "login INT UNSIGNED"),
            "`login` is int(10) unsigned, needs BIGINT UNSIGNED",
        ),
        (
            FEE.replace("ticket BIGINT UNSIGNED", "ticket VARCHAR(5)"),
            "`ticket` is varchar(5), needs BIGINT UNSIGNED",
        ),
        (
            format!("{FEE}, note INT NOT NULL"),
            "`note` is int(11) NOT NULL without a default",
        ),
        (
            FEE.replace("PRIMARY KEY", ""),
            "`ticket` is neither the PRIMARY KEY nor a single-column UNIQUE key",
        ),
    ];
    for (columns, expected) in cases {
        let mut c = db.conn();
        c.query_drop("DROP TABLE IF EXISTS fee").unwrap();
        c.query_drop(format!("CREATE TABLE fee ({columns}) ENGINE=InnoDB"))
            .unwrap();
        let err = start_must_fail(&f);
        assert!(err.contains(expected), "{expected}\n{err}");
        assert!(err.contains("does not fit what feedd writes"), "{err}");
    }
    let mut c = db.conn();
    c.query_drop("DROP TABLE fee").unwrap();
    c.query_drop(format!("CREATE TABLE fee ({FEE}) ENGINE=MyISAM"))
        .unwrap();
    let err = start_must_fail(&f);
    assert!(err.contains("the engine is MyISAM, needs InnoDB"), "{err}");
}

#[test]
fn a_reload_judges_the_table_again() {
    let db = Db::create("hostile_reload_schema");
    let f = Feedd::start(&db, &[]);
    db.conn()
        .query_drop("ALTER TABLE fee MODIFY volume DECIMAL(20,2) NOT NULL")
        .unwrap();
    f.signal(libc::SIGHUP);
    f.wait_for_log("reload failed", Duration::from_secs(10));
    assert!(
        f.stderr_log().contains("`volume` is decimal(20,2)"),
        "{}",
        f.stderr_log()
    );
}

/// A server whose global sql_mode is empty (as some installs have it) and a table narrowed
/// under a running feedd: the session's strict mode makes the INSERT fail instead of storing
/// 4294967295, the message is held with a log line saying an operator must act, and it is
/// answered TRUE, stored exactly, once the column is widened again.
#[test]
fn strict_sessions_hold_what_an_altered_table_cannot_take() {
    let server = PrivateMariadb::start();
    server
        .conn()
        .query_drop("SET GLOBAL sql_mode = ''")
        .unwrap();
    let db = Db::create_on("hostile_strict", server.port);
    let f = Feedd::start(&db, &["pipeline.workers = 1"]);
    db.conn()
        .query_drop("ALTER TABLE fee MODIFY login INT UNSIGNED NOT NULL")
        .unwrap();
    let dealer = Dealer::connect(&f.endpoint());
    dealer.send(1, "1,4294967296,1");
    f.wait_for_log("an operator must act", Duration::from_secs(20));
    let log = f.stderr_log();
    assert!(log.contains("`login` is int(10) unsigned"), "{log}");
    assert!(
        dealer.0.recv_multipart(zmq::DONTWAIT).is_err(),
        "nothing answered while the table cannot take it"
    );
    assert_eq!(db.count(), 0);
    db.conn()
        .query_drop("ALTER TABLE fee MODIFY login BIGINT UNSIGNED NOT NULL")
        .unwrap();
    assert_eq!(dealer.recv(), Some((1, "TRUE".to_string())));
    assert_eq!(db.rows()[&1].0, 4_294_967_296);
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
fn metrics_listener_bounds_size_time_and_connections() {
    let db = Db::create("hostile_metrics");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    assert!(http_get(&addr, "/metrics").contains("feedd_queue_depth"));
    let before = f.rss_kib();

    // One endless header line: cut off after a few KiB, costing no memory.
    let mut huge = std::net::TcpStream::connect(&addr).unwrap();
    huge.write_all(b"GET /metrics HTTP/1.1\r\nX-Big: ").unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 64 << 20 {
        match huge.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 64 << 20, "the server kept reading a 64 MiB header");
    let grown = f.rss_kib().saturating_sub(before);
    assert!(grown < 4 * 1024, "RSS grew by {grown} KiB");

    // Silent connections are closed within the request deadline, however many there are.
    let started = Instant::now();
    let mut idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = Vec::new();
        match s.read_to_end(&mut sink) {
            Ok(_) => {}
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "an idle connection was kept open: {e}"
            ),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(http_get(&addr, "/metrics").contains("feedd_queue_depth"));
}

#[test]
fn log_file_is_checked_at_start_and_on_reload() {
    let db = Db::create("hostile_log");
    let f = Feedd::prepare(&db, &["daemon.log_file = /proc/feedd-hostile.log"]);
    let err = start_must_fail(&f);
    assert!(
        err.contains("[daemon] log_file /proc/feedd-hostile.log: cannot open"),
        "{err}"
    );

    let f = f.prepare_in(&db, &[]);
    f.start_daemon();
    let _cleanup = Cleanup {
        daemon: Some(&f),
        children: Vec::new(),
    };
    let missing = f.dir.path().join("nonexistent");
    let wanted = missing.join("dir/x.log");
    let conf = config_text(
        &db,
        f.port,
        &[&format!("daemon.log_file = {}", path_str(&wanted))],
    );
    std::fs::write(f.conf_path(), conf).unwrap();
    let (status, out, err) = f.command(&["reload", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(0), "{out}{err}");
    f.wait_for_daemon_log("reload failed");
    assert!(f.log().contains("[daemon] log_file"), "{}", f.log());
    assert!(!missing.exists(), "no directory is created for log_file");
    f.stop_daemon();
}

#[test]
fn frames_and_sizes_as_the_spec_says() {
    let db = Db::create("hostile_frames");
    let f = Feedd::start(&db, &["zmq.max_message_bytes = 100"]);
    let req = Req::connect(&f.endpoint());
    // 64 parts after a REQ's delimiter: 65 client frames, one too many, and the REQ hears it.
    let parts: Vec<Vec<u8>> = (0..64).map(|i| format!("{i},1,1").into_bytes()).collect();
    req.0.send_multipart(parts, 0).unwrap();
    let reply = req.0.recv_multipart(0).expect("a reply to the REQ");
    assert_eq!(reply, vec![b"FALSE too many frames".to_vec()]);
    // The body alone counts: exactly max_message_bytes is judged, one more is too large.
    let exact = format!("{:<100}", "1,1,1");
    assert_eq!(exact.len(), 100);
    assert_eq!(req.ask(&exact), "TRUE");
    assert_eq!(req.ask(&format!("{exact} ")), "FALSE too large");
    // SPEC §4: spaces only, and `\r` only before `\n`.
    assert!(req.ask("1004,1,5\r").starts_with("FALSE line 1: volume"));
    assert!(req
        .ask("1005,1,5\r\r\n")
        .starts_with("FALSE line 1: volume"));
    assert!(req.ask("1006,1,\t5").starts_with("FALSE line 1: volume"));
    assert_eq!(req.ask("1007 , 1 , 5\r\n"), "TRUE");
}

#[test]
fn config_mistakes_are_named_and_secrets_never_echoed() {
    let db = Db::create("hostile_config");
    let f = Feedd::prepare(&db, &[]);
    let check = |text: &str| {
        std::fs::write(f.dir.path().join("c.ini"), text).unwrap();
        let (status, out, err) = f.command(&["check", "--conf", "c.ini"]);
        (status.success(), format!("{out}{err}"))
    };
    let (_, secret) = curve_pair();
    let (ok, text) = check(&format!("[zmq]\ncurve_secret_key {secret}\n"));
    assert!(!ok);
    assert!(!text.contains(&secret), "{text}");
    assert!(text.contains("[zmq] curve_secret_key"), "{text}");
    let (ok, text) = check("[mysql]\ntable = a\n\ntable = b\n");
    assert!(!ok);
    assert!(
        text.contains("[mysql] table: set twice, on lines 2 and 4"),
        "{text}"
    );
    let (ok, text) = check("[mysql]\n[zmq]\n[mysql]\n");
    assert!(!ok);
    assert!(
        text.contains("section [mysql] appears twice, on lines 1 and 3"),
        "{text}"
    );
    let (ok, text) = check("\u{feff}[mysql]\ntable = a\n");
    assert!(ok, "{text}");
    let (ok, text) = check(&format!(
        "[zmq]\ncurve_secret_key = \"{}\"\n",
        "#".repeat(40)
    ));
    assert!(!ok);
    assert!(text.contains("not valid Z85"), "{text}");

    let (status, _, err) = f.command(&["check", "--conf", "."]);
    assert!(!status.success());
    assert_eq!(err.matches("os error 21").count(), 1, "{err}");

    let f = f.prepare_in(&db, &["zmq.endpoint = tcp://no-such-host.invalid:5999"]);
    let (status, _, err) = f.command(&["--conf", "feed.ini"]);
    assert!(!status.success());
    assert!(
        err.contains("is not a local address, an interface"),
        "{err}"
    );
    assert!(!err.contains("No such device"), "{err}");
}

#[test]
fn committed_counts_rows_and_acknowledged_counts_answers() {
    let db = Db::create("hostile_counters");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    let req = Req::connect(&f.endpoint());
    for _ in 0..3 {
        assert_eq!(req.ask("1,1,1\n2,1,1\n3,1,1"), "TRUE");
    }
    let text = http_get(&addr, "/metrics");
    assert_eq!(metric(&text, "feedd_records_committed_total"), 3.0);
    assert_eq!(metric(&text, "feedd_records_acknowledged_total"), 9.0);
    assert_eq!(db.count(), 3);
}
