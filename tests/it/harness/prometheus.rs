//! A real Prometheus (Debian's `prometheus`, `.ci/setup` installs it) in a temp dir of its own:
//! its own TSDB, a listen port from `ports`, scraping one feedd every second and evaluating a
//! copy of `conf/prometheus/feedd-rules.yml` with minutes turned into seconds, so an alert's
//! `for:` passes within a test. Queries go through its HTTP API; dropping it kills it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{clients::http_get, ports, wait_until};

/// The rules as shipped.
pub fn rules_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/prometheus/feedd-rules.yml")
}

/// The rules with every `[Nm]` range and `for: Nm` scaled to `N * secs_per_minute` seconds.
pub fn scaled_rules(text: &str, secs_per_minute: u32) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // A duration in minutes: digits after `[` or `for: `, then `m` and a `]` or line end.
    while let Some(i) = rest.find(|c: char| c.is_ascii_digit()) {
        let (before, from) = rest.split_at(i);
        let digits = from.len() - from.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, after) = from.split_at(digits);
        let opens = before.ends_with('[') || before.ends_with("for: ");
        let minutes = after.starts_with("m]") || after.starts_with("m\n");
        out.push_str(before);
        if opens && minutes {
            let n: u32 = number.parse().unwrap();
            out.push_str(&format!("{}s", n * secs_per_minute));
            rest = &after[1..];
        } else {
            out.push_str(number);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

pub struct Prometheus {
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Prometheus {
    /// Starts a server scraping `target` (host:port of feedd's /metrics) as job `feedd`, every
    /// second, with `rules`; returns once it is ready.
    pub fn start(target: &str, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\n\
             scrape_configs:\n  - job_name: feedd\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", ports::port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(super::database::binary("prometheus"))
            .current_dir(dir.path())
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (bash .ci/setup installs it)");
        let server = Prometheus { addr, dir, child };
        assert!(
            wait_until(Duration::from_secs(30), || server.ready()),
            "prometheus did not start: {}",
            server.log()
        );
        server
    }

    fn ready(&self) -> bool {
        std::net::TcpStream::connect(&self.addr).is_ok()
            && http_get(&self.addr, "/-/ready").contains("Ready")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>?<params>`: the answer's `data`, after asserting `status: success`.
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let body = http_get(&self.addr, &format!("/api/v1/{path}?{query}"));
        let mut answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}?{query}: {e}: {body}"));
        assert_eq!(answer["status"], "success", "{path}?{query}: {body}");
        answer["data"].take()
    }

    /// The result vector of an instant query.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self.api("query", &[("query", expr)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The states of the alerts named `name` now: "pending" or "firing"; empty when inactive.
    pub fn alert_states(&self, name: &str) -> Vec<String> {
        let data = self.api("alerts", &[]);
        data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn minutes_become_seconds_in_ranges_and_for_only() {
    let rules = "expr: rate(x[2m]) > 5\n        for: 10m\n  - record: a:rate1m\n";
    assert_eq!(
        scaled_rules(rules, 5),
        "expr: rate(x[10s]) > 5\n        for: 50s\n  - record: a:rate1m\n"
    );
}
