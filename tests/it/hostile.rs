//! Hostile peers: a broker that stops answering mid-protocol (a relay that passes the first
//! frames and then nothing), a database host that accepts TCP and never answers (a listener
//! nobody accepts on), hosts that answer but cannot be used, a dead-letter queue deleted under
//! a running feedd. Every wait is bounded, SIGTERM is acted on at once, nothing rejected is
//! acked into nowhere.

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use crate::harness::broker::{self, Client};
use crate::harness::ports;
use crate::harness::relay::Relay;
use crate::harness::*;

/// Broker frames of a connection up to the passive queue declare: connection.start, .tune,
/// .open-ok, channel.open-ok. The declare is never answered.
const UP_TO_THE_DECLARE: usize = 4;

fn silent_broker_feedd(test: &str, db: &Db) -> (Relay, Feedd) {
    let (queue, _) = broker::names(test);
    let relay = Relay::start("127.0.0.1:5672");
    relay.go_silent_after(UP_TO_THE_DECLARE);
    let url = relay.url(&broker::shared_url(), 5672);
    let o = broker::amqp_overrides(&url, &queue, false, &[]);
    let refs: Vec<&str> = o.iter().map(String::as_str).collect();
    let f = Feedd::prepare(db, &refs).spawn_notified(&[]);
    assert!(
        wait_until(Duration::from_secs(10), || relay.connections() >= 1),
        "feedd never connected to the broker:\n{}",
        f.stderr_log()
    );
    (relay, f)
}

#[test]
fn a_broker_silent_mid_protocol_fails_start_up_within_its_bound() {
    let db = Db::create("hostile_silent_start");
    let (_relay, mut f) = silent_broker_feedd("silent_start", &db);
    let t = Instant::now();
    let status = f.wait(Duration::from_secs(20));
    let log = f.stderr_log();
    println!("start-up failed after {:?}", t.elapsed());
    assert!(!status.success(), "{log}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        log.contains("look for the queue: no answer within"),
        "{log}"
    );
}

#[test]
fn sigterm_ends_a_start_up_stuck_on_a_silent_broker() {
    let db = Db::create("hostile_silent_term");
    let (_relay, mut f) = silent_broker_feedd("silent_term", &db);
    f.signal(Signal::SIGTERM);
    let t = Instant::now();
    let status = f.wait(Duration::from_secs(20));
    println!("exited {:?} after SIGTERM", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(status.success(), "{}", f.stderr_log());
}

/// The broker goes silent at reconnect: the consumer keeps turning (pings every half period
/// of a 4 s watchdog) and SIGTERM ends feedd at once.
#[test]
fn a_broker_silent_at_reconnect_stalls_neither_the_watchdog_nor_sigterm() {
    let db = Db::create("hostile_silent_reconnect");
    let (queue, _) = broker::names("silent_reconnect");
    let relay = Relay::start("127.0.0.1:5672");
    let url = relay.url(&broker::shared_url(), 5672);
    let o = broker::amqp_overrides(&url, &queue, false, &["daemon.shutdown_timeout_ms = 2000"]);
    let refs: Vec<&str> = o.iter().map(String::as_str).collect();
    let mut f = Feedd::prepare(&db, &refs).spawn_notified(&[("WATCHDOG_USEC", "4000000".into())]);
    f.wait_ready();
    relay.go_silent_after(UP_TO_THE_DECLARE);
    relay.cut();
    let pings: Vec<Instant> = f
        .notify()
        .collect(Duration::from_secs(12))
        .into_iter()
        .filter(|(_, text)| text == "WATCHDOG=1\n")
        .map(|(at, _)| at)
        .collect();
    let log = f.stderr_log();
    let longest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "{} pings in 12 s, longest gap {longest:?}, {} broker connections",
        pings.len(),
        relay.connections()
    );
    assert!(pings.len() >= 5, "{} pings:\n{log}", pings.len());
    assert!(longest < Duration::from_millis(3000), "{longest:?}\n{log}");
    assert!(!log.contains("no ping"), "{log}");
    assert!(relay.connections() >= 3, "the consumer kept trying:\n{log}");
    assert_eq!(
        log.matches("connection to").count(),
        1,
        "one line per outage:\n{log}"
    );
    f.signal(Signal::SIGTERM);
    let t = Instant::now();
    let status = f.wait(Duration::from_secs(30));
    println!("exited {:?} after SIGTERM", t.elapsed());
    assert!(status.success(), "{}", f.stderr_log());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// A first host that accepts TCP and never answers is passed within `connect_timeout_ms`.
#[test]
fn a_database_host_that_never_answers_is_passed_within_connect_timeout() {
    let db = Db::create("hostile_db_hole");
    let hole = ports::listener();
    let hole_port = hole.local_addr().unwrap().port();
    let hosts = format!(
        "mysql.host = 127.0.0.1:{hole_port}, {}:{}",
        mysql_host(),
        mysql_port()
    );
    let t = Instant::now();
    let f = Feedd::start(&db, &[&hosts, "mysql.connect_timeout_ms = 1000"]);
    println!("ready after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let log = f.stderr_log();
    assert!(
        log.contains(&format!("db host 127.0.0.1:{hole_port} → ")),
        "{log}"
    );
    drop(hole);
}

#[test]
fn sigterm_ends_a_start_up_waiting_on_a_silent_database() {
    let db = Db::create("hostile_db_hole_term");
    let hole = ports::listener();
    let hosts = format!(
        "mysql.host = 127.0.0.1:{}",
        hole.local_addr().unwrap().port()
    );
    let mut f =
        Feedd::prepare(&db, &[&hosts, "mysql.connect_timeout_ms = 60000"]).spawn_notified(&[]);
    // Accepted and held: the server greeting never comes.
    hole.set_nonblocking(true).unwrap();
    let mut held = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            held = hole.accept().ok();
            held.is_some()
        }),
        "feedd never connected:\n{}",
        f.stderr_log()
    );
    f.signal(Signal::SIGTERM);
    let t = Instant::now();
    let status = f.wait(Duration::from_secs(70));
    println!("exited {:?} after SIGTERM", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(status.success(), "{}", f.stderr_log());
    drop(hole);
}

