//! Past one machine (SPEC §9): a 3-node Galera cluster, the ordered failover host list, and
//! several feedd on one table. Galera tests run one at a time (a cluster is 3 mariadbd on 2
//! cores).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness::cluster::{self, GaleraCluster};
use crate::harness::database::PrivateMariadb;
use crate::harness::*;
use mysql::prelude::Queryable;

/// One cluster at a time in this test binary.
static CLUSTER: Mutex<()> = Mutex::new(());

fn one_cluster_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    CLUSTER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every acknowledged record is on every node, each ticket once.
fn assert_on_every_node(
    cluster: &GaleraCluster,
    db: &Db,
    data: &[String],
    r: &Resender,
    total: usize,
) {
    for node in 0..cluster::NODES {
        let rows = cluster.rows(node, &db.name);
        assert_acked_present(data, &r.acked, &rows);
        assert_eq!(rows.len(), total, "node {node}: one row per ticket");
    }
}

/// SPEC §9 Galera: two feedd on two nodes write the same tickets at once. Certification
/// conflicts (1213 at COMMIT) are retried; every message is TRUE on both; one row per ticket
/// on all three nodes.
#[test]
fn galera_two_writers_on_two_nodes_with_overlapping_tickets() {
    let _one = one_cluster_at_a_time();
    let cluster = GaleraCluster::start();
    let db = Db::create_on("gal_two", cluster.port(0));
    let (ma, la) = metrics_listen();
    let (mb, lb) = metrics_listen();
    let a = Feedd::start(&db, &[la.as_str()]);
    let on_node1 = format!("mysql.port = {}", cluster.port(1));
    let b = Feedd::start(&db, &[lb.as_str(), on_node1.as_str()]);
    let data = bodies(1, 3_000, 10);
    let ca = Resender::spawn(a.endpoint(), &data, Duration::from_secs(10));
    let cb = Resender::spawn(b.endpoint(), &data, Duration::from_secs(10));
    let (ra, rb) = (ca.join().unwrap(), cb.join().unwrap());
    for r in [&ra, &rb] {
        assert!(r.falses.is_empty(), "FALSE: {:?}", &r.falses[..1]);
        assert_eq!(r.acked.len(), data.len(), "every message TRUE");
    }
    // Then the same message to both at the same instant, round after round: both INSERTs
    // run before either writeset arrives, so the later COMMIT fails certification. Messages
    // over one statement (1,000 rows) commit in an explicit transaction: the server's own
    // retry of a conflicting autocommit statement (wsrep_retry_autocommit) would hide it.
    let rounds: Vec<String> = bodies(100_001, 20, 1_500);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let lockstep = |endpoint: String| {
        let (rounds, barrier) = (rounds.clone(), barrier.clone());
        std::thread::spawn(move || {
            let req = Req::connect(&endpoint);
            rounds
                .iter()
                .map(|body| {
                    barrier.wait();
                    req.ask(body)
                })
                .collect::<Vec<String>>()
        })
    };
    let (la, lb) = (lockstep(a.endpoint()), lockstep(b.endpoint()));
    for answers in [la.join().unwrap(), lb.join().unwrap()] {
        assert!(answers.iter().all(|t| t == "TRUE"), "{answers:?}");
    }
    let errors = scrape(&ma, "feedd_db_errors_total") + scrape(&mb, "feedd_db_errors_total");
    eprintln!("failed attempts retried (certification conflicts): {errors}");
    assert!(errors > 0.0, "the two writers conflicted at least once");
    assert!(
        format!("{}{}", a.stderr_log(), b.stderr_log()).contains("1213"),
        "a certification failure (1213) was logged"
    );
    let all: Vec<String> = data.iter().chain(&rounds).cloned().collect();
    let every: std::collections::HashSet<u64> = (0..all.len() as u64).collect();
    for node in 0..cluster::NODES {
        let rows = cluster.rows(node, &db.name);
        assert_acked_present(&all, &every, &rows);
        assert_eq!(rows.len(), 60_000, "node {node}: one row per ticket");
    }
}

