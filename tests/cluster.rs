//! Past one machine (SPEC §9): a 3-node Galera cluster, the ordered failover host list, and
//! several feedd on one table. Galera tests run one at a time (a cluster is 3 mariadbd on 2
//! cores).

mod common;

use std::sync::Mutex;

use common::galera::GaleraCluster;

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
