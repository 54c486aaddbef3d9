//! A TCP relay in front of a server, for faults a real server does not make on demand: `cut`
//! shuts every connection at once (a broker that vanished), and `go_silent_after` makes new
//! connections pass only the first N AMQP frames from the broker and then nothing, with the
//! sockets left open (a broker that stops answering mid-protocol).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::ports;

pub struct Relay {
    pub port: u16,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    /// For new connections: the broker frames passed before silence (usize::MAX: all).
    frames: Arc<AtomicUsize>,
}

impl Relay {
    pub fn start(target: &str) -> Relay {
        let listener = ports::listener();
        let port = listener.local_addr().unwrap().port();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let frames = Arc::new(AtomicUsize::new(usize::MAX));
        let (kept, limit, target) = (
            Arc::clone(&streams),
            Arc::clone(&frames),
            target.to_string(),
        );
        // Detached: its sockets are shut down by `cut`, and the test process ends with it.
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(up.0, up.1, usize::MAX));
                let down = (server.try_clone().unwrap(), client.try_clone().unwrap());
                let n = limit.load(Ordering::SeqCst);
                std::thread::spawn(move || pump(down.0, down.1, n));
                kept.lock().unwrap().extend([client, server]);
            }
        });
        Relay {
            port,
            streams,
            frames,
        }
    }

    /// `url` with its port replaced by the relay's.
    pub fn url(&self, url: &str, port: u16) -> String {
        url.replace(&format!(":{port}"), &format!(":{}", self.port))
    }

    pub fn connections(&self) -> usize {
        self.streams.lock().unwrap().len() / 2
    }

    pub fn cut(&self) {
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// New connections pass `frames` AMQP frames from the broker, then go silent.
    pub fn go_silent_after(&self, frames: usize) {
        self.frames.store(frames, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`; after `frames` whole AMQP frames (the first 8 bytes of a stream that
/// starts with `AMQP` are the protocol header, not a frame) it reads on and forwards nothing.
fn pump(mut from: TcpStream, mut to: TcpStream, frames: usize) {
    let mut buf = [0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut passed = 0;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        if frames == usize::MAX {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        // Whole frames: type (1), channel (2), size (4), payload, frame end (1).
        while passed < frames && pending.len() >= 7 {
            let size = u32::from_be_bytes(pending[3..7].try_into().unwrap()) as usize;
            if pending.len() < size + 8 {
                break;
            }
            let frame: Vec<u8> = pending.drain(..size + 8).collect();
            if to.write_all(&frame).is_err() {
                return;
            }
            passed += 1;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
