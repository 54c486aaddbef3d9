//! The `[amqp] url` broker list (SPEC §3, §9 RabbitMQ cluster) end to end: start-up on the first
//! broker that answers, failover on a lost connection, passwords never shown; and a real 3-node
//! RabbitMQ cluster (harness/rabbit_cluster.rs) with a quorum queue under load: the node feedd
//! consumes from killed -9 and restarted, another node killed, reloads that change the list,
//! feedd's node gone silent (noticed by the heartbeat).

use std::time::{Duration, Instant};

use crate::harness::broker::{self, Client};
use crate::harness::database::missing_records;
use crate::harness::rabbit_cluster::{Publisher, RabbitCluster};
use crate::harness::relay::Relay;
use crate::harness::*;

/// feedd's label for the broker at `port` (shared-broker tests: guest, vhost /).
fn shown(port: u16) -> String {
    format!("amqp://guest@127.0.0.1:{port}//")
}

fn active(addr: &str, broker: &str) -> f64 {
    scrape(
        addr,
        &format!("feedd_amqp_broker_active{{broker=\"{broker}\"}}"),
    )
}

#[test]
fn a_broker_list_starts_on_the_first_that_answers_and_moves_on_when_it_is_lost() {
    let db = Db::create("amqp_list");
    let (queue, dlq) = broker::names("list");
    let shared = broker::shared_url();
    let mq = Client::connect(&shared);
    mq.delete(&queue);
    mq.declare(&queue);
    let total = 20_000u64;
    mq.publish(&queue, &bodies(1, total / 10, 10), &[]);
    // A dead port first, then the broker through a relay that can cut, then the broker itself.
    let dead = ports::port();
    let relay = Relay::start("127.0.0.1:5672");
    let list = format!(
        "{}, {}, {shared}",
        broker::url_on(dead),
        relay.url(&shared, 5672)
    );
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(
            &list,
            &queue,
            false,
            &[&listen, "pipeline.batch_size = 100"],
        ),
    );
    assert_eq!(active(&addr, &shown(dead)), 0.0);
    assert_eq!(
        active(&addr, &shown(relay.port)),
        1.0,
        "the first that answers"
    );
    assert_eq!(active(&addr, &shown(5672)), 0.0);
    wait_rows(&db, 2_000, 30, &feedd);
    relay.cut();
    wait_rows(&db, total, 60, &feedd);
    assert!(
        wait_until(Duration::from_secs(20), || mq.ready(&queue) == 0),
        "nothing left in the queue"
    );
    assert_eq!(db.count(), total, "each record once");
    assert!(mq.drain(&dlq).is_empty(), "no dead letters");
    assert_eq!(scrape(&addr, "feedd_amqp_failovers_total"), 1.0);
    assert_eq!(active(&addr, &shown(relay.port)), 0.0);
    assert_eq!(active(&addr, &shown(5672)), 1.0, "moved on to the next");
    let log = feedd.stderr_log();
    let line = format!(
        "amqp: broker {} → {}: connection lost",
        shown(relay.port),
        shown(5672)
    );
    assert_eq!(log.matches(&line).count(), 1, "one line per move:\n{log}");
    mq.delete(&queue);
}

#[test]
fn no_password_of_the_list_is_ever_shown_and_every_dead_broker_is_named() {
    let db = Db::create("amqp_list_pw");
    let (a, b, c) = (ports::port(), ports::port(), ports::port());
    let list = format!(
        "amqp://feed:pw1Xyzzy@127.0.0.1:{a}/%2f, amqp://feed:pw2Xyzzy@127.0.0.1:{b}/%2f, amqp://feed:pw3Xyzzy@127.0.0.1:{c}/%2f"
    );
    let feedd = Feedd::prepare(&db, &["zmq.endpoint =", &format!("amqp.url = {list}")]);
    let (status, out, err) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert!(status.success(), "{out}{err}");
    let err = feedd.start_must_fail();
    for port in [a, b, c] {
        let broker = format!("amqp://feed@127.0.0.1:{port}//");
        assert!(err.contains(&broker), "{broker} named: {err}");
    }
    assert!(err.contains("no broker of [amqp] url answered"), "{err}");
    let bad = feedd.prepare_in(
        &db,
        &[&format!(
            "amqp.url = amqp://feed:pw1Xyzzy@127.0.0.1:{a}/%2f, http://feed:pw2Xyzzy@x/"
        )],
    );
    let (status, _, check) = bad.command(&["check", "--conf", "feed.ini"]);
    assert!(!status.success());
    assert!(
        check.contains("[amqp] url: entry 2: not an AMQP URL"),
        "{check}"
    );
    for text in [err, check, bad.log(), bad.stderr_log()] {
        assert!(!text.contains("Xyzzy"), "a password shown: {text}");
    }
}

