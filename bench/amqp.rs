//! `cargo bench --bench amqp`: feedd draining a pre-loaded RabbitMQ queue at 1, 10 and 100
//! records per message, on each target (a classic and a quorum queue on the shared node, and in
//! a full run a quorum queue on a private 3-node cluster with feedd given all three URLs; a
//! target is a broker URL list; FEEDD_BENCH_NO_CLUSTER=1 skips it), and in the same run, on the
//! same rows, broker and server: (a) the database's own ceiling (1,000-row prepared multi-row
//! INSERTs from 1 and 2 clients, the best), (b) the broker's own ceiling for that target and
//! message size (a bare lapin consumer: prefetch 2,000, a `multiple` ack per 500 deliveries,
//! nothing else), and (c) the consumer pattern of the daemon feedd replaces, done honestly:
//! prefetch 1, one autocommit INSERT per record, ack after it (classic queue only).
//!
//! A cell: fresh database and queue, N records published with confirms, then feedd started
//! (AMQP only) and timed until it has acked every delivery; median of 3 (1 with `--quick`).
//! Also per delivery: feedd's and the broker's CPU µs (from /proc; the shared broker's counts
//! whatever else uses it). `FEEDD_TEST_BIN=path` runs another feedd build (an A/B run).
//! Needs RabbitMQ and MariaDB as .ci/setup leaves them.

#[path = "../tests/it/harness/mod.rs"]
// The bench uses only part of the test harness; the rest would warn as unused here.
#[allow(dead_code, unused_imports)]
mod harness;

#[path = "../src/bin/feedd-load/amqp.rs"]
#[allow(dead_code)]
mod amqp_load;
#[path = "../src/bin/feedd-load/load.rs"]
#[allow(dead_code)]
mod load;

use std::time::{Duration, Instant};

use amqp_load::AmqpLoadOptions;
use harness::broker::{self, Client};
use harness::rabbit_cluster::RabbitCluster;
use harness::{Db, Feedd};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use mysql::prelude::Queryable;
use smol::stream::StreamExt;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn table_sql() -> &'static str {
    "CREATE TABLE IF NOT EXISTS fee (ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY,
     login BIGINT UNSIGNED NOT NULL, volume DECIMAL(20,4) NOT NULL,
     status CHAR(1) NOT NULL DEFAULT 'N') ENGINE=InnoDB"
}

/// Where a cell runs: broker URLs (feedd's `[amqp] url` list; the bench's own clients use the
/// first) and the queue type it declares before publishing.
struct Target {
    name: &'static str,
    urls: Vec<String>,
    quorum: bool,
    /// The broker's Erlang VM, for its CPU time (0: not measured).
    beam: i32,
}

impl Target {
    fn url(&self) -> &str {
        &self.urls[0]
    }
}

fn preload(target: &Target, queue: &str, records: u64, per_msg: usize) -> u64 {
    let mq = Client::connect(target.url());
    mq.delete(queue);
    if target.quorum {
        mq.declare_quorum(queue, 20);
    }
    let o = AmqpLoadOptions {
        url: target.url().to_string(),
        queue: queue.to_string(),
        records,
        per_msg,
        start_ticket: 1,
        metrics: None,
        timeout: Duration::from_secs(60),
    };
    amqp_load::publish(&o).expect("publish").0
}

