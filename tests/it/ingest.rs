//! Ingest over ZeroMQ: REQ and DEALER clients get `TRUE` only after COMMIT, resends are
//! idempotent, conflicts refuse only their message, and a full queue stops reading instead of
//! growing (SPEC §4, §5).

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::*;
use mysql::prelude::Queryable;

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
