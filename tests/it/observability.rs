//! What feedd shows about itself: metrics (SPEC §7) counting known traffic, the metrics
//! listener's bounds against hostile HTTP clients, and feedd-load (SPEC §8) against a running
//! feedd.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::ports;
use crate::harness::*;

#[test]
fn metrics_count_known_traffic() {
    let db = Db::create("metrics");
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start(&db, &[&listen]);
    let before = http_get(&addr, "/metrics");
    for name in [
        "feedd_messages_received_total",
        "feedd_messages_rejected_total",
        "feedd_records_committed_total",
        "feedd_queue_depth",
        "feedd_db_errors_total",
        "feedd_config_reloads_total",
        "feedd_config_reload_failures_total",
        "feedd_batch_commit_seconds_count",
        "feedd_ack_latency_seconds_count",
    ] {
        assert_eq!(metric(&before, name), 0.0, "{name}");
    }
    assert!(before.contains("feedd_build_info{version=\""));
    let req = Req::connect(&feedd.endpoint());
    assert_eq!(req.ask("1,1,1\n2,1,1\n3,1,1"), "TRUE");
    assert_eq!(req.ask("4,1,1"), "TRUE");
    assert!(req.ask("5,1,x").starts_with("FALSE"));
    assert!(req.ask("1,9,1").starts_with("FALSE conflict"));
    let after = http_get(&addr, "/metrics");
    assert_eq!(metric(&after, "feedd_messages_received_total"), 4.0);
    assert_eq!(metric(&after, "feedd_messages_rejected_total"), 2.0);
    assert_eq!(metric(&after, "feedd_records_committed_total"), 4.0);
    assert!(metric(&after, "feedd_batch_commit_seconds_count") >= 2.0);
    assert!(metric(&after, "feedd_ack_latency_seconds_count") >= 3.0);
    assert!(http_get(&addr, "/nothing").contains("not found"));

    // Reload counters, and a reload that moves the listener.
    let conf = std::fs::read_to_string(feedd.conf_path()).unwrap();
    std::fs::write(feedd.conf_path(), "[pipeline]\nbatch_size = none\n").unwrap();
    feedd.signal(Signal::SIGHUP);
    feedd.wait_for_log("reload failed", Duration::from_secs(10));
    let moved = format!("127.0.0.1:{}", ports::port());
    std::fs::write(feedd.conf_path(), conf.replace(&addr, &moved)).unwrap();
    feedd.signal(Signal::SIGHUP);
    feedd.wait_for_log("config reloaded", Duration::from_secs(10));
    let text = http_get(&moved, "/metrics");
    assert_eq!(metric(&text, "feedd_config_reload_failures_total"), 1.0);
    assert_eq!(metric(&text, "feedd_config_reloads_total"), 1.0);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the old listener is closed"
    );
}

#[test]
fn feedd_load_commits_exactly_n_rows_and_reports_them() {
    let db = Db::create("load_tool");
    let feedd = Feedd::start(&db, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args([
            "--endpoint",
            &feedd.endpoint(),
            "--records",
            "5003",
            "--clients",
            "3",
            "--window",
            "16",
            "--per-msg",
            "10",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("5003 records in 501 messages acknowledged"),
        "{stdout}"
    );
    assert!(stdout.contains("p99.9"), "{stdout}");
    assert_eq!(db.count(), 5003);
    // Sending the same again conflicts nowhere (same values): all TRUE, no new rows.
    let again = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args([
            "--endpoint",
            &feedd.endpoint(),
            "--records",
            "100",
            "--rate",
            "2000",
        ])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(db.count(), 5003);
}

#[test]
fn feedd_load_fails_on_false_and_missing_replies() {
    let db = Db::create("load_tool_fail");
    let feedd = Feedd::start(&db, &[]);
    // Ticket 3 stored with another login: the load's message for it is a conflict.
    assert_eq!(Req::connect(&feedd.endpoint()).ask("3,12345,1"), "TRUE");
    let out = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args(["--endpoint", &feedd.endpoint(), "--records", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 FALSE"));
    // Nobody listening: missing replies after the timeout.
    let out = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args([
            "--endpoint",
            &format!("tcp://127.0.0.1:{}", ports::port()),
            "--records",
            "5",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 missing"));
    let _ = Duration::ZERO;
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
    // Counted once the reply is handed to the client's pipe, a moment after it may be read.
    let acknowledged = "feedd_records_acknowledged_total";
    assert!(wait_until(Duration::from_secs(5), || scrape(
        &addr,
        acknowledged
    ) == 9.0));
    assert_eq!(db.count(), 3);
}
