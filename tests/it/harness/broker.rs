//! The broker side, RabbitMQ for tests: the config that points feedd at a queue, a blocking
//! client (publish with confirms, queue counts, reading dead letters) on the shared broker
//! (127.0.0.1:5672, guest, started by .ci/setup), and a private broker for tests that kill or
//! restart it: its own node name, ports (from `ports`), mnesia and log dirs in a temp dir, the
//! caller's Erlang cookie ($HOME), its own process group.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::{ports, wait_until};

pub fn shared_url() -> String {
    std::env::var("FEEDD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn url_on(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// The config overrides that point feedd at `url`/`queue`, ZeroMQ off unless `zmq`.
pub fn amqp_overrides(url: &str, queue: &str, zmq: bool, extra: &[&str]) -> Vec<String> {
    let mut o = vec![
        format!("amqp.url = {url}"),
        format!("amqp.queue = {queue}"),
        format!("amqp.dead_letter_exchange = {queue}.rejected"),
        "daemon.log_level = info".to_string(),
    ];
    if !zmq {
        o.push("zmq.endpoint =".into());
    }
    o.extend(extra.iter().map(|s| s.to_string()));
    o
}

/// A queue name of the test's own (and its dead-letter exchange/queue name).
pub fn names(test: &str) -> (String, String) {
    let q = format!("feedd_t_{test}_{}", std::process::id());
    let dlx = format!("{q}.rejected");
    (q, dlx)
}

/// A blocking AMQP client for the test's side.
pub struct Client {
    conn: Connection,
    ch: Channel,
}

impl Client {
    pub fn connect(url: &str) -> Client {
        Self::try_connect(url).expect("RabbitMQ answers (run .ci/setup)")
    }

    /// A client, or `None` when the broker does not answer within 5 s (a starting node may
    /// accept TCP before it speaks AMQP).
    #[must_use]
    pub fn try_connect(url: &str) -> Option<Client> {
        use smol::future::FutureExt;
        smol::block_on(
            async {
                let conn = Connection::connect(url, ConnectionProperties::default())
                    .await
                    .ok()?;
                let ch = conn.create_channel().await.ok()?;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .ok()?;
                Some(Client { conn, ch })
            }
            .or(async {
                smol::Timer::after(Duration::from_secs(5)).await;
                None
            }),
        )
    }

    /// Declares `queue` durable (as feedd would) so messages can wait in it.
    pub fn declare(&self, queue: &str) {
        smol::block_on(self.ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .unwrap();
    }

    /// Declares `queue` a durable quorum queue that retires a message after `delivery_limit`
    /// returns (RabbitMQ's `x-delivery-limit`).
    pub fn declare_quorum(&self, queue: &str, delivery_limit: i64) {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(delivery_limit),
        );
        smol::block_on(self.ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        ))
        .unwrap();
    }

    /// Deletes this one queue (its exchange bindings go with it), ignoring an absent one.
    pub fn delete_queue_only(&self, queue: &str) {
        let _ = smol::block_on(
            self.ch
                .queue_delete(queue.into(), QueueDeleteOptions::default()),
        );
    }

    /// Deletes the queue (and `queue`.rejected with its exchange), ignoring absent ones.
    pub fn delete(&self, queue: &str) {
        smol::block_on(async {
            for q in [queue.to_string(), format!("{queue}.rejected")] {
                let _ = self
                    .ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = self
                    .ch
                    .exchange_delete(q.as_str().into(), Default::default())
                    .await;
            }
        });
    }

    /// Publishes every body (persistent) to `queue` through the default exchange, with
    /// `headers` on each; returns once the broker confirmed all of them.
    pub fn publish(&self, queue: &str, bodies: &[String], headers: &[(&str, &str)]) {
        self.publish_to("", queue, bodies, headers);
    }

    /// Publishes every body (persistent) to `exchange` with `routing_key`, as a producer of
    /// the seed's kind does; returns once the broker confirmed all of them (a message the
    /// exchange routes nowhere is confirmed too, and dropped).
    pub fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: &[String],
        headers: &[(&str, &str)],
    ) {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(table);
        smol::block_on(async {
            let mut confirms = Vec::with_capacity(bodies.len());
            for b in bodies {
                let c = self
                    .ch
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        b.as_bytes(),
                        props.clone(),
                    )
                    .await
                    .unwrap();
                confirms.push(c);
                if confirms.len() >= 1000 {
                    for c in confirms.drain(..) {
                        assert!(c.await.unwrap().is_ack(), "broker confirmed");
                    }
                }
            }
            for c in confirms {
                assert!(c.await.unwrap().is_ack(), "broker confirmed");
            }
        });
    }

    /// Publishes every body (persistent) to `queue`; true only if the broker confirmed all
    /// within 10 s (false when the broker is gone: the caller publishes them again).
    #[must_use]
    pub fn try_publish(&self, queue: &str, bodies: &[String]) -> bool {
        use smol::future::FutureExt;
        let props = BasicProperties::default().with_delivery_mode(2);
        smol::block_on(
            async {
                let mut confirms = Vec::with_capacity(bodies.len());
                for b in bodies {
                    let c = self
                        .ch
                        .basic_publish(
                            "".into(),
                            queue.into(),
                            BasicPublishOptions::default(),
                            b.as_bytes(),
                            props.clone(),
                        )
                        .await;
                    match c {
                        Ok(c) => confirms.push(c),
                        Err(_) => return false,
                    }
                }
                for c in confirms {
                    if !matches!(c.await, Ok(conf) if conf.is_ack()) {
                        return false;
                    }
                }
                true
            }
            .or(async {
                smol::Timer::after(Duration::from_secs(10)).await;
                false
            }),
        )
    }

    /// Declares `exchange` durable of `kind` (as an operator or the seed's consumer did).
    pub fn declare_exchange(&self, exchange: &str, kind: lapin::ExchangeKind) {
        smol::block_on(self.ch.exchange_declare(
            exchange.into(),
            kind,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .unwrap();
    }

    /// Deletes `exchange`, ignoring an absent one.
    pub fn delete_exchange(&self, exchange: &str) {
        let _ = smol::block_on(self.ch.exchange_delete(exchange.into(), Default::default()));
    }

    /// Whether `queue` exists and is a quorum queue: the broker accepts a declare with
    /// `x-queue-type = quorum` only from a quorum queue (a channel of its own: a refusal
    /// closes it). None if it does not exist.
    pub fn is_quorum(&self, queue: &str) -> Option<bool> {
        self.counts(queue)?;
        let ch = smol::block_on(self.conn.create_channel()).ok()?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let quorum = smol::block_on(ch.queue_declare(queue.into(), durable, args)).is_ok();
        let _ = smol::block_on(ch.close(200, "".into()));
        Some(quorum)
    }

    /// Takes up to `n` messages of `queue` without acking them, then closes their channel so
    /// the broker returns them (redelivered; a quorum queue counts one more delivery).
    /// Returns each one's `x-delivery-count` header (None: absent, a first delivery).
    pub fn take_and_return(&self, queue: &str, n: usize) -> Vec<Option<i64>> {
        let ch = smol::block_on(self.conn.create_channel()).unwrap();
        let mut counts = Vec::new();
        while counts.len() < n {
            let got = smol::block_on(ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }))
                .unwrap();
            let Some(m) = got else { break };
            let count = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delivery-count").cloned())
                .map(|v| match v {
                    AMQPValue::LongLongInt(c) => c,
                    AMQPValue::LongInt(c) => i64::from(c),
                    AMQPValue::ShortInt(c) => i64::from(c),
                    other => panic!("x-delivery-count {other:?}"),
                });
            counts.push(count);
        }
        smol::block_on(ch.close(200, "return them".into())).unwrap();
        counts
    }

    /// Ready messages and consumers of `queue` (passive declare); None if it does not exist.
    pub fn counts(&self, queue: &str) -> Option<(u32, u32)> {
        let ch = smol::block_on(self.conn.create_channel()).ok()?;
        let q = smol::block_on(ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .ok()?;
        let _ = smol::block_on(ch.close(200, "".into()));
        Some((q.message_count(), q.consumer_count()))
    }

    pub fn ready(&self, queue: &str) -> u32 {
        self.counts(queue).map_or(0, |c| c.0)
    }

    /// Takes every message waiting in `queue`: (body, headers as text).
    pub fn drain(&self, queue: &str) -> Vec<(String, BTreeMap<String, String>)> {
        let mut out = Vec::new();
        while let Some(m) = smol::block_on(
            self.ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false }),
        )
        .unwrap()
        {
            let mut headers = BTreeMap::new();
            if let Some(h) = m.delivery.properties.headers() {
                for (k, v) in h.inner() {
                    let text = match v {
                        AMQPValue::LongString(s) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        AMQPValue::ShortString(s) => s.as_str().to_string(),
                        other => format!("{other:?}"),
                    };
                    headers.insert(k.as_str().to_string(), text);
                }
            }
            out.push((
                String::from_utf8_lossy(&m.delivery.data).into_owned(),
                headers,
            ));
            smol::block_on(
                self.ch
                    .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()),
            )
            .unwrap();
        }
        out
    }
}

