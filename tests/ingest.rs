//! Core ingest against a real MariaDB and real ZMQ sockets, through the real binary.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use mysql::prelude::Queryable;

#[test]
fn libzmq_has_curve() {
    assert_eq!(
        zmq::has("curve"),
        Some(true),
        "libzmq must be built with CURVE"
    );
    assert!(zmq::CurveKeyPair::new().is_ok());
}

#[test]
fn req_gets_true_and_row_is_committed_with_status_y() {
    let db = Db::create("req_true");
    let feedd = Feedd::start(&db, &[]);
    let req = Req::connect(&feedd.endpoint());
    assert_eq!(req.ask("42,7,12.5"), "TRUE");
    let rows = db.rows();
    assert_eq!(rows[&42], (7, "12.5000".to_string(), "Y".to_string()));
    // REQ clients are served one after another on the same socket.
    assert_eq!(req.ask("43,7,1\n44,8,2.0001\n"), "TRUE");
    assert_eq!(db.count(), 3);
}

#[test]
fn dealer_with_1000_in_flight_gets_1000_true() {
    let db = Db::create("dealer_1000");
    let feedd = Feedd::start(&db, &[]);
    let dealer = Dealer::connect(&feedd.endpoint());
    let replies = dealer.round_trip(&one_record_bodies(1, 1000));
    assert!(replies.values().all(|r| r == "TRUE"), "{replies:?}");
    assert_eq!(db.count(), 1000);
}

#[test]
fn bad_line_refuses_the_whole_message() {
    let db = Db::create("bad_line");
    let feedd = Feedd::start(&db, &[]);
    let mut body: Vec<String> = (1..=100).map(|t| format!("{t},1,1")).collect();
    body[72] = "73,1,1.00001".into();
    let req = Req::connect(&feedd.endpoint());
    assert_eq!(
        req.ask(&body.join("\n")),
        "FALSE line 73: volume: more than 4 fraction digits"
    );
    assert_eq!(db.count(), 0);
    assert_eq!(
        req.ask("1,2,x"),
        "FALSE line 1: volume: not a non-negative decimal number"
    );
    assert_eq!(req.ask(""), "FALSE empty message");
    // The daemon keeps serving.
    assert_eq!(req.ask("5,5,5"), "TRUE");
}

#[test]
fn resend_is_true_and_adds_no_row() {
    let db = Db::create("resend");
    let feedd = Feedd::start(&db, &[]);
    let req = Req::connect(&feedd.endpoint());
    assert_eq!(req.ask("10,1,1.5\n11,1,2"), "TRUE");
    assert_eq!(req.ask("10,1,1.5000\n11,1,2"), "TRUE");
    // Partly stored before: the new record is added, the old one not duplicated.
    assert_eq!(req.ask("11,1,2\n12,1,3"), "TRUE");
    assert_eq!(db.count(), 3);
}

#[test]
fn conflict_refuses_that_message_and_commits_the_rest_of_the_batch() {
    let db = Db::create("conflict");
    // A long batch window so all messages below land in one batch of the single worker.
    let feedd = Feedd::start(
        &db,
        &["pipeline.workers = 1", "pipeline.batch_timeout_ms = 300"],
    );
    let req = Req::connect(&feedd.endpoint());
    assert_eq!(req.ask("100,1,1"), "TRUE");
    let dealer = Dealer::connect(&feedd.endpoint());
    let bodies = vec![
        "200,1,1".to_string(),
        "201,1,1\n100,2,1".to_string(), // conflicts with the stored row
        "202,1,1".to_string(),
        "200,1,9".to_string(), // conflicts with message 0 of this batch
        "203,1,1\n203,1,2".to_string(), // conflicts within itself
    ];
    let replies = dealer.round_trip(&bodies);
    assert_eq!(replies[&0], "TRUE");
    assert!(
        replies[&1].starts_with("FALSE conflict: ticket 100"),
        "{}",
        replies[&1]
    );
    assert_eq!(replies[&2], "TRUE");
    assert!(
        replies[&3].starts_with("FALSE conflict: ticket 200"),
        "{}",
        replies[&3]
    );
    assert!(
        replies[&4].starts_with("FALSE conflict: ticket 203"),
        "{}",
        replies[&4]
    );
    let rows = db.rows();
    let tickets: HashSet<u64> = rows.keys().copied().collect();
    assert_eq!(tickets, HashSet::from([100, 200, 202]));
    assert_eq!(rows[&100].0, 1);
    assert_eq!(rows[&200].1, "1.0000");
}

