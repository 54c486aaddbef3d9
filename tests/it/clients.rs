//! The clients users copy (clients/): each runs as a real PHP or Python program against the
//! real feedd, and its rows are checked; the REQ clients also against a feedd that is killed
//! (SIGKILL) and restarted mid-run, and still end with every record stored once; the PHP AMQP
//! producer publishes through the exchange feedd binds its queue to.
//!
//! They need php-cli + php-zmq (+ php-amqp for the AMQP producer) and Python with pyzmq
//! (`.ci/setup` installs them). Without them a test says so and passes, except under CI (`CI`
//! set), where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// A missing interpreter: skipped with a message, or a failure under CI.
fn missing(what: &str) -> Option<Command> {
    let msg = format!("{what} not installed (bash .ci/setup installs it)");
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    eprintln!("SKIPPED: {msg}");
    None
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `php` with the zmq extension, or None.
fn php() -> Option<Command> {
    if succeeds("php", &["-r", "exit(class_exists('ZMQContext') ? 0 : 1);"]) {
        Some(Command::new("php"))
    } else {
        missing("php-cli with php-zmq")
    }
}

/// A Python that imports zmq: the one on PATH, else Debian's (python3-zmq), or None.
fn python() -> Option<Command> {
    ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| succeeds(p, &["-c", "import zmq"]))
        .map(Command::new)
        .or_else(|| missing("python3 with pyzmq"))
}

/// The command line for one client: interpreter, script, options, endpoint, records file.
fn client(which: &str, endpoint: &str, records: &Path, options: &[&str]) -> Option<Command> {
    let (mut cmd, script) = match which {
        "php-req" => (php()?, clients_dir().join("php/feedd_req.php")),
        "py-req" => (python()?, clients_dir().join("python/feedd_req.py")),
        "py-dealer" => (python()?, clients_dir().join("python/feedd_dealer.py")),
        other => panic!("no client {other}"),
    };
    // PHP's getopt stops at the first operand: options first, for every client alike.
    cmd.arg(script)
        .args(options)
        .arg(endpoint)
        .arg(records)
        .stdin(Stdio::null());
    Some(cmd)
}

/// `n` records from ticket `first`, one per line, written to a file in `dir`.
fn records_file(dir: &Path, first: u64, n: u64) -> (PathBuf, String) {
    let text = bodies(first, 1, n).remove(0);
    let path = dir.join(format!("records-{first}.csv"));
    std::fs::write(&path, format!("{text}\n")).unwrap();
    (path, text)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every record of `records` stored with its values, and nothing else in the table.
fn assert_stored_once(db: &Db, records: &str, n: u64) {
    let rows = db.rows();
    let missing = missing_records(records, &rows);
    assert!(missing.is_empty(), "missing or different: {missing:?}");
    assert_eq!(rows.len() as u64, n, "one row per record");
}

fn sends_a_batch(which: &str, options: &[&str], test: &str) {
    let db = Db::create(test);
    let f = Feedd::start(&db, &[]);
    let (path, records) = records_file(f.dir.path(), 1, 1000);
    let Some(mut cmd) = client(which, &f.endpoint(), &path, options) else {
        return;
    };
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1000 records sent, 0 messages refused"),
        "{}",
        text(&out)
    );
    assert_stored_once(&db, &records, 1000);

    // A message with a malformed record is refused whole; the client says so and exits 1.
    let bad = f.dir.path().join("bad.csv");
    std::fs::write(&bad, "5001,1,1.5\n5002,x,1\n").unwrap();
    let Some(mut cmd) = client(which, &f.endpoint(), &bad, &[]) else {
        return;
    };
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FALSE line 2"),
        "{}",
        text(&out)
    );
    assert_eq!(db.count(), 1000, "nothing of the refused message stored");
}

#[test]
fn php_req_client_stores_a_batch() {
    sends_a_batch("php-req", &["--per-message=50"], "c_php");
}

#[test]
fn python_req_client_stores_a_batch() {
    sends_a_batch("py-req", &["--per-message", "50"], "c_pyreq");
}

#[test]
fn python_dealer_client_stores_a_batch() {
    sends_a_batch(
        "py-dealer",
        &["--per-message", "20", "--window", "8"],
        "c_pydealer",
    );
}