/// A private `rabbitmq-server` on ports of the test's own (start takes ~10 s).
pub struct PrivateRabbit {
    pub dir: tempfile::TempDir,
    pub port: u16,
    dist_port: u16,
    node: String,
    child: Option<Child>,
    /// More environment for the node (a cluster's cookie HOME and epmd port).
    env: Vec<(String, String)>,
}

impl PrivateRabbit {
    pub fn start() -> PrivateRabbit {
        let mut r = PrivateRabbit::new(Vec::new());
        r.restart();
        r
    }

    /// A node not started yet, its ports and dirs chosen.
    pub fn new(env: Vec<(String, String)>) -> PrivateRabbit {
        let dir = tempfile::tempdir().unwrap();
        let port = ports::port();
        PrivateRabbit {
            node: format!("feedd_t_{}_{port}@localhost", std::process::id()),
            dist_port: ports::port(),
            dir,
            port,
            child: None,
            env,
        }
    }

    pub fn url(&self) -> String {
        url_on(self.port)
    }

    /// The Erlang node name (`name@localhost`).
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the node on the same data dir and ports (after `kill9`).
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_amqp();
    }

    /// Starts the node without waiting for it.
    pub fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("server.log"))
            .unwrap();
        let script = [
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
            "/usr/sbin/rabbitmq-server",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("rabbitmq-server (run .ci/setup)");
        let child = Command::new(script)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("none"))
            .env_remove("RABBITMQ_ALLOW_INPUT")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the node speaks AMQP (60 s at most).
    pub fn wait_amqp(&self) {
        let d = self.dir.path();
        let url = self.url();
        assert!(
            wait_until(Duration::from_secs(60), || Client::try_connect(&url)
                .is_some()),
            "private RabbitMQ did not start: {}",
            std::fs::read_to_string(d.join("server.log")).unwrap_or_default()
        );
    }

    /// SIGSTOP (`freeze`) or SIGCONT to the whole node: a host gone silent, its sockets open.
    pub fn pause(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let signal = if frozen {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            let _ = killpg(Pid::from_raw(c.id() as i32), signal);
        }
    }

    /// SIGKILL to the whole node (script and Erlang VM), as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
            // The VM is a child of the script: wait until the port is free again. Best effort
            // (this also runs in Drop, where a panic would abort): a `restart` on a port still
            // taken fails loudly anyway.
            let port = self.port;
            let _ = wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            });
        }
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.kill9();
    }
}