/// The dead-letter queue deleted under a running feedd: the next dead letter comes back
/// unroutable, the queue is declared again and the dead letter lands in it.
#[test]
fn a_deleted_dead_letter_queue_is_declared_again_before_the_original_is_acked() {
    let db = Db::create("hostile_dlq_gone");
    let (queue, dlx) = broker::names("dlq_gone");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.delete(&dlx);
    let (addr, listen) = metrics_listen();
    let o = broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&listen]);
    let f = Feedd::start_owned(&db, &o);
    // The queue only: the exchange stays, with nothing bound to it.
    mq.delete_queue_only(&dlx);
    let bad: Vec<String> = (0..3).map(|i| format!("not a record {i}")).collect();
    mq.publish(&queue, &bad, &[]);
    assert!(
        wait_until(Duration::from_secs(20), || mq
            .counts(&dlx)
            .is_some_and(|(ready, _)| ready == 3)),
        "dead-letter queue: {:?}\n{}",
        mq.counts(&dlx),
        f.stderr_log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || mq.ready(&queue) == 0),
        "originals still queued"
    );
    let letters = mq.drain(&dlx);
    println!("{} dead letters in the re-declared queue", letters.len());
    assert_eq!(letters.len(), 3, "{}", f.stderr_log());
    assert_eq!(scrape(&addr, "feedd_amqp_dead_letters_total"), 3.0);
    mq.delete(&queue);
    mq.delete(&dlx);
}

/// 3 malformed deliveries (dead-lettered), 50 valid one-record deliveries (tickets 1–50), then
/// ticket 51 with a header the broker
/// accepts but delivers in a content-header frame larger than its own `frame_max` (lapin
/// refuses the frame: the connection breaks each time), then 50 valid ones (52–101); feedd
/// started on the queue, with its metrics address.
fn poison_in_the_middle(test: &str, quorum: bool) -> (Db, String, Client, Feedd, String) {
    let db = Db::create(&format!("hostile_{test}"));
    let (queue, _) = broker::names(test);
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    if quorum {
        mq.declare_quorum(&queue, 5);
    } else {
        mq.declare(&queue);
    }
    let bad: Vec<String> = (0..3).map(|i| format!("not a record {i}")).collect();
    mq.publish(&queue, &bad, &[]);
    mq.publish(&queue, &one_record_bodies(1, 50), &[]);
    let pad = "p".repeat(131_040);
    mq.publish(&queue, &one_record_bodies(51, 1), &[("x-pad", &pad)]);
    mq.publish(&queue, &one_record_bodies(52, 50), &[]);
    let (addr, listen) = metrics_listen();
    let f = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&listen]),
    );
    (db, queue, mq, f, addr)
}