/// The client's output once it exits (killed after `timeout`).
fn wait_child(mut child: Child, timeout: Duration) -> Output {
    let until = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A REQ client keeps resending across a feedd killed with SIGKILL and started again.
fn survives_a_killed_feedd(which: &str, options: &[&str], test: &str) {
    let db = Db::create(test);
    let mut f = Feedd::start(&db, &[]);
    let n = 5000;
    let (path, records) = records_file(f.dir.path(), 1, n);
    let Some(mut cmd) = client(which, &f.endpoint(), &path, options) else {
        return;
    };
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    assert!(
        wait_until(Duration::from_secs(60), || db.count() >= n / 10),
        "the client made no progress"
    );
    f.signal(Signal::SIGKILL);
    f.wait(Duration::from_secs(10));
    let stored_at_kill = db.count();
    // Same dir, same port: the client's endpoint comes back.
    let f = f.spawn_foreground();

    let out = wait_child(child, Duration::from_secs(120));
    let resends = String::from_utf8_lossy(&out.stderr)
        .matches("resending")
        .count();
    eprintln!("{which}: killed with {stored_at_kill}/{n} stored; {resends} resends");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_stored_once(&db, &records, n);
    drop(f);
}

#[test]
fn php_req_client_survives_a_killed_feedd() {
    survives_a_killed_feedd(
        "php-req",
        &["--per-message=10", "--timeout-ms=1000", "--retries=30"],
        "c_php_kill",
    );
}

#[test]
fn python_req_client_survives_a_killed_feedd() {
    survives_a_killed_feedd(
        "py-req",
        &[
            "--per-message",
            "10",
            "--timeout-ms",
            "1000",
            "--retries",
            "30",
        ],
        "c_pyreq_kill",
    );
}

/// `php` with the AMQP extension the seed's producers used, or None.
fn php_amqp() -> Option<Command> {
    if succeeds(
        "php",
        &["-r", "exit(class_exists('AMQPConnection') ? 0 : 1);"],
    ) {
        Some(Command::new("php"))
    } else {
        missing("php-cli with php-amqp")
    }
}

/// The seed's producer kind (php-amqp, publisher confirms, persistent) publishing to the
/// exchange feedd binds its queue to: every record stored once, also when it all is sent
/// again; a routing key bound to nothing is reported, not counted as sent.
#[test]
fn php_amqp_producer_publishes_through_the_exchange() {
    use crate::harness::broker::{self, Client};
    let db = Db::create("c_php_amqp");
    let (queue, _) = broker::names("php_amqp");
    let x = format!("{queue}.in");
    let mq = Client::connect(&broker::shared_url());
    mq.delete(&queue);
    mq.delete_exchange(&x);
    let (addr, listen) = metrics_listen();
    let exchange = format!("amqp.exchange = {x}");
    let f = Feedd::start_owned(
        &db,
        &broker::amqp_overrides(&broker::shared_url(), &queue, false, &[&exchange, &listen]),
    );
    let (path, records) = records_file(f.dir.path(), 1, 2000);
    let script = clients_dir().join("php/feedd_amqp_publish.php");
    let run = |key: &str| -> Option<Output> {
        let mut cmd = php_amqp()?;
        // The URL from the environment ("-"): the password stays off the command line.
        cmd.arg(&script)
            .arg("--per-message=10")
            .arg(format!("--routing-key={key}"))
            .arg("-")
            .arg(&x)
            .arg(&path)
            .env("FEEDD_AMQP_URL", broker::shared_url())
            .stdin(Stdio::null());
        Some(cmd.output().unwrap())
    };
    // [amqp] routing_key empty: bound with the queue's name, as the seed's consumer did.
    let Some(out) = run(&queue) else { return };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("200 messages confirmed, 0 refused"),
        "{}",
        text(&out)
    );
    wait_rows(&db, 2000, 30, &f);
    // Everything again (a producer that lost its confirms resends): stored once.
    let Some(out) = run(&queue) else { return };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        wait_until(Duration::from_secs(20), || scrape(
            &addr,
            "feedd_amqp_acks_total"
        ) == 400.0),
        "every delivery acked"
    );
    assert_stored_once(&db, &records, 2000);
    // Bound to nothing: returned by the broker, and the producer fails.
    let Some(out) = run("not-bound") else { return };
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("312 NO_ROUTE"),
        "{}",
        text(&out)
    );
    assert_eq!(scrape(&addr, "feedd_amqp_dead_letters_total"), 0.0);
    mq.delete(&queue);
    mq.delete_exchange(&x);
}
