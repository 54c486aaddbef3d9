//! The table feedd writes (SPEC §5): which existing tables are used, which refuse start-up with
//! the reason, and what happens when a table is altered under a running feedd.

use std::time::Duration;

use crate::harness::database::PrivateMariadb;
use crate::harness::*;
use mysql::prelude::Queryable;

const FEE: &str = "ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY, login BIGINT UNSIGNED NOT NULL,
                   volume DECIMAL(20,4) NOT NULL, status CHAR(1) NOT NULL DEFAULT 'N'";

#[test]
fn a_table_that_does_not_fit_refuses_start() {
    let db = Db::create("hostile_schema");
    let f = Feedd::prepare(&db, &[]);
    let cases = [
        (
            FEE.replace("DECIMAL(20,4)", "DECIMAL(20,2)"),
            "`volume` is decimal(20,2), needs an exact DECIMAL",
        ),
        (
            FEE.replace("DECIMAL(20,4)", "DOUBLE"),
            "`volume` is double, needs an exact DECIMAL",
        ),
        (
            FEE.replace("login BIGINT UNSIGNED", "login INT UNSIGNED"),
            "`login` is int(10) unsigned, needs BIGINT UNSIGNED",
        ),
        (
            FEE.replace("ticket BIGINT UNSIGNED", "ticket VARCHAR(5)"),
            "`ticket` is varchar(5), needs BIGINT UNSIGNED",
        ),
        (
            format!("{FEE}, note INT NOT NULL"),
            "`note` is int(11) NOT NULL without a default",
        ),
        (
            FEE.replace("PRIMARY KEY", ""),
            "`ticket` is neither the PRIMARY KEY nor a single-column UNIQUE key",
        ),
    ];
    for (columns, expected) in cases {
        let mut c = db.conn();
        c.query_drop("DROP TABLE IF EXISTS fee").unwrap();
        c.query_drop(format!("CREATE TABLE fee ({columns}) ENGINE=InnoDB"))
            .unwrap();
        let err = f.start_must_fail();
        assert!(err.contains(expected), "{expected}\n{err}");
        assert!(err.contains("does not fit what feedd writes"), "{err}");
    }
    let mut c = db.conn();
    c.query_drop("DROP TABLE fee").unwrap();
    c.query_drop(format!("CREATE TABLE fee ({FEE}) ENGINE=MyISAM"))
        .unwrap();
    let err = f.start_must_fail();
    assert!(err.contains("the engine is MyISAM, needs InnoDB"), "{err}");
}

/// A server whose global sql_mode is empty (as some installs have it) and a table narrowed
/// under a running feedd: the session's strict mode makes the INSERT fail instead of storing
/// 4294967295, the message is held with a log line saying an operator must act, and it is
/// answered TRUE, stored exactly, once the column is widened again.
#[test]
fn strict_sessions_hold_what_an_altered_table_cannot_take() {
    let server = PrivateMariadb::start();
    server
        .conn()
        .query_drop("SET GLOBAL sql_mode = ''")
        .unwrap();
    let db = Db::create_on("hostile_strict", server.port);
    let f = Feedd::start(&db, &["pipeline.workers = 1"]);
    db.conn()
        .query_drop("ALTER TABLE fee MODIFY login INT UNSIGNED NOT NULL")
        .unwrap();
    let dealer = Dealer::connect(&f.endpoint());
    dealer.send(1, "1,4294967296,1");
    f.wait_for_log("an operator must act", Duration::from_secs(20));
    let log = f.stderr_log();
    assert!(log.contains("`login` is int(10) unsigned"), "{log}");
    assert!(
        dealer.0.recv_multipart(zmq::DONTWAIT).is_err(),
        "nothing answered while the table cannot take it"
    );
    assert_eq!(db.count(), 0);
    db.conn()
        .query_drop("ALTER TABLE fee MODIFY login BIGINT UNSIGNED NOT NULL")
        .unwrap();
    assert_eq!(dealer.recv(), Some((1, "TRUE".to_string())));
    assert_eq!(db.rows()[&1].0, 4_294_967_296);
}

