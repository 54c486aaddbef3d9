//! What feedd declares on the broker (SPEC §3 `[amqp]` exchange, exchange_type, routing_key,
//! queue_type), end to end on the shared RabbitMQ with the real `feedd` and MariaDB: the
//! exchange and binding a seed-style producer publishes through, each exchange type, an
//! existing exchange of another type refused at start and on reload, quorum queues declared,
//! an existing queue used as it is with its type logged, redelivered quorum messages.

use std::time::Duration;

use lapin::ExchangeKind;
use mysql::prelude::Queryable;

use crate::harness::broker::{self, Client};
use crate::harness::relay::Relay;
use crate::harness::*;

/// The shared broker with the test's queue, its dead letters and `exchange` deleted.
fn fresh(queue: &str, exchange: &str) -> Client {
    let mq = Client::connect(&broker::shared_url());
    mq.delete(queue);
    mq.delete_exchange(exchange);
    mq
}

fn start(db: &Db, queue: &str, extra: &[&str]) -> Feedd {
    Feedd::start_owned(
        db,
        &broker::amqp_overrides(&broker::shared_url(), queue, false, extra),
    )
}

/// Waits until every delivery taken was acked and the queue is empty: whatever the broker
/// routed into the queue has been committed (or dead-lettered) by then.
fn wait_settled(mq: &Client, queue: &str, addr: &str) {
    assert!(
        wait_until(Duration::from_secs(20), || {
            mq.ready(queue) == 0
                && scrape(addr, "feedd_amqp_acks_total")
                    == scrape(addr, "feedd_amqp_deliveries_total")
        }),
        "queue `{queue}` not drained and acked"
    );
}

#[test]
fn a_direct_exchange_routes_its_routing_key_into_the_queue() {
    let db = Db::create("topo_direct");
    let (queue, _) = broker::names("direct");
    let x = format!("{queue}.in");
    let mq = fresh(&queue, &x);
    let (addr, listen) = metrics_listen();
    let exchange = format!("amqp.exchange = {x}");
    let feedd = start(
        &db,
        &queue,
        &[&exchange, "amqp.routing_key = fee.eu", &listen],
    );
    feedd.wait_for_log(
        &format!("queue `{queue}`: declared, classic queue; bound to direct exchange `{x}` with key `fee.eu`"),
        Duration::from_secs(5),
    );
    mq.publish_to(&x, "fee.eu", &bodies(1, 10, 10), &[]);
    // Another key: the exchange routes it nowhere (the broker drops it).
    mq.publish_to(&x, "fee.us", &bodies(101, 10, 10), &[]);
    // The default exchange still reaches the queue by its name.
    mq.publish(&queue, &bodies(201, 10, 10), &[]);
    wait_rows(&db, 200, 20, &feedd);
    wait_settled(&mq, &queue, &addr);
    let rows = db.rows();
    assert_eq!(rows.len(), 200);
    assert!(
        (101..=200).all(|t| !rows.contains_key(&t)),
        "fee.us not bound"
    );
    for b in bodies(1, 10, 10).iter().chain(&bodies(201, 10, 10)) {
        assert!(missing_records(b, &rows).is_empty());
    }
    assert_eq!(scrape(&addr, "feedd_amqp_deliveries_total"), 20.0);
    mq.delete(&queue);
    mq.delete_exchange(&x);
}