/// (a): 1,000-row prepared INSERTs from `clients` connections; rows/s.
fn ceiling(records: u64, clients: u64) -> f64 {
    let db = Db::create(&format!("amqpbench_ceiling_{clients}"));
    db.conn().query_drop(table_sql()).unwrap();
    let per = records / clients;
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let mut conn = db.conn();
            std::thread::spawn(move || {
                let values = vec!["(?,?,?,'Y')"; 1000].join(",");
                let stmt = conn
                    .prep(format!(
                        "INSERT INTO fee (ticket,login,volume,status) VALUES {values}"
                    ))
                    .unwrap();
                let first = 1 + c * per;
                let mut t = first;
                while t + 1000 <= first + per {
                    let params: Vec<mysql::Value> = (t..t + 1000)
                        .flat_map(|t| {
                            let r = load::record_for(t);
                            [r.ticket.into(), r.login.into(), r.volume.to_string().into()]
                        })
                        .collect();
                    conn.exec_drop(&stmt, params).unwrap();
                    t += 1000;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (per / 1000 * 1000 * clients) as f64 / started.elapsed().as_secs_f64()
}

/// (c): prefetch 1, one autocommit INSERT per record, ack after it; records/s.
fn seed_consumer(target: &Target, records: u64, per_msg: usize) -> f64 {
    let db = Db::create(&format!("amqpbench_seed_{per_msg}"));
    db.conn().query_drop(table_sql()).unwrap();
    let (queue, _) = broker::names(&format!("bench_seed_{per_msg}"));
    let messages = preload(target, &queue, records, per_msg);
    let mut conn = db.conn();
    let started = Instant::now();
    smol::block_on(async {
        let c = lapin::Connection::connect(target.url(), Default::default())
            .await
            .unwrap();
        let ch = c.create_channel().await.unwrap();
        ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..messages {
            let d = consumer.next().await.unwrap().unwrap();
            let body = String::from_utf8(d.data.clone()).unwrap();
            for line in body.lines() {
                let f: Vec<&str> = line.split(',').collect();
                conn.exec_drop(
                    "INSERT INTO fee (ticket,login,volume,status) VALUES (?,?,?,'Y')",
                    (f[0], f[1], f[2]),
                )
                .unwrap();
            }
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .unwrap();
        }
        let _ = c.close(200, "".into()).await;
    });
    let rate = records as f64 / started.elapsed().as_secs_f64();
    assert_eq!(db.count(), records);
    Client::connect(target.url()).delete(&queue);
    rate
}

/// (b): what the broker alone delivers of `records` (`per_msg` a message) to a bare lapin
/// consumer (prefetch 2,000, a `multiple` ack per 500 deliveries, no other work); records/s.
fn broker_ceiling(target: &Target, records: u64, per_msg: usize) -> f64 {
    let (queue, _) = broker::names(&format!("bench_broker_{per_msg}"));
    let messages = preload(target, &queue, records, per_msg);
    let started = Instant::now();
    let (got, end) = bare_consumer(target.url(), &queue, messages);
    assert_eq!(got, messages);
    Client::connect(target.url()).delete(&queue);
    records as f64 / (end - started).as_secs_f64()
}

/// The shared broker's Erlang VM (the oldest `beam.smp` of user rabbitmq).
fn broker_pid() -> i32 {
    if let Some(p) = std::env::var("FEEDD_BENCH_BEAM")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return p;
    }
    let out = std::process::Command::new("pgrep")
        .args(["-o", "-u", "rabbitmq", "beam.smp"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out.parse().unwrap_or(0)
}

/// CPU seconds a process's live threads have used so far (schedstat: nanoseconds, where
/// /proc/<pid>/stat counts 10 ms ticks).
fn cpu_secs(pid: i32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Consumes `most` deliveries from `queue` (fewer if none comes for 10 s); deliveries taken
/// and when the last one came.
fn bare_consumer(url: &str, queue: &str, most: u64) -> (u64, Instant) {
    smol::block_on(async {
        let c = lapin::Connection::connect(url, Default::default())
            .await
            .unwrap();
        let ch = c.create_channel().await.unwrap();
        ch.basic_qos(2000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (mut n, mut acked) = (0u64, 0u64);
        let mut at = Instant::now();
        while n < most {
            use smol::future::FutureExt;
            let next = async { consumer.next().await }
                .or(async {
                    smol::Timer::after(Duration::from_secs(10)).await;
                    None
                })
                .await;
            let Some(d) = next else { break };
            n += 1;
            let last = d.unwrap().delivery_tag;
            at = Instant::now();
            if n - acked >= 500 || n == most {
                ch.basic_ack(last, BasicAckOptions { multiple: true })
                    .await
                    .unwrap();
                acked = n;
            }
        }
        let _ = c.close(200, "".into()).await;
        (n, at)
    })
}

/// One feedd run's measures.
struct Cell {
    /// Records/s from feedd's start (connect and declares included) to the last ack.
    rate: f64,
    /// Records/s from its READY=1 to the last ack.
    drain: f64,
    /// Mean records per committed batch.
    per_batch: f64,
    threads: usize,
    peak_kib: u64,
    /// CPU µs per delivery from READY to the last ack: feedd's, the broker's.
    feedd_us: f64,
    broker_us: f64,
}

/// One feedd run on `target`: every delivery acked, every record stored once.
fn feedd_cell(target: &Target, records: u64, per_msg: usize) -> Cell {
    let db = Db::create(&format!("amqpbench_k{per_msg}"));
    let (queue, _) = broker::names(&format!("bench_k{per_msg}"));
    let messages = preload(target, &queue, records, per_msg);
    let (addr, listen) = harness::metrics_listen();
    let url = format!("amqp.url = {}", target.urls.join(", "));
    let q = format!("amqp.queue = {queue}");
    let dlx = format!("amqp.dead_letter_exchange = {queue}.rejected");
    let started = Instant::now();
    let mut feedd = Feedd::start(
        &db,
        &[
            &url,
            &q,
            &dlx,
            &listen,
            "zmq.endpoint =",
            "daemon.log_level = info",
            "pipeline.workers = 2",
        ],
    );
    let ready = Instant::now();
    let cpu0 = (cpu_secs(target.beam), cpu_secs(feedd.pid()));
    let mut threads = 0;
    let done = harness::wait_until(Duration::from_secs(600), || {
        threads = threads.max(thread_count(feedd.pid()));
        amqp_load::feedd_acks(&addr) == Some(messages)
    });
    assert!(
        done,
        "feedd did not drain the queue:\n{}",
        feedd.stderr_log()
    );
    let (rate, drain) = (
        records as f64 / started.elapsed().as_secs_f64(),
        records as f64 / ready.elapsed().as_secs_f64(),
    );
    let cpu1 = (cpu_secs(target.beam), cpu_secs(feedd.pid()));
    let batch = |m: &str| harness::clients::scrape(&addr, &format!("feedd_batch_records_{m}"));
    let per_batch = batch("sum") / batch("count").max(1.0);
    let peak_kib = std::fs::read_to_string(format!("/proc/{}/status", feedd.pid()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    feedd.signal(harness::Signal::SIGTERM);
    feedd.wait(Duration::from_secs(20));
    assert_eq!(db.count(), records);
    Client::connect(target.url()).delete(&queue);
    let per_delivery = |secs: f64| secs * 1e6 / messages as f64;
    Cell {
        rate,
        drain,
        per_batch,
        threads,
        peak_kib,
        feedd_us: per_delivery(cpu1.1 - cpu0.1),
        broker_us: if target.beam > 0 {
            per_delivery(cpu1.0 - cpu0.0)
        } else {
            f64::NAN
        },
    }
}

fn thread_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The targets of this run: a classic and a quorum queue on the shared node, and (a full run)
/// a quorum queue on a private 3-node cluster, led by the node feedd's list names first.
fn targets(cluster: Option<&RabbitCluster>) -> Vec<Target> {
    let shared = || vec![broker::shared_url()];
    let mut targets = vec![
        Target {
            name: "classic, 1 node",
            urls: shared(),
            quorum: false,
            beam: broker_pid(),
        },
        Target {
            name: "quorum, 1 node",
            urls: shared(),
            quorum: true,
            beam: broker_pid(),
        },
    ];
    if let Some(c) = cluster {
        targets.push(Target {
            name: "quorum-3, 3 nodes",
            urls: (0..c.len()).map(|i| c.url(i)).collect(),
            quorum: true,
            // Three Erlang VMs: not summed here.
            beam: 0,
        });
    }
    targets
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var_os("FEEDD_BENCH_QUICK").is_some();
    let runs = if quick { 1 } else { 3 };
    println!(
        "feedd AMQP benchmark{} — {} cores",
        if quick { " (quick)" } else { "" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let ceiling_records = if quick { 20_000 } else { 400_000 };
    let a = [1, 2]
        .into_iter()
        .map(|c| median((0..runs).map(|_| ceiling(ceiling_records, c)).collect()))
        .fold(0.0, f64::max);
    println!("  (a) database ceiling (best of 1 and 2 clients, prepared 1,000-row INSERTs): {a:.0} rows/s");
    println!(
        "{:<16} {:>7} {:>8} {:>11} {:>11} {:>10} {:>10} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "queue",
        "rec/msg",
        "records",
        "feedd rec/s",
        "from READY",
        "(b) rec/s",
        "(c) rec/s",
        "× (a)",
        "× (b)",
        "× (c)",
        "feedd µs",
        "broker µs",
        "rec/batch",
        "threads",
        "RSS MiB"
    );
    // FEEDD_BENCH_ONLY=classic:1 runs one line (an A/B run with FEEDD_TEST_BIN).
    let only = std::env::var("FEEDD_BENCH_ONLY").unwrap_or_default();
    // The cluster's cells in a full run only: its start-up alone is 20-30 s.
    // A FEEDD_BENCH_ONLY line of another target does not start it (its Erlang VMs would
    // share the cores with the line measured).
    let cluster = (!quick
        && std::env::var_os("FEEDD_BENCH_NO_CLUSTER").is_none()
        && (only.is_empty() || only.starts_with("quorum-3")))
    .then(|| RabbitCluster::start(3));
    for target in targets(cluster.as_ref()) {
        for per_msg in [1usize, 10, 100] {
            let line = format!("{}:{per_msg}", target.name.split(',').next().unwrap_or(""));
            if !only.is_empty() && only != line {
                continue;
            }
            run_cells(&target, per_msg, quick, runs, a);
        }
    }
}

/// One line of the table: (b), (c) on a classic queue, and feedd's runs.
fn run_cells(target: &Target, per_msg: usize, quick: bool, runs: usize, a: f64) {
    let records: u64 = match (quick, per_msg) {
        (true, 1) => 5_000,
        (true, _) => 20_000,
        (false, 1) => 60_000,
        (false, 10) => 300_000,
        (false, _) => 600_000,
    };
    let b = median(
        (0..runs)
            .map(|_| broker_ceiling(target, records, per_msg))
            .collect(),
    );
    let seed_records = if quick { 1_000 } else { 5_000 };
    let c = if target.quorum {
        f64::NAN
    } else {
        median(
            (0..runs)
                .map(|_| seed_consumer(target, seed_records, per_msg))
                .collect(),
        )
    };
    let cells: Vec<Cell> = (0..runs)
        .map(|_| feedd_cell(target, records, per_msg))
        .collect();
    let med = |f: fn(&Cell) -> f64| median(cells.iter().map(f).collect());
    let rate = med(|c| c.rate);
    let threads = cells.iter().map(|c| c.threads).max().unwrap_or(0);
    let rss = cells.iter().map(|c| c.peak_kib).max().unwrap_or(0) as f64 / 1024.0;
    println!(
        "{:<16} {per_msg:>7} {records:>8} {rate:>11.0} {:>11.0} {b:>10.0} {c:>10.0} {:>6.2} {:>6.2} {:>6.1} {:>8.1} {:>8.1} {:>9.0} {threads:>7} {rss:>7.1}",
        target.name,
        med(|c| c.drain),
        rate / a,
        rate / b,
        rate / c,
        med(|c| c.feedd_us),
        med(|c| c.broker_us),
        med(|c| c.per_batch),
    );
}
