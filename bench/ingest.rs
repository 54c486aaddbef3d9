//! `cargo bench`: feedd's ingest rate and ack latency over a matrix of workers × batch_size ×
//! records per message, and in the same run, on the same rows and server, the two baselines:
//! (a) the database's own ceiling — 1,000-row multi-row INSERTs straight from 1, 2 and 4
//! clients (text and prepared), best of them; (b) the original PHP daemon's pattern — a REP
//! loop writing each record with INSERT 'N' + UPDATE 'Y', autocommit, one at a time.
//!
//! Every cell runs ≥ 3 s after a calibration run, median of 3. `-- --quick` (or
//! FEEDD_BENCH_QUICK=1) runs a small version for CI. Results go to target/bench/ingest.{csv,json}.
//! Needs MariaDB as the README's setup leaves it (or FEEDD_TEST_MYSQL_HOST/PORT).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Db, Feedd};
use feedd::load::{self, LoadOptions, LoadReport, Progress};
use mysql::prelude::Queryable;

struct Plan {
    quick: bool,
    runs: usize,
    min_secs: f64,
}

#[derive(Clone)]
struct Cell {
    workers: usize,
    batch_size: usize,
    per_msg: usize,
    in_flight: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_kib: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY,
         login BIGINT UNSIGNED NOT NULL, volume DECIMAL(20,4) NOT NULL,
         status CHAR(1) NOT NULL DEFAULT 'N') ENGINE=InnoDB"
    )
}

/// The row feedd-load sends for ticket t, so every way writes the same data.
fn row(t: u64) -> (u64, u64, String) {
    let r = load::record_for(t);
    (r.ticket, r.login, r.volume.to_string())
}

/// Messages in flight per client (4 clients): 32 for 1 record per message, 8 otherwise.
fn default_window(per_msg: usize) -> usize {
    if per_msg == 1 {
        32
    } else {
        8
    }
}

/// One feedd run: fresh database, feedd started with the cell's settings, load, stop.
fn run_feedd(
    workers: usize,
    batch_size: usize,
    per_msg: usize,
    window: usize,
    records: u64,
    rate: Option<f64>,
) -> (LoadReport, u64) {
    let db = Db::create(&format!("bench_w{workers}_b{batch_size}_k{per_msg}"));
    let w = format!("pipeline.workers = {workers}");
    let b = format!("pipeline.batch_size = {batch_size}");
    let mut feedd = Feedd::start(&db, &[&w, &b, "daemon.log_level = info"]);
    let options = LoadOptions {
        endpoint: feedd.endpoint(),
        records,
        clients: 4,
        window,
        per_msg,
        start_ticket: 1,
        reply_timeout: Duration::from_secs(30),
        curve: None,
        rate,
    };
    let report = load::run(&options, Arc::new(Progress::default())).expect("load run");
    assert!(report.ok(), "feedd run failed: {}", report.summary());
    let peak = peak_rss_kib(feedd.pid());
    feedd.signal(libc::SIGTERM);
    feedd.wait(Duration::from_secs(20));
    (report, peak)
}

fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Runs a measurement until it lasts ≥ min_secs (calibrating the size), then `runs` times.
fn measure<F: FnMut(u64) -> (f64, f64, f64, u64)>(
    plan: &Plan,
    start: u64,
    mut f: F,
) -> Vec<(f64, f64, f64, u64)> {
    let mut n = start;
    if !plan.quick {
        let (rate, ..) = f(n);
        n = ((rate * plan.min_secs * 1.15) as u64).max(n);
    }
    (0..plan.runs).map(|_| f(n)).collect()
}

fn cell(plan: &Plan, workers: usize, batch_size: usize, per_msg: usize, window: usize) -> Cell {
    let start = if plan.quick { 2_000 } else { 20_000 };
    let results = measure(plan, start, |n| {
        let (r, peak) = run_feedd(workers, batch_size, per_msg, window, n, None);
        (
            r.records_per_sec(),
            r.latency_ms(0.5),
            r.latency_ms(0.99),
            peak,
        )
    });
    Cell {
        workers,
        batch_size,
        per_msg,
        in_flight: 4 * window,
        rate: median(results.iter().map(|r| r.0).collect()),
        p50_ms: median(results.iter().map(|r| r.1).collect()),
        p99_ms: median(results.iter().map(|r| r.2).collect()),
        peak_rss_kib: results.iter().map(|r| r.3).max().unwrap_or(0),
    }
}

