//! What feedd shows about itself: metrics (SPEC §7) counting known traffic, the metrics
//! listener's bounds against hostile HTTP clients, and feedd-load (SPEC §8) against a running
//! feedd.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use crate::harness::ports;
use crate::harness::*;

#[test]
fn metrics_count_known_traffic() {
    let db = Db::create("metrics");
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start(&db, &[&listen]);
    let before = http_get(&addr, "/metrics");
    for name in [
        "feedd_messages_received_total",
        "feedd_messages_rejected_total",
        "feedd_records_committed_total",
        "feedd_queue_depth",
        "feedd_db_errors_total",
        "feedd_config_reloads_total",
        "feedd_config_reload_failures_total",
        "feedd_batch_commit_seconds_count",
        "feedd_ack_latency_seconds_count",
    ] {
        assert_eq!(metric(&before, name), 0.0, "{name}");
    }
    assert!(before.contains("feedd_build_info{version=\""));
    let req = Req::connect(&feedd.endpoint());
    assert_eq!(req.ask("1,1,1\n2,1,1\n3,1,1"), "TRUE");
    assert_eq!(req.ask("4,1,1"), "TRUE");
    assert!(req.ask("5,1,x").starts_with("FALSE"));
    assert!(req.ask("1,9,1").starts_with("FALSE conflict"));
    let after = http_get(&addr, "/metrics");
    assert_eq!(metric(&after, "feedd_messages_received_total"), 4.0);
    assert_eq!(metric(&after, "feedd_messages_rejected_total"), 2.0);
    assert_eq!(metric(&after, "feedd_records_committed_total"), 4.0);
    assert!(metric(&after, "feedd_batch_commit_seconds_count") >= 2.0);
    assert!(metric(&after, "feedd_ack_latency_seconds_count") >= 3.0);
    assert!(http_get(&addr, "/nothing").contains("not found"));

    // Reload counters, and a reload that moves the listener.
    let conf = std::fs::read_to_string(feedd.conf_path()).unwrap();
    std::fs::write(feedd.conf_path(), "[pipeline]\nbatch_size = none\n").unwrap();
    feedd.signal(Signal::SIGHUP);
    feedd.wait_for_log("reload failed", Duration::from_secs(10));
    let moved = format!("127.0.0.1:{}", ports::port());
    std::fs::write(feedd.conf_path(), conf.replace(&addr, &moved)).unwrap();
    feedd.signal(Signal::SIGHUP);
    feedd.wait_for_log("config reloaded", Duration::from_secs(10));
    let text = http_get(&moved, "/metrics");
    assert_eq!(metric(&text, "feedd_config_reload_failures_total"), 1.0);
    assert_eq!(metric(&text, "feedd_config_reloads_total"), 1.0);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the old listener is closed"
    );
}

