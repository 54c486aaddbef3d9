//! `cargo bench --bench cluster`: what running past one machine costs here (SPEC §9). One
//! feedd writing to node 0 of a private 3-node Galera cluster on loopback, against one feedd
//! on a private single mariadbd with the same InnoDB settings, in the same run, at 100 and 1
//! records per message; printed with the Galera/single ratio. Then TLS: the single server
//! with a certificate, feedd with `tls = off` and `tls = verify_identity`, same run.
//!
//! All nodes share this machine's cores, so the ratio is the cost of synchronous replication
//! plus two more servers' CPU: on separate hosts the CPU part goes away, the network round
//! trip per COMMIT comes in. `-- --quick` (or FEEDD_BENCH_QUICK=1): one small run per cell.

#[path = "../tests/it/harness/mod.rs"]
// The bench uses only part of the test harness; the rest would warn as unused here.
#[allow(dead_code, unused_imports)]
mod harness;

#[path = "../src/bin/feedd-load/load.rs"]
#[allow(dead_code)]
mod load;

use std::sync::Arc;
use std::time::Duration;

use harness::cluster::GaleraCluster;
use harness::database::PrivateMariadb;
use harness::tls::{tls_args, Pki};
use harness::{Db, Feedd};
use load::{LoadOptions, Progress};

struct Plan {
    runs: usize,
    /// Records per run at 100 and at 1 record per message.
    records: [u64; 2],
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One feedd on the server at 127.0.0.1:`port` (fresh database), loaded with `records`
/// records at `per_msg` per message by 4 clients; records/s.
fn run(port: u16, name: &str, per_msg: usize, records: u64, extra: &[&str]) -> f64 {
    let db = Db::create_on(name, port);
    let mut overrides = vec!["pipeline.workers = 2", "daemon.log_level = info"];
    overrides.extend_from_slice(extra);
    let mut feedd = Feedd::start(&db, &overrides);
    let options = LoadOptions {
        endpoint: feedd.endpoint(),
        records,
        clients: 4,
        window: if per_msg == 1 { 32 } else { 8 },
        per_msg,
        start_ticket: 1,
        reply_timeout: Duration::from_secs(60),
        curve: None,
        rate: None,
    };
    let report = load::run(&options, Arc::new(Progress::default())).expect("load run");
    assert!(report.ok(), "feedd run failed: {}", report.summary());
    feedd.signal(harness::Signal::SIGTERM);
    feedd.wait(Duration::from_secs(20));
    report.records_per_sec()
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var_os("FEEDD_BENCH_QUICK").is_some();
    let plan = if quick {
        Plan {
            runs: 1,
            records: [20_000, 2_000],
        }
    } else {
        Plan {
            runs: 3,
            records: [200_000, 20_000],
        }
    };
    println!(
        "feedd cluster benchmark{} — {} cores, one feedd (2 workers, batch_size 1000, 4 clients)",
        if quick { " (quick)" } else { "" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if !harness::cluster::available() {
        println!("galera-4 is not installed (.ci/setup installs it): skipped");
        return;
    }
    // The single node gets the Galera nodes' InnoDB settings, so only replication differs;
    // it offers TLS (not required) for the TLS cells.
    let pki = Pki::generate();
    let mut args = tls_args(&pki);
    args.push("--innodb-buffer-pool-size=64M".into());
    let single = PrivateMariadb::start_with(&args);
    let started = std::time::Instant::now();
    let cluster = GaleraCluster::start();
    println!(
        "3-node Galera cluster formed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:>7} {:>14} {:>14} {:>8}",
        "rec/msg", "single rec/s", "galera rec/s", "ratio"
    );
    for (per_msg, records) in [(100, plan.records[0]), (1, plan.records[1])] {
        let mut singles = Vec::new();
        let mut galeras = Vec::new();
        // Interleaved, so drift on a shared machine hits both alike.
        for i in 0..plan.runs {
            singles.push(run(
                single.port,
                &format!("bc_s{per_msg}_{i}"),
                per_msg,
                records,
                &[],
            ));
            galeras.push(run(
                cluster.port(0),
                &format!("bc_g{per_msg}_{i}"),
                per_msg,
                records,
                &[],
            ));
        }
        let (s, g) = (median(singles), median(galeras));
        println!("{per_msg:>7} {s:>14.0} {g:>14.0} {:>8.2}", g / s);
    }
    drop(cluster);

    let verify = [
        "mysql.tls = verify_identity".to_string(),
        format!("mysql.tls_ca_file = {}", pki.ca().display()),
    ];
    let verify: Vec<&str> = verify.iter().map(String::as_str).collect();
    println!(
        "\n{:>7} {:>14} {:>14} {:>8}",
        "rec/msg", "tls off rec/s", "verify rec/s", "ratio"
    );
    for (per_msg, records) in [(100, plan.records[0]), (1, plan.records[1])] {
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        for i in 0..plan.runs {
            plain.push(run(
                single.port,
                &format!("bt_o{per_msg}_{i}"),
                per_msg,
                records,
                &[],
            ));
            tls.push(run(
                single.port,
                &format!("bt_v{per_msg}_{i}"),
                per_msg,
                records,
                &verify,
            ));
        }
        let (p, t) = (median(plain), median(tls));
        println!("{per_msg:>7} {p:>14.0} {t:>14.0} {:>8.2}", t / p);
    }
}