/// On a quorum queue with `x-delivery-limit = 5` only the culprit spends its delivery budget:
/// the 100 valid deliveries around it are all stored and the broker retires the culprit.
#[test]
fn a_delivery_that_breaks_the_connection_spends_only_its_own_delivery_budget() {
    let t = Instant::now();
    let (db, queue, mq, f, addr) = poison_in_the_middle("poison_quorum", true);
    assert!(
        wait_until(Duration::from_secs(60), || db.count() >= 100
            && mq.ready(&queue) == 0),
        "{} rows, {} ready after {:?}\n{}",
        db.count(),
        mq.ready(&queue),
        t.elapsed(),
        f.stderr_log()
    );
    let rows = db.rows();
    let reconnects = scrape(&addr, "feedd_amqp_reconnects_total");
    let log = f.stderr_log();
    println!(
        "{} rows after {:?}, {reconnects} reconnects, {} 'connection lost' lines",
        rows.len(),
        t.elapsed(),
        log.matches("lost (").count()
    );
    assert!(
        (1..=50).chain(52..=101).all(|t| rows.contains_key(&t)),
        "every valid message around the culprit is stored: {} rows\n{log}",
        rows.len()
    );
    assert!(!rows.contains_key(&51), "the culprit never arrived");
    // Whether it is named first depends on how fast the broker spends its budget (naming is
    // the classic queue's test). One more if a loss came between a dead letter and its ack.
    let counted = scrape(&addr, "feedd_amqp_dead_letters_total");
    assert!(
        (3.0..=4.0).contains(&counted),
        "{counted} dead letters\n{log}"
    );
    mq.delete(&queue);
}

/// On a classic queue the culprit stays at the head: feedd names it within a few reconnects,
/// backs off (not hammering the broker), logs the outage once; the 50 before it are stored.
#[test]
fn a_delivery_that_breaks_the_connection_is_named_on_a_classic_queue() {
    let t = Instant::now();
    let (db, queue, mq, f, addr) = poison_in_the_middle("poison_classic", false);
    f.wait_for_log("breaks the connection", Duration::from_secs(30));
    let named = t.elapsed();
    wait_rows(&db, 50, 10, &f);
    assert!(
        wait_until(Duration::from_secs(30), || scrape(
            &addr,
            "feedd_amqp_reconnects_total"
        ) >= 5.0),
        "{}",
        f.stderr_log()
    );
    let log = f.stderr_log();
    println!(
        "culprit named after {named:?}; {} rows, 5 reconnects after {:?}, {} 'connection lost' lines",
        db.count(),
        t.elapsed(),
        log.matches("lost (").count()
    );
    assert_eq!(db.count(), 50, "the deliveries before the culprit\n{log}");
    // Acked as soon as confirmed: the losses that follow do not dead-letter them again.
    let (_, dlq) = broker::names("poison_classic");
    // At least once, never the copy per reconnect of before: a dead letter whose confirm (or
    // whose original's ack) is lost with the connection — the culprit's frame can arrive while
    // feedd awaits that confirm — is published once more after the reconnect.
    let counted = scrape(&addr, "feedd_amqp_dead_letters_total");
    assert!(
        (3.0..=4.0).contains(&counted),
        "{counted} dead letters\n{log}"
    );
    let copies = mq.drain(&dlq).len();
    assert!(
        (3..=4).contains(&copies),
        "{copies} copies of 3 dead letters\n{log}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "backoff 0.1 + 0.2 + 0.4 + 0.8 s at least: {:?}",
        t.elapsed()
    );
    assert_eq!(
        log.matches("lost (").count(),
        1,
        "one line per outage\n{log}"
    );
    mq.delete(&queue);
}