#[test]
fn feedd_load_commits_exactly_n_rows_and_reports_them() {
    let db = Db::create("load_tool");
    let feedd = Feedd::start(&db, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args([
            "--endpoint",
            &feedd.endpoint(),
            "--records",
            "5003",
            "--clients",
            "3",
            "--window",
            "16",
            "--per-msg",
            "10",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("5003 records in 501 messages acknowledged"),
        "{stdout}"
    );
    assert!(stdout.contains("p99.9"), "{stdout}");
    assert_eq!(db.count(), 5003);
    // Sending the same again conflicts nowhere (same values): all TRUE, no new rows.
    let again = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args([
            "--endpoint",
            &feedd.endpoint(),
            "--records",
            "100",
            "--rate",
            "2000",
        ])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(db.count(), 5003);
}

#[test]
fn feedd_load_fails_on_false_and_missing_replies() {
    let db = Db::create("load_tool_fail");
    let feedd = Feedd::start(&db, &[]);
    // Ticket 3 stored with another login: the load's message for it is a conflict.
    assert_eq!(Req::connect(&feedd.endpoint()).ask("3,12345,1"), "TRUE");
    let out = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args(["--endpoint", &feedd.endpoint(), "--records", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 FALSE"));
    // Nobody listening: missing replies after the timeout.
    let out = Command::new(env!("CARGO_BIN_EXE_feedd-load"))
        .args([
            "--endpoint",
            &format!("tcp://127.0.0.1:{}", ports::port()),
            "--records",
            "5",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 missing"));
    let _ = Duration::ZERO;
}

#[test]
fn metrics_listener_bounds_size_time_and_connections() {
    let db = Db::create("hostile_metrics");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    assert!(http_get(&addr, "/metrics").contains("feedd_queue_depth"));
    let before = f.rss_kib();

    // One endless header line: cut off after a few KiB, costing no memory.
    let mut huge = std::net::TcpStream::connect(&addr).unwrap();
    huge.write_all(b"GET /metrics HTTP/1.1\r\nX-Big: ").unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 64 << 20 {
        match huge.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 64 << 20, "the server kept reading a 64 MiB header");
    let grown = f.rss_kib().saturating_sub(before);
    assert!(grown < 4 * 1024, "RSS grew by {grown} KiB");

    // Silent connections are closed within the request deadline, however many there are.
    let started = Instant::now();
    let mut idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = Vec::new();
        match s.read_to_end(&mut sink) {
            Ok(_) => {}
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "an idle connection was kept open: {e}"
            ),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(http_get(&addr, "/metrics").contains("feedd_queue_depth"));
}

#[test]
fn committed_counts_rows_and_acknowledged_counts_answers() {
    let db = Db::create("hostile_counters");
    let (addr, listen) = metrics_listen();
    let f = Feedd::start(&db, &[&listen]);
    let req = Req::connect(&f.endpoint());
    for _ in 0..3 {
        assert_eq!(req.ask("1,1,1\n2,1,1\n3,1,1"), "TRUE");
    }
    let text = http_get(&addr, "/metrics");
    assert_eq!(metric(&text, "feedd_records_committed_total"), 3.0);
    // Counted once the reply is handed to the client's pipe, a moment after it may be read.
    let acknowledged = "feedd_records_acknowledged_total";
    assert!(wait_until(Duration::from_secs(5), || scrape(
        &addr,
        acknowledged
    ) == 9.0));
    assert_eq!(db.count(), 3);
}

/// Connections to 127.0.0.1:`port` the server side still holds (ESTABLISHED or CLOSE_WAIT in
/// /proc/net/tcp, local port `port`).
fn server_side_connections(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next().unwrap_or("");
            u16::from_str_radix(local_port, 16) == Ok(port) && matches!(fields[3], "01" | "08")
        })
        .count()
}

/// A reply whose client went away between its message and the COMMIT cannot be handed over:
/// it is counted in `feedd_replies_dropped_total` (and the record is committed all the same).
#[test]
fn a_reply_to_a_client_gone_before_the_commit_is_counted_as_dropped() {
    let db = Db::create("replies_dropped");
    let (addr, listen) = metrics_listen();
    let feedd = Feedd::start(&db, &[&listen]);
    // The table is locked, so the message waits in its batch until the test unlocks it.
    let mut lock = db.conn();
    lock.query_drop("LOCK TABLES fee WRITE").unwrap();
    let gone = Dealer::connect(&feedd.endpoint());
    gone.send(1, "1,1,1");
    assert!(wait_until(Duration::from_secs(10), || scrape(
        &addr,
        "feedd_messages_received_total"
    ) == 1.0));
    drop(gone);
    // feedd's side of the connection closed: libzmq has let go of the peer.
    assert!(
        wait_until(Duration::from_secs(10), || server_side_connections(
            feedd.port
        ) == 0),
        "feedd still holds the connection"
    );
    let dropped = "feedd_replies_dropped_total{reason=\"peer_gone\"}";
    assert_eq!(scrape(&addr, dropped), 0.0);
    lock.query_drop("UNLOCK TABLES").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || scrape(&addr, dropped) == 1.0),
        "the reply to the gone client is not counted"
    );
    assert_eq!(db.count(), 1, "committed all the same");
    // Acknowledged counts replies handed to a live pipe only.
    assert_eq!(scrape(&addr, "feedd_records_acknowledged_total"), 0.0);
}

/// The `feedd_…` metric names an expression text uses.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("feedd_") {
        let from = &rest[i..];
        let end = from
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(from.len());
        names.insert(from[..end].to_string());
        rest = &from[end..];
    }
    names
}

