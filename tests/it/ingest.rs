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

/// SPEC §4: a reply is never dropped because the client's window is deeper than the socket's
/// send high-water mark (1,000): the receiver holds it until the pipe takes it.
#[test]
fn windows_of_2000_and_4096_get_every_reply() {
    let db = Db::create("deep_windows");
    let (metrics_addr, listen) = metrics_listen();
    let feedd = Feedd::start(&db, &[&listen]);
    let clients: Vec<_> = [(2000usize, 1u64), (4096, 1_000_001)]
        .into_iter()
        .map(|(window, first)| {
            let endpoint = feedd.endpoint();
            std::thread::spawn(move || {
                let bodies = one_record_bodies(first, 20_000);
                let (replies, missing) =
                    Dealer::connect(&endpoint).stream(&bodies, window, Duration::from_secs(10));
                assert!(replies.values().all(|r| r == "TRUE"));
                (window, missing)
            })
        })
        .collect();
    for c in clients {
        let (window, missing) = c.join().unwrap();
        assert_eq!(missing, 0, "replies missing with a window of {window}");
    }
    assert_eq!(db.count(), 40_000);
    // As many acknowledged as the clients received (counted just after each send).
    let acknowledged = "feedd_records_acknowledged_total";
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(&metrics_addr, acknowledged) == 40_000.0
    }));
}

/// A client that sends 3,000 and reads nothing for 3 s: every reply waits for it.
#[test]
fn a_client_that_reads_nothing_for_3_s_then_gets_all_3000() {
    let db = Db::create("late_reader");
    // One batch, so 3,000 replies are due at once (three times the send high-water mark).
    let feedd = Feedd::start(
        &db,
        &[
            "pipeline.batch_size = 5000",
            "pipeline.batch_timeout_ms = 500",
        ],
    );
    let dealer = Dealer::connect_tight(&feedd.endpoint(), 100, 65_536);
    let bodies = one_record_bodies(1, 3000);
    for (i, b) in bodies.iter().enumerate() {
        dealer.send(i as u64, b);
    }
    let sent = std::time::Instant::now();
    assert!(wait_until(Duration::from_secs(30), || db.count() == 3000));
    std::thread::sleep(Duration::from_secs(3).saturating_sub(sent.elapsed()));
    let mut ids = HashSet::new();
    dealer.0.set_rcvtimeo(10_000).unwrap();
    while ids.len() < bodies.len() {
        let Some((id, text)) = dealer.recv() else {
            break;
        };
        assert_eq!(text, "TRUE");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 3000, "every reply, read late");
}

/// A client gone with replies pending: they are counted as dropped, and the others are served.
#[test]
fn replies_to_a_gone_client_are_counted_and_no_one_waits_for_them() {
    let db = Db::create("gone_client");
    let (metrics_addr, listen) = metrics_listen();
    let feedd = Feedd::start(&db, &[&listen]);
    let mut lock = db.conn();
    lock.query_drop("LOCK TABLES fee WRITE").unwrap();
    let gone = Dealer::connect(&feedd.endpoint());
    for (i, b) in one_record_bodies(1, 500).iter().enumerate() {
        gone.send(i as u64, b);
    }
    assert!(wait_until(Duration::from_secs(20), || {
        scrape(&metrics_addr, "feedd_messages_received_total") >= 500.0
    }));
    drop(gone);
    let live = Dealer::connect(&feedd.endpoint());
    let bodies = one_record_bodies(10_001, 200);
    for (i, b) in bodies.iter().enumerate() {
        live.send(i as u64, b);
    }
    // The receiver has read the live client's messages, so it has also taken in libzmq's
    // notice of the gone client's disconnect (sent earlier); replies before that notice would
    // go into the dead pipe and count as handed over.
    assert!(wait_until(Duration::from_secs(20), || {
        scrape(&metrics_addr, "feedd_messages_received_total") >= 700.0
    }));
    lock.query_drop("UNLOCK TABLES").unwrap();
    for _ in 0..bodies.len() {
        let (_, text) = live.recv().expect("the live client is answered");
        assert_eq!(text, "TRUE");
    }
    let dropped = "feedd_replies_dropped_total{reason=\"peer_gone\"}";
    assert!(
        wait_until(Duration::from_secs(10), || scrape(&metrics_addr, dropped)
            == 500.0),
        "{}",
        http_get(&metrics_addr, "/metrics")
    );
    assert_eq!(db.count(), 700);
    // Only the replies handed to a live client.
    let acknowledged = "feedd_records_acknowledged_total";
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(&metrics_addr, acknowledged) == 200.0
    }));
}

/// A client that sends without end and never reads: feedd holds a bounded number of replies,
/// then stops reading; its memory stays bounded, and every reply comes once the client reads.
#[test]
fn a_reader_that_never_reads_keeps_memory_bounded() {
    let db = Db::create("never_reads");
    let (metrics_addr, listen) = metrics_listen();
    // Memory is bounded by the held replies plus the work in flight (the queue's capacity).
    let feedd = Feedd::start(&db, &[&listen, "pipeline.queue_capacity = 8192"]);
    let dealer = Dealer::connect_tight(&feedd.endpoint(), 1, 4096);
    let total = 120_000u64;
    let bodies = one_record_bodies(1, total);
    // Ids of 100 digits make replies of ~115 bytes, so the kernel's socket buffers (a few
    // MB) fill long before the client has sent everything.
    for (i, b) in bodies.iter().enumerate() {
        let id = format!("{i:0>100}").into_bytes();
        let frames = [id, Vec::new(), b.as_bytes().to_vec()];
        dealer.0.send_multipart(frames, 0).unwrap();
    }
    // Reading stops: the count of messages read holds still for a second, short of all.
    let mut last = -1.0;
    assert!(wait_until(Duration::from_secs(60), || {
        let now = scrape(&metrics_addr, "feedd_messages_received_total");
        let still = now == last;
        last = now;
        std::thread::sleep(Duration::from_secs(1));
        still
    }));
    assert!(last < total as f64, "reading stopped at {last}");
    let rss = feedd.rss_kib();
    eprintln!("reading stopped at {last} of {total} messages, RSS {rss} KiB");
    assert!(rss < 64 * 1024, "RSS {rss} KiB while holding replies");
    dealer.0.set_rcvtimeo(20_000).unwrap();
    let mut n = 0;
    while n < total {
        let (_, text) = dealer.recv().expect("every reply once the client reads");
        assert_eq!(text, "TRUE");
        n += 1;
    }
    assert_eq!(db.count(), total);
}
