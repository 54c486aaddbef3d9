//! The client side: ZeroMQ REQ and DEALER clients (plain and CURVE), a client that resends what
//! went unanswered, the bodies they send, and plain HTTP for the metrics endpoint.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

thread_local! {
    static CONTEXT: zmq::Context = zmq::Context::new();
}

pub fn context() -> zmq::Context {
    CONTEXT.with(|c| c.clone())
}

/// A REQ client (like the PHP daemon's clients).
pub struct Req(pub zmq::Socket);

impl Req {
    pub fn connect(endpoint: &str) -> Req {
        let s = context().socket(zmq::REQ).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(20_000).unwrap();
        s.connect(endpoint).unwrap();
        Req(s)
    }

    /// Sends one message and returns the reply text.
    pub fn ask(&self, body: &str) -> String {
        self.0.send(body, 0).unwrap();
        let reply = self.0.recv_bytes(0).expect("a reply within 20 s");
        String::from_utf8(reply).unwrap()
    }
}

/// A DEALER client that keeps many messages in flight; replies are matched by an id frame
/// in the envelope (which the daemon echoes).
pub struct Dealer(pub zmq::Socket);

impl Dealer {
    pub fn connect(endpoint: &str) -> Dealer {
        let s = context().socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(30_000).unwrap();
        s.set_sndhwm(0).unwrap();
        s.set_rcvhwm(0).unwrap();
        s.connect(endpoint).unwrap();
        Dealer(s)
    }

    /// A DEALER that buffers little on its side (receive high-water mark `rcvhwm`, kernel
    /// receive buffer `rcvbuf` bytes), so replies it does not read back up into feedd.
    pub fn connect_tight(endpoint: &str, rcvhwm: i32, rcvbuf: i32) -> Dealer {
        let s = context().socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(30_000).unwrap();
        s.set_sndhwm(0).unwrap();
        s.set_rcvhwm(rcvhwm).unwrap();
        s.set_rcvbuf(rcvbuf).unwrap();
        s.connect(endpoint).unwrap();
        Dealer(s)
    }

    /// One DEALER connected to several feedd: messages spread round-robin over the live ones.
    /// `ZMQ_IMMEDIATE` keeps messages off a peer that is down (else they queue there).
    pub fn connect_all(endpoints: &[String]) -> Dealer {
        let s = context().socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(30_000).unwrap();
        s.set_sndhwm(0).unwrap();
        s.set_rcvhwm(0).unwrap();
        s.set_immediate(true).unwrap();
        for e in endpoints {
            s.connect(e).unwrap();
        }
        Dealer(s)
    }

    /// Sends `body` tagged with `id`: frames [id, "", body].
    pub fn send(&self, id: u64, body: &str) {
        self.0
            .send_multipart(
                [
                    id.to_string().into_bytes(),
                    Vec::new(),
                    body.as_bytes().to_vec(),
                ],
                0,
            )
            .unwrap();
    }

    /// The next reply: (id, text), or None on timeout.
    #[must_use]
    pub fn recv(&self) -> Option<(u64, String)> {
        let frames = self.0.recv_multipart(0).ok()?;
        let id = String::from_utf8_lossy(&frames[0]).parse().unwrap();
        assert!(frames[1].is_empty(), "the delimiter comes back");
        Some((
            id,
            String::from_utf8_lossy(frames.last().unwrap()).into_owned(),
        ))
    }

    /// Sends every body, then collects every reply: id → text.
    pub fn round_trip(&self, bodies: &[String]) -> HashMap<u64, String> {
        for (i, b) in bodies.iter().enumerate() {
            self.send(i as u64, b);
        }
        let mut replies = HashMap::new();
        while replies.len() < bodies.len() {
            let (id, text) = self.recv().expect("every reply within 30 s");
            assert!(
                replies.insert(id, text).is_none(),
                "message {id} answered twice"
            );
        }
        replies
    }

    /// Streams `bodies` keeping `window` in flight (id = index), as a client with a window
    /// does; stops when every reply is in or none came for `quiet`. Returns the replies and
    /// how many are missing (never resent).
    pub fn stream(
        &self,
        bodies: &[String],
        window: usize,
        quiet: Duration,
    ) -> (HashMap<u64, String>, usize) {
        self.0
            .set_rcvtimeo(i32::try_from(quiet.as_millis()).unwrap())
            .unwrap();
        let mut replies = HashMap::new();
        let mut next = 0;
        while replies.len() < bodies.len() {
            while next < bodies.len() && next - replies.len() < window {
                self.send(next as u64, &bodies[next]);
                next += 1;
            }
            let Some((id, text)) = self.recv() else { break };
            assert!(
                replies.insert(id, text).is_none(),
                "message {id} answered twice"
            );
        }
        let missing = bodies.len() - replies.len();
        (replies, missing)
    }