/// The type a metric name promises: `_total` a counter, a histogram's series by their suffix
/// (and its base name when `_bucket` is named too), else a gauge.
fn promised_type<'a>(
    name: &'a str,
    names: &std::collections::BTreeSet<String>,
) -> (&'a str, &'static str) {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return (base, "histogram");
        }
    }
    if names.contains(&format!("{name}_bucket")) {
        (name, "histogram")
    } else if name.ends_with("_total") {
        (name, "counter")
    } else {
        (name, "gauge")
    }
}

/// Every panel query of the dashboard with its variables filled in, by panel title.
fn dashboard_queries(rate_interval: &str) -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/grafana/feedd.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let filled = expr
                .replace("$__rate_interval", rate_interval)
                .replace("$instance", ".*");
            out.push((panel["title"].as_str().unwrap().to_string(), filled));
        }
    }
    out
}

/// A DEALER sending a 10-record message every 20 ms until stopped, then waiting for every
/// reply: (messages sent, replies by text).
fn steady_load(
    endpoint: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, std::collections::HashMap<String, u64>)> {
    std::thread::spawn(move || {
        let dealer = Dealer::connect(&endpoint);
        dealer.0.set_rcvtimeo(20).unwrap();
        let mut replies = std::collections::HashMap::new();
        let mut got = 0u64;
        let mut sent = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            dealer.send(sent, &bodies(1 + sent * 10, 1, 10)[0]);
            sent += 1;
            while let Some((_, text)) = dealer.recv() {
                *replies.entry(text).or_insert(0) += 1;
                got += 1;
            }
        }
        let until = Instant::now() + Duration::from_secs(60);
        while got < sent && Instant::now() < until {
            if let Some((_, text)) = dealer.recv() {
                *replies.entry(text).or_insert(0) += 1;
                got += 1;
            }
        }
        (sent, replies)
    })
}