#[test]
fn existing_table_with_extra_columns_is_used() {
    let db = Db::create("extra_columns");
    db.conn()
        .query_drop(
            "CREATE TABLE fee (ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY, login BIGINT UNSIGNED NOT NULL,
             volume DECIMAL(20,4) NOT NULL, status CHAR(1) NOT NULL DEFAULT 'N',
             created TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, note VARCHAR(10) DEFAULT 'x') ENGINE=InnoDB",
        )
        .unwrap();
    let feedd = Feedd::start(&db, &[]);
    assert_eq!(Req::connect(&feedd.endpoint()).ask("1,1,1"), "TRUE");
    assert_eq!(db.count(), 1);
}

#[test]
fn table_missing_a_column_is_a_startup_error() {
    let db = Db::create("missing_column");
    db.conn()
        .query_drop("CREATE TABLE fee (ticket BIGINT UNSIGNED PRIMARY KEY, login BIGINT UNSIGNED, volume DECIMAL(20,4))")
        .unwrap();
    let feedd = Feedd::prepare(&db, &[]);
    let (status, _, stderr) = feedd.command(&["--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("no column `status`"), "{stderr}");
}

/// A unique key without `ticket`, or a CHECK constraint on a column feedd fills from records,
/// would hold valid records forever: refused at start, naming it. A unique AUTO_INCREMENT id
/// and a CHECK on another column (MariaDB's JSON) are fine.
#[test]
fn a_second_unique_key_or_a_check_on_record_columns_refuses_start() {
    let db = Db::create("unique_check");
    let f = Feedd::prepare(&db, &[]);
    let cases = [
        (
            format!("{FEE}, UNIQUE KEY by_login (login)"),
            "unique key `by_login` on (`login`) does not hold `ticket`",
        ),
        (
            format!("{FEE}, CONSTRAINT small CHECK (volume < 1000)"),
            "CHECK constraint `small` (`volume` < 1000) reads `volume`",
        ),
    ];
    let mut c = db.conn();
    for (columns, expected) in cases {
        c.query_drop("DROP TABLE IF EXISTS fee").unwrap();
        c.query_drop(format!("CREATE TABLE fee ({columns}) ENGINE=InnoDB"))
            .unwrap();
        let err = f.start_must_fail();
        println!("{err}");
        assert!(err.contains(expected), "{expected}\n{err}");
    }
    c.query_drop("DROP TABLE fee").unwrap();
    c.query_drop(format!(
        "CREATE TABLE fee ({}, id BIGINT NOT NULL AUTO_INCREMENT UNIQUE, doc JSON) ENGINE=InnoDB",
        FEE
    ))
    .unwrap();
    let feedd = Feedd::start(&db, &[]);
    assert_eq!(Req::connect(&feedd.endpoint()).ask("1,1,1"), "TRUE");
}

/// A unique key added under a running feedd: the insert's duplicate key on it is no resend
/// (the rows are read by ticket and none is there) but a table an operator must fix: logged
/// once as such, naming the key, never the "another writer" race loop; answered once fixed.
#[test]
fn a_unique_key_added_under_load_is_an_operator_fault() {
    let db = Db::create("unique_added");
    let f = Feedd::start(&db, &["pipeline.workers = 1"]);
    db.conn()
        .query_drop("ALTER TABLE fee ADD UNIQUE KEY by_login (login)")
        .unwrap();
    let dealer = Dealer::connect(&f.endpoint());
    dealer.send(1, "1,5,1\n2,5,2");
    f.wait_for_log("an operator must act", Duration::from_secs(20));
    // Long enough for the race loop (8 careful passes, then backoff) to show.
    assert!(
        !wait_until(Duration::from_secs(3), || f
            .stderr_log()
            .contains("another writer")),
        "{}",
        f.stderr_log()
    );
    let log = f.stderr_log();
    println!("{log}");
    assert!(log.contains("unique key `by_login`"), "{log}");
    assert_eq!(log.matches("an operator must act").count(), 1, "{log}");
    db.conn()
        .query_drop("ALTER TABLE fee DROP KEY by_login")
        .unwrap();
    assert_eq!(dealer.recv(), Some((1, "TRUE".to_string())));
    assert_eq!(db.count(), 2);
}
