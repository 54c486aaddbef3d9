//! Nothing acknowledged is ever lost: database crashes, outages, lock waits, deadlocks, killed
//! connections, a dropped table, an exhausted server, and daemon crashes — each under a
//! streaming client that resends what was not answered. The database here is a private
//! mariadbd (harness/database.rs), never the shared one.

use std::time::{Duration, Instant};

use crate::harness::database::PrivateMariadb;
use crate::harness::*;
use mysql::prelude::Queryable;

fn private_feedd(server: &PrivateMariadb, test: &str, overrides: &[&str]) -> (Db, Feedd, String) {
    let db = Db::create_on(test, server.port);
    let (metrics_addr, listen) = metrics_listen();
    let mut all = vec![listen.as_str()];
    all.extend_from_slice(overrides);
    let f = Feedd::start(&db, &all);
    (db, f, metrics_addr)
}

#[test]
fn database_killed_mid_load_and_restarted() {
    let mut server = PrivateMariadb::start();
    let (db, f, metrics) = private_feedd(&server, "kill_db", &[]);
    let data = bodies(1, 20_000, 5);
    let client = Resender::spawn(f.endpoint(), &data, Duration::from_secs(8));
    assert!(
        wait_until(Duration::from_secs(20), || db.count() > 0),
        "mid-load"
    );
    server.kill9();
    // The outage itself: the scenario is a restart 3 s later.
    std::thread::sleep(Duration::from_secs(3));
    server.restart();
    let r = client.join().unwrap();
    assert!(
        r.falses.is_empty(),
        "a fault caused FALSE: {:?}",
        &r.falses[..1]
    );
    assert_eq!(
        r.acked.len(),
        data.len(),
        "every message answered in the end"
    );
    assert_acked_present(&data, &r.acked, &db.rows());
    assert_eq!(db.count(), 100_000, "each ticket exactly once");
    assert!(metric(&http_get(&metrics, "/metrics"), "feedd_db_errors_total") > 0.0);
    let log = f.stderr_log();
    assert!(log.contains("retrying with backoff"), "{log}");
    assert!(log.contains("database is back"), "{log}");
}

#[test]
fn sigterm_during_a_long_outage_exits_in_time_without_false_acks() {
    let mut server = PrivateMariadb::start();
    let (db, mut f, _) = private_feedd(
        &server,
        "outage_term",
        &["daemon.shutdown_timeout_ms = 1500"],
    );
    let dealer = Dealer::connect(&f.endpoint());
    let data = bodies(1, 200, 1);
    assert_eq!(Req::connect(&f.endpoint()).ask(&data[0]), "TRUE");
    server.stop();
    for (i, b) in data.iter().enumerate().skip(1) {
        dealer.send(i as u64, b);
    }
    // The outage has reached feedd: its batch is failing and being retried.
    f.wait_for_log("retrying with backoff", Duration::from_secs(10));
    let asked = Instant::now();
    f.signal(Signal::SIGTERM);
    let status = f.wait(Duration::from_secs(10));
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(3000),
        "exit took {took:?} with a 1.5 s timeout"
    );
    assert_eq!(status.code(), Some(0));
    dealer.0.set_rcvtimeo(300).unwrap();
    assert!(dealer.recv().is_none(), "nothing uncommitted was answered");
    server.restart();
    assert_eq!(db.count(), 1);
    assert!(f.stderr_log().contains("not answered"));
}

#[test]
fn row_lock_wait_is_retried_until_true() {
    let db = Db::create("locks");
    let (metrics, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen, "pipeline.workers = 1"]);
    // Another session holds ticket 1 in an open transaction: feedd's INSERT waits on it until
    // its session's innodb_lock_wait_timeout (10 s) ends the wait with 1205.
    let mut other = db.conn();
    other.query_drop("BEGIN").unwrap();
    other
        .query_drop("INSERT INTO fee (ticket, login, volume, status) VALUES (1, 1, 1, 'Y')")
        .unwrap();
    let endpoint = f.endpoint();
    let client = std::thread::spawn(move || {
        let req = Req::connect(&endpoint);
        req.0.set_rcvtimeo(60_000).unwrap();
        req.ask("2,1,1\n1,1,1")
    });
    let errors = || metric(&http_get(&metrics, "/metrics"), "feedd_db_errors_total");
    assert!(
        wait_until(Duration::from_secs(30), || errors() >= 1.0),
        "feedd's batch never failed on the lock:\n{}",
        f.stderr_log()
    );
    assert!(f.stderr_log().contains("1205"), "{}", f.stderr_log());
    assert!(!client.is_finished(), "no reply while the lock is held");
    other.query_drop("ROLLBACK").unwrap();
    assert_eq!(client.join().unwrap(), "TRUE");
    let rows = db.rows();
    assert_eq!(rows.len(), 2);
    assert!(rows.contains_key(&1) && rows.contains_key(&2));
    let text = http_get(&metrics, "/metrics");
    assert!(metric(&text, "feedd_batch_retries_total") >= 1.0);
}

