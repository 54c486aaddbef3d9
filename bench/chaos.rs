//! The chaos run: `cargo bench --bench chaos -- --secs 600`.
//!
//! A supervised feedd daemon on a private mariadbd and a private RabbitMQ node (with `--cluster`:
//! three clustered nodes, a quorum queue, `[amqp] url` listing all three), a ZeroMQ client
//! that streams messages and resends whatever is not answered, an AMQP publisher (publisher
//! confirms; republishes what was not confirmed), and an injector that, at random every 1–4 s,
//! kills the database or the broker (a random node of the cluster; restarting it 1–3 s later),
//! kills the serving child,
//! upgrades (`feedd upgrade`; one during a database outage rolls back), reloads with a changed
//! config, or sends SIGUSR1. Afterwards the client resends until
//! everything it sent is answered and feedd drains the queue, and the run prints messages
//! sent / acknowledged / resent, published / confirmed, faults injected,
//! acknowledged-but-missing-or-different (ZeroMQ: every acknowledged ticket holds exactly the
//! values sent, status 'Y') and published-but-missing (AMQP: every confirmed publish committed),
//! both must be 0, and dead letters (must be 0). Exit status 1 if any is not 0, or on any FALSE.

#[path = "../tests/it/harness/mod.rs"]
// The bench uses only part of the test harness; the rest would warn as unused here.
#[allow(dead_code, unused_imports)]
mod harness;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::broker::{Client, PrivateRabbit};
use harness::database::PrivateMariadb;
use harness::rabbit_cluster::RabbitCluster;
use harness::{Db, Dealer, Feedd};
use mysql::prelude::Queryable;

/// xorshift64: enough randomness to pick faults, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

const PER_MSG: u64 = 4;

