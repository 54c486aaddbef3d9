//! MySQL/MariaDB: the connection pool, the table check, and one batch committed as one
//! transaction.
//!
//! Fast path: the plan with no stored rows, one multi-row INSERT, COMMIT. Only when that INSERT
//! hits a duplicate key does it roll back and take the careful path: read the batch's stored
//! tickets, classify (`classify::plan`), insert the new rows, COMMIT. Sessions run READ
//! COMMITTED, so two workers racing on one ticket end in 1062 for one of them, which redoes
//! the careful path and then sees the other's row. Used from worker threads; no threads of
//! its own besides r2d2's.
//!
//! The table is judged (`schema::judge`) whenever a store is built and whenever it is
//! (re)created, and sessions run a strict `sql_mode`, so a value that does not fit is an
//! error, never a silent truncation. `StoreError::is_transient` tells faults that heal by
//! themselves (connections, deadlocks) from those an operator must fix (table, grants, disk).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{OptsBuilder, TxOpts};
use r2d2_mysql::MySqlConnectionManager;

use crate::config::MysqlConfig;
use crate::input::record::{Record, Volume};
use crate::pipeline::classify::{self, StoredRow, Verdict};
use crate::pipeline::schema::{self, Column};

const ER_DUP_ENTRY: u16 = 1062;
const ER_NO_SUCH_TABLE: u16 = 1146;
/// Most rows in one INSERT statement, so a huge message stays far below max_allowed_packet.
const ROWS_PER_STATEMENT: usize = 1000;
/// Careful-path redos after a duplicate-key race before it counts as a fault to back off from.
const RACE_REDOS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {host}:{port}: {error}")]
    Connect {
        host: String,
        port: u16,
        error: r2d2::Error,
    },
    #[error(transparent)]
    Pool(#[from] r2d2::Error),
    #[error(transparent)]
    Mysql(#[from] mysql::Error),
    #[error("table `{table}` does not fit what feedd writes: {}", problems.join("; "))]
    Schema {
        table: String,
        problems: Vec<String>,
    },
    #[error("table `{table}`: stored volume `{value}` of ticket {ticket} is not DECIMAL(20,4)")]
    BadStoredVolume {
        table: String,
        ticket: u64,
        value: String,
    },
    #[error("another writer kept inserting the same tickets; giving up this attempt")]
    Race,
}

impl StoreError {
    /// The MySQL server error code, if this is one.
    pub fn code(&self) -> Option<u16> {
        match self {
            StoreError::Mysql(mysql::Error::MySqlError(e)) => Some(e.code),
            _ => None,
        }
    }

    /// A fault that heals by itself (connection, server restart, lock conflict, failover):
    /// retried quietly. Anything else is about the table, the data or the grants (1054 unknown
    /// column, 1264 out of range, 1406 too long, 1364 no default, 1142 denied, 1114 table full,
    /// …): retried too, since nothing accepted may be dropped, but an operator must act.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { .. } | StoreError::Pool(_) | StoreError::Race => true,
            StoreError::Schema { .. } | StoreError::BadStoredVolume { .. } => false,
            StoreError::Mysql(mysql::Error::MySqlError(e)) => TRANSIENT_CODES.contains(&e.code),
            // I/O, driver and protocol errors: the connection, not the data.
            StoreError::Mysql(_) => true,
        }
    }
}

/// Server errors that heal by themselves: too many connections (1040), WSREP not ready
/// (1047), shutdown in progress (1053), aborted or broken connections (1152–1161), lock wait
/// timeout (1205), deadlock (1213), read-only during failover (1290, 1836), query interrupted
/// or connection killed (1317, 1927), and 1146: a dropped table is recreated by the next attempt.
const TRANSIENT_CODES: &[u16] = &[
    1040, 1047, 1053, 1146, 1152, 1153, 1154, 1155, 1156, 1157, 1158, 1159, 1160, 1161, 1205, 1213,
    1290, 1317, 1836, 1927,
];

/// Every session: READ COMMITTED (see the module doc), a bounded lock wait, and a strict
/// `sql_mode` so a value that does not fit a column is an error, never a warning.
const SESSION_SETUP: [&str; 3] = [
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET SESSION innodb_lock_wait_timeout = 10",
    "SET SESSION sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'",
];

pub type Pool = r2d2::Pool<MySqlConnectionManager>;
pub type Connection = r2d2::PooledConnection<MySqlConnectionManager>;

/// One database target: a pool and the table it writes.
pub struct Store {
    pool: Pool,
    table: String,
    /// The prepared INSERT of exactly `ROWS_PER_STATEMENT` rows.
    full_chunk_sql: String,
}

/// Silences r2d2's own logging of background connection failures: the worker logs each fault
/// episode once.
#[derive(Debug)]
struct QuietErrors;

impl<E> r2d2::HandleError<E> for QuietErrors {
    fn handle_error(&self, _error: E) {}
}

