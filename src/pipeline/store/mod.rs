//! The MySQL/MariaDB store as the rest of feedd sees it: `Store::connect` finds a host that
//! takes writes, `checkout` hands a worker a pooled connection, `commit_batch` commits one
//! batch atomically, `ensure_table`/`diagnose` check the table. Built on the thread that
//! starts or reloads the server, then shared by the worker threads (`Arc<ArcSwap<Store>>`).
//!
//! By job:
//! - `errors`: the one table saying what a MySQL error means (retry here, move host, operator
//!   must act) and whether it breaks the connection (pure).
//! - `pool`: the r2d2 manager, the driver and TLS options, building a pool.
//! - `table`: `CREATE TABLE IF NOT EXISTS` and the table check (`schema::judge`).
//! - `commit`: the commit strategy, a pure decision (fast path, careful path, redo) and the
//!   driver that runs its steps on a connection.
//!
//! Sessions run a strict `sql_mode`, so a value that does not fit is an error, never a silent
//! truncation. `StoreError::is_transient` tells faults that heal by themselves (connections,
//! deadlocks) from those an operator must fix (table, grants, disk).
//!
//! With several `[mysql] host` entries the store is the one place that knows which host takes
//! writes (SPEC §9): one pool at a time, for that host; an error that means the host cannot
//! write (`hosts::move_reason`) moves to the next one in order with a fresh pool, logged once
//! and counted. The round tracking is `hosts::Failover`'s alone. Connections carry the host
//! they came from, so a failure seen on a connection older than the last move does not move
//! again. Workers only see `checkout`/`commit_batch`.

mod commit;
pub mod errors;
mod pool;
mod table;

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mysql::Opts;
use parking_lot::Mutex;

use self::commit::ROWS_PER_STATEMENT;
use self::errors::ER_ACCESS_DENIED;
use self::pool::{build_pool, driver_opts};
pub use self::pool::{Conn, Manager, Pool};
use crate::config::MysqlConfig;
use crate::metrics::Metrics;
use crate::pipeline::hosts::{self, Failover, HostAddr, MoveReason};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {host}: {}{hint}", errors::text(error))]
    Host {
        host: String,
        error: mysql::Error,
        hint: &'static str,
    },
    #[error("no database host of the list could take writes: {}", tried.join("; "))]
    NoHost { tried: Vec<String> },
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
            StoreError::Mysql(e) => errors::code_of(e),
            _ => None,
        }
    }

    /// Why this error means the host cannot take writes now, if it does.
    pub fn move_reason(&self) -> Option<MoveReason> {
        match self {
            StoreError::Host { error, .. } | StoreError::Mysql(error) => hosts::move_reason(error),
            StoreError::Pool(error) => Some(MoveReason::Unreachable(error.to_string())),
            _ => None,
        }
    }

    /// A fault that heals by itself (connection, server restart, lock conflict, failover):
    /// retried quietly. Anything else is about the table, the data or the grants (see
    /// `errors`): retried too, since nothing accepted may be dropped, but an operator must act.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Host { .. }
            | StoreError::NoHost { .. }
            | StoreError::Pool(_)
            | StoreError::Race => true,
            StoreError::Schema { .. } | StoreError::BadStoredVolume { .. } => false,
            StoreError::Mysql(e) => errors::judge(e).class.is_transient(),
        }
    }
}

/// A pooled connection and the host (index in the list) it is connected to.
pub struct Connection {
    conn: r2d2::PooledConnection<Manager>,
    host: usize,
}

impl Deref for Connection {
    type Target = r2d2::PooledConnection<Manager>;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

/// The host taking writes and its pool.
struct Active {
    host: usize,
    pool: Pool,
}

/// Serial numbers of stores, so only the serving one shows in `feedd_db_host_active`.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// One database target: the host list, the pool of the host in use, and the table it writes.
pub struct Store {
    active: ArcSwap<Active>,
    hosts: Vec<HostAddr>,
    /// Driver options per host, in list order.
    opts: Vec<Opts>,
    /// The same with every wait bounded by `connect_timeout_ms`, to prove a host.
    proof_opts: Vec<Opts>,
    pool_size: u32,
    connect_timeout: std::time::Duration,
    failover: Mutex<Failover>,
    /// Names of the unique keys holding `ticket`, as the last table check read them: a
    /// duplicate-key error naming another key is no resend but a table an operator must fix.
    ticket_keys: Mutex<Vec<String>>,
    metrics: Metrics,
    serial: u64,
    table: String,
    /// The prepared INSERT of exactly `ROWS_PER_STATEMENT` rows.
    full_chunk_sql: String,
}

impl Store {
    /// Finds the first host of the list that answers and can take writes (creating the table
    /// if missing and checking it there), and builds its pool. A host that cannot be used
    /// (unreachable within `connect_timeout_ms`, no database, no grants, a table that does
    /// not fit) is logged with its reason and the next one tried; fails when none can, with
    /// each host's reason (a single host's error as it is).
    pub fn connect(
        config: &MysqlConfig,
        pool_size: u32,
        metrics: &Metrics,
    ) -> Result<Store, StoreError> {
        let opts: Vec<Opts> = config
            .hosts
            .iter()
            .map(|h| driver_opts(config, h, false))
            .collect();
        let proof_opts = config
            .hosts
            .iter()
            .map(|h| driver_opts(config, h, true))
            .collect();
        let first = opts
            .first()
            .cloned()
            .ok_or(StoreError::NoHost { tried: Vec::new() })?;
        let connect_timeout = config.connect_timeout();
        let store = Store {
            active: ArcSwap::from_pointee(Active {
                host: 0,
                pool: build_pool(first, pool_size, connect_timeout),
            }),
            hosts: config.hosts.clone(),
            opts,
            proof_opts,
            pool_size,
            connect_timeout,
            failover: Mutex::new(Failover::new(config.hosts.len(), 0)),
            ticket_keys: Mutex::new(vec!["PRIMARY".to_string()]),
            metrics: metrics.clone(),
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
            table: config.table.clone(),
            full_chunk_sql: format!(
                "INSERT INTO `{}` (ticket, login, volume, status) VALUES {}",
                config.table,
                vec!["(?,?,?,'Y')"; ROWS_PER_STATEMENT].join(",")
            ),
        };
        let mut tried = Vec::new();
        for host in 0..store.hosts.len() {
            let Err(e) = store.prove(host) else {
                return Ok(store);
            };
            if store.hosts.len() == 1 {
                return Err(e);
            }
            tried.push(match &e {
                StoreError::Host { .. } => e.to_string(), // names its host
                _ => format!("{}: {e}", store.hosts[host]),
            });
            if host + 1 == store.hosts.len() {
                break;
            }
            match e.move_reason() {
                // Logged and counted like any move.
                Some(reason) => store.move_from(host, &reason),
                None => {
                    log::warn!("db host {} not usable: {e}", store.hosts[host]);
                    store.start_on(host + 1);
                }
            }
        }
        Err(StoreError::NoHost { tried })
    }