/// Baseline (a): 1,000-row INSERTs from `clients` connections; `prepared` uses the binary
/// protocol with 3,000 placeholders, else text statements. Returns rows/s.
fn db_ceiling(records: u64, clients: u64, prepared: bool) -> f64 {
    let db = Db::create(&format!("bench_ceiling_{clients}_{prepared}"));
    db.conn().query_drop(table_sql("fee")).unwrap();
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let mut conn = db.conn();
            let per = records / clients;
            std::thread::spawn(move || {
                let first = 1 + c * per;
                let stmt = prepared.then(|| {
                    let values = vec!["(?,?,?,'Y')"; 1000].join(",");
                    conn.prep(format!(
                        "INSERT INTO fee (ticket,login,volume,status) VALUES {values}"
                    ))
                    .unwrap()
                });
                let mut t = first;
                while t < first + per {
                    let n = 1000.min(first + per - t);
                    match (&stmt, n) {
                        (Some(stmt), 1000) => {
                            let params: Vec<mysql::Value> = (t..t + n)
                                .flat_map(|t| {
                                    let (a, b, v) = row(t);
                                    [a.into(), b.into(), v.into()]
                                })
                                .collect();
                            conn.exec_drop(stmt, params).unwrap();
                        }
                        _ => {
                            let mut sql = String::from(
                                "INSERT INTO fee (ticket,login,volume,status) VALUES ",
                            );
                            for t in t..t + n {
                                let (a, b, v) = row(t);
                                if t > first && !sql.ends_with(' ') {
                                    sql.push(',');
                                }
                                let _ = write!(sql, "({a},{b},{v},'Y')");
                            }
                            conn.query_drop(sql).unwrap();
                        }
                    }
                    t += n;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rate = (records / clients * clients) as f64 / started.elapsed().as_secs_f64();
    assert_eq!(db.count(), records / clients * clients);
    rate
}

/// Baseline (b): the PHP daemon's loop — REP socket, reply, INSERT 'N', UPDATE 'Y', autocommit,
/// one record at a time — driven by one REQ client. Returns records/s.
fn seed_pattern(records: u64) -> f64 {
    let db = Db::create("bench_seed");
    db.conn().query_drop(table_sql("fee")).unwrap();
    let port = common::free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let mut conn = db.conn();
    let server_endpoint = endpoint.clone();
    let server = std::thread::spawn(move || {
        let rep = common::context().socket(zmq::REP).unwrap();
        rep.bind(&server_endpoint).unwrap();
        for _ in 0..records {
            let msg = rep.recv_bytes(0).unwrap();
            rep.send("TRUE", 0).unwrap(); // the original acknowledged before writing
            let text = String::from_utf8(msg).unwrap();
            let f: Vec<&str> = text.split(',').collect();
            conn.exec_drop(
                "INSERT INTO fee (ticket,login,volume,status) VALUES (?,?,?,'N')",
                (f[0], f[1], f[2]),
            )
            .unwrap();
            conn.exec_drop("UPDATE fee SET status = 'Y' WHERE ticket = ?", (f[0],))
                .unwrap();
        }
    });
    let req = common::Req::connect(&endpoint);
    let started = Instant::now();
    for t in 1..=records {
        let (a, b, v) = row(t);
        assert_eq!(req.ask(&format!("{a},{b},{v}")), "TRUE");
    }
    server.join().unwrap();
    let rate = records as f64 / started.elapsed().as_secs_f64();
    assert_eq!(db.count(), records);
    rate
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var_os("FEEDD_BENCH_QUICK").is_some();
    let plan = Plan {
        quick,
        runs: if quick { 1 } else { 3 },
        min_secs: 3.0,
    };
    println!(
        "feedd ingest benchmark{} — {} cores",
        if quick { " (quick)" } else { "" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // Baseline (a): best of 1/2/4 clients, text and prepared.
    let ceiling_records = if quick { 20_000 } else { 600_000 };
    let mut ceilings = Vec::new();
    for clients in [1, 2, 4] {
        for prepared in [false, true] {
            let rates: Vec<f64> = (0..plan.runs)
                .map(|_| db_ceiling(ceiling_records, clients, prepared))
                .collect();
            let r = median(rates);
            println!(
                "  (a) database ceiling, {clients} client(s), {}: {r:.0} rows/s",
                if prepared { "prepared" } else { "text" }
            );
            ceilings.push(r);
        }
    }
    let ceiling = ceilings.iter().copied().fold(0.0, f64::max);
    // Baseline (b): the seed pattern.
    let seed_records = if quick { 500 } else { 8_000 };
    let seed = median((0..plan.runs).map(|_| seed_pattern(seed_records)).collect());
    println!("  (a) ceiling = {ceiling:.0} rows/s   (b) seed pattern = {seed:.0} records/s\n");

    let mut cells = Vec::new();
    println!(
        "{:>7} {:>10} {:>7} {:>12} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "workers",
        "batch_size",
        "rec/msg",
        "records/s",
        "p50 ms",
        "p99 ms",
        "× (a)",
        "× (b)",
        "RSS MiB"
    );
    for workers in [1, 2] {
        for batch_size in [100, 1000] {
            for per_msg in [1, 10, 100] {
                let c = cell(&plan, workers, batch_size, per_msg, default_window(per_msg));
                println!(
                    "{:>7} {:>10} {:>7} {:>12.0} {:>8.2} {:>8.2} {:>9.2} {:>9.1} {:>9.1}",
                    c.workers,
                    c.batch_size,
                    c.per_msg,
                    c.rate,
                    c.p50_ms,
                    c.p99_ms,
                    c.rate / ceiling,
                    c.rate / seed,
                    c.peak_rss_kib as f64 / 1024.0
                );
                cells.push(c);
            }
        }
    }

    // Ack latency at half the peak rate of the best 1-record-per-message cell.
    let best = cells
        .iter()
        .filter(|c| c.per_msg == 1)
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .cloned()
        .unwrap();
    let half = best.rate / 2.0;
    let records = if quick { 2_000 } else { (half * 4.0) as u64 };
    let p99s: Vec<f64> = (0..plan.runs)
        .map(|_| {
            run_feedd(
                best.workers,
                best.batch_size,
                1,
                default_window(1),
                records,
                Some(half),
            )
            .0
            .latency_ms(0.99)
        })
        .collect();
    let p99_half = median(p99s);
    println!("\nack latency p99 at half the peak 1-record rate ({half:.0} records/s, workers {}, batch_size {}): {p99_half:.2} ms", best.workers, best.batch_size);
    // Single records are bound by commit latency × messages in flight: a deeper window.
    let deep = cell(&plan, 1, 1000, 1, 256);
    println!(
        "1 record/message with 1,024 in flight (workers 1, batch_size 1000): {:.0} records/s, p99 {:.2} ms, {:.2} × (a), {:.1} × (b)",
        deep.rate,
        deep.p99_ms,
        deep.rate / ceiling,
        deep.rate / seed
    );
    cells.push(deep);
    let peak_rss = cells.iter().map(|c| c.peak_rss_kib).max().unwrap_or(0);
    println!(
        "peak feedd RSS over all cells: {:.1} MiB",
        peak_rss as f64 / 1024.0
    );

    write_results(&cells, ceiling, seed, p99_half, quick);
}

fn write_results(cells: &[Cell], ceiling: f64, seed: f64, p99_half: f64, quick: bool) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let mut csv = String::from("workers,batch_size,records_per_message,in_flight,records_per_sec,ack_p50_ms,ack_p99_ms,ratio_ceiling,ratio_seed,peak_rss_kib\n");
    let mut json = format!("{{\"quick\":{quick},\"ceiling_rows_per_sec\":{ceiling:.0},\"seed_records_per_sec\":{seed:.0},\"ack_p99_ms_at_half_peak\":{p99_half:.3},\"cells\":[");
    for (i, c) in cells.iter().enumerate() {
        let _ = writeln!(
            csv,
            "{},{},{},{},{:.0},{:.3},{:.3},{:.3},{:.2},{}",
            c.workers,
            c.batch_size,
            c.per_msg,
            c.in_flight,
            c.rate,
            c.p50_ms,
            c.p99_ms,
            c.rate / ceiling,
            c.rate / seed,
            c.peak_rss_kib
        );
        let _ = write!(
            json,
            "{}{{\"workers\":{},\"batch_size\":{},\"records_per_message\":{},\"in_flight\":{},\"records_per_sec\":{:.0},\"ack_p50_ms\":{:.3},\"ack_p99_ms\":{:.3},\"ratio_ceiling\":{:.3},\"ratio_seed\":{:.2},\"peak_rss_kib\":{}}}",
            if i > 0 { "," } else { "" }, c.workers, c.batch_size, c.per_msg, c.in_flight, c.rate, c.p50_ms, c.p99_ms, c.rate / ceiling, c.rate / seed, c.peak_rss_kib
        );
    }
    json.push_str("]}\n");
    let _ = std::fs::write(dir.join("ingest.csv"), csv);
    let _ = std::fs::write(dir.join("ingest.json"), json);
    println!("results: {}", dir.join("ingest.{csv,json}").display());
}
