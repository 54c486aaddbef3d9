//! The AMQP input end to end (SPEC §4b): a real RabbitMQ (the shared one from .ci/setup, or a
//! private node for the broker-kill test), real MariaDB, the real `feedd` binary: commits and
//! acks, dead letters, both inputs at once, broker, database and feedd killed under load.

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::broker::{self, Client, PrivateRabbit};
use crate::harness::database::PrivateMariadb;
use crate::harness::*;

#[test]
fn ten_thousand_records_in_1000_deliveries_are_committed_and_acked() {
    let db = Db::create("amqp_10k");
    let (queue, _) = broker::names("10k");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.declare(&queue);
    mq.publish(&queue, &bodies(1, 1000, 10), &[]);
    let (addr, listen) = metrics_listen();
    let mut feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&listen]),
    );
    wait_rows(&db, 10_000, 60, &feedd);
    assert!(
        wait_until(Duration::from_secs(10), || scrape(
            &addr,
            "feedd_amqp_acks_total"
        ) == 1000.0),
        "every delivery acked"
    );
    assert_eq!(scrape(&addr, "feedd_amqp_deliveries_total"), 1000.0);
    assert_eq!(scrape(&addr, "feedd_amqp_dead_letters_total"), 0.0);
    assert_eq!(mq.ready(&queue), 0);
    let rows = db.rows();
    assert_eq!(rows.len(), 10_000);
    assert!(rows.values().all(|r| r.2 == "Y"));
    feedd.signal(Signal::SIGTERM);
    assert!(feedd.wait(Duration::from_secs(15)).success());
    assert_eq!(mq.ready(&queue), 0, "nothing was left unacked to come back");
    mq.delete(&queue);
}

#[test]
fn a_bad_line_dead_letters_its_delivery_with_the_reason_and_headers() {
    let db = Db::create("amqp_bad");
    let (queue, dlq) = broker::names("bad");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.declare(&queue);
    let mut bodies = bodies(1, 5, 100);
    let mut lines: Vec<String> = bodies[2].lines().map(str::to_string).collect();
    lines[56] = "57,x,1".into();
    bodies[2] = lines.join("\n");
    mq.publish(&queue, &bodies, &[("x-origin", "test")]);
    let feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&broker::shared_url(), &queue, false, &[]),
    );
    wait_rows(&db, 400, 30, &feedd);
    let mut dead = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        dead.extend(mq.drain(&dlq));
        !dead.is_empty()
    }));
    assert_eq!(dead.len(), 1);
    let (body, headers) = &dead[0];
    assert_eq!(body, &bodies[2], "the original body");
    let reason = &headers["feedd-reason"];
    assert!(reason.starts_with("line 57:"), "{reason}");
    assert_eq!(headers["x-origin"], "test", "original headers kept");
    let rows = db.rows();
    assert_eq!(rows.len(), 400);
    assert!(
        (201..=300).all(|t| !rows.contains_key(&t)),
        "no row of the bad delivery"
    );
    assert!(wait_until(Duration::from_secs(5), || mq.ready(&queue) == 0));
    mq.delete(&queue);
}

#[test]
fn a_conflict_is_dead_lettered_and_an_identical_resend_is_acked() {
    let db = Db::create("amqp_conflict");
    let (queue, dlq) = broker::names("conflict");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&broker::shared_url(), &queue, true, &[&listen]),
    );
    mq.publish(&queue, &["7,1,1.5".to_string()], &[]);
    wait_rows(&db, 1, 20, &feedd);
    mq.publish(&queue, &["7,2,1.5".to_string()], &[]);
    let mut dead = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        dead.extend(mq.drain(&dlq));
        !dead.is_empty()
    }));
    let reason = &dead[0].1["feedd-reason"];
    assert!(reason.starts_with("conflict: ticket 7"), "{reason}");
    mq.publish(&queue, &["7,1,1.5000".to_string()], &[]);
    assert!(wait_until(Duration::from_secs(10), || scrape(
        &addr,
        "feedd_amqp_acks_total"
    ) == 3.0));
    assert_eq!(db.count(), 1, "no new row");
    assert_eq!(scrape(&addr, "feedd_amqp_dead_letters_total"), 1.0);
    assert_eq!(mq.ready(&queue), 0);
    assert!(mq.drain(&dlq).is_empty());
    mq.delete(&queue);
}