fn body(id: u64) -> String {
    (0..PER_MSG)
        .map(|i| {
            let t = id * PER_MSG + i + 1;
            format!("{t},{},{}.25", t % 1000, t % 97)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// AMQP messages take tickets from here on (ZeroMQ ones stay below).
const AMQP_BASE: u64 = 1 << 32;

/// The broker side: one private node, or three clustered (`--cluster`).
enum Broker {
    One(PrivateRabbit),
    Cluster(RabbitCluster),
}

impl Broker {
    /// Started, with the queue `fee` declared (a quorum queue on a cluster, and the dead-letter
    /// queue too: a classic one on a killed node would fail every reconnect's declare).
    fn start(cluster: bool) -> Broker {
        if !cluster {
            let one = PrivateRabbit::start();
            Client::connect(&one.url()).declare("fee");
            return Broker::One(one);
        }
        let c = RabbitCluster::start(3);
        let (_, mq) = c.client(0);
        mq.declare_quorum("fee", 1_000);
        mq.declare_quorum("feedd.rejected", 1_000);
        Broker::Cluster(c)
    }

    /// Every node's URL, in `[amqp] url` order.
    fn urls(&self) -> Vec<String> {
        match self {
            Broker::One(one) => vec![one.url()],
            Broker::Cluster(c) => (0..c.len()).map(|i| c.url(i)).collect(),
        }
    }

    /// Kills -9 one node (node `pick` modulo the count) and restarts it after `pause`.
    fn kill_one(&mut self, pick: u64, pause: Duration) {
        match self {
            Broker::One(one) => {
                one.kill9();
                std::thread::sleep(pause);
                one.restart();
            }
            Broker::Cluster(c) => {
                let i = pick as usize % c.len();
                c.kill9(i);
                std::thread::sleep(pause);
                c.restart(i);
            }
        }
    }

    fn client(&self) -> Client {
        match self {
            Broker::One(one) => Client::connect(&one.url()),
            Broker::Cluster(c) => c.client(0).1,
        }
    }
}

/// Publishes `body(AMQP_BASE + id)` for ids 0.. until `stop`, 20 at a time with confirms; a
/// batch not wholly confirmed (node gone, or nacked while the queue had no leader) is published
/// again on a new connection, to the next node of `urls`.
/// Returns how many ids were confirmed (all ids below it) and how many publishes were repeated.
fn publisher(urls: Vec<String>, stop: Arc<AtomicBool>) -> (u64, u64) {
    let (mut confirmed, mut repeated, mut at) = (0u64, 0u64, 0usize);
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_ref() else {
            client = Client::try_connect(&urls[at % urls.len()]);
            at += 1;
            if client.is_none() {
                std::thread::sleep(Duration::from_millis(300));
            }
            continue;
        };
        let bodies: Vec<String> = (confirmed..confirmed + 20)
            .map(|id| body(AMQP_BASE + id))
            .collect();
        if c.try_publish("fee", &bodies) {
            confirmed += 20;
        } else {
            repeated += 20;
            client = None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (confirmed, repeated)
}

#[derive(Default)]
struct Faults {
    broker_kills: u64,
    db_kills: u64,
    child_kills: u64,
    upgrades: u64,
    /// Upgrades that rolled back (the new child could not get ready, e.g. the database down).
    upgrades_refused: u64,
    reloads: u64,
    usr1: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(60);
    let cluster = args.iter().any(|a| a == "--cluster");
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id()) | 1;
    println!(
        "chaos run: {secs} s of faults, seed {seed}, broker: {}",
        if cluster {
            "3-node cluster, quorum queue"
        } else {
            "one node"
        }
    );

    let server = Arc::new(parking_lot::Mutex::new(PrivateMariadb::start()));
    let port = server.lock().port;
    let db = Db::create_on("chaos", port);
    let broker = Arc::new(parking_lot::Mutex::new(Broker::start(cluster)));
    let amqp_urls = broker.lock().urls();
    // A short heartbeat: a node that dies silently is left in seconds (lapin reads the URL).
    let url_line = format!(
        "amqp.url = {}?heartbeat=5",
        amqp_urls.join("?heartbeat=5, ")
    );
    let feedd = Feedd::prepare(
        &db,
        &[
            "daemon.log_level = info",
            "daemon.shutdown_timeout_ms = 3000",
            &url_line,
        ],
    );
    feedd.start_daemon();
    let conf = std::fs::read_to_string(feedd.conf_path()).unwrap_or_default();

    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let (urls, stop) = (amqp_urls.clone(), Arc::clone(&stop));
        std::thread::spawn(move || publisher(urls, stop))
    };
    let injector = {
        let (stop, server, broker) = (Arc::clone(&stop), Arc::clone(&server), Arc::clone(&broker));
        let pidfile_pid = feedd.daemon_pid();
        let conf_path = feedd.conf_path();
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut f = Faults::default();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1000 + rng.next(3000)));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match rng.next(6) {
                    5 => {
                        let upgraded = std::process::Command::new(harness::feedd_bin())
                            .args(["upgrade", "--conf"])
                            .arg(&conf_path)
                            .current_dir(conf_path.parent().unwrap_or(Path::new(".")))
                            .output()
                            .is_ok_and(|out| out.status.success());
                        f.upgrades += 1;
                        f.upgrades_refused += u64::from(!upgraded);
                    }
                    4 => {
                        let (pick, pause) = (rng.next(3), 1000 + rng.next(2000));
                        broker.lock().kill_one(pick, Duration::from_millis(pause));
                        f.broker_kills += 1;
                    }
                    0 => {
                        server.lock().kill9();
                        std::thread::sleep(Duration::from_millis(1000 + rng.next(2000)));
                        server.lock().restart();
                        f.db_kills += 1;
                    }
                    1 => {
                        if let Some(child) = harness::children_of(pidfile_pid).first() {
                            harness::kill(*child, harness::Signal::SIGKILL);
                            f.child_kills += 1;
                        }
                    }
                    2 => {
                        let batch = [10, 100, 1000][rng.next(3) as usize];
                        let text = conf.replace(
                            "[pipeline]\n",
                            &format!("[pipeline]\nbatch_size = {batch}\n"),
                        );
                        let _ = std::fs::write(&conf_path, text);
                        harness::kill(pidfile_pid, harness::Signal::SIGHUP);
                        f.reloads += 1;
                    }
                    _ => {
                        harness::kill(pidfile_pid, harness::Signal::SIGUSR1);
                        f.usr1 += 1;
                    }
                }
            }
            f
        })
    };

    // The client: new messages while the faults go on, then only resends until all answered.
    let dealer = Dealer::connect(&feedd.endpoint());
    let _ = dealer.0.set_rcvtimeo(20);
    let window = 64;
    let patience = Duration::from_secs(3);
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut acked: HashSet<u64> = HashSet::new();
    let (mut sent, mut resent, mut falses, mut replies_after_ack) = (0u64, 0u64, Vec::new(), 0u64);
    let chaos_until = Instant::now() + Duration::from_secs(secs);
    let give_up = chaos_until + Duration::from_secs(120);
    let mut stopped = false;
    while Instant::now() < give_up {
        if !stopped && Instant::now() >= chaos_until {
            stop.store(true, Ordering::Relaxed);
            stopped = true;
        }
        if stopped && in_flight.is_empty() {
            break;
        }
        while !stopped && in_flight.len() < window {
            dealer.send(sent, &body(sent));
            in_flight.insert(sent, Instant::now());
            sent += 1;
        }
        match dealer.recv() {
            Some((id, text)) => {
                if text != "TRUE" {
                    falses.push(text);
                } else if in_flight.remove(&id).is_some() {
                    acked.insert(id);
                } else {
                    replies_after_ack += 1; // the answer to an earlier copy of a resent message
                }
            }
            None => {
                let stale: Vec<u64> = in_flight
                    .iter()
                    .filter(|(_, at)| at.elapsed() > patience)
                    .map(|(id, _)| *id)
                    .collect();
                for id in stale {
                    dealer.send(id, &body(id));
                    in_flight.insert(id, Instant::now());
                    resent += 1;
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let faults = injector.join().unwrap_or_default();
    let (published, republished) = publishing.join().unwrap_or_default();
    // feedd drains the queue: nothing ready, and every confirmed publish committed.
    let mq = broker.lock().client();
    let drained = harness::wait_until(Duration::from_secs(120), || mq.ready("fee") == 0);
    let amqp_missing_at = |conn: &mut mysql::Conn| -> u64 {
        let first = AMQP_BASE * PER_MSG + 1;
        let n: u64 = conn
            .query_first(format!(
                "SELECT COUNT(*) FROM fee WHERE ticket >= {first} AND ticket < {} AND status = 'Y'",
                first + published * PER_MSG
            ))
            .ok()
            .flatten()
            .unwrap_or(0);
        published * PER_MSG - n
    };
    let mut conn = server.lock().create_db(&db.name);
    // Whether it settled is reported by the count read right after, not asserted here.
    let _ = harness::wait_until(Duration::from_secs(60), || amqp_missing_at(&mut conn) == 0);
    let amqp_missing = amqp_missing_at(&mut conn);
    let dead_letters = mq.drain("feedd.rejected").len();

    // The invariant, read from the table.
    let rows: HashMap<u64, (u64, String, String)> = conn
        .query_map(
            "SELECT ticket, login, CAST(volume AS CHAR), status FROM fee",
            |(t, l, v, s): (u64, u64, String, String)| (t, (l, v, s)),
        )
        .unwrap_or_default()
        .into_iter()
        .collect();
    let missing: u64 = acked
        .iter()
        .filter(|id| **id < AMQP_BASE)
        .map(|id| harness::missing_records(&body(*id), &rows).len() as u64)
        .sum();
    println!(
        "messages sent:                {sent} ({} records)",
        sent * PER_MSG
    );
    println!("messages acknowledged:        {}", acked.len());
    println!("messages resent:              {resent} (late answers to earlier copies: {replies_after_ack})");
    println!("never answered:               {}", in_flight.len());
    println!(
        "AMQP messages confirmed:      {published} ({} records; republished after a broker loss: {republished})",
        published * PER_MSG
    );
    println!("AMQP queue drained:           {drained}");
    println!(
        "faults injected:              {} (broker kill -9: {}, database kill -9: {}, serving child kill -9: {}, upgrades: {} ({} rolled back), reloads: {}, SIGUSR1: {})",
        faults.broker_kills
            + faults.db_kills
            + faults.child_kills
            + faults.upgrades
            + faults.reloads
            + faults.usr1,
        faults.broker_kills,
        faults.db_kills,
        faults.child_kills,
        faults.upgrades,
        faults.upgrades_refused,
        faults.reloads,
        faults.usr1
    );
    println!("FALSE replies:                {}", falses.len());
    println!("acknowledged-but-missing-or-different: {missing} (ZeroMQ)");
    println!("published-but-missing:        {amqp_missing} records (AMQP)");
    println!("dead letters:                 {dead_letters}");
    let log_errors = feedd
        .log()
        .lines()
        .filter(|l| l.contains("panicked"))
        .count();
    println!("panics in the log:            {log_errors}");
    let log = feedd.log();
    let moves = log
        .lines()
        .filter(|l| l.contains("amqp: broker ") && l.contains(" → "))
        .count();
    println!("AMQP broker moves:            {moves}");
    feedd.stop_daemon();
    if missing > 0
        || amqp_missing > 0
        || dead_letters > 0
        || !drained
        || !falses.is_empty()
        || !in_flight.is_empty()
        || log_errors > 0
    {
        println!("CHAOS RUN FAILED");
        std::process::exit(1);
    }
    println!("chaos run passed");
}
