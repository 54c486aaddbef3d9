//! A RabbitMQ cluster for tests (and bench/chaos.rs): `n` private nodes (`broker::PrivateRabbit`:
//! own node name, AMQP and distribution ports, mnesia and log dirs, process group) on loopback,
//! sharing one Erlang cookie through a HOME of the cluster's own and one private epmd on a port
//! of its own (`ERL_EPMD_PORT`), so the shared broker's cookie and epmd play no part. Nodes 2..n
//! join node 1 (`stop_app; join_cluster; start_app`); `start` returns once `cluster_status`
//! lists every node running (25–40 s on 2 busy cores). Dropping it kills every node's whole
//! process group (script and beam.smp), then epmd.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::broker::{Client, PrivateRabbit};
use super::{ports, wait_until};

const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

pub struct RabbitCluster {
    /// Declared before `epmd` and `home`: nodes die first.
    nodes: Vec<PrivateRabbit>,
    epmd: Child,
    env: Vec<(String, String)>,
    _home: tempfile::TempDir,
}

impl RabbitCluster {
    /// Starts `n` nodes and clusters them; panics with the nodes' logs if that fails.
    pub fn start(n: usize) -> RabbitCluster {
        let started = Instant::now();
        let home = tempfile::tempdir().unwrap();
        let cookie = home.path().join(".erlang.cookie");
        std::fs::write(&cookie, format!("FEEDDTESTCLUSTER{}", std::process::id())).unwrap();
        // Erlang refuses a cookie file others can read.
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        let epmd_port = ports::port();
        let env = vec![
            ("HOME".to_string(), home.path().display().to_string()),
            ("ERL_EPMD_PORT".to_string(), epmd_port.to_string()),
        ];
        // In the foreground and in a group of its own: `epmd -daemon` (what a node starts when
        // none answers) detaches into a session no drop could find.
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string()])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd (erlang-base, run .ci/setup)");
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                epmd_port
            ))
            .is_ok()),
            "epmd did not listen"
        );
        let mut cluster = RabbitCluster {
            nodes: (0..n).map(|_| PrivateRabbit::new(env.clone())).collect(),
            epmd,
            env,
            _home: home,
        };
        // All at once: each node's boot is mostly waiting on one core.
        cluster.nodes.iter_mut().for_each(PrivateRabbit::spawn);
        cluster.nodes.iter().for_each(PrivateRabbit::wait_amqp);
        let first = cluster.nodes[0].node().to_string();
        for i in 1..n {
            cluster.ctl(i, &["stop_app"]);
            cluster.ctl(i, &["join_cluster", &first]);
            cluster.ctl(i, &["start_app"]);
        }
        cluster.wait_clustered();
        eprintln!(
            "rabbit cluster of {n} up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// The nodes' URLs in `order`, as one `[amqp] url` list; `query` (e.g. `heartbeat=2`) on
    /// each.
    pub fn url_list(&self, order: &[usize], query: &str) -> String {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        let urls: Vec<String> = order
            .iter()
            .map(|&i| format!("{}{q}", self.url(i)))
            .collect();
        urls.join(", ")
    }

    /// How feedd shows node `i` in logs and metrics.
    pub fn shown(&self, i: usize) -> String {
        format!("amqp://guest@127.0.0.1:{}//", self.port(i))
    }

    /// A client on the first running node from `from` on (wrapping).
    pub fn client(&self, from: usize) -> (usize, Client) {
        for k in 0..self.len() {
            let i = (from + k) % self.len();
            if self.nodes[i].is_running() {
                if let Some(c) = Client::try_connect(&self.url(i)) {
                    return (i, c);
                }
            }
        }
        panic!("no node of the cluster answers");
    }

    /// SIGKILL to node `i`'s whole process group, as a crash.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }

    /// Freezes node `i` (SIGSTOP: a silent host, its TCP connections open) or thaws it.
    pub fn pause(&mut self, i: usize, frozen: bool) {
        self.nodes[i].pause(frozen);
    }

    /// Starts node `i` again on its data dir; returns once the cluster lists it running.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_clustered();
    }

    /// `rabbitmqctl -n NODE args` against node `i`; panics with its output on failure.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new(CTL)
            .args(["-n", self.nodes[i].node()])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("rabbitmqctl (run .ci/setup)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "rabbitmqctl {args:?}: {text}");
        text
    }

    /// Nodes `cluster_status` (asked of the first running node) lists running.
    pub fn running_nodes(&self) -> usize {
        let Some(i) = self.nodes.iter().position(PrivateRabbit::is_running) else {
            return 0;
        };
        let out = Command::new(CTL)
            .args([
                "-n",
                self.nodes[i].node(),
                "cluster_status",
                "--formatter",
                "json",
            ])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("rabbitmqctl");
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Waits (90 s at most) until every node not killed is running in the cluster.
    fn wait_clustered(&self) {
        let want = self.nodes.iter().filter(|n| n.is_running()).count();
        assert!(
            wait_until(Duration::from_secs(90), || self.running_nodes() == want),
            "the cluster did not form: {}",
            self.ctl(0, &["cluster_status"])
        );
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        self.nodes.clear(); // each kills its own group
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.epmd.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.epmd.wait();
    }
}

/// A publisher thread under load: batches of `deliveries` bodies of `per` records (tickets
/// counting up from 1) with publisher confirms, one batch every `pause`, through the first of
/// `urls` that takes them. A batch not confirmed (its node died, its channel nacks while the
/// queue's leader is away) is published again on a new connection, the next URL first, so
/// every batch it counts was confirmed at least once.
pub struct Publisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Publisher {
    pub fn start(
        urls: Vec<String>,
        queue: &str,
        deliveries: u64,
        per: u64,
        pause: Duration,
    ) -> Publisher {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let queue = queue.to_string();
        let thread = std::thread::spawn(move || {
            let (mut at, mut client, mut next) = (0, None::<Client>, 1u64);
            while !stopping.load(Ordering::Relaxed) {
                let batch = super::bodies(next, deliveries, per);
                loop {
                    let c = match client.take() {
                        Some(c) => c,
                        None => match Client::try_connect(&urls[at % urls.len()]) {
                            Some(c) => c,
                            None => {
                                at += 1;
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                        },
                    };
                    if c.try_publish(&queue, &batch) {
                        client = Some(c);
                        break;
                    }
                    at += 1;
                }
                next += deliveries * per;
                std::thread::sleep(pause);
            }
            next - 1
        });
        Publisher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops after the batch in hand is confirmed; the records confirmed (tickets 1..=n).
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("publisher thread"))
            .unwrap_or(0)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