/// Every record of tickets 1..=n stored once with its values.
fn assert_stored_once(db: &Db, n: u64) {
    let rows = db.rows();
    let missing: Vec<u64> = bodies(1, n / 10, 10)
        .iter()
        .flat_map(|b| missing_records(b, &rows))
        .collect();
    assert_eq!(missing, Vec::<u64>::new(), "missing or different");
    assert_eq!(rows.len() as u64, n, "each record once");
}

/// Seconds from `since` until feedd uses `broker` and acked a delivery there (the failover
/// time; an ack written to the dead connection before feedd noticed counts for nothing).
fn next_ack_on(addr: &str, broker: &str, since: Instant) -> f64 {
    assert!(
        wait_until(Duration::from_secs(60), || active(addr, broker) == 1.0),
        "feedd did not move to {broker}"
    );
    let before = scrape(addr, "feedd_amqp_acks_total");
    assert!(
        wait_until(Duration::from_secs(60), || scrape(
            addr,
            "feedd_amqp_acks_total"
        ) > before),
        "no ack within 60 s"
    );
    since.elapsed().as_secs_f64()
}

#[test]
fn a_quorum_queue_on_three_nodes_loses_nothing_to_node_kills_list_reloads_and_a_silent_node() {
    let mut cluster = RabbitCluster::start(3);
    let db = Db::create("amqp_cluster");
    let queue = "fee_cluster";
    // Declared through node 0, so node 0 leads the queue: the first kill takes both feedd's
    // broker and the leader. The dead-letter queue is a quorum queue too: a classic one lives
    // on one node, and with that node down every declare of it fails the reconnect.
    let (_, mq) = cluster.client(0);
    mq.declare_quorum(queue, 1_000);
    mq.declare_quorum(&format!("{queue}.rejected"), 1_000);
    drop(mq);
    let publisher = Publisher::start(
        vec![cluster.url(2), cluster.url(0), cluster.url(1)],
        queue,
        100,
        10,
        Duration::from_millis(50),
    );
    // A short heartbeat: a node that dies silently is noticed in seconds, not 60.
    let list = cluster.url_list(&[0, 1, 2], "heartbeat=2");
    let (addr, listen) = metrics_listen();
    let mut overrides =
        broker::amqp_overrides(&list, queue, false, &[&listen, "pipeline.batch_size = 100"]);
    let mut feedd = Feedd::start_owned(&db, &overrides);
    assert_eq!(active(&addr, &cluster.shown(0)), 1.0);
    wait_rows(&db, 5_000, 60, &feedd);

    // 1. The node feedd consumes from (and the queue's leader) dies under load.
    let killed = Instant::now();
    cluster.kill9(0);
    let failover = next_ack_on(&addr, &cluster.shown(1), killed);
    eprintln!("failover: node kill -9 → next ack {failover:.2} s");
    assert_eq!(
        active(&addr, &cluster.shown(1)),
        1.0,
        "moved to the next node"
    );
    assert_eq!(scrape(&addr, "feedd_amqp_failovers_total"), 1.0);
    let moved = format!(
        "amqp: broker {} → {}: connection lost",
        cluster.shown(0),
        cluster.shown(1)
    );
    assert_eq!(
        feedd.stderr_log().matches(&moved).count(),
        1,
        "one line per move"
    );
    cluster.restart(0);
    let seen = db.count();
    assert!(wait_until(Duration::from_secs(30), || db.count() > seen + 2_000));
    assert_eq!(active(&addr, &cluster.shown(1)), 1.0, "no flap back");

    // 2. Another node (the publisher's) dies: feedd stays where it is.
    cluster.kill9(2);
    let seen = db.count();
    assert!(wait_until(Duration::from_secs(60), || db.count() > seen + 2_000));
    assert_eq!(scrape(&addr, "feedd_amqp_failovers_total"), 1.0);

    // 3. A reload drops feedd's node from the list: it moves to the first of the new list that
    // answers (node 2 is down, node 0 answers).
    overrides.retain(|o| !o.starts_with("amqp.url"));
    overrides.push(format!(
        "amqp.url = {}",
        cluster.url_list(&[2, 0], "heartbeat=2")
    ));
    let reloads = scrape(&addr, "feedd_config_reloads_total");
    feedd.rewrite(&db, &overrides);
    feedd.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &addr,
        "feedd_config_reloads_total"
    ) > reloads));
    feedd.wait_for_log(
        &format!("amqp: now consuming {}", cluster.shown(0)),
        Duration::from_secs(5),
    );
    assert_eq!(active(&addr, &cluster.shown(0)), 1.0);
    assert!(!http_get(&addr, "/metrics").contains(&cluster.shown(1)));

    cluster.restart(2);

    // 4. A reload that keeps feedd's node (now second) leaves it there.
    overrides.retain(|o| !o.starts_with("amqp.url"));
    overrides.push(format!(
        "amqp.url = {}",
        cluster.url_list(&[1, 0], "heartbeat=2")
    ));
    feedd.rewrite(&db, &overrides);
    feedd.signal(Signal::SIGHUP);
    feedd.wait_for_log(
        &format!("staying on {}", cluster.shown(0)),
        Duration::from_secs(30),
    );
    assert_eq!(active(&addr, &cluster.shown(0)), 1.0);
    assert_eq!(active(&addr, &cluster.shown(1)), 0.0);

    // 5. feedd's node goes silent (frozen, its sockets open): only the heartbeat notices it,
    // then feedd moves on to the next of the list, wrapping around.
    // The cluster itself notices a silent node only after its net_ticktime (60 s): the node is
    // thawed once feedd has moved, so the queue's leader (if it was there) answers again.
    let frozen = Instant::now();
    cluster.pause(0, true);
    assert!(
        wait_until(Duration::from_secs(30), || active(&addr, &cluster.shown(1))
            == 1.0),
        "feedd did not leave the silent node:\n{}",
        feedd.stderr_log()
    );
    let silent = frozen.elapsed().as_secs_f64();
    eprintln!(
        "failover: node silent (SIGSTOP, heartbeat=2) → feedd on the next node {silent:.2} s"
    );
    cluster.pause(0, false);
    assert_eq!(scrape(&addr, "feedd_amqp_failovers_total"), 2.0);
    let seen = db.count();
    assert!(wait_until(Duration::from_secs(60), || db.count() > seen + 2_000));

    let total = publisher.finish();
    eprintln!("{total} publisher-confirmed records");
    assert!(
        wait_until(Duration::from_secs(90), || db.count() >= total),
        "{} of {total} stored\n{}",
        db.count(),
        feedd.stderr_log()
    );
    let (_, mq) = cluster.client(0);
    // Quorum queue counts lag a few seconds.
    assert!(
        wait_until(Duration::from_secs(30), || mq.ready(queue) == 0),
        "the queue drained"
    );
    assert_stored_once(&db, total);
    assert!(
        mq.drain(&format!("{queue}.rejected")).is_empty(),
        "nothing dead-lettered"
    );
    feedd.signal(Signal::SIGTERM);
    assert!(feedd.wait(Duration::from_secs(20)).success());
    let log = feedd.stderr_log();
    let amqp: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("] amqp: ") && !l.contains("DEBUG"))
        .collect();
    eprintln!("feedd's AMQP log lines:\n{}", amqp.join("\n"));
}