#[test]
fn zeromq_and_amqp_at_once_with_overlapping_tickets() {
    let db = Db::create("amqp_both");
    let (queue, dlq) = broker::names("both");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&broker::shared_url(), &queue, true, &[&listen]),
    );
    // A windowed client that resends what is unanswered, as ZeroMQ clients are told to (a
    // ROUTER drops replies to a peer past its high-water mark).
    let zmq_bodies = bodies(1, 2000, 1);
    let zmq = Resender::spawn(feedd.endpoint(), &zmq_bodies, Duration::from_secs(3));
    mq.publish(&queue, &bodies(1, 200, 10), &[]);
    let Ok(zmq) = zmq.join() else {
        panic!("the ZeroMQ client failed:\n{}", feedd.stderr_log());
    };
    assert!(zmq.falses.is_empty(), "{:?}", zmq.falses);
    assert_eq!(zmq.acked.len(), 2000, "every ZeroMQ message TRUE");
    assert!(
        wait_until(Duration::from_secs(20), || scrape(
            &addr,
            "feedd_amqp_acks_total"
        ) == 200.0),
        "every delivery acked"
    );
    assert_eq!(db.count(), 2000, "one row per ticket");
    assert!(mq.drain(&dlq).is_empty());
    assert_eq!(mq.ready(&queue), 0);
    mq.delete(&queue);
}

#[test]
fn broker_killed_mid_load_and_restarted_loses_nothing() {
    let mut broker = PrivateRabbit::start();
    let url = broker.url();
    let db = Db::create("amqp_brokerkill");
    let queue = "fee_kill";
    let mq = Client::connect(&url);
    mq.declare(queue);
    let total = 20_000u64;
    mq.publish(queue, &bodies(1, total / 10, 10), &[]);
    drop(mq);
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&url, queue, false, &[&listen, "pipeline.batch_size = 100"]),
    );
    wait_rows(&db, 2_000, 30, &feedd);
    broker.kill9();
    std::thread::sleep(Duration::from_secs(3)); // the fault: 3 s without a broker
    broker.restart();
    wait_rows(&db, total, 90, &feedd);
    let mq = Client::connect(&url);
    assert!(
        wait_until(Duration::from_secs(20), || mq.ready(queue) == 0),
        "nothing left in the queue"
    );
    assert!(
        mq.drain(&format!("{queue}.rejected")).is_empty(),
        "no dead letters"
    );
    assert_eq!(db.count(), total, "each record once");
    assert!(scrape(&addr, "feedd_amqp_reconnects_total") >= 1.0);
    let log = feedd.stderr_log();
    assert_eq!(
        log.matches("lost (").count(),
        1,
        "one log line per episode:\n{log}"
    );
}

#[test]
fn feedd_killed_mid_load_then_restarted_and_its_serving_child_killed_lose_nothing() {
    let db = Db::create("amqp_feeddkill");
    let (queue, dlq) = broker::names("feeddkill");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.declare(&queue);
    let total = 30_000u64;
    mq.publish(&queue, &bodies(1, total / 10, 10), &[]);
    let overrides = broker::amqp_overrides(
        &broker::shared_url(),
        &queue,
        false,
        &["pipeline.batch_size = 100"],
    );
    let mut feedd = Feedd::start_owned(&db, &overrides);
    wait_rows(&db, 1_000, 30, &feedd);
    feedd.signal(Signal::SIGKILL);
    feedd.wait(Duration::from_secs(5));
    assert!(db.count() < total, "killed mid-load");
    // Again under the supervisor: kill its serving child mid-load.
    feedd.start_daemon();
    let seen = db.count();
    assert!(wait_until(Duration::from_secs(30), || db.count() > seen + 1_000));
    if db.count() < total {
        let child = feedd.serving_pid().expect("a serving child");
        kill(child, Signal::SIGKILL);
    }
    assert!(
        wait_until(Duration::from_secs(90), || db.count() >= total),
        "{} of {total}\n{}",
        db.count(),
        feedd.log()
    );
    assert!(wait_until(Duration::from_secs(20), || mq.ready(&queue) == 0));
    feedd.stop_daemon();
    assert_eq!(mq.ready(&queue), 0, "every delivery acked in the end");
    assert_eq!(db.count(), total, "each record exactly once");
    assert!(mq.drain(&dlq).is_empty());
    mq.delete(&queue);
}