#[test]
fn fanout_topic_and_headers_exchanges_bind_the_queue() {
    let db = Db::create("topo_kinds");
    // (type, routing_key, a key routed, a key not routed)
    let kinds = [
        ("fanout", "", "any.key", None),
        ("topic", "fee.*", "fee.eu", Some("tax.eu")),
        ("headers", "", "whatever", None),
    ];
    let mut first = 1;
    for (kind, key, routed, dropped) in kinds {
        let (queue, _) = broker::names(&format!("kind_{kind}"));
        let x = format!("{queue}.in");
        let mq = fresh(&queue, &x);
        let exchange = format!("amqp.exchange = {x}");
        let kind_line = format!("amqp.exchange_type = {kind}");
        let key_line = format!("amqp.routing_key = {key}");
        let mut feedd = start(&db, &queue, &[&exchange, &kind_line, &key_line]);
        feedd.wait_for_log(
            &format!("bound to {kind} exchange `{x}`"),
            Duration::from_secs(5),
        );
        if let Some(dropped) = dropped {
            mq.publish_to(&x, dropped, &bodies(first + 1000, 5, 10), &[]);
        }
        mq.publish_to(&x, routed, &bodies(first, 5, 10), &[]);
        wait_rows(&db, first + 49, 20, &feedd);
        assert!(wait_until(Duration::from_secs(10), || mq.ready(&queue) == 0));
        feedd.signal(Signal::SIGTERM);
        assert!(feedd.wait(Duration::from_secs(15)).success());
        let rows = db.rows();
        assert!(
            (first + 1000..first + 1050).all(|t| !rows.contains_key(&t)),
            "{kind}: `{dropped:?}` not routed"
        );
        assert!(missing_records(&bodies(first, 1, 50)[0], &rows).is_empty());
        first += 50;
        mq.delete(&queue);
        mq.delete_exchange(&x);
    }
    assert_eq!(db.count(), 150);
}

#[test]
fn an_existing_exchange_of_another_type_is_refused_at_start_and_on_reload() {
    let db = Db::create("topo_mismatch");
    let (queue, _) = broker::names("mismatch");
    let x = format!("{queue}.in");
    let mq = fresh(&queue, &x);
    mq.declare_exchange(&x, ExchangeKind::Fanout);
    let exchange = format!("amqp.exchange = {x}");
    let refused =
        format!("exchange `{x}` exists as a fanout exchange, but [amqp] exchange_type = direct");

    let with_exchange = broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&exchange]);
    let refs: Vec<&str> = with_exchange.iter().map(String::as_str).collect();
    let mut feedd = Feedd::prepare(&db, &refs).spawn_notified(&[]);
    assert_eq!(feedd.wait(Duration::from_secs(15)).code(), Some(1));
    let log = feedd.stderr_log();
    assert!(log.contains(&refused), "{log}");
    assert!(!log.contains("guest:guest"), "no password: {log}");

    // Running without the exchange, a reload to it is refused before the consumer is touched.
    let (addr, listen) = metrics_listen();
    let plain = broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&listen]);
    let feedd = Feedd::start_owned(&db, &plain);
    mq.publish(&queue, &bodies(1, 10, 10), &[]);
    wait_rows(&db, 100, 20, &feedd);
    let mut reload = plain.clone();
    reload.push(exchange.clone());
    let refs: Vec<&str> = reload.iter().map(String::as_str).collect();
    let feedd = feedd.prepare_in(&db, &refs);
    feedd.signal(Signal::SIGHUP);
    wait_counts(&addr, (0.0, 1.0));
    assert!(
        feedd.stderr_log().contains(&refused),
        "{}",
        feedd.stderr_log()
    );
    // Not bound: what goes to the fanout exchange reaches no queue of feedd's.
    mq.publish_to(&x, "", &bodies(1001, 10, 10), &[]);
    mq.publish(&queue, &bodies(101, 10, 10), &[]);
    wait_rows(&db, 200, 20, &feedd);
    wait_settled(&mq, &queue, &addr);
    assert_eq!(db.count(), 200, "nothing routed by the refused exchange");
    assert_eq!(
        scrape(&addr, "feedd_amqp_reconnects_total"),
        0.0,
        "the running channel was never cancelled"
    );
    // The exchange gone, the same file applies: declared direct and bound with the queue's name.
    mq.delete_exchange(&x);
    feedd.signal(Signal::SIGHUP);
    wait_counts(&addr, (1.0, 1.0));
    feedd.wait_for_log(
        &format!("bound to direct exchange `{x}` with key `{queue}`"),
        Duration::from_secs(5),
    );
    mq.publish_to(&x, &queue, &bodies(201, 10, 10), &[]);
    wait_rows(&db, 300, 20, &feedd);
    mq.delete(&queue);
    mq.delete_exchange(&x);
}

