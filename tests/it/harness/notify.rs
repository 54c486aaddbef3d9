//! The service manager's end of systemd's notify protocol: a Unix datagram socket of the test's
//! own that a foreground feedd is pointed at with `NOTIFY_SOCKET`. The harness waits on it for
//! `READY=1` (start-up detected by readiness, not by log text); the notify tests read every
//! datagram from it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the "service manager" received: (when, datagram text), in arrival order.
pub struct Notify {
    rx: mpsc::Receiver<(Instant, String)>,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// A datagram feedd never sends: tells the reader thread to end.
const STOP: &[u8] = b"";

impl Notify {
    /// Binds the socket and starts the thread that timestamps datagrams as they arrive, so
    /// intervals are measured, not guessed. Anyone may send to it: feedd may have dropped its
    /// privileges to `nobody` (or run as the packaged `feedd` user) by the time it is ready.
    pub fn bind() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if &buf[..n] == STOP {
                    return;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    return;
                }
            }
        });
        Notify {
            rx,
            _dir: dir,
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next datagram other than a watchdog ping or a periodic status line, if one comes
    /// within `timeout`.
    #[must_use]
    pub fn try_next_state(&self, timeout: Duration) -> Option<String> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let (_, text) = self.rx.recv_timeout(left).ok()?;
            if text != "WATCHDOG=1\n" && !text.starts_with("STATUS=") {
                return Some(text);
            }
        }
    }

    /// The next state change; panics if none comes within `timeout`.
    pub fn next_state(&self, timeout: Duration) -> String {
        self.try_next_state(timeout)
            .unwrap_or_else(|| panic!("no state change within {timeout:?}"))
    }

    /// Every datagram for `span`.
    pub fn collect(&self, span: Duration) -> Vec<(Instant, String)> {
        let until = Instant::now() + span;
        let mut out = Vec::new();
        while let Ok(m) = self
            .rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            out.push(m);
        }
        out
    }
}

/// Waits until `child` sends `READY=1` to `notify`: Err with the reason if it exits first or
/// does not within `timeout` (the caller adds its log).
pub fn await_ready(child: &mut Child, notify: &Notify, timeout: Duration) -> Result<(), String> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited ({status}) before it was ready"));
        }
        let state = notify.try_next_state(Duration::from_millis(100));
        if state.is_some_and(|s| s.starts_with("READY=1")) {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(format!("no READY=1 within {timeout:?}"));
        }
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        // Wake the reader thread so that it ends with the socket.
        if let Ok(s) = UnixDatagram::unbound() {
            let _ = s.send_to(STOP, &self.path);
        }
    }
}