#[test]
fn same_tickets_from_two_clients_at_once() {
    let db = Db::create("two_clients");
    let feedd = Feedd::start(&db, &["pipeline.workers = 2", "pipeline.batch_size = 50"]);
    let endpoint = feedd.endpoint();
    let bodies: Vec<String> = (0..400u64)
        .map(|m| {
            (m * 5 + 1..=m * 5 + 5)
                .map(|t| format!("{t},3,4.5"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (endpoint, mut bodies) = (endpoint.clone(), bodies.clone());
            if c == 1 {
                bodies.reverse();
            }
            std::thread::spawn(move || Dealer::connect(&endpoint).round_trip(&bodies))
        })
        .collect();
    for c in clients {
        let replies = c.join().unwrap();
        assert!(
            replies.values().all(|r| r == "TRUE"),
            "{:?}",
            replies.values().find(|r| *r != "TRUE")
        );
    }
    assert_eq!(db.count(), 2000);
    // One more client with different values for the same tickets: all refused.
    let replies = Dealer::connect(&endpoint).round_trip(&["1,4,4.5".to_string()]);
    assert!(replies[&0].starts_with("FALSE conflict"));
}

#[test]
fn oversize_message_is_refused_and_others_still_served() {
    let db = Db::create("oversize");
    let feedd = Feedd::start(&db, &["zmq.max_message_bytes = 4096"]);
    let big = Req::connect(&feedd.endpoint());
    let body = one_record_bodies(1, 1000).join("\n");
    assert!(body.len() > 4096);
    assert_eq!(big.ask(&body), "FALSE too large");
    let other = Req::connect(&feedd.endpoint());
    assert_eq!(other.ask("7,7,7"), "TRUE");
    assert_eq!(big.ask("8,8,8"), "TRUE");
    assert_eq!(db.count(), 2);
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
    feedd.signal(libc::SIGTERM);
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
fn full_queue_stops_reading_and_memory_stays_bounded() {
    let db = Db::create("backpressure");
    let (metrics_addr, listen) = metrics_listen();
    let feedd = Feedd::start(
        &db,
        &[
            "pipeline.queue_capacity = 200",
            "pipeline.batch_size = 100",
            "pipeline.workers = 1",
            &listen,
        ],
    );
    // Hold the table so no batch can commit.
    let mut lock = db.conn();
    lock.query_drop("LOCK TABLES fee WRITE").unwrap();
    let dealer = Dealer::connect(&feedd.endpoint());
    let bodies: Vec<String> = (0..3000u64)
        .map(|m| {
            (m * 10 + 1..=m * 10 + 10)
                .map(|t| format!("{t},1,1"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    for (i, b) in bodies.iter().enumerate() {
        dealer.send(i as u64, b);
    }
    // The queue fills up to its capacity and stays there.
    assert!(wait_until(Duration::from_secs(20), || {
        metric(&http_get(&metrics_addr, "/metrics"), "feedd_queue_depth") >= 190.0
    }));
    let rss_blocked = feedd.rss_kib();
    // Queue depth is kept near the capacity, far below the 30,000 records sent.
    let text = http_get(&metrics_addr, "/metrics");
    let depth = metric(&text, "feedd_queue_depth");
    assert!(depth <= 210.0, "queue depth {depth} with capacity 200");
    assert!(metric(&text, "feedd_records_committed_total") == 0.0);
    let log = feedd.stderr_log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        rss_blocked < 64 * 1024,
        "RSS {rss_blocked} KiB while blocked"
    );
    lock.query_drop("UNLOCK TABLES").unwrap();
    drop(lock);
    let mut n = 0;
    while n < bodies.len() {
        let (_, text) = dealer
            .recv()
            .expect("every message answered after the unlock");
        assert_eq!(text, "TRUE");
        n += 1;
    }
    assert_eq!(db.count(), 30_000);
}

#[test]
fn existing_table_with_extra_columns_is_used() {
    let db = Db::create("extra_columns");
    db.conn()
        .query_drop(
            "CREATE TABLE fee (ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY, login BIGINT UNSIGNED NOT NULL,
             volume DECIMAL(20,4) NOT NULL, status CHAR(1) NOT NULL DEFAULT 'N',
             created TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, note VARCHAR(10) DEFAULT 'x') ENGINE=InnoDB",
        )
        .unwrap();
    let feedd = Feedd::start(&db, &[]);
    assert_eq!(Req::connect(&feedd.endpoint()).ask("1,1,1"), "TRUE");
    assert_eq!(db.count(), 1);
}

#[test]
fn table_missing_a_column_is_a_startup_error() {
    let db = Db::create("missing_column");
    db.conn()
        .query_drop("CREATE TABLE fee (ticket BIGINT UNSIGNED PRIMARY KEY, login BIGINT UNSIGNED, volume DECIMAL(20,4))")
        .unwrap();
    let feedd = Feedd::prepare(&db, &[]);
    let (status, _, stderr) = feedd.command(&["--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("no column `status`"), "{stderr}");
}

#[test]
fn startup_errors_exit_1_with_one_line_reason() {
    let db = Db::create("startup_errors");
    // Database unreachable.
    let feedd = Feedd::prepare(&db, &[&format!("mysql.port = {}", free_port())]);
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
fn check_names_file_key_and_reason() {
    let db = Db::create("check");
    let feedd = Feedd::prepare(&db, &[]);
    let (status, stdout, _) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert_eq!((status.code(), stdout.trim()), (Some(0), "ok"));
    std::fs::write(feedd.conf_path(), "[mysql]\ntable = fee;drop\n").unwrap();
    let (status, _, stderr) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("feed.ini: [mysql] table"), "{stderr}");
    std::fs::write(feedd.conf_path(), "[pipeline]\nbogus = 1\n").unwrap();
    let (_, _, stderr) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert!(stderr.contains("[pipeline] bogus: unknown key"), "{stderr}");
}

#[test]
fn large_messages_use_full_prepared_chunks_and_text_remainders() {
    let db = Db::create("chunks");
    let feedd = Feedd::start(&db, &[]);
    let req = Req::connect(&feedd.endpoint());
    // 2,500 records: two full 1,000-row prepared INSERTs and a 500-row text one.
    let body: Vec<String> = (1..=2500)
        .map(|t| format!("{t},{},{}.0001", t * 3, t % 10))
        .collect();
    assert_eq!(req.ask(&body.join("\n")), "TRUE");
    let rows = db.rows();
    assert_eq!(rows.len(), 2500);
    assert_eq!(rows[&1000], (3000, "0.0001".to_string(), "Y".to_string()));
    assert_eq!(rows[&2500], (7500, "0.0001".to_string(), "Y".to_string()));
    // The same again: the prepared INSERT hits duplicates, the careful path answers TRUE.
    assert_eq!(req.ask(&body.join("\n")), "TRUE");
    assert_eq!(db.count(), 2500);
}