#[test]
fn database_down_for_5_s_means_no_ack_and_no_dead_letter() {
    let mut server = PrivateMariadb::start();
    let db = Db::create_on("amqp_dbdown", server.port);
    let (queue, dlq) = broker::names("dbdown");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.declare(&queue);
    let total = 20_000u64;
    mq.publish(&queue, &bodies(1, total / 10, 10), &[]);
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(
            &broker::shared_url(),
            &queue,
            false,
            &[&listen, "pipeline.batch_size = 100"],
        ),
    );
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &addr,
        "feedd_amqp_acks_total"
    ) >= 200.0));
    server.kill9();
    // Batches under way when it died end in errors (both workers retrying: several errors);
    // from then on nothing commits, so nothing may be acked.
    assert!(wait_until(Duration::from_secs(10), || scrape(
        &addr,
        "feedd_db_errors_total"
    ) >= 4.0));
    let acked = scrape(&addr, "feedd_amqp_acks_total");
    std::thread::sleep(Duration::from_secs(5)); // the fault: 5 s without a database
    assert_eq!(
        scrape(&addr, "feedd_amqp_acks_total"),
        acked,
        "no ack while down"
    );
    server.restart();
    assert!(
        wait_until(Duration::from_secs(90), || db.count() >= total),
        "{} of {total}\n{}",
        db.count(),
        feedd.stderr_log()
    );
    assert!(wait_until(Duration::from_secs(20), || mq.ready(&queue) == 0));
    assert_eq!(scrape(&addr, "feedd_amqp_dead_letters_total"), 0.0);
    assert!(mq.drain(&dlq).is_empty());
    mq.delete(&queue);
}

#[test]
fn sigterm_with_20000_deliveries_in_flight_acks_only_what_committed() {
    let db = Db::create("amqp_term");
    let (queue, dlq) = broker::names("term");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.declare(&queue);
    let total = 20_000u64;
    let bodies = bodies(1, total, 1);
    mq.publish(&queue, &bodies, &[]);
    let (addr, listen) = metrics_listen();
    let mut feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(
            &broker::shared_url(),
            &queue,
            false,
            &[
                &listen,
                "amqp.prefetch = 20000",
                "pipeline.batch_size = 50",
                "pipeline.workers = 1",
                // Reading waits for commits, so deliveries are still unread at SIGTERM however
                // fast the broker delivers and however late this test's poll runs.
                "pipeline.queue_capacity = 1000",
            ],
        ),
    );
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &addr,
        "feedd_amqp_deliveries_total"
    ) >= 5_000.0));
    feedd.signal(Signal::SIGTERM);
    let status = feedd.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit 0: {status:?}\n{}",
        feedd.stderr_log()
    );
    // What is not in the queue was acked, and what was acked is in the table.
    let left: HashSet<u64> = mq
        .drain(&queue)
        .iter()
        .map(|(b, _)| b.split(',').next().unwrap().parse().unwrap())
        .collect();
    let rows = db.rows();
    assert!(!left.is_empty(), "stopped mid-load");
    for t in 1..=total {
        assert!(
            left.contains(&t) || rows.contains_key(&t),
            "ticket {t} acked (gone from the queue) but not in the table"
        );
    }
    assert!(mq.drain(&dlq).is_empty());
    mq.delete(&queue);
}

