//! `feedd-load`: drives a running feedd and reports records/s and ack latency.
//!
//! A binary of its own, outside the daemon's library: `load` (ZeroMQ DEALER clients, HDR
//! latency) and `amqp` (publisher with confirms) are its modules, and the benches include
//! them by path, so `hdrhistogram` and `indicatif` are never linked into the daemon.

#![deny(unsafe_code)]

mod amqp;
mod load;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use feedd::config::CurveKey;
use load::{LoadOptions, Progress};

#[derive(Parser)]
#[command(name = "feedd-load", version, about = "Load generator for feedd")]
struct Cli {
    /// feedd's endpoint
    #[arg(long, default_value = "tcp://127.0.0.1:5555")]
    endpoint: String,
    /// Records to send in all
    #[arg(long)]
    records: u64,
    /// DEALER clients (threads)
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Messages in flight per client
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Records per message
    #[arg(long, default_value_t = 1)]
    per_msg: usize,
    /// First ticket (clients take consecutive ranges)
    #[arg(long, default_value_t = 1)]
    start_ticket: u64,
    /// Offer at most this many records/s in all (default: as fast as the window allows)
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds without any reply before giving up
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// CURVE: the server's Z85 public key
    #[arg(long, requires = "curve_client_key")]
    curve_server_key: Option<String>,
    /// CURVE: this client's Z85 secret key
    #[arg(long, requires = "curve_server_key")]
    curve_client_key: Option<String>,
    /// AMQP instead of ZeroMQ: publish to this broker URL with confirms, wait for the drain
    #[arg(long, requires = "queue")]
    amqp: Option<String>,
    /// AMQP: the queue feedd consumes
    #[arg(long)]
    queue: Option<String>,
    /// AMQP: feedd's metrics address (host:port), to also wait until every delivery is acked
    #[arg(long)]
    metrics: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let (Some(url), Some(queue)) = (&cli.amqp, &cli.queue) {
        let options = amqp::AmqpLoadOptions {
            url: url.clone(),
            queue: queue.clone(),
            records: cli.records,
            per_msg: cli.per_msg,
            start_ticket: cli.start_ticket,
            metrics: cli.metrics.clone(),
            timeout: Duration::from_secs(cli.timeout),
        };
        return match amqp::run(&options) {
            Ok(report) => {
                println!("{}", report.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("feedd-load: {e}");
                ExitCode::from(1)
            }
        };
    }
    let curve = match (&cli.curve_server_key, &cli.curve_client_key) {
        (Some(s), Some(c)) => match (CurveKey::from_z85(s), CurveKey::from_z85(c)) {
            (Ok(s), Ok(c)) => Some((s, c)),
            (Err(e), _) => return fail(&format!("--curve-server-key: {e}")),
            (_, Err(e)) => return fail(&format!("--curve-client-key: {e}")),
        },
        _ => None,
    };
    let options = LoadOptions {
        endpoint: cli.endpoint,
        records: cli.records,
        clients: cli.clients,
        window: cli.window,
        per_msg: cli.per_msg,
        start_ticket: cli.start_ticket,
        reply_timeout: Duration::from_secs(cli.timeout),
        curve,
        rate: cli.rate,
    };
    let progress = Arc::new(Progress::default());
    let shown = Arc::clone(&progress);
    let total = options.records;
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let display = std::thread::spawn(move || show_progress(&shown, total, &stop_rx));
    let result = load::run(&options, progress);
    drop(stop_tx);
    let _ = display.join();
    match result {
        Err(e) => fail(&e.to_string()),
        Ok(report) => {
            println!("{}", report.summary());
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "feedd-load: {} FALSE and {} missing replies",
                    report.falses, report.missing
                );
                ExitCode::from(1)
            }
        }
    }
}

/// A progress bar on a terminal, a plain line every few seconds otherwise.
fn show_progress(progress: &Progress, total: u64, stop: &crossbeam_channel::Receiver<()>) {
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(total);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} records  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut ticks = 0u64;
    // Runs until the sender is dropped (the load is over).
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
        stop.recv_timeout(Duration::from_millis(200))
    {
        let done = progress.records_acked.load(Ordering::Relaxed);
        bar.set_position(done);
        ticks += 1;
        if !tty && ticks.is_multiple_of(25) {
            eprintln!("feedd-load: {done}/{total} records acknowledged");
        }
        if done >= total {
            break;
        }
    }
    bar.finish_and_clear();
}

fn fail(reason: &str) -> ExitCode {
    eprintln!("feedd-load: {reason}");
    ExitCode::from(2)
}