/// An existing quorum queue with `queue_type` left at classic: the dead-letter queue feedd
/// declares follows the queue (quorum), so the node it was declared on dying does not make
/// every reconnect fail (a classic queue answers 404 while its one home node is down).
#[test]
fn the_dead_letter_queue_follows_an_existing_quorum_queue_and_survives_its_node() {
    let mut cluster = RabbitCluster::start(3);
    let db = Db::create("amqp_cluster_dlq");
    let queue = "fee_cluster_dlq";
    let dlq = format!("{queue}.rejected");
    let (_, mq) = cluster.client(0);
    mq.declare_quorum(queue, 1_000);
    mq.publish(queue, &bodies(1, 10, 10), &[]);
    drop(mq);
    let list = cluster.url_list(&[0, 1, 2], "heartbeat=2");
    let (addr, listen) = metrics_listen();
    let overrides = broker::amqp_overrides(&list, queue, false, &[&listen]);
    let feedd = Feedd::start_owned(&db, &overrides);
    wait_rows(&db, 100, 30, &feedd);
    // feedd declared the dead-letter queue on node 0, the node it consumes from.
    cluster.kill9(0);
    // A publisher channel first used while the leader is down is nacked for a while: a new
    // channel each try (a ticket published twice is stored once).
    let more = bodies(101, 10, 10);
    assert!(wait_until(Duration::from_secs(60), || cluster
        .client(1)
        .1
        .try_publish(queue, &more)));
    let (_, mq) = cluster.client(1);
    assert!(
        wait_until(Duration::from_secs(60), || db.count() >= 200),
        "{} of 200 stored after node 0 died\n{}",
        db.count(),
        feedd.stderr_log()
    );
    assert_eq!(active(&addr, &cluster.shown(0)), 0.0);
    assert_eq!(mq.is_quorum(&dlq), Some(true), "the dead-letter queue");
    assert_stored_once(&db, 200);
}