    /// A DEALER that authenticates with CURVE: the server's public key, this client's pair.
    pub fn connect_curve(endpoint: &str, server_public: &str, client: &(String, String)) -> Dealer {
        let s = context().socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(3_000).unwrap();
        s.set_curve_serverkey(&zmq::z85_decode(server_public).unwrap())
            .unwrap();
        s.set_curve_publickey(&zmq::z85_decode(&client.0).unwrap())
            .unwrap();
        s.set_curve_secretkey(&zmq::z85_decode(&client.1).unwrap())
            .unwrap();
        s.connect(endpoint).unwrap();
        Dealer(s)
    }

    /// Sends one body and waits (up to the socket's timeout) for its reply.
    #[must_use]
    pub fn ask(&self, body: &str) -> Option<String> {
        self.send(1, body);
        self.recv().map(|(_, text)| text)
    }
}

/// A client that keeps resending what was not answered, as feedd's users are told to:
/// every body is sent with id = its index; unanswered ones are resent after `patience`.
pub struct Resender {
    pub acked: HashSet<u64>,
    pub falses: Vec<String>,
    pub resent: u64,
}

impl Resender {
    /// `run` on a thread of its own, for tests that inject faults meanwhile.
    pub fn spawn(
        endpoint: String,
        bodies: &[String],
        patience: Duration,
    ) -> std::thread::JoinHandle<Resender> {
        let bodies = bodies.to_vec();
        std::thread::spawn(move || {
            Resender::run(&endpoint, &bodies, 64, patience, Duration::from_secs(90))
        })
    }

    /// Streams `bodies` (window `window`), resending until all are answered or `deadline`.
    pub fn run(
        endpoint: &str,
        bodies: &[String],
        window: usize,
        patience: Duration,
        deadline: Duration,
    ) -> Resender {
        Resender::run_on(
            Dealer::connect(endpoint),
            bodies,
            window,
            patience,
            deadline,
        )
    }

    /// `run` on a DEALER of the caller's (e.g. one connected to several feedd).
    pub fn run_on(
        dealer: Dealer,
        bodies: &[String],
        window: usize,
        patience: Duration,
        deadline: Duration,
    ) -> Resender {
        dealer.0.set_rcvtimeo(50).unwrap();
        let mut r = Resender {
            acked: Default::default(),
            falses: Vec::new(),
            resent: 0,
        };
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        let mut next = 0usize;
        let end = Instant::now() + deadline;
        while r.acked.len() + r.falses.len() < bodies.len() && Instant::now() < end {
            while sent_at.len() < window && next < bodies.len() {
                dealer.send(next as u64, &bodies[next]);
                sent_at.insert(next as u64, Instant::now());
                next += 1;
            }
            match dealer.recv() {
                Some((id, text)) => {
                    if sent_at.remove(&id).is_some() {
                        if text == "TRUE" {
                            r.acked.insert(id);
                        } else {
                            r.falses.push(text);
                        }
                    }
                }
                None => {
                    let stale: Vec<u64> = sent_at
                        .iter()
                        .filter(|(_, at)| at.elapsed() > patience)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in stale {
                        dealer.send(id, &bodies[id as usize]);
                        sent_at.insert(id, Instant::now());
                        r.resent += 1;
                    }
                }
            }
        }
        r
    }
}

/// A CURVE key pair as Z85 text: (public, secret).
pub fn curve_pair() -> (String, String) {
    let pair = zmq::CurveKeyPair::new().unwrap();
    (
        zmq::z85_encode(&pair.public_key).unwrap(),
        zmq::z85_encode(&pair.secret_key).unwrap(),
    )
}

/// `n` one-record bodies with tickets from `first`.
pub fn one_record_bodies(first: u64, n: u64) -> Vec<String> {
    (first..first + n)
        .map(|t| format!("{t},{},{}.25", t % 97, t % 1000))
        .collect()
}

/// `n` bodies of `per` records each, tickets from `first`, login/volume derived from the ticket.
pub fn bodies(first: u64, n: u64, per: u64) -> Vec<String> {
    (0..n)
        .map(|m| {
            (0..per)
                .map(|i| {
                    let t = first + m * per + i;
                    format!("{t},{},{}.5", t % 1000, t % 77)
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// GET `path` from `addr` (plain HTTP/1.0), returning the body.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of a metric line `name value` (first match, labels included in `name`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// One metric's value, scraped from the metrics endpoint at `addr` now.
pub fn scrape(addr: &str, name: &str) -> f64 {
    metric(&http_get(addr, "/metrics"), name)
}

/// feedd's (applied, failed) reload counters.
pub fn reload_counts(addr: &str) -> (f64, f64) {
    let text = http_get(addr, "/metrics");
    (
        metric(&text, "feedd_config_reloads_total"),
        metric(&text, "feedd_config_reload_failures_total"),
    )
}

/// Waits (20 s at most) until the reload counters are `want` (applied, failed).
pub fn wait_counts(addr: &str, want: (f64, f64)) {
    assert!(
        super::wait_until(Duration::from_secs(20), || reload_counts(addr) == want),
        "reload counts {:?}, wanted {want:?}",
        reload_counts(addr)
    );
}
