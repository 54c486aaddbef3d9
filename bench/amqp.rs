//! `cargo bench --bench amqp`: feedd draining a pre-loaded RabbitMQ queue at 1, 10 and 100
//! records per message, and in the same run, on the same rows, broker and server:
//! (a) the database's own ceiling (1,000-row prepared multi-row INSERTs from 1 and 2
//! clients, the best), and (c) the consumer pattern of the daemon feedd replaces, done
//! honestly: prefetch 1, one autocommit INSERT per record, ack after it.
//!
//! A cell: fresh database and queue, N records published with confirms, then feedd started
//! (AMQP only) and timed until it has acked every delivery; median of 3 (1 with `--quick`).
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

fn preload(queue: &str, records: u64, per_msg: usize) -> u64 {
    let mq = Client::connect(&broker::shared_url());
    mq.delete(queue);
    let o = AmqpLoadOptions {
        url: broker::shared_url(),
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
fn seed_consumer(records: u64, per_msg: usize) -> f64 {
    let db = Db::create(&format!("amqpbench_seed_{per_msg}"));
    db.conn().query_drop(table_sql()).unwrap();
    let (queue, _) = broker::names(&format!("bench_seed_{per_msg}"));
    let messages = preload(&queue, records, per_msg);
    let mut conn = db.conn();
    let started = Instant::now();
    smol::block_on(async {
        let c = lapin::Connection::connect(&broker::shared_url(), Default::default())
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
    Client::connect(&broker::shared_url()).delete(&queue);
    rate
}

/// One feedd cell: records/s from feedd's start until every delivery is acked, the number
/// of threads feedd runs while draining, and its peak RSS in KiB.
fn feedd_cell(records: u64, per_msg: usize) -> (f64, usize, u64) {
    let db = Db::create(&format!("amqpbench_k{per_msg}"));
    let (queue, _) = broker::names(&format!("bench_k{per_msg}"));
    let messages = preload(&queue, records, per_msg);
    let (addr, listen) = harness::metrics_listen();
    let url = format!("amqp.url = {}", broker::shared_url());
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
    let rate = records as f64 / started.elapsed().as_secs_f64();
    let peak = std::fs::read_to_string(format!("/proc/{}/status", feedd.pid()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    feedd.signal(harness::Signal::SIGTERM);
    feedd.wait(Duration::from_secs(20));
    assert_eq!(db.count(), records);
    Client::connect(&broker::shared_url()).delete(&queue);
    (rate, threads, peak)
}

fn thread_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
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
        "{:>8} {:>10} {:>12} {:>12} {:>8} {:>8} {:>8} {:>8}",
        "rec/msg", "records", "feedd rec/s", "(c) rec/s", "× (a)", "× (c)", "threads", "RSS MiB"
    );
    for per_msg in [1usize, 10, 100] {
        let records: u64 = match (quick, per_msg) {
            (true, 1) => 5_000,
            (true, _) => 20_000,
            (false, 1) => 60_000,
            (false, 10) => 300_000,
            (false, _) => 600_000,
        };
        let seed_records = if quick { 1_000 } else { 5_000 };
        let c = median(
            (0..runs)
                .map(|_| seed_consumer(seed_records, per_msg))
                .collect(),
        );
        let cells: Vec<(f64, usize, u64)> =
            (0..runs).map(|_| feedd_cell(records, per_msg)).collect();
        let rate = median(cells.iter().map(|c| c.0).collect());
        let threads = cells.iter().map(|c| c.1).max().unwrap_or(0);
        let rss = cells.iter().map(|c| c.2).max().unwrap_or(0) as f64 / 1024.0;
        println!(
            "{per_msg:>8} {records:>10} {rate:>12.0} {c:>12.0} {:>8.2} {:>8.1} {threads:>8} {rss:>8.1}",
            rate / a,
            rate / c
        );
    }
}
