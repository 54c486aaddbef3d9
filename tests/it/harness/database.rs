//! The database side: a database of the test's own on the shared MariaDB
//! (`FEEDD_TEST_MYSQL_HOST`:`FEEDD_TEST_MYSQL_PORT`, default 127.0.0.1:3306, root without a
//! password, as `.ci/setup` leaves it), the rows feedd stored, and a private `mariadbd` for
//! tests that kill, stop or restart the database: its own temp data dir, a port of its own, no
//! grant tables (root without password), and the same data dir and port across restarts. Tests
//! never kill the shared server.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mysql::prelude::Queryable;
use nix::sys::signal::Signal;

use super::{kill, ports, wait_until};

pub fn mysql_host() -> String {
    std::env::var("FEEDD_TEST_MYSQL_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

pub fn mysql_port() -> u16 {
    std::env::var("FEEDD_TEST_MYSQL_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3306)
}

/// ticket → (login, volume as stored, status), as `Db::rows` returns them.
pub type Rows = HashMap<u64, (u64, String, String)>;

/// A database of the test's own, dropped at the end.
pub struct Db {
    pub name: String,
    pub port: u16,
    pool: mysql::Pool,
}

impl Db {
    pub fn create(test: &str) -> Db {
        Db::create_on(test, mysql_port())
    }

    /// A database on the server at 127.0.0.1:`port` (a private mariadbd).
    pub fn create_on(test: &str, port: u16) -> Db {
        Db::create_with(test, port, None)
    }

    /// `create_on` with TLS options for a server that requires secure transport.
    pub fn create_with(test: &str, port: u16, ssl: Option<mysql::SslOpts>) -> Db {
        let name = format!("feedd_t_{}_{}", test, std::process::id());
        let opts = mysql::OptsBuilder::new()
            .ip_or_hostname(Some(mysql_host()))
            .tcp_port(port)
            .user(Some("root"))
            .prefer_socket(false)
            .ssl_opts(ssl);
        let pool = mysql::Pool::new(opts)
            .expect("MariaDB on FEEDD_TEST_MYSQL_PORT (run the README setup)");
        let mut conn = pool.get_conn().expect("connection");
        conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
            .unwrap();
        conn.query_drop(format!("CREATE DATABASE `{name}`"))
            .unwrap();
        Db { name, port, pool }
    }

    pub fn conn(&self) -> mysql::PooledConn {
        let mut c = self.pool.get_conn().expect("connection");
        c.query_drop(format!("USE `{}`", self.name)).unwrap();
        c
    }

    pub fn count(&self) -> u64 {
        self.conn()
            .query_first::<u64, _>("SELECT COUNT(*) FROM fee")
            .unwrap()
            .unwrap_or(0)
    }

    /// ticket → (login, volume text, status)
    pub fn rows(&self) -> Rows {
        self.conn()
            .query_map(
                "SELECT ticket, login, CAST(volume AS CHAR), status FROM fee",
                |(t, l, v, s)| (t, (l, v, s)),
            )
            .unwrap()
            .into_iter()
            .collect()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Ok(mut c) = self.pool.get_conn() {
            let _ = c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
    }
}

/// Every record of every acknowledged body is in `rows` with its values.
pub fn assert_acked_present(bodies: &[String], acked: &HashSet<u64>, rows: &Rows) {
    for id in acked {
        let missing = missing_records(&bodies[*id as usize], rows);
        assert!(
            missing.is_empty(),
            "acknowledged tickets missing or different: {missing:?}"
        );
    }
}

/// Tickets of `body` whose row is absent, holds other values, or is not `status = 'Y'`.
pub fn missing_records(body: &str, rows: &Rows) -> Vec<u64> {
    let records = feedd::record::parse_body(body.as_bytes()).expect("a body the test sent");
    records
        .iter()
        .filter(|r| {
            !rows.get(&r.ticket).is_some_and(|(login, volume, status)| {
                *login == r.login
                    && feedd::record::Volume::parse(volume.as_bytes()) == Ok(r.volume)
                    && status == "Y"
            })
        })
        .map(|r| r.ticket)
        .collect()
}

pub struct PrivateMariadb {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Server options beyond the defaults (e.g. TLS), given last.
    extra: Vec<String>,
    /// Accounts enforced (root@127.0.0.1 without password); else --skip-grant-tables.
    grants: bool,
}

pub fn binary(name: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = format!("{dir}/{name}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    name.to_string()
}

impl PrivateMariadb {
    /// Initialises a data dir and starts the server; returns once it answers.
    pub fn start() -> PrivateMariadb {
        PrivateMariadb::init(&[], false)
    }

    /// Like `start`, with the grant tables on (root@127.0.0.1 without password; accounts,
    /// privileges and REQUIRE clauses enforced) and extra server options.
    pub fn start_with(extra: &[String]) -> PrivateMariadb {
        PrivateMariadb::init(extra, true)
    }

    fn init(extra: &[String], grants: bool) -> PrivateMariadb {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        // A tmpdir of its own: parallel bootstraps collide in a shared /tmp.
        let out = Command::new(binary("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .env("TMPDIR", &tmp)
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect("mariadb-install-db (run the README setup)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = PrivateMariadb {
            dir,
            port: ports::port(),
            child: None,
            extra: extra.to_vec(),
            grants,
        };
        db.restart();
        db
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts mariadbd on the same data dir and port (after `kill9` or `stop`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mariadbd.log"))
            .unwrap();
        let child = Command::new(binary("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--port={}", self.port))
            .arg(format!(
                "--socket={}",
                self.dir.path().join("sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("pid").display()
            ))
            .arg(format!(
                "--tmpdir={}",
                self.dir.path().join("tmp").display()
            ))
            .args((!self.grants).then_some("--skip-grant-tables"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                "--skip-log-bin",
            ])
            // Last, so they override the defaults above.
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(30), || Self::answers(port)),
            "private mariadbd did not start: {}",
            std::fs::read_to_string(self.dir.path().join("mariadbd.log")).unwrap_or_default()
        );
    }

    fn answers(port: u16) -> bool {
        let opts = mysql::OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(port)
            .user(Some("root"))
            .prefer_socket(false)
            .tcp_connect_timeout(Some(Duration::from_millis(500)));
        // A server error (e.g. TLS required) still means the server is up.
        matches!(
            mysql::Conn::new(opts),
            Ok(_) | Err(mysql::Error::MySqlError(_))
        )
    }

    pub fn conn(&self) -> mysql::Conn {
        let opts = mysql::OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(self.port)
            .user(Some("root"))
            .prefer_socket(false);
        mysql::Conn::new(opts).expect("private mariadbd answers")
    }

    /// Creates `name` and returns a connection using it.
    pub fn create_db(&self, name: &str) -> mysql::Conn {
        let mut c = self.conn();
        c.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{name}`"))
            .unwrap();
        c.query_drop(format!("USE `{name}`")).unwrap();
        c
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id() as i32, Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.kill9();
    }
}