/// An exchange of another type is the same on every node of a cluster: feedd does not walk
/// its broker list over it (at start it names that reason; running, it stays, says so).
#[test]
fn an_exchange_of_another_type_does_not_walk_the_broker_list() {
    let db = Db::create("topo_walk");
    let (queue, _) = broker::names("walk");
    let x = format!("{queue}.in");
    let mq = fresh(&queue, &x);
    let shared = broker::shared_url();
    // The shared broker twice (through a relay first): two nodes sharing their exchanges.
    let relay = Relay::start("127.0.0.1:5672");
    let list = format!("{}, {shared}", relay.url(&shared, 5672));
    let (addr, listen) = metrics_listen();
    let exchange = format!("amqp.exchange = {x}");
    let extra = [listen.as_str(), &exchange, "daemon.log_level = debug"];
    let overrides = broker::amqp_overrides(&list, &queue, false, &extra);
    let mut feedd = Feedd::start_owned(&db, &overrides);
    mq.publish_to(&x, &queue, &bodies(1, 10, 10), &[]);
    wait_rows(&db, 100, 20, &feedd);
    let refused =
        format!("exchange `{x}` exists as a fanout exchange, but [amqp] exchange_type = direct");
    // Replaced by a fanout exchange under the running feedd, then its connection lost.
    mq.delete_exchange(&x);
    mq.declare_exchange(&x, ExchangeKind::Fanout);
    relay.cut();
    assert!(
        wait_until(Duration::from_secs(30), || feedd
            .stderr_log()
            .matches("reconnect failed")
            .count()
            >= 3),
        "{}",
        feedd.stderr_log()
    );
    let log = feedd.stderr_log();
    assert_eq!(
        scrape(&addr, "feedd_amqp_failovers_total"),
        1.0,
        "the lost connection's move only:\n{log}"
    );
    let error = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(&refused));
    assert_eq!(error.count(), 1, "said once, loud:\n{log}");
    feedd.signal(Signal::SIGTERM);
    assert!(feedd.wait(Duration::from_secs(20)).success());

    // At start: the reason, not "no broker answered" after trying every node.
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let mut feedd = Feedd::prepare(&db, &refs).spawn_notified(&[]);
    assert_eq!(feedd.wait(Duration::from_secs(15)).code(), Some(1));
    let log = feedd.stderr_log();
    assert!(log.contains(&refused), "{log}");
    assert!(!log.contains("no broker of [amqp] url answered"), "{log}");
    assert!(!log.contains("trying the next broker"), "{log}");
    mq.delete(&queue);
    mq.delete_exchange(&x);
}

#[test]
fn queue_type_quorum_declares_quorum_queues_and_feedd_consumes_them() {
    let db = Db::create("topo_quorum");
    let (queue, dlq) = broker::names("quorum");
    let mq = fresh(&queue, "none");
    let (addr, listen) = metrics_listen();
    let feedd = start(&db, &queue, &["amqp.queue_type = quorum", &listen]);
    feedd.wait_for_log(
        &format!("queue `{queue}`: declared, quorum queue"),
        Duration::from_secs(5),
    );
    assert_eq!(mq.is_quorum(&queue), Some(true));
    assert_eq!(
        mq.is_quorum(&dlq),
        Some(true),
        "dead letters follow queue_type"
    );
    let mut sent = bodies(1, 100, 10);
    sent.push("100001,x,1".into());
    mq.publish(&queue, &sent, &[]);
    wait_rows(&db, 1000, 30, &feedd);
    // Consuming at all shows the QoS is per consumer: a global one is refused (540).
    wait_settled(&mq, &queue, &addr);
    assert_eq!(scrape(&addr, "feedd_amqp_acks_total"), 101.0);
    let mut dead = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        dead.extend(mq.drain(&dlq));
        !dead.is_empty()
    }));
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1["feedd-reason"].starts_with("line 1:"));
    let rows = db.rows();
    assert_eq!(rows.len(), 1000);
    assert!(sent[..100]
        .iter()
        .all(|b| missing_records(b, &rows).is_empty()));
    mq.delete(&queue);
}