    /// Before serving: `host` is the one to prove next, with a pool of its own.
    fn start_on(&self, host: usize) {
        *self.failover.lock() = Failover::new(self.hosts.len(), host);
        self.active.store(Arc::new(Active {
            host,
            pool: build_pool(
                self.opts[host].clone(),
                self.pool_size,
                self.connect_timeout,
            ),
        }));
    }

    /// One direct connection first (its error is the driver's own, at once, rather than the
    /// pool's timeout), then the table through the pool.
    fn prove(&self, host: usize) -> Result<(), StoreError> {
        mysql::Conn::new(self.proof_opts[host].clone()).map_err(|error| {
            // MariaDB refuses a plaintext login under require_secure_transport with a bare 1045.
            let plaintext = self.opts[host].get_ssl_opts().is_none();
            let hint = match &error {
                mysql::Error::MySqlError(e) if e.code == ER_ACCESS_DENIED && plaintext => {
                    " (tls = off: if the server sets require_secure_transport, set [mysql] tls)"
                }
                _ => "",
            };
            StoreError::Host {
                host: self.hosts[host].to_string(),
                error,
                hint,
            }
        })?;
        self.ensure_table()
    }

    /// `host:port` of the host taking writes.
    pub fn active_host(&self) -> String {
        self.hosts[self.active.load().host].to_string()
    }

    /// Makes this store the one `feedd_db_host_active` shows (the serving one).
    pub fn publish(&self) {
        self.metrics
            .db_hosts_owner
            .store(self.serial, Ordering::Relaxed);
        self.metrics.db_host_active.reset();
        self.show_active();
    }

    fn show_active(&self) {
        if self.metrics.db_hosts_owner.load(Ordering::Relaxed) != self.serial {
            return;
        }
        let current = self.active.load().host;
        for (i, host) in self.hosts.iter().enumerate() {
            self.metrics
                .db_host_active
                .with_label_values(&[&host.to_string()])
                .set(i64::from(i == current));
        }
    }

    /// The host `host` failed for `reason`: the next one of the list takes over (unless
    /// another connection already reported it), with a pool of its own.
    fn move_from(&self, host: usize, reason: &MoveReason) {
        let mut failover = self.failover.lock();
        let Some(m) = failover.failed(host) else {
            return;
        };
        if m.to == m.from {
            return; // a single host: nowhere to move, the caller's backoff paces retries
        }
        log::warn!(
            "db host {} → {}: {reason}",
            self.hosts[m.from],
            self.hosts[m.to]
        );
        if m.full_round {
            log::warn!("every db host of the list failed since the last commit; going round again");
        }
        self.metrics.db_failovers.inc();
        // A fresh pool: connections left from an earlier stay on that host may be dead.
        self.active.store(Arc::new(Active {
            host: m.to,
            pool: build_pool(
                self.opts[m.to].clone(),
                self.pool_size,
                self.connect_timeout,
            ),
        }));
        drop(failover);
        self.show_active();
    }

    fn note(&self, host: usize, result: Result<(), &StoreError>) {
        match result {
            // Uncontended in practice (held for nanoseconds, once per batch).
            Ok(()) => self.failover.lock().worked(),
            Err(e) => {
                if let Some(reason) = e.move_reason() {
                    self.move_from(host, &reason);
                }
            }
        }
    }

    /// A pooled connection to the host taking writes (waits up to the pool's timeout).
    pub fn checkout(&self) -> Result<Connection, StoreError> {
        let active = self.active.load();
        match active.pool.get() {
            Ok(conn) => Ok(Connection {
                conn,
                host: active.host,
            }),
            Err(e) => {
                let e = StoreError::Pool(e);
                self.note(active.host, Err(&e));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