/// A first host that answers but cannot be used — no database (1049), an account that may
/// only SELECT (1142), a table of another shape — is logged with its reason and passed: feedd
/// serves on host 2. With no usable host at all, start-up fails naming each host's reason.
#[test]
fn a_first_host_that_cannot_be_used_is_passed_with_its_reason() {
    let one = PrivateMariadb::start_with(&[]);
    let db = Db::create("hostile_unusable");
    let user = format!("feedd_t_sel_{}", std::process::id());
    let hosts = format!(
        "mysql.host = 127.0.0.1:{}, {}:{}",
        one.port,
        mysql_host(),
        mysql_port()
    );
    let serves_on_host_2 = |overrides: &[&str], reason: &str| {
        let mut o = vec![hosts.as_str()];
        o.extend(overrides);
        let t = Instant::now();
        let f = Feedd::start(&db, &o);
        let log = f.stderr_log();
        println!("{reason}: ready after {:?}", t.elapsed());
        assert!(
            log.contains(&format!("db host 127.0.0.1:{} not usable", one.port)),
            "{log}"
        );
        assert!(log.contains(reason), "{log}");
        let d = Dealer::connect(&f.endpoint());
        assert_eq!(d.round_trip(&one_record_bodies(1, 1))[&0], "TRUE");
    };
    // No database on host 1.
    serves_on_host_2(&[], "1049");
    // The database, and an account that may only read it.
    let mut c = one.create_db(&db.name);
    let pw = "mysql.password = pw";
    let as_user = format!("mysql.user = {user}");
    c.query_drop(format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"))
        .unwrap();
    c.query_drop(format!("GRANT SELECT ON `{}`.* TO '{user}'@'%'", db.name))
        .unwrap();
    let mut shared = db.conn();
    shared
        .query_drop(format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"))
        .unwrap();
    shared
        .query_drop(format!("GRANT ALL ON `{}`.* TO '{user}'@'%'", db.name))
        .unwrap();
    serves_on_host_2(&[&as_user, pw], "1142");
    // A table of another shape.
    c.query_drop("CREATE TABLE fee (ticket VARCHAR(20) PRIMARY KEY)")
        .unwrap();
    serves_on_host_2(&[], "`ticket`");
    // No usable host: each host's reason.
    let none = format!(
        "mysql.host = 127.0.0.1:{}, 127.0.0.1:{}",
        one.port,
        ports::port()
    );
    let mut f =
        Feedd::prepare(&db, &[&none, "mysql.connect_timeout_ms = 1000"]).spawn_notified(&[]);
    let status = f.wait(Duration::from_secs(20));
    let log = f.stderr_log();
    println!("no usable host:\n{log}");
    assert!(!status.success(), "{log}");
    assert!(log.contains("`ticket`"), "{log}");
    assert!(
        log.contains("refused") || log.contains("Connection"),
        "{log}"
    );
    let _ = shared.query_drop(format!("DROP USER '{user}'@'%'"));
}

/// A start-up error states its cause once: an unreachable broker's "Connection refused" was
/// printed three times in one line (each error of the chain holding its source's text), a
/// host list named each host twice and wrapped the driver's text in its variant name.
#[test]
fn a_start_up_error_states_its_cause_once() {
    let db = Db::create("hostile_cause_once");
    let (queue, _) = broker::names("cause_once");
    let o = broker::amqp_overrides(&broker::url_on(ports::port()), &queue, false, &[]);
    let refs: Vec<&str> = o.iter().map(String::as_str).collect();
    let err = Feedd::prepare(&db, &refs).start_must_fail();
    println!("{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    let (a, b) = (ports::port(), ports::port());
    let hosts = format!("mysql.host = 127.0.0.1:{a}, 127.0.0.1:{b}");
    let err = Feedd::prepare(&db, &[&hosts]).start_must_fail();
    println!("{err}");
    assert_eq!(err.matches(&format!("127.0.0.1:{a}")).count(), 2, "{err}");
    assert!(!err.contains("DriverError"), "{err}");
}

/// A malformed delivery whose header fits the broker's `frame_max` but not with `feedd-reason`
/// added: the dead letter goes without the original headers (saying so) instead of breaking
/// the connection each time, and the deliveries behind it are stored.
#[test]
fn a_dead_letter_too_large_for_the_frame_limit_goes_without_its_headers() {
    let db = Db::create("hostile_big_dead_letter");
    let (queue, dlq) = broker::names("big_dead_letter");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.declare(&queue);
    let pad = "p".repeat(131_000);
    mq.publish(&queue, &["not a record".to_string()], &[("x-pad", &pad)]);
    mq.publish(&queue, &one_record_bodies(1, 5), &[]);
    let (addr, listen) = metrics_listen();
    let f = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&listen]),
    );
    wait_rows(&db, 5, 20, &f);
    let mut letters = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            letters.extend(mq.drain(&dlq));
            !letters.is_empty()
        }),
        "{}",
        f.stderr_log()
    );
    let (body, headers) = &letters[0];
    println!(
        "dead letter headers: {:?}",
        headers.keys().collect::<Vec<_>>()
    );
    assert_eq!(body, "not a record");
    assert!(headers.contains_key("feedd-reason"), "{headers:?}");
    assert!(headers.contains_key("feedd-headers-dropped"), "{headers:?}");
    assert_eq!(scrape(&addr, "feedd_amqp_dead_letters_total"), 1.0);
    assert_eq!(scrape(&addr, "feedd_amqp_reconnects_total"), 0.0);
    mq.delete(&queue);
}
