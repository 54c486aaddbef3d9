//! Past one machine (SPEC §9): a 3-node Galera cluster, the ordered failover host list, and
//! several feedd on one table. Galera tests run one at a time (a cluster is 3 mariadbd on 2
//! cores).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::galera::GaleraCluster;
use common::*;

/// One cluster at a time in this test binary.
static CLUSTER: Mutex<()> = Mutex::new(());

#[test]
fn galera_cluster_forms_and_a_killed_node_rejoins() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let t = std::time::Instant::now();
    let mut cluster = GaleraCluster::start();
    eprintln!("formed in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    cluster.kill9(0);
    cluster.wait_synced(1, 2);
    cluster.restart(0);
    eprintln!("rejoined in {:?}", t.elapsed());
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
