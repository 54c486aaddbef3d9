//! What feedd asks of the database per batch: a fast-path batch is one statement and nothing
//! else (no BEGIN, no COMMIT, no PING), read from the server's own status counters on a private
//! mariadbd that nothing else talks to; prepared chunks and text remainders; a connection killed
//! while idle is weeded out on checkout; sessions that start without autocommit still commit.

use std::collections::HashMap;
use std::time::Duration;

use crate::harness::database::PrivateMariadb;
use crate::harness::*;
use mysql::prelude::Queryable;

/// The counters we compare, from `SHOW GLOBAL STATUS`.
fn status(admin: &mut mysql::Conn) -> HashMap<String, u64> {
    let rows: Vec<(String, String)> = admin
        .query(
            "SHOW GLOBAL STATUS WHERE Variable_name IN \
             ('Questions', 'Com_begin', 'Com_commit', 'Com_admin_commands', 'Com_insert', \
              'Com_stmt_execute', 'Com_stmt_prepare', 'Com_rollback')",
        )
        .unwrap();
    rows.into_iter()
        .map(|(k, v)| (k, v.parse().unwrap_or(0)))
        .collect()
}

#[test]
fn a_fast_path_batch_is_one_statement() {
    let server = PrivateMariadb::start();
    let db = Db::create_on("roundtrips", server.port);
    let f = Feedd::start(&db, &["pipeline.workers = 1"]);
    let req = Req::connect(&f.endpoint());
    // Warm-up: the pool's connection and its session setup happen here, not in the count.
    assert_eq!(req.ask("1,1,1"), "TRUE");
    let mut admin = server.conn();
    const N: u64 = 40;
    let before = status(&mut admin);
    // One message at a time, each answered before the next: every message is its own batch.
    // Sizes 1, 10 and 100 records: small batches go as text, and each is one statement.
    let mut ticket = 2;
    for i in 0..N {
        let per = [1, 10, 100][i as usize % 3];
        let body = bodies(ticket, 1, per).remove(0);
        ticket += per;
        assert_eq!(req.ask(&body), "TRUE");
    }
    let after = status(&mut admin);
    let delta = |k: &str| after[k] - before[k];
    // The second SHOW STATUS is itself one question.
    assert_eq!(
        delta("Questions"),
        N + 1,
        "statements per batch: {before:?} → {after:?}"
    );
    assert_eq!(delta("Com_insert") + delta("Com_stmt_execute"), N);
    for k in [
        "Com_begin",
        "Com_commit",
        "Com_rollback",
        "Com_admin_commands",
        "Com_stmt_prepare",
    ] {
        assert_eq!(delta(k), 0, "{k}: {before:?} → {after:?}");
    }
    assert_eq!(db.count(), ticket - 1);
}

#[test]
fn a_connection_killed_while_idle_is_replaced_on_checkout() {
    let server = PrivateMariadb::start();
    let db = Db::create_on("idle_kill", server.port);
    let f = Feedd::start(&db, &["pipeline.workers = 1", "mysql.pool_size = 1"]);
    let req = Req::connect(&f.endpoint());
    assert_eq!(req.ask("1,1,1"), "TRUE");
    let mut admin = server.conn();
    let ids: Vec<u64> = admin
        .query(format!(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = '{}' AND ID <> CONNECTION_ID()",
            db.name
        ))
        .unwrap();
    assert!(!ids.is_empty(), "feedd's connection is open");
    for id in ids {
        admin.query_drop(format!("KILL {id}")).unwrap();
    }
    // The scenario is an idle connection: stay quiet past the manager's idle-ping threshold.
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(req.ask("2,1,1"), "TRUE");
    assert_eq!(db.count(), 2);
    let log = f.stderr_log();
    assert!(
        !log.contains("retrying with backoff"),
        "the dead idle connection failed a batch:\n{log}"
    );
}

#[test]
fn a_duplicate_in_the_fast_insert_leaves_nothing_of_it_behind() {
    let db = Db::create("fast_atomic");
    let f = Feedd::start(&db, &["pipeline.workers = 1"]);
    let req = Req::connect(&f.endpoint());
    assert_eq!(req.ask("1000000,1,1"), "TRUE");
    // Ticket 250 stored with other values: a 500-record message (one autocommit INSERT) and a
    // 1,500-record one (a transaction of two) both hit it midway and must be refused whole.
    db.conn()
        .query_drop("INSERT INTO fee (ticket, login, volume, status) VALUES (250, 9, 9, 'Y')")
        .unwrap();
    for n in [500, 1500] {
        let reply = req.ask(&bodies(1, 1, n).remove(0));
        assert!(reply.starts_with("FALSE conflict"), "{n}: {reply}");
        assert_eq!(
            db.count(),
            2,
            "{n} records: nothing of the failed INSERT stayed"
        );
    }
    // Same values as stored: the careful path accepts and inserts the rest.
    let body = bodies(1, 1, 500)
        .remove(0)
        .replace("250,250,19.5", "250,9,9");
    assert_eq!(req.ask(&body), "TRUE");
    assert_eq!(db.count(), 501);
}

#[test]
fn sessions_that_start_without_autocommit_still_commit() {
    let server = PrivateMariadb::start();
    // A server configured so that new sessions start with autocommit off.
    server
        .conn()
        .query_drop("SET GLOBAL autocommit = 0")
        .unwrap();
    let db = Db::create_on("no_autocommit", server.port);
    let f = Feedd::start(&db, &["pipeline.workers = 1"]);
    let req = Req::connect(&f.endpoint());
    assert_eq!(req.ask("1,1,1"), "TRUE");
    assert_eq!(req.ask(&bodies(2, 1, 50).remove(0)), "TRUE");
    // Another session sees only committed rows (and its own autocommit is off too).
    let mut other = server.create_db(&db.name);
    let n: Option<u64> = other.query_first("SELECT COUNT(*) FROM fee").unwrap();
    assert_eq!(n, Some(51), "acknowledged rows are committed");
}

#[test]
fn large_messages_use_full_prepared_chunks_and_text_remainders() {
    let db = Db::create("chunks");
    let feedd = Feedd::start(&db, &[]);
    let req = Req::connect(&feedd.endpoint());
    // 2,500 records: two full 1,000-row prepared INSERTs and a 500-row text one.
    let body: Vec<String> = (1..=2500)
        .map(|t| format!("{t},{},{}.0001", t * 3, t % 10))
        .collect();
    assert_eq!(req.ask(&body.join("\n")), "TRUE");
    let rows = db.rows();
    assert_eq!(rows.len(), 2500);
    assert_eq!(rows[&1000], (3000, "0.0001".to_string(), "Y".to_string()));
    assert_eq!(rows[&2500], (7500, "0.0001".to_string(), "Y".to_string()));
    // The same again: the prepared INSERT hits duplicates, the careful path answers TRUE.
    assert_eq!(req.ask(&body.join("\n")), "TRUE");
    assert_eq!(db.count(), 2500);
}
