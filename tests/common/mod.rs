//! The one test harness: a private database per test on the shared MariaDB, free ports, the
//! real `feedd` binary in a temp dir, and REQ/DEALER clients.
//!
//! The server is `FEEDD_TEST_MYSQL_HOST`:`FEEDD_TEST_MYSQL_PORT` (default 127.0.0.1:3306), root
//! with an empty password, as the README's setup leaves it.
#![allow(dead_code)]

pub mod galera;
pub mod mariadb;
pub mod rabbit;
pub mod tls;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

pub fn mysql_host() -> String {
    std::env::var("FEEDD_TEST_MYSQL_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

pub fn mysql_port() -> u16 {
    std::env::var("FEEDD_TEST_MYSQL_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3306)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A free metrics address and the config override that points feedd at it.
pub fn metrics_listen() -> (String, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let listen = format!("metrics.listen = {addr}");
    (addr, listen)
}

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
    pub fn rows(&self) -> HashMap<u64, (u64, String, String)> {
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

/// A config file's text for `db`, with a free endpoint port and extra `[section] key = value`
/// lines merged in (`overrides` lines like "pipeline.batch_size = 10").
pub fn config_text(db: &Db, zmq_port: u16, overrides: &[&str]) -> String {
    let mut sections: Vec<(String, Vec<String>)> = vec![
        ("daemon".into(), vec!["log_level = debug".into()]),
        (
            "zmq".into(),
            vec![format!("endpoint = tcp://127.0.0.1:{zmq_port}")],
        ),
        (
            "mysql".into(),
            vec![
                format!("host = {}", mysql_host()),
                format!("port = {}", db.port),
                format!("database = {}", db.name),
            ],
        ),
        ("amqp".into(), vec![]),
        ("pipeline".into(), vec![]),
        ("metrics".into(), vec!["listen =".into()]),
    ];
    for o in overrides {
        let (key, value) = o.split_once('=').expect("section.key = value");
        let (section, key) = key.trim().split_once('.').expect("section.key");
        let entry = sections
            .iter_mut()
            .find(|(s, _)| s == section)
            .expect("known section");
        entry.1.retain(|l| !l.starts_with(&format!("{key} ")));
        entry.1.push(format!("{key} = {}", value.trim()));
    }
    let mut text = String::new();
    for (s, lines) in sections {
        text.push_str(&format!("[{s}]\n"));
        for l in lines {
            text.push_str(&l);
            text.push('\n');
        }
    }
    text
}

pub fn feedd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_feedd")
}

/// A `feedd` run in its own temp dir, on its own port.
pub struct Feedd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
}

impl Feedd {
    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("feed.ini")
    }

    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Starts `feedd --conf feed.ini` in the foreground and waits until it serves.
    pub fn start(db: &Db, overrides: &[&str]) -> Feedd {
        let f = Feedd::prepare(db, overrides);
        f.spawn_foreground()
    }

    /// Writes the config into a fresh temp dir without starting anything.
    pub fn prepare(db: &Db, overrides: &[&str]) -> Feedd {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("feed.ini"),
            config_text(db, port, overrides),
        )
        .unwrap();
        Feedd {
            dir,
            port,
            child: None,
        }
    }

    /// Rewrites the config of a prepared run (same dir and port) with other overrides.
    pub fn prepare_in(self, db: &Db, overrides: &[&str]) -> Feedd {
        std::fs::write(self.conf_path(), config_text(db, self.port, overrides)).unwrap();
        self
    }

    pub fn spawn_foreground(mut self) -> Feedd {
        let log = std::fs::File::create(self.dir.path().join("stderr.log")).unwrap();
        let child = Command::new(feedd_bin())
            .args(["--conf", "feed.ini"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_for_log("serving with", Duration::from_secs(20));
        self
    }

    /// Runs `feedd ARGS` in this dir to completion: (status, stdout, stderr).
    pub fn command(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let out = Command::new(feedd_bin())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.stderr_log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no `{needle}` in the log:\n{}", self.stderr_log());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the foreground process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < until, "feedd did not exit in {timeout:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process's resident set in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

impl Drop for Feedd {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

thread_local! {
    static CONTEXT: zmq::Context = zmq::Context::new();
}

pub fn context() -> zmq::Context {
    CONTEXT.with(|c| c.clone())
}

/// A REQ client (like the PHP daemon's clients).
pub struct Req(pub zmq::Socket);

impl Req {
    pub fn connect(endpoint: &str) -> Req {
        let s = context().socket(zmq::REQ).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(20_000).unwrap();
        s.connect(endpoint).unwrap();
        Req(s)
    }

    /// Sends one message and returns the reply text.
    pub fn ask(&self, body: &str) -> String {
        self.0.send(body, 0).unwrap();
        let reply = self.0.recv_bytes(0).expect("a reply within 20 s");
        String::from_utf8(reply).unwrap()
    }
}

/// A DEALER client that keeps many messages in flight; replies are matched by an id frame
/// in the envelope (which the daemon echoes).
pub struct Dealer(pub zmq::Socket);

impl Dealer {
    pub fn connect(endpoint: &str) -> Dealer {
        let s = context().socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(30_000).unwrap();
        s.set_sndhwm(0).unwrap();
        s.set_rcvhwm(0).unwrap();
        s.connect(endpoint).unwrap();
        Dealer(s)
    }

    /// One DEALER connected to several feedd: messages spread round-robin over the live ones.
    /// `ZMQ_IMMEDIATE` keeps messages off a peer that is down (else they queue there).
    pub fn connect_all(endpoints: &[String]) -> Dealer {
        let s = context().socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(30_000).unwrap();
        s.set_sndhwm(0).unwrap();
        s.set_rcvhwm(0).unwrap();
        s.set_immediate(true).unwrap();
        for e in endpoints {
            s.connect(e).unwrap();
        }
        Dealer(s)
    }

    /// Sends `body` tagged with `id`: frames [id, "", body].
    pub fn send(&self, id: u64, body: &str) {
        self.0
            .send_multipart(
                [
                    id.to_string().into_bytes(),
                    Vec::new(),
                    body.as_bytes().to_vec(),
                ],
                0,
            )
            .unwrap();
    }

    /// The next reply: (id, text), or None on timeout.
    pub fn recv(&self) -> Option<(u64, String)> {
        let frames = self.0.recv_multipart(0).ok()?;
        let id = String::from_utf8_lossy(&frames[0]).parse().unwrap();
        assert!(frames[1].is_empty(), "the delimiter comes back");
        Some((
            id,
            String::from_utf8_lossy(frames.last().unwrap()).into_owned(),
        ))
    }

    /// Sends every body, then collects every reply: id → text.
    pub fn round_trip(&self, bodies: &[String]) -> HashMap<u64, String> {
        for (i, b) in bodies.iter().enumerate() {
            self.send(i as u64, b);
        }
        let mut replies = HashMap::new();
        while replies.len() < bodies.len() {
            let (id, text) = self.recv().expect("every reply within 30 s");
            assert!(
                replies.insert(id, text).is_none(),
                "message {id} answered twice"
            );
        }
        replies
    }
}

/// `n` one-record bodies with tickets from `first`.
pub fn one_record_bodies(first: u64, n: u64) -> Vec<String> {
    (first..first + n)
        .map(|t| format!("{t},{},{}.25", t % 97, t % 1000))
        .collect()
}

/// GET `path` from `addr` (plain HTTP/1.0), returning the body.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of a metric line `name value` (first match, labels included in `name`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Daemon-mode helpers: paths the default config puts under the run dir.
impl Feedd {
    pub fn pidfile(&self) -> PathBuf {
        self.dir.path().join("run/feedd.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("log/feedd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// `feedd start`; asserts it reports ready.
    pub fn start_daemon(&self) {
        let (status, out, err) = self.command(&["start", "--conf", "feed.ini"]);
        assert_eq!(
            status.code(),
            Some(0),
            "start failed: {out}{err}\n{}",
            self.log()
        );
    }

    /// `feedd stop`; asserts it succeeded.
    pub fn stop_daemon(&self) {
        let (status, out, err) = self.command(&["stop", "--conf", "feed.ini"]);
        assert_eq!(status.code(), Some(0), "stop failed: {out}{err}");
    }

    pub fn daemon_pid(&self) -> i32 {
        std::fs::read_to_string(self.pidfile())
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The supervisor's serving child (first child process of the pidfile's pid).
    pub fn serving_pid(&self) -> Option<i32> {
        children_of(self.daemon_pid()).first().copied()
    }

    /// Processes whose working directory is this run dir (daemon, supervisor, child).
    pub fn processes(&self) -> Vec<i32> {
        let dir = std::fs::canonicalize(self.dir.path()).unwrap();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .ok()
                    .as_deref()
                    == Some(dir.as_path())
                    && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| !s.contains(") Z "))
                        .unwrap_or(false)
            })
            .collect()
    }
}

/// The child processes of `parent` (the library's own lookup, used by `feedd status`).
pub fn children_of(parent: i32) -> Vec<i32> {
    feedd::supervisor::children_of(parent)
}

pub fn kill(pid: i32, sig: i32) {
    assert!(pid > 0);
    unsafe {
        libc::kill(pid, sig);
    }
}

/// (real, effective, saved) ids from a /proc status line such as `Uid:`.
pub fn proc_ids(pid: i32, field: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(3)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Feedd {
    pub fn wait_for_daemon_log(&self, needle: &str) {
        assert!(
            wait_until(Duration::from_secs(10), || self.log().contains(needle)),
            "no `{needle}` in the daemon log:\n{}",
            self.log()
        );
    }
}

/// A CURVE key pair as Z85 text: (public, secret).
pub fn curve_pair() -> (String, String) {
    let pair = zmq::CurveKeyPair::new().unwrap();
    (
        zmq::z85_encode(&pair.public_key).unwrap(),
        zmq::z85_encode(&pair.secret_key).unwrap(),
    )
}

impl Dealer {
    /// A DEALER that authenticates with CURVE: the server's public key, this client's pair.
    pub fn connect_curve(endpoint: &str, server_public: &str, client: &(String, String)) -> Dealer {
        let s = context().socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(3_000).unwrap();
        s.set_curve_serverkey(&zmq::z85_decode(server_public).unwrap())
            .unwrap();
        s.set_curve_publickey(&zmq::z85_decode(&client.0).unwrap())
            .unwrap();
        s.set_curve_secretkey(&zmq::z85_decode(&client.1).unwrap())
            .unwrap();
        s.connect(endpoint).unwrap();
        Dealer(s)
    }

    /// Sends one body and waits (up to the socket's timeout) for its reply.
    pub fn ask(&self, body: &str) -> Option<String> {
        self.send(1, body);
        self.recv().map(|(_, text)| text)
    }
}

/// A client that keeps resending what was not answered, as feedd's users are told to:
/// every body is sent with id = its index; unanswered ones are resent after `patience`.
pub struct Resender {
    pub acked: std::collections::HashSet<u64>,
    pub falses: Vec<String>,
    pub resent: u64,
}

impl Resender {
    /// `run` on a thread of its own, for tests that inject faults meanwhile.
    pub fn spawn(
        endpoint: String,
        bodies: &[String],
        patience: Duration,
    ) -> std::thread::JoinHandle<Resender> {
        let bodies = bodies.to_vec();
        std::thread::spawn(move || {
            Resender::run(&endpoint, &bodies, 64, patience, Duration::from_secs(90))
        })
    }

    /// Streams `bodies` (window `window`), resending until all are answered or `deadline`.
    pub fn run(
        endpoint: &str,
        bodies: &[String],
        window: usize,
        patience: Duration,
        deadline: Duration,
    ) -> Resender {
        Resender::run_on(
            Dealer::connect(endpoint),
            bodies,
            window,
            patience,
            deadline,
        )
    }

    /// `run` on a DEALER of the caller's (e.g. one connected to several feedd).
    pub fn run_on(
        dealer: Dealer,
        bodies: &[String],
        window: usize,
        patience: Duration,
        deadline: Duration,
    ) -> Resender {
        dealer.0.set_rcvtimeo(50).unwrap();
        let mut r = Resender {
            acked: Default::default(),
            falses: Vec::new(),
            resent: 0,
        };
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        let mut next = 0usize;
        let end = Instant::now() + deadline;
        while r.acked.len() + r.falses.len() < bodies.len() && Instant::now() < end {
            while sent_at.len() < window && next < bodies.len() {
                dealer.send(next as u64, &bodies[next]);
                sent_at.insert(next as u64, Instant::now());
                next += 1;
            }
            match dealer.recv() {
                Some((id, text)) => {
                    if sent_at.remove(&id).is_some() {
                        if text == "TRUE" {
                            r.acked.insert(id);
                        } else {
                            r.falses.push(text);
                        }
                    }
                }
                None => {
                    let stale: Vec<u64> = sent_at
                        .iter()
                        .filter(|(_, at)| at.elapsed() > patience)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in stale {
                        dealer.send(id, &bodies[id as usize]);
                        sent_at.insert(id, Instant::now());
                        r.resent += 1;
                    }
                }
            }
        }
        r
    }
}

/// `n` bodies of `per` records each, tickets from `first`, login/volume derived from the ticket.
pub fn bodies(first: u64, n: u64, per: u64) -> Vec<String> {
    (0..n)
        .map(|m| {
            (0..per)
                .map(|i| {
                    let t = first + m * per + i;
                    format!("{t},{},{}.5", t % 1000, t % 77)
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Every record of every acknowledged body is in `rows` with its values.
pub fn assert_acked_present(
    bodies: &[String],
    acked: &std::collections::HashSet<u64>,
    rows: &HashMap<u64, (u64, String, String)>,
) {
    for id in acked {
        let missing = missing_records(&bodies[*id as usize], rows);
        assert!(
            missing.is_empty(),
            "acknowledged tickets missing or different: {missing:?}"
        );
    }
}

/// Tickets of `body` whose row is absent, holds other values, or is not `status = 'Y'`.
/// `rows`: ticket → (login, volume as stored, status), as `Db::rows` returns them.
pub fn missing_records(body: &str, rows: &HashMap<u64, (u64, String, String)>) -> Vec<u64> {
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
