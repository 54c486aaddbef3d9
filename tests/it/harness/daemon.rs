//! The real `feedd` binary under test: a config file in a temp dir of its own, started in the
//! foreground (ready when it sends `READY=1` on its own notify socket) or as a daemon (`start`
//! returns only once the daemon reported ready through its pipe), signals, logs and the
//! processes it leaves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::database::{mysql_host, Db};
use super::notify::{await_ready, Notify};
use super::ports;

/// A config file's text for `db`, on endpoint port `zmq_port`, with extra `[section] key = value`
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

/// A metrics address of the test's own and the config override that points feedd at it.
pub fn metrics_listen() -> (String, String) {
    let addr = format!("127.0.0.1:{}", ports::port());
    let listen = format!("metrics.listen = {addr}");
    (addr, listen)
}

/// The daemon under test: this build, or the one `FEEDD_TEST_BIN` names (a bench's A/B run
/// against a copy of an older build).
pub fn feedd_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("FEEDD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_feedd").into())
    })
}

/// Sends `signal` to `pid` (which must be a real process: never 0 or a group).
pub fn kill(pid: i32, signal: Signal) {
    assert!(pid > 0);
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
}

/// The child processes of `parent` (the library's own lookup, used by `feedd status`).
pub fn children_of(parent: i32) -> Vec<i32> {
    feedd::supervisor::children_of(parent)
}

/// Alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
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

/// The resident set of `pid` in KiB (from /proc).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// How long a foreground feedd may take to report ready (2 cores, tests in parallel).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `feedd` run in its own temp dir, on its own port.
pub struct Feedd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
    /// The notify socket of the foreground process, if one was started.
    notify: Option<Notify>,
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
        Feedd::prepare(db, overrides).spawn_foreground()
    }

    /// `start` with overrides built at run time (e.g. `broker::amqp_overrides`).
    pub fn start_owned(db: &Db, overrides: &[String]) -> Feedd {
        let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
        Feedd::start(db, &refs)
    }

    /// Writes the config into a fresh temp dir without starting anything.
    pub fn prepare(db: &Db, overrides: &[&str]) -> Feedd {
        let dir = tempfile::tempdir().unwrap();
        let port = ports::port();
        std::fs::write(
            dir.path().join("feed.ini"),
            config_text(db, port, overrides),
        )
        .unwrap();
        Feedd {
            dir,
            port,
            child: None,
            notify: None,
        }
    }

    /// Rewrites the config of a prepared run (same dir and port) with other overrides.
    pub fn prepare_in(self, db: &Db, overrides: &[&str]) -> Feedd {
        std::fs::write(self.conf_path(), config_text(db, self.port, overrides)).unwrap();
        self
    }

    /// Rewrites the config of a running feedd (for a reload) with other overrides.
    pub fn rewrite(&self, db: &Db, overrides: &[String]) {
        let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
        std::fs::write(self.conf_path(), config_text(db, self.port, &refs)).unwrap();
    }

    /// Starts the foreground process and waits for its `READY=1`.
    pub fn spawn_foreground(self) -> Feedd {
        let mut f = self.spawn_notified(&[]);
        f.wait_ready();
        f
    }

    /// Starts the foreground process like a `Type=notify` unit does (`NOTIFY_SOCKET` at a
    /// socket of its own, plus `env`), without waiting for anything.
    pub fn spawn_notified(mut self, env: &[(&str, String)]) -> Feedd {
        let notify = Notify::bind();
        let log = std::fs::File::create(self.dir.path().join("stderr.log")).unwrap();
        let child = Command::new(feedd_bin())
            .args(["--conf", "feed.ini"])
            .current_dir(self.dir.path())
            .env("NOTIFY_SOCKET", notify.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.notify = Some(notify);
        self
    }

    /// The notify socket of the foreground process.
    pub fn notify(&self) -> &Notify {
        self.notify.as_ref().expect("started with spawn_notified")
    }

    /// Waits for `READY=1`; panics with the log if the process exits first or takes too long.
    pub fn wait_ready(&mut self) {
        let child = self.child.as_mut().expect("running");
        let notify = self.notify.as_ref().expect("started with spawn_notified");
        if let Err(why) = await_ready(child, notify, READY_TIMEOUT) {
            panic!("feedd {why}:\n{}", self.stderr_log());
        }
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

    /// What the foreground process wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Waits until the foreground process logged `needle` (for what only the log shows).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        assert!(
            super::wait_until(timeout, || self.stderr_log().contains(needle)),
            "no `{needle}` in the log:\n{}",
            self.stderr_log()
        );
    }

    /// The foreground process's pid (0 when none runs).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends `signal` to the foreground process.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal);
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

    /// The foreground process's resident set in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    // Daemon mode: the paths the default config puts under the run dir.

    pub fn pidfile(&self) -> PathBuf {
        self.dir.path().join("run/feedd.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("log/feedd.log")
    }

    /// The daemon's log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// `feedd start`; asserts it reports ready (it returns once the daemon is serving).
    pub fn start_daemon(&self) {
        let (status, out, err) = self.command(&["start", "--conf", "feed.ini"]);
        assert_eq!(
            status.code(),
            Some(0),
            "start failed: {out}{err}\n{}",
            self.log()
        );
    }

    /// `feedd start`, which must fail: its stderr. A daemon that started anyway is stopped
    /// before panicking.
    pub fn start_must_fail(&self) -> String {
        let (status, out, err) = self.command(&["start", "--conf", "feed.ini"]);
        if status.success() {
            self.stop_daemon();
            panic!("started although it should not: {out}");
        }
        err
    }

    /// `feedd stop`; asserts it succeeded.
    pub fn stop_daemon(&self) {
        let (status, out, err) = self.command(&["stop", "--conf", "feed.ini"]);
        assert_eq!(status.code(), Some(0), "stop failed: {out}{err}");
    }

    /// The pid in the daemon's pidfile (0 when there is none).
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
                    && alive(*pid)
            })
            .collect()
    }

    /// Waits until the daemon's log file shows `needle`.
    pub fn wait_for_daemon_log(&self, needle: &str) {
        assert!(
            super::wait_until(Duration::from_secs(10), || self.log().contains(needle)),
            "no `{needle}` in the daemon log:\n{}",
            self.log()
        );
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

/// Stops a daemon started by a test and kills helper processes, even when the test fails.
pub struct Cleanup<'a> {
    pub daemon: Option<&'a Feedd>,
    pub children: Vec<Child>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.daemon {
            if !f.processes().is_empty() {
                let _ = f.command(&["stop", "--conf", "feed.ini"]);
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `db` holds at least `n` rows; panics with feedd's log otherwise.
pub fn wait_rows(db: &Db, n: u64, secs: u64, feedd: &Feedd) {
    assert!(
        super::wait_until(Duration::from_secs(secs), || db.count() >= n),
        "{} of {n} rows after {secs} s\n{}",
        db.count(),
        feedd.stderr_log()
    );
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