/// A real Prometheus scraping a real feedd every second: every metric the rules and the
/// dashboard name exists with its type and labels, every dashboard query returns data, the
/// rules load, and the database alert fires while a private MariaDB is stopped and resolves
/// when it is back; `up == 0` fires once feedd is gone.
#[test]
fn a_real_prometheus_scrapes_feedd_and_the_rules_fire_and_resolve() {
    use crate::harness::prometheus::{rules_path, scaled_rules, Prometheus};
    let started = Instant::now();
    let mut server = PrivateMariadb::start();
    let db = Db::create_on("prometheus", server.port);
    let (addr, listen) = metrics_listen();
    let mut feedd = Feedd::start(&db, &[&listen]);
    // One rule minute is 5 s here: `for: 1m` waits 5 s, `rate(x[2m])` looks 10 s back.
    let rules = std::fs::read_to_string(rules_path()).unwrap();
    let prometheus = Prometheus::start(&addr, &scaled_rules(&rules, 5));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = steady_load(feedd.endpoint(), stop.clone());

    // Every dashboard query answers with data once a few scrapes of the load are in.
    let queries = dashboard_queries("15s");
    let empty = |p: &Prometheus| -> Vec<String> {
        queries
            .iter()
            .filter(|(_, q)| p.query(q).is_empty())
            .map(|(t, q)| format!("{t}: {q}"))
            .collect()
    };
    let ready = wait_until(Duration::from_secs(40), || {
        empty(&prometheus).is_empty()
            && !prometheus
                .query("rate(feedd_records_committed_total[15s]) > 0")
                .is_empty()
    });
    assert!(
        ready,
        "dashboard queries without data: {:#?}",
        empty(&prometheus)
    );
    // The throughput and latency panels show numbers, not NaN or zero.
    for expr in [
        "sum(rate(feedd_records_committed_total{instance=~\".*\"}[15s]))",
        "histogram_quantile(0.99, sum by (le) (rate(feedd_ack_latency_seconds_bucket{instance=~\".*\"}[15s])))",
        "histogram_quantile(0.99, sum by (le) (rate(feedd_batch_commit_seconds_bucket{instance=~\".*\"}[15s])))",
    ] {
        assert!(queries.iter().any(|(_, q)| q == expr), "the dashboard has {expr}");
        let value = &prometheus.query(expr)[0]["value"][1];
        let v: f64 = value.as_str().unwrap().parse().unwrap();
        assert!(v.is_finite() && v > 0.0, "{expr} = {value}");
    }

    // Every metric the rules and the dashboard name: its series, its type, its labels.
    let dashboard_text: String = queries.iter().map(|(_, q)| format!("{q}\n")).collect();
    let names = metric_names(&format!("{rules}\n{dashboard_text}"));
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        let (base, kind) = promised_type(name, &names);
        let meta = prometheus.api("metadata", &[("metric", base)]);
        assert_eq!(meta[base][0]["type"], kind, "{name}: {meta}");
        let series = match kind {
            "histogram" if name == base => prometheus.query(&format!("{name}_count")),
            _ => prometheus.query(&format!("{{__name__=\"{name}\"}}")),
        };
        assert!(!series.is_empty(), "no series {name}");
        for s in &series {
            let labels = &s["metric"];
            assert_eq!(labels["job"], "feedd", "{s}");
            assert_eq!(labels["instance"].as_str(), Some(addr.as_str()), "{s}");
            let needs = match name.as_str() {
                n if n.ends_with("_bucket") => Some("le"),
                "feedd_db_host_active" => Some("host"),
                _ => None,
            };
            if let Some(label) = needs {
                assert!(labels[label].is_string(), "{name} has no {label}: {s}");
            }
        }
    }
    // The rules loaded and evaluate cleanly; the recording rules have data.
    let groups = prometheus.api("rules", &[]);
    for group in groups["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    }
    let recorded = || {
        !prometheus
            .query("feedd:records_committed:rate1m")
            .is_empty()
    };
    assert!(
        wait_until(Duration::from_secs(10), recorded),
        "no recorded rate: {groups}"
    );
    assert!(prometheus.alert_states("FeeddDatabaseErrors").is_empty());

    // The database goes away: batches fail and are retried, the alert fires.
    server.stop();
    let firing = |name: &str| prometheus.alert_states(name).iter().any(|s| s == "firing");
    assert!(
        wait_until(Duration::from_secs(60), || firing("FeeddDatabaseErrors")),
        "FeeddDatabaseErrors did not fire; alerts: {}",
        prometheus.api("alerts", &[])
    );
    let fired_after = started.elapsed();
    assert!(
        !prometheus.query("feedd_queue_depth > 0").is_empty(),
        "records wait in the queue"
    );
    server.restart();
    assert!(
        wait_until(Duration::from_secs(60), || prometheus
            .alert_states("FeeddDatabaseErrors")
            .is_empty()),
        "FeeddDatabaseErrors did not resolve: {}",
        prometheus.api("alerts", &[])
    );
    let resolved_after = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, replies) = load.join().unwrap();
    assert_eq!(
        replies.get("TRUE"),
        Some(&sent),
        "every message acknowledged: {replies:?}"
    );
    assert_eq!(db.count(), sent * 10);

    // feedd gone: `up` drops to 0 and FeeddDown fires.
    feedd.signal(Signal::SIGTERM);
    let _ = feedd.wait(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || firing("FeeddDown")),
        "FeeddDown did not fire: {}",
        prometheus.api("alerts", &[])
    );
    eprintln!(
        "prometheus: {} metric names checked, {} dashboard queries with data, {sent} messages; \
         database alert fired at {fired_after:?}, resolved at {resolved_after:?}, FeeddDown at {:?}",
        names.len(),
        queries.len(),
        started.elapsed()
    );
}
