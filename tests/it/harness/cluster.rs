//! The cluster side: a private 3-node MariaDB Galera cluster on loopback, for tests and the
//! bench.
//!
//! Each node has its own data dir, socket, SQL port, `base_port` (group communication; IST
//! listens on base_port + 1, hence 10 ports apart) and rsync SST receive address. Node 0
//! bootstraps with `--wsrep-new-cluster` after `mariadb-install-db`; nodes 1 and 2 start
//! empty and get the state by SST. Every mariadbd runs in a process group of its own so that
//! `kill9` and teardown also end the SST helpers it spawned. Buffers are small for CI's 2
//! cores. No threads of its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::database::binary;
use super::ports;

pub const NODES: usize = 3;
const PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";
/// Forming the cluster took about 20 s here; CI's 2 cores may be slower.
const FORM_TIMEOUT: Duration = Duration::from_secs(180);

pub struct GaleraCluster {
    pub dir: tempfile::TempDir,
    /// First port of this cluster's block; node i uses first + 10 * i .. + 3.
    first: u16,
    children: Vec<Option<Child>>,
}

/// Whether this machine can run a cluster (the provider library is installed).
pub fn available() -> bool {
    std::path::Path::new(PROVIDER).exists()
}

impl GaleraCluster {
    /// Initialises node 0, bootstraps it, joins the others, and returns once all three are
    /// `Synced` in a cluster of 3.
    pub fn start() -> GaleraCluster {
        assert!(
            available(),
            "{PROVIDER} missing: install galera-4 and rsync (.ci/setup)"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = GaleraCluster {
            first: ports::block(10 * NODES as u16),
            dir,
            children: (0..NODES).map(|_| None).collect(),
        };
        for i in 0..NODES {
            std::fs::create_dir_all(cluster.node_dir(i).join("data")).unwrap();
            std::fs::create_dir_all(cluster.node_dir(i).join("tmp")).unwrap();
            std::fs::write(cluster.node_dir(i).join("my.cnf"), cluster.cnf(i)).unwrap();
        }
        // As root, mariadbd and its rsync daemon run as `mysql` (a root rsync daemon would drop
        // to `nobody` and fail to write the joiner's data dir).
        if cluster.as_root() {
            let out = Command::new("chown")
                .args(["-R", "mysql:mysql"])
                .arg(cluster.dir.path())
                .output()
                .expect("chown");
            assert!(out.status.success(), "chown: {out:?}");
        }
        let tmp = cluster.node_dir(0).join("tmp");
        let out = Command::new(binary("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!(
                "--datadir={}",
                cluster.node_dir(0).join("data").display()
            ))
            .arg(format!("--tmpdir={}", tmp.display()))
            .env("TMPDIR", &tmp)
            .arg(format!("--user={}", cluster.user()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .output()
            .expect("mariadb-install-db");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.spawn(0, true);
        cluster.wait_synced(0, 1);
        // Joiners one at a time: an rsync donor serves one SST at a time anyway.
        for i in 1..NODES {
            cluster.spawn(i, false);
            cluster.wait_synced(i, i + 1);
        }
        cluster
    }

    fn as_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn user(&self) -> String {
        if self.as_root() {
            "mysql".into()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "nobody".into())
        }
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}"))
    }

    fn base_port(&self, i: usize) -> u16 {
        self.first + 10 * i as u16
    }

    /// The SQL port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.base_port(i) + 3
    }