/// SPEC §9 failover: host list node0, node1, node2; node 0 is killed mid-load. feedd moves to
/// node 1 within seconds without a FALSE; nothing acknowledged is missing; node 0 rejoins
/// with every row.
#[test]
fn galera_host_list_first_node_killed_mid_load() {
    let _one = one_cluster_at_a_time();
    let mut cluster = GaleraCluster::start();
    let db = Db::create_on("gal_kill", cluster.port(0));
    let (m, l) = metrics_listen();
    let list = format!("mysql.host = {}", cluster.host_list());
    let f = Feedd::start(&db, &[l.as_str(), list.as_str()]);
    let ports: Vec<u16> = (0..3).map(|i| cluster.port(i)).collect();
    let node = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let active = |i: usize| scrape(&m, &format!("feedd_db_host_active{{host=\"{}\"}}", node(i)));
    assert_eq!((active(0), active(1), active(2)), (1.0, 0.0, 0.0));
    let data = bodies(1, 20_000, 5);
    let client = Resender::spawn(f.endpoint(), &data, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &m,
        "feedd_records_committed_total"
    ) > 20_000.0));
    let killed = Instant::now();
    cluster.kill9(0);
    assert!(wait_until(Duration::from_secs(20), || scrape(
        &m,
        "feedd_db_failovers_total"
    ) >= 1.0));
    let move_took = killed.elapsed();
    let moved = scrape(&m, "feedd_records_committed_total");
    assert!(wait_until(Duration::from_secs(20), || scrape(
        &m,
        "feedd_records_committed_total"
    ) > moved));
    let took = killed.elapsed();
    // The rest is the cluster's own: node 1 commits once the group has evicted node 0
    // (evs.suspect_timeout, 5 s by default).
    eprintln!(
        "failover: kill -9 of node 0 → feedd on node 1 in {} ms → first commit there at {} ms",
        move_took.as_millis(),
        took.as_millis()
    );
    assert!(
        took < Duration::from_secs(10),
        "moved within seconds: {took:?}"
    );
    let r = client.join().unwrap();
    assert!(
        r.falses.is_empty(),
        "FALSE for a failover: {:?}",
        &r.falses[..1]
    );
    assert_eq!(r.acked.len(), data.len());
    assert_eq!((active(0), active(1), active(2)), (0.0, 1.0, 0.0));
    assert_eq!(scrape(&m, "feedd_db_failovers_total"), 1.0, "no flapping");
    let log = f.stderr_log();
    for l in log
        .lines()
        .filter(|l| l.contains("db host ") || l.contains("retrying"))
    {
        eprintln!("{l}");
    }
    let line = format!("db host {} → {}: unreachable", node(0), node(1));
    assert!(log.contains(&line), "{line} in\n{log}");
    assert_eq!(log.matches("db host ").count(), 1, "logged once:\n{log}");
    cluster.restart(0);
    assert_on_every_node(&cluster, &db, &data, &r, 100_000);
    // Node 0 is back, but feedd stays on node 1 while it works.
    assert_eq!(Req::connect(&f.endpoint()).ask("999999,1,1.5"), "TRUE");
    assert_eq!((active(0), active(1)), (0.0, 1.0));
}

/// SPEC §9: a node cut off from the primary component answers 1047; feedd moves on, never
/// FALSE, and the node has every row once it is back.
#[test]
fn galera_node_out_of_the_primary_component_is_left() {
    let _one = one_cluster_at_a_time();
    let cluster = GaleraCluster::start();
    let db = Db::create_on("gal_isolate", cluster.port(0));
    let (m, l) = metrics_listen();
    let list = format!("mysql.host = {}", cluster.host_list());
    let f = Feedd::start(&db, &[l.as_str(), list.as_str()]);
    let data = bodies(1, 10_000, 5);
    let client = Resender::spawn(f.endpoint(), &data, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &m,
        "feedd_records_committed_total"
    ) > 10_000.0));
    cluster
        .conn(0)
        .query_drop("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'")
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &m,
        "feedd_db_failovers_total"
    ) >= 1.0));
    let r = client.join().unwrap();
    assert!(
        r.falses.is_empty(),
        "FALSE for a non-primary node: {:?}",
        &r.falses[..1]
    );
    assert_eq!(r.acked.len(), data.len());
    let log = f.stderr_log();
    assert!(log.contains("not primary (error 1047)"), "{log}");
    cluster
        .conn(0)
        .query_drop("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'")
        .unwrap();
    cluster.wait_all_synced();
    assert_on_every_node(&cluster, &db, &data, &r, 50_000);
}