#[test]
fn an_existing_classic_queue_is_used_as_is_and_its_type_logged() {
    let db = Db::create("topo_existing");
    let (queue, _) = broker::names("existing");
    let mq = fresh(&queue, "none");
    mq.declare(&queue);
    mq.publish(&queue, &bodies(1, 10, 10), &[]);
    let feedd = start(&db, &queue, &["amqp.queue_type = quorum"]);
    wait_rows(&db, 100, 20, &feedd);
    let log = feedd.stderr_log();
    assert!(
        log.contains(&format!(
            "queue `{queue}`: existing classic queue, used as is"
        )),
        "{log}"
    );
    assert!(
        log.contains("queue_type = quorum is not applied to the existing queue"),
        "{log}"
    );
    assert_eq!(mq.is_quorum(&queue), Some(false), "left a classic queue");
    assert_eq!(db.count(), 100);
    mq.delete(&queue);
}

#[test]
fn redelivered_quorum_messages_are_committed_once() {
    let db = Db::create("topo_redeliver");
    let (queue, _) = broker::names("redeliver");
    let mq = fresh(&queue, "none");
    mq.declare_quorum(&queue, 20);
    let sent = bodies(1, 20, 10);
    mq.publish(&queue, &sent, &[]);
    // Twice delivered and returned: a lost consumer's channel, as a crash before the ack.
    // (3.10 sends `x-delivery-count: 0` on a first delivery when a delivery limit is set.)
    let first = mq.take_and_return(&queue, 20);
    let second = mq.take_and_return(&queue, 20);
    assert_eq!(first.len(), 20);
    let counted: Vec<Option<i64>> = first.iter().map(|c| Some(c.unwrap_or(0) + 1)).collect();
    assert_eq!(second, counted, "each return counted");
    // Half of them were committed before that crash.
    db.conn()
        .query_drop(
            "CREATE TABLE fee (ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY, \
             login BIGINT UNSIGNED NOT NULL, volume DECIMAL(20,4) NOT NULL, \
             status CHAR(1) NOT NULL DEFAULT 'N') ENGINE=InnoDB",
        )
        .unwrap();
    for b in &sent[..10] {
        for line in b.lines() {
            let f: Vec<&str> = line.split(',').collect();
            db.conn()
                .exec_drop("INSERT INTO fee VALUES (?, ?, ?, 'Y')", (f[0], f[1], f[2]))
                .unwrap();
        }
    }
    let (addr, listen) = metrics_listen();
    let feedd = start(&db, &queue, &[&listen]);
    wait_rows(&db, 200, 20, &feedd);
    wait_settled(&mq, &queue, &addr);
    assert_eq!(scrape(&addr, "feedd_amqp_acks_total"), 20.0);
    assert_eq!(scrape(&addr, "feedd_amqp_redeliveries_total"), 20.0);
    assert_eq!(scrape(&addr, "feedd_amqp_dead_letters_total"), 0.0);
    let rows = db.rows();
    assert_eq!(rows.len(), 200, "each record once");
    assert!(sent.iter().all(|b| missing_records(b, &rows).is_empty()));
    let log = feedd.stderr_log();
    assert!(
        log.contains(&format!(
            "queue `{queue}`: existing quorum queue, used as is"
        )),
        "{log}"
    );
    mq.delete(&queue);
}
