//! The ZAP handler: decides which CURVE clients may connect (RFC 27, ZeroMQ Authentication
//! Protocol). Its own thread owns a REP socket bound at `inproc://zeromq.zap.01` in the same
//! context as the ROUTER, bound before the ROUTER so no handshake goes unjudged.
//!
//! The allowlist comes from the live config (`curve_allowed_clients`, re-read on SIGHUP), so a
//! reload admits or drops keys for new connections. With no allowlist, any client holding a
//! valid CURVE key pair may connect (encryption without client authentication). Refusals are
//! counted and logged at most once per interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{Config, CurveKey};
use crate::metrics::Metrics;

pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// At most one refusal log line per this interval; the rest are counted into it.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What to answer a handshake (pure; the thread below only does the socket work).
pub fn decide(
    mechanism: &[u8],
    client_key: Option<&[u8]>,
    allowed: &[CurveKey],
    has_list: bool,
) -> bool {
    if mechanism != b"CURVE" {
        return false;
    }
    let Some(key) = client_key.and_then(|k| <[u8; 32]>::try_from(k).ok()) else {
        return false;
    };
    !has_list || allowed.binary_search(&CurveKey(key)).is_ok()
}

pub struct ZapHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ZapHandler {
    /// Binds the ZAP socket (now, so the caller can bind the ROUTER after) and starts the thread.
    pub fn start(
        context: &zmq::Context,
        config: Arc<ArcSwap<Config>>,
        metrics: Metrics,
    ) -> Result<ZapHandler, zmq::Error> {
        let socket = context.socket(zmq::REP)?;
        socket.set_linger(0)?;
        socket.bind(ZAP_ENDPOINT)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("zap".into())
            .spawn(move || {
                if let Err(e) = serve(&socket, &config, &metrics, &stopping) {
                    log::error!("zap: handler stopped: {e}; new CURVE clients cannot connect");
                }
            })
            .map_err(|_| zmq::Error::EMFILE)?;
        Ok(ZapHandler {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ZapHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("zap: handler panicked");
            }
        }
    }
}

fn serve(
    socket: &zmq::Socket,
    config: &ArcSwap<Config>,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> Result<(), zmq::Error> {
    let mut refused_since_log = 0u64;
    let mut last_log: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        // EINTR is routine here: the privilege drop (glibc's setxid) signals every thread.
        match socket.poll(zmq::POLLIN, 200) {
            Ok(0) | Err(zmq::Error::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        let frames = match socket.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => frames,
            Err(zmq::Error::EINTR | zmq::Error::EAGAIN) => continue,
            Err(e) => return Err(e),
        };
        // version, request id, domain, address, identity, mechanism, credentials…
        let field = |i: usize| frames.get(i).map(Vec::as_slice).unwrap_or_default();
        let request_id = field(1).to_vec();
        let address = String::from_utf8_lossy(field(3)).into_owned();
        let mechanism = field(5);
        let client_key = frames.get(6).map(Vec::as_slice);
        let current = config.load();
        let allowed = decide(
            mechanism,
            client_key,
            &current.zmq.allowed_client_keys,
            current.zmq.curve_allowed_clients.is_some(),
        );
        let (code, text): (&[u8], &[u8]) = if field(0) != b"1.0" {
            (b"500", b"unsupported ZAP version")
        } else if allowed {
            (b"200", b"OK")
        } else {
            (b"400", b"key not allowed")
        };
        let user = client_key
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(|k| CurveKey(k).to_z85())
            .unwrap_or_default();
        socket.send_multipart(
            [
                b"1.0".to_vec(),
                request_id,
                code.to_vec(),
                text.to_vec(),
                user.clone().into_bytes(),
                Vec::new(),
            ],
            0,
        )?;
        if !allowed {
            metrics.curve_refusals.inc();
            refused_since_log += 1;
            if last_log.is_none_or(|t| t.elapsed() >= LOG_INTERVAL) {
                log::warn!(
                    "zap: refused {refused_since_log} CURVE client(s) since the last report; latest from {address} with key {}",
                    if user.is_empty() { "(none)" } else { &user }
                );
                refused_since_log = 0;
                last_log = Some(Instant::now());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let a = CurveKey([1; 32]);
        let b = CurveKey([2; 32]);
        let list = vec![a];
        assert!(decide(b"CURVE", Some(&a.0), &list, true));
        assert!(!decide(b"CURVE", Some(&b.0), &list, true));
        assert!(
            decide(b"CURVE", Some(&b.0), &[], false),
            "no allowlist: any CURVE client"
        );
        assert!(!decide(b"NULL", None, &list, true));
        assert!(!decide(b"PLAIN", Some(b"user"), &[], false));
        assert!(!decide(b"CURVE", Some(b"short"), &list, true));
    }
}