    /// `127.0.0.1:p0, 127.0.0.1:p1, 127.0.0.1:p2`, for `[mysql] host`.
    pub fn host_list(&self) -> String {
        (0..NODES)
            .map(|i| format!("127.0.0.1:{}", self.port(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn cnf(&self, i: usize) -> String {
        let d = self.node_dir(i);
        let gcomm: Vec<String> = (0..NODES)
            .map(|n| format!("127.0.0.1:{}", self.base_port(n)))
            .collect();
        let base = self.base_port(i);
        format!(
            "[mysqld]
datadir={data}
tmpdir={tmp}
socket={sock}
pid-file={pid}
log-error={log}
port={port}
bind-address=127.0.0.1
user={user}
skip-grant-tables
skip-name-resolve
skip-log-bin
innodb_buffer_pool_size=64M
innodb_log_file_size=16M
binlog_format=ROW
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
wsrep_on=ON
wsrep_provider={PROVIDER}
wsrep_cluster_name=feedd_test_{first}
wsrep_cluster_address=gcomm://{gcomm}
wsrep_node_name=node{i}
wsrep_node_address=127.0.0.1
wsrep_provider_options=\"base_port={base};gmcast.listen_addr=tcp://127.0.0.1:{base};ist.recv_addr=127.0.0.1:{ist};gcache.size=64M\"
wsrep_sst_method=rsync
wsrep_sst_receive_address=127.0.0.1:{sst}
",
            data = d.join("data").display(),
            tmp = d.join("tmp").display(),
            sock = d.join("sock").display(),
            pid = d.join("pid").display(),
            log = d.join("error.log").display(),
            port = self.port(i),
            user = self.user(),
            first = self.first,
            gcomm = gcomm.join(","),
            ist = base + 1,
            sst = base + 2,
        )
    }

    fn spawn(&mut self, i: usize, new_cluster: bool) {
        assert!(self.children[i].is_none(), "node {i} already running");
        let mut cmd = Command::new(binary("mariadbd"));
        cmd.arg(format!(
            "--defaults-file={}",
            self.node_dir(i).join("my.cnf").display()
        ));
        if new_cluster {
            cmd.arg("--wsrep-new-cluster");
        }
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        self.children[i] = Some(child);
    }

    /// The error log of node `i` (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.node_dir(i).join("error.log")).unwrap_or_default()
    }

    fn opts(&self, i: usize) -> mysql::OptsBuilder {
        mysql::OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(self.port(i))
            .user(Some("root"))
            .prefer_socket(false)
            .tcp_connect_timeout(Some(Duration::from_millis(500)))
            .read_timeout(Some(Duration::from_secs(10)))
    }

    /// A connection to node `i`, or None if it does not answer.
    pub fn try_conn(&self, i: usize) -> Option<mysql::Conn> {
        mysql::Conn::new(self.opts(i)).ok()
    }

    pub fn conn(&self, i: usize) -> mysql::Conn {
        self.try_conn(i)
            .unwrap_or_else(|| panic!("galera node {i} answers:\n{}", self.log(i)))
    }

    /// A `SHOW STATUS` value of node `i`, if it answers.
    pub fn status(&self, i: usize, name: &str) -> Option<String> {
        let mut c = self.try_conn(i)?;
        c.query_first::<(String, String), _>(format!("SHOW STATUS LIKE '{name}'"))
            .ok()
            .flatten()
            .map(|(_, v)| v)
    }

    /// Node `i` is `Synced` in a primary component of `size` nodes.
    pub fn is_synced(&self, i: usize, size: usize) -> bool {
        self.status(i, "wsrep_local_state_comment").as_deref() == Some("Synced")
            && self.status(i, "wsrep_cluster_size") == Some(size.to_string())
            && self.status(i, "wsrep_cluster_status").as_deref() == Some("Primary")
    }

    /// Waits until node `i` is synced in a cluster of `size`; panics with its log otherwise.
    pub fn wait_synced(&self, i: usize, size: usize) {
        let until = Instant::now() + FORM_TIMEOUT;
        while Instant::now() < until {
            if self.is_synced(i, size) {
                return;
            }
            assert!(
                self.children[i].is_some(),
                "node {i} is not running:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "galera node {i} not Synced in a cluster of {size}:\n{}",
            self.log(i)
        );
    }

    /// Waits until every running node is synced in a cluster of all running nodes.
    pub fn wait_all_synced(&self) {
        let running: Vec<usize> = (0..NODES).filter(|i| self.children[*i].is_some()).collect();
        for i in &running {
            self.wait_synced(*i, running.len());
        }
    }

    /// SIGKILL node `i` and whatever it spawned (an SST script, rsync): a crash.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Starts a stopped node again (it rejoins by IST, or SST after a crash) and waits until
    /// it is synced in the full cluster.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i, false);
        self.wait_all_synced();
    }

    /// ticket → (login, volume text, status) of `db`.`fee` on node `i`, once the node has
    /// applied everything committed anywhere before the read (`wsrep_sync_wait`).
    pub fn rows(
        &self,
        i: usize,
        db: &str,
    ) -> std::collections::HashMap<u64, (u64, String, String)> {
        let mut c = self.conn(i);
        c.query_drop("SET SESSION wsrep_sync_wait = 1").unwrap();
        c.query_map(
            format!("SELECT ticket, login, CAST(volume AS CHAR), status FROM `{db}`.fee"),
            |(t, l, v, s)| (t, (l, v, s)),
        )
        .unwrap()
        .into_iter()
        .collect()
    }
}

impl Drop for GaleraCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill9(i);
        }
    }
}
