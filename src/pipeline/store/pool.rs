//! The connection pool of the host taking writes: r2d2's `ManageConnection` over the `mysql`
//! driver, the driver's options per host (timeouts, session setup, TLS), building a pool.
//!
//! Used from worker threads (checkout, return) and from the thread that builds a `Store`
//! (start-up, reload); r2d2 adds its own scheduler thread per pool.
//!
//! The manager does not ping a connection on every return as r2d2_mysql's does: a connection
//! is dropped when an operation on it failed with a connection error, and pinged on checkout
//! only after it sat idle for `IDLE_PING`.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use mysql::{ClientIdentity, Opts, OptsBuilder, SslOpts};
use r2d2_mysql::MySqlConnectionManager;

use crate::config::{MysqlConfig, TlsMode};
use crate::pipeline::hosts::HostAddr;

/// Every session: READ COMMITTED (see `commit`), a bounded lock wait, a strict
/// `sql_mode` so a value that does not fit a column is an error, never a warning, and
/// autocommit: the fast path's INSERT commits by itself only under it, and a server whose
/// sessions start without it would leave acknowledged rows uncommitted.
const SESSION_SETUP: [&str; 4] = [
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET SESSION innodb_lock_wait_timeout = 10",
    "SET SESSION sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'",
    "SET SESSION autocommit = 1",
];

pub type Pool = r2d2::Pool<Manager>;

/// A connection back in the pool after this long is pinged before its next use: that catches
/// one killed or timed out while idle (a server restart in a quiet hour) without a failed
/// batch. A busy connection is reused within microseconds and never pinged; one that dies
/// mid-use fails its batch, is marked broken and dropped, and the batch is retried.
const IDLE_PING: Duration = Duration::from_secs(1);

/// r2d2_mysql's manager, with `has_broken` answered from a mark instead of a ping per return.
#[derive(Debug)]
pub struct Manager {
    inner: MySqlConnectionManager,
}

/// A pooled MySQL connection plus what the manager needs to judge it without a round trip.
#[derive(Debug)]
pub struct Conn {
    pub(super) conn: mysql::Conn,
    /// An operation on it failed with a connection error: r2d2 drops it on return.
    broken: bool,
    /// When it was last returned to the pool.
    returned: Instant,
    /// The full-chunk INSERT, prepared on this connection at first use. Held here so an
    /// execute skips the driver's per-call parse and cache lookup of its 15 kB of SQL.
    pub(super) full_chunk: Option<mysql::Statement>,
}

impl Conn {
    /// Marks the connection unusable, so the pool drops it instead of taking it back.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl Deref for Conn {
    type Target = mysql::Conn;
    fn deref(&self) -> &mysql::Conn {
        &self.conn
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut mysql::Conn {
        &mut self.conn
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = mysql::Error;

    fn connect(&self) -> Result<Conn, mysql::Error> {
        Ok(Conn {
            conn: self.inner.connect()?,
            broken: false,
            returned: Instant::now(),
            full_chunk: None,
        })
    }

    /// Called by r2d2 on every checkout (`test_on_check_out`); r2d2 has no idle-time setting
    /// for it, so the idle check is here: only a connection idle ≥ `IDLE_PING` costs a ping.
    fn is_valid(&self, conn: &mut Conn) -> Result<(), mysql::Error> {
        if conn.broken {
            return Err(broken_error());
        }
        if conn.returned.elapsed() >= IDLE_PING {
            self.inner.is_valid(&mut conn.conn)?;
        }
        Ok(())
    }

    /// Called by r2d2 on every return: no round trip, just the mark (and the return time).
    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.returned = Instant::now();
        conn.broken
    }
}

fn broken_error() -> mysql::Error {
    mysql::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "connection marked broken after a failed operation",
    ))
}

/// Silences r2d2's own logging of background connection failures: the worker logs each fault
/// episode once.
#[derive(Debug)]
struct QuietErrors;

impl<E> r2d2::HandleError<E> for QuietErrors {
    fn handle_error(&self, _error: E) {}
}

/// The driver's options for one host of the list: timeouts, session setup, TLS. `proof`: for
/// the one connection that proves a host at start-up or reload, whose every wait is bounded
/// by `connect_timeout_ms`, so a host that accepts TCP and never answers is passed quickly.
pub(super) fn driver_opts(config: &MysqlConfig, host: &HostAddr, proof: bool) -> Opts {
    let read = if proof {
        config.connect_timeout()
    } else {
        config.read_timeout()
    };
    let mut opts = OptsBuilder::new()
        .ip_or_hostname(Some(host.driver_host()))
        .tcp_port(host.port)
        .user(Some(config.user.clone()))
        .pass(Some(config.password.expose().to_string()))
        .db_name(Some(config.database.clone()))
        .prefer_socket(false)
        .tcp_connect_timeout(Some(config.connect_timeout()))
        .read_timeout(Some(read))
        .write_timeout(Some(read))
        .init(SESSION_SETUP.to_vec());
    if let Some(ssl) = ssl_opts(config) {
        opts = opts.ssl_opts(ssl);
    }
    opts.into()
}

/// `[mysql] tls*` as the driver's TLS options (rustls; the files were checked by the config).
fn ssl_opts(config: &MysqlConfig) -> Option<SslOpts> {
    let ssl = match config.tls {
        TlsMode::Off => return None,
        TlsMode::Required => SslOpts::default()
            .with_danger_accept_invalid_certs(true)
            .with_danger_skip_domain_validation(true),
        TlsMode::VerifyCa => SslOpts::default().with_danger_skip_domain_validation(true),
        TlsMode::VerifyIdentity => SslOpts::default(),
    };
    let ssl = ssl.with_root_cert_path(config.tls_ca_file.clone());
    Some(match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => {
            ssl.with_client_identity(Some(ClientIdentity::new(cert.clone(), key.clone())))
        }
        _ => ssl,
    })
}

/// `connect_timeout`: the longest wait for a connection from the pool.
pub(super) fn build_pool(opts: Opts, pool_size: u32, connect_timeout: Duration) -> Pool {
    r2d2::Pool::builder()
        .max_size(pool_size.max(1))
        .min_idle(Some(0))
        .connection_timeout(connect_timeout)
        // Manager::is_valid pings only connections idle ≥ IDLE_PING; see there.
        .test_on_check_out(true)
        .error_handler(Box::new(QuietErrors))
        .build_unchecked(Manager {
            inner: MySqlConnectionManager::new(OptsBuilder::from_opts(opts)),
        })
}