#[test]
fn connections_killed_from_the_server_side() {
    let server = PrivateMariadb::start();
    let (db, f, _) = private_feedd(&server, "kill_conn", &[]);
    let data = bodies(1, 40_000, 3);
    let client = Resender::spawn(f.endpoint(), &data, Duration::from_secs(8));
    let mut admin = server.conn();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(60));
        let ids: Vec<u64> = admin
            .query(format!(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = '{}' AND ID <> CONNECTION_ID()",
                db.name
            ))
            .unwrap();
        for id in ids {
            let _ = admin.query_drop(format!("KILL {id}"));
        }
    }
    let r = client.join().unwrap();
    assert!(r.falses.is_empty(), "{:?}", r.falses.first());
    assert_eq!(r.acked.len(), data.len());
    assert_acked_present(&data, &r.acked, &db.rows());
    assert_eq!(db.count(), 120_000);
    assert!(
        f.stderr_log().contains("retrying with backoff"),
        "the kills hit feedd's connections"
    );
}

#[test]
fn dropped_table_is_recreated_and_nothing_is_acked_without_a_row() {
    let server = PrivateMariadb::start();
    let (db, f, metrics) = private_feedd(&server, "drop_table", &[]);
    let req = Req::connect(&f.endpoint());
    assert_eq!(req.ask("1,1,1"), "TRUE");
    server
        .create_db(&db.name)
        .query_drop("DROP TABLE fee")
        .unwrap();
    assert_eq!(req.ask("2,1,1"), "TRUE");
    assert_eq!(
        db.rows().keys().copied().collect::<Vec<_>>(),
        vec![2],
        "recreated, new row present"
    );
    // A table altered into uselessness: feedd holds the message and retries; fixed, it lands.
    server
        .create_db(&db.name)
        .query_drop("ALTER TABLE fee DROP COLUMN status")
        .unwrap();
    let endpoint = f.endpoint();
    let errors_before = metric(&http_get(&metrics, "/metrics"), "feedd_db_errors_total");
    let held = std::thread::spawn(move || Req::connect(&endpoint).ask("3,1,1"));
    // Wait until the batch has failed (at least twice) against the broken table.
    assert!(wait_until(Duration::from_secs(20), || {
        metric(&http_get(&metrics, "/metrics"), "feedd_db_errors_total") >= errors_before + 2.0
    }));
    assert!(!held.is_finished(), "no reply while the table is broken");
    server
        .create_db(&db.name)
        .query_drop("ALTER TABLE fee ADD COLUMN status CHAR(1) NOT NULL DEFAULT 'N'")
        .unwrap();
    assert_eq!(held.join().unwrap(), "TRUE");
    assert_eq!(db.rows()[&3].2, "Y");
    assert!(
        f.stderr_log().contains("database error 1054"),
        "{}",
        f.stderr_log()
    );
}

#[test]
fn server_connection_limit_below_pool_size() {
    let server = PrivateMariadb::start();
    let (db, f, _) = private_feedd(
        &server,
        "max_conn",
        &["pipeline.workers = 4", "mysql.pool_size = 6"],
    );
    // feedd holds at most what it has; new connections are refused with 1040.
    server
        .conn()
        .query_drop("SET GLOBAL max_connections = 2")
        .unwrap();
    let data = bodies(1, 2000, 2);
    let r = Resender::run(
        &f.endpoint(),
        &data,
        64,
        Duration::from_secs(8),
        Duration::from_secs(60),
    );
    assert!(r.falses.is_empty());
    assert_eq!(r.acked.len(), data.len());
    assert_eq!(db.count(), 4000);
}

#[test]
fn whole_daemon_killed_mid_load_then_started_again() {
    let db = Db::create("kill_daemon");
    let f = Feedd::prepare(&db, &[]);
    f.start_daemon();
    let data = bodies(1, 3000, 2);
    let client = Resender::spawn(f.endpoint(), &data, Duration::from_secs(2));
    assert!(
        wait_until(Duration::from_secs(20), || db.count() > 0),
        "mid-load"
    );
    let pid = f.daemon_pid();
    let child = f.serving_pid();
    kill(pid, Signal::SIGKILL);
    if let Some(c) = child {
        kill(c, Signal::SIGKILL);
    }
    assert!(wait_until(Duration::from_secs(5), || f
        .processes()
        .is_empty()));
    f.start_daemon();
    let r = client.join().unwrap();
    assert!(r.falses.is_empty());
    assert_eq!(r.acked.len(), data.len());
    assert_acked_present(&data, &r.acked, &db.rows());
    assert_eq!(db.count(), 6000);
    f.stop_daemon();
}