/// SPEC §9 on plain servers: `SET GLOBAL read_only = 1` on the current primary makes feedd's
/// account get 1290; feedd moves to the next host of its list. Each record is on exactly one
/// of the two servers.
#[test]
fn read_only_primary_moves_to_the_next_host() {
    let a = PrivateMariadb::start_with(&[]);
    let b = PrivateMariadb::start_with(&[]);
    let db_a = Db::create_on("read_only", a.port);
    let db_b = Db::create_on("read_only", b.port);
    for server in [&a, &b] {
        let mut c = server.conn();
        // An account without SUPER/READ_ONLY ADMIN, which read_only binds.
        c.query_drop("CREATE USER feed@'127.0.0.1' IDENTIFIED BY 'pw'")
            .unwrap();
        c.query_drop(format!(
            "GRANT ALL ON `{}`.* TO feed@'127.0.0.1'",
            db_a.name
        ))
        .unwrap();
    }
    let (m, l) = metrics_listen();
    let list = format!("mysql.host = 127.0.0.1:{}, 127.0.0.1:{}", a.port, b.port);
    let f = Feedd::start(
        &db_a,
        &[
            l.as_str(),
            list.as_str(),
            "mysql.user = feed",
            "mysql.password = pw",
        ],
    );
    let data = bodies(1, 10_000, 5);
    let client = Resender::spawn(f.endpoint(), &data, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(30), || scrape(
        &m,
        "feedd_records_committed_total"
    ) > 10_000.0));
    a.conn().query_drop("SET GLOBAL read_only = 1").unwrap();
    let r = client.join().unwrap();
    assert!(
        r.falses.is_empty(),
        "FALSE for read-only: {:?}",
        &r.falses[..1]
    );
    assert_eq!(r.acked.len(), data.len());
    let log = f.stderr_log();
    let line = format!(
        "db host 127.0.0.1:{} → 127.0.0.1:{}: read-only (error 1290)",
        a.port, b.port
    );
    assert!(log.contains(&line), "{line} in\n{log}");
    assert_eq!(scrape(&m, "feedd_db_failovers_total"), 1.0);
    let mut rows = db_a.rows();
    let on_b = db_b.rows();
    assert!(!on_b.is_empty(), "writes went on on the second host");
    let overlap = on_b.keys().filter(|t| rows.contains_key(t)).count();
    assert_eq!(overlap, 0, "no record on both");
    rows.extend(on_b);
    assert_acked_present(&data, &r.acked, &rows);
    assert_eq!(rows.len(), 50_000);
}

/// SPEC §9 "several feedd on one table": a DEALER connected to two feedd on one database;
/// one of them is killed mid-load and the client resends what went unanswered, which the
/// other one commits. Every record ends up exactly once.
#[test]
fn two_feedd_one_table_one_killed_mid_load() {
    let db = Db::create("two_feedd");
    let (metrics_a, listen_a) = metrics_listen();
    let a = Feedd::start(&db, &[listen_a.as_str()]);
    let mut b = Feedd::start(&db, &[]);
    let data = bodies(1, 3_000, 10);
    let endpoints = vec![a.endpoint(), b.endpoint()];
    let dealer = Dealer::connect_all(&endpoints);
    let load = {
        let data = data.clone();
        std::thread::spawn(move || {
            Resender::run_on(
                dealer,
                &data,
                64,
                Duration::from_secs(2),
                Duration::from_secs(120),
            )
        })
    };
    // Mid-load: both have committed some.
    assert!(wait_until(Duration::from_secs(30), || {
        metric(
            &http_get(&metrics_a, "/metrics"),
            "feedd_records_committed_total",
        ) > 2_000.0
            && db.count() > 6_000
    }));
    if let Some(child) = b.child.as_mut() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    b.child = None;
    let r = load.join().unwrap();
    assert!(r.falses.is_empty(), "FALSE: {:?}", &r.falses[..1]);
    assert_eq!(
        r.acked.len(),
        data.len(),
        "every message answered in the end"
    );
    assert!(r.resent > 0, "the killed one left messages unanswered");
    assert_acked_present(&data, &r.acked, &db.rows());
    assert_eq!(db.count(), 30_000, "every record exactly once");
}