impl Store {
    /// Builds the pool, proves the server answers, creates the table if missing and checks its
    /// columns. Fails fast (a few seconds) when the server is unreachable.
    pub fn connect(config: &MysqlConfig, pool_size: u32) -> Result<Store, StoreError> {
        let opts = OptsBuilder::new()
            .ip_or_hostname(Some(config.host.clone()))
            .tcp_port(config.port)
            .user(Some(config.user.clone()))
            .pass(Some(config.password.expose().to_string()))
            .db_name(Some(config.database.clone()))
            .prefer_socket(false)
            .tcp_connect_timeout(Some(Duration::from_secs(3)))
            .read_timeout(Some(Duration::from_secs(60)))
            .write_timeout(Some(Duration::from_secs(60)))
            .init(SESSION_SETUP.to_vec());
        let manager = MySqlConnectionManager::new(opts);
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(3))
            // has_broken pings every connection on return, which is enough to weed out dead ones.
            .test_on_check_out(false)
            .error_handler(Box::new(QuietErrors))
            .build_unchecked(manager);
        let store = Store {
            pool,
            table: config.table.clone(),
            full_chunk_sql: format!(
                "INSERT INTO `{}` (ticket, login, volume, status) VALUES {}",
                config.table,
                vec!["(?,?,?,'Y')"; ROWS_PER_STATEMENT].join(",")
            ),
        };
        store.pool.get().map_err(|error| StoreError::Connect {
            host: config.host.clone(),
            port: config.port,
            error,
        })?;
        store.ensure_table()?;
        Ok(store)
    }

    /// A pooled connection (waits up to the pool's connection timeout).
    pub fn checkout(&self) -> Result<Connection, StoreError> {
        Ok(self.pool.get()?)
    }

    /// `CREATE TABLE IF NOT EXISTS`, then checks the table fits what feedd writes.
    pub fn ensure_table(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.get()?;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS `{}` (
               ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY,
               login  BIGINT UNSIGNED NOT NULL,
               volume DECIMAL(20,4)   NOT NULL,
               status CHAR(1)         NOT NULL DEFAULT 'N'
             ) ENGINE=InnoDB",
            self.table
        ))?;
        self.check_table(&mut conn)
    }

    /// Reads the table's definition and judges it (`schema::judge`).
    fn check_table(&self, conn: &mut Connection) -> Result<(), StoreError> {
        type Row = (
            String,
            String,
            String,
            Option<u64>,
            Option<u64>,
            Option<u64>,
            String,
            Option<String>,
            String,
        );
        let rows: Vec<Row> = conn.exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_PRECISION, NUMERIC_SCALE,
                    CHARACTER_MAXIMUM_LENGTH, IS_NULLABLE, COLUMN_DEFAULT, EXTRA
             FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (&self.table,),
        )?;
        let columns: Vec<Column> = rows
            .into_iter()
            .map(
                |(
                    name,
                    data_type,
                    column_type,
                    precision,
                    scale,
                    char_length,
                    nullable,
                    default,
                    extra,
                )| {
                    Column {
                        name,
                        data_type: data_type.to_ascii_lowercase(),
                        column_type: column_type.to_ascii_lowercase(),
                        precision,
                        scale,
                        char_length,
                        nullable: nullable.eq_ignore_ascii_case("YES"),
                        default,
                        extra,
                    }
                },
            )
            .collect();
        let unique: Vec<String> = conn.exec(
            "SELECT MAX(COLUMN_NAME) FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND NON_UNIQUE = 0
             GROUP BY INDEX_NAME HAVING COUNT(*) = 1",
            (&self.table,),
        )?;
        let engine: Option<String> = conn.exec_first(
            "SELECT ENGINE FROM information_schema.TABLES
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (&self.table,),
        )?;
        let problems = if columns.is_empty() {
            vec!["it does not exist".to_string()]
        } else {
            let mut problems = schema::judge(&columns, &unique);
            problems.extend(engine.as_deref().and_then(schema::judge_engine));
            problems
        };
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Schema {
                table: self.table.clone(),
                problems,
            })
        }
    }

    /// For the log when an operator must act: what the table check says now.
    pub fn diagnose(&self) -> String {
        match self
            .pool
            .get()
            .map_err(StoreError::from)
            .and_then(|mut c| self.check_table(&mut c))
        {
            Ok(()) => "the table's columns fit; check grants, disk and the server log".to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// Commits one batch (one transaction) and returns a verdict per message.
    /// Any error means nothing of this attempt is committed (or, for a COMMIT whose outcome is
    /// unknown, that a redo will find the rows and accept them).
    pub fn commit_batch(
        &self,
        conn: &mut Connection,
        messages: &[&[Record]],
    ) -> Result<Vec<Verdict>, StoreError> {
        let fast = classify::plan(messages, &HashMap::new());
        {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            match self.insert(&mut tx, &fast.inserts) {
                Ok(()) => {
                    tx.commit()?;
                    return Ok(fast.verdicts);
                }
                Err(e) if code_of(&e) == Some(ER_DUP_ENTRY) => tx.rollback()?,
                Err(e) => {
                    if code_of(&e) == Some(ER_NO_SUCH_TABLE) {
                        drop(tx);
                        // The table was dropped under us: recreate it, then let the caller retry.
                        let _ = self.ensure_table();
                    }
                    return Err(e.into());
                }
            }
        }
        for _ in 0..RACE_REDOS {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let stored = self.read_stored(&mut tx, messages)?;
            let careful = classify::plan(messages, &stored);
            match self.insert(&mut tx, &careful.inserts) {
                Ok(()) => {}
                Err(e) if code_of(&e) == Some(ER_DUP_ENTRY) => {
                    tx.rollback()?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            if !careful.mark_committed.is_empty() {
                tx.query_drop(format!(
                    "UPDATE `{}` SET status = 'Y' WHERE ticket IN ({})",
                    self.table,
                    join(&careful.mark_committed)
                ))?;
            }
            tx.commit()?;
            return Ok(careful.verdicts);
        }
        Err(StoreError::Race)
    }

    /// Multi-row INSERTs of up to `ROWS_PER_STATEMENT` rows. A full chunk goes through one
    /// prepared statement (binary protocol, cached per connection by the driver), which costs
    /// the server less than parsing text; smaller chunks vary in size and go as text.
    fn insert(&self, tx: &mut mysql::Transaction<'_>, rows: &[Record]) -> Result<(), mysql::Error> {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            if chunk.len() == ROWS_PER_STATEMENT {
                let params: Vec<mysql::Value> = chunk
                    .iter()
                    .flat_map(|r| {
                        [
                            mysql::Value::UInt(r.ticket),
                            mysql::Value::UInt(r.login),
                            mysql::Value::Bytes(r.volume.to_string().into_bytes()),
                        ]
                    })
                    .collect();
                tx.exec_drop(&self.full_chunk_sql, params)?;
                continue;
            }
            let mut sql = String::with_capacity(64 + chunk.len() * 48);
            let _ = write!(
                sql,
                "INSERT INTO `{}` (ticket, login, volume, status) VALUES ",
                self.table
            );
            for (i, r) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                // Validated integers and decimals only: nothing here needs escaping.
                let _ = write!(sql, "({},{},{},'Y')", r.ticket, r.login, r.volume);
            }
            tx.query_drop(sql)?;
        }
        Ok(())
    }

    fn read_stored(
        &self,
        tx: &mut mysql::Transaction<'_>,
        messages: &[&[Record]],
    ) -> Result<HashMap<u64, StoredRow>, StoreError> {
        let tickets: Vec<u64> = messages
            .iter()
            .flat_map(|m| m.iter().map(|r| r.ticket))
            .collect();
        let mut stored = HashMap::new();
        for chunk in tickets.chunks(ROWS_PER_STATEMENT) {
            let rows: Vec<(u64, u64, String, String)> = tx.query(format!(
                "SELECT ticket, login, CAST(volume AS CHAR), status FROM `{}` WHERE ticket IN ({})",
                self.table,
                join(chunk)
            ))?;
            for (ticket, login, volume, status) in rows {
                let volume =
                    Volume::parse(volume.as_bytes()).map_err(|_| StoreError::BadStoredVolume {
                        table: self.table.clone(),
                        ticket,
                        value: volume.clone(),
                    })?;
                stored.insert(
                    ticket,
                    StoredRow {
                        login,
                        volume,
                        committed: status == "Y",
                    },
                );
            }
        }
        Ok(stored)
    }
}