/// A backlog of deliveries feedd refuses (each dead-lettered, one broker round trip) keeps the
/// consumer's source always ready; SIGTERM must still be acted on within the drain bound.
#[test]
fn sigterm_during_a_backlog_of_refused_deliveries_exits_within_the_drain() {
    let db = Db::create("amqp_poison_term");
    let (queue, dlq) = broker::names("poison_term");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.delete(&dlq);
    mq.declare(&queue);
    // Over `max_message_bytes`: every one is refused and dead-lettered.
    let body = format!("1,1,{}", "1".repeat(80));
    let bodies: Vec<String> = (0..20_000).map(|_| body.clone()).collect();
    mq.publish(&queue, &bodies, &[]);
    let (addr, listen) = metrics_listen();
    let mut feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(
            &broker::shared_url(),
            &queue,
            false,
            &[
                &listen,
                "zmq.max_message_bytes = 64",
                "daemon.shutdown_timeout_ms = 2000",
            ],
        ),
    );
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &addr,
        "feedd_amqp_dead_letters_total"
    ) >= 500.0));
    let asked = std::time::Instant::now();
    feedd.signal(Signal::SIGTERM);
    let status = feedd.wait(Duration::from_secs(60));
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}\n{}", feedd.stderr_log());
    assert!(
        took < Duration::from_millis(3500),
        "SIGTERM took {took:?} (shutdown_timeout_ms 2000)\n{}",
        feedd.stderr_log()
    );
    assert!(mq.ready(&queue) > 0, "stopped mid-backlog");
    mq.delete(&queue);
    mq.delete(&dlq);
}

/// After SIGTERM the consumer waits for commits with nothing to read: its thread must sleep
/// in that wait, not spin on a wake-up lapin gave for the cancelled consumer.
#[test]
fn the_consumer_sleeps_while_a_sigterm_drain_waits_for_commits() {
    let db = Db::create("amqp_sleep");
    let (queue, _) = broker::names("sleep");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.declare(&queue);
    let (addr, listen) = metrics_listen();
    let drain = "daemon.shutdown_timeout_ms = 20000";
    let o = broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&listen, drain]);
    let mut feedd = Feedd::start_owned(&db, &o);
    // Held table: the deliveries are taken and their batch waits.
    let mut lock = db.conn();
    mysql::prelude::Queryable::query_drop(&mut lock, "LOCK TABLES fee WRITE").unwrap();
    mq.publish(&queue, &bodies(1, 20, 10), &[]);
    assert!(wait_until(Duration::from_secs(20), || scrape(
        &addr,
        "feedd_amqp_deliveries_total"
    ) == 20.0));
    feedd.signal(Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || feedd
            .stderr_log()
            .contains("consumer cancelled, draining")),
        "{}",
        feedd.stderr_log()
    );
    let before = consumer_cpu_secs(feedd.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = consumer_cpu_secs(feedd.pid()) - before;
    assert!(
        used < 0.2,
        "the consumer thread used {used:.2} s of CPU in 1 s of waiting"
    );
    mysql::prelude::Queryable::query_drop(&mut lock, "UNLOCK TABLES").unwrap();
    let status = feedd.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", feedd.stderr_log());
    assert_eq!(db.count(), 200);
    assert_eq!(mq.ready(&queue), 0, "every delivery committed and acked");
    mq.delete(&queue);
}

/// CPU seconds the `amqp-consumer` thread of `pid` has used (schedstat, nanoseconds).
fn consumer_cpu_secs(pid: i32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let task = tasks
        .filter_map(|t| Some(t.ok()?.path()))
        .find(|t| {
            std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "amqp-consumer")
        })
        .expect("an amqp-consumer thread");
    let stat = std::fs::read_to_string(task.join("schedstat")).unwrap();
    stat.split_whitespace()
        .next()
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1e9
}