fn code_of(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(e) => Some(e.code),
        _ => None,
    }
}

fn join(tickets: &[u64]) -> String {
    let mut s = String::with_capacity(tickets.len() * 12);
    for (i, t) in tickets.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{t}");
    }
    s
}

/// Capped exponential backoff between retries of a failed batch.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const CAP: Duration = Duration::from_secs(2);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The wait before the next retry; each call doubles the following one, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_cap() {
        let mut b = Backoff::new();
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(10));
        assert_eq!(delays[1], Duration::from_millis(20));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(2));
    }

    #[test]
    fn transient_or_operator() {
        let server = |code| {
            StoreError::Mysql(mysql::Error::MySqlError(mysql::MySqlError {
                state: "HY000".into(),
                message: "x".into(),
                code,
            }))
        };
        for code in [1205, 1213, 1040, 1146, 1927] {
            assert!(server(code).is_transient(), "{code}");
        }
        for code in [1054, 1264, 1406, 1364, 1366, 1142, 1114] {
            assert!(!server(code).is_transient(), "{code}");
        }
        assert!(StoreError::Race.is_transient());
        let schema = StoreError::Schema {
            table: "fee".into(),
            problems: vec!["a".into(), "b".into()],
        };
        assert!(!schema.is_transient());
        assert_eq!(
            schema.to_string(),
            "table `fee` does not fit what feedd writes: a; b"
        );
    }

    #[test]
    fn join_lists() {
        assert_eq!(join(&[1, 2, 3]), "1,2,3");
        assert_eq!(join(&[]), "");
    }
}
