//! The ROUTER socket's plumbing: options (size guard, high-water marks, CURVE), binding with
//! the retries a same-address move needs, `ipc://` files, and sending a reply. Used only by
//! the receiver thread that owns the socket.

use crate::input::zmq::{ReceiverError, ZmqSettings};

/// Sends a reply on the ROUTER; to a gone or saturated peer it is dropped, never waited for.
/// Whether it was handed to the socket.
pub(super) fn send(router: &zmq::Socket, envelope: &[Vec<u8>], text: &[u8]) -> bool {
    for frame in envelope {
        if let Err(e) = router.send(frame.as_slice(), zmq::DONTWAIT | zmq::SNDMORE) {
            // A multipart send fails on its first frame (unroutable peers are dropped
            // silently by the ROUTER), so nothing half-sent is left behind.
            log::debug!("receiver: reply dropped: {e}");
            return false;
        }
    }
    if let Err(e) = router.send(text, zmq::DONTWAIT) {
        log::debug!("receiver: reply dropped: {e}");
        return false;
    }
    true
}

/// Two TCP endpoints that one listener's address excludes the other's: the same port, and the
/// same host or a wildcard on either side (`tcp://127.0.0.1:P` and `tcp://*:P`).
pub(super) fn overlaps(a: &str, b: &str) -> bool {
    let split = |e: &str| {
        e.strip_prefix("tcp://")
            .and_then(|rest| rest.rsplit_once(':'))
            .map(|(h, p)| (h.to_string(), p.to_string()))
    };
    let wildcard = |h: &str| matches!(h, "*" | "0.0.0.0" | "[::]" | "::" | "[*]");
    match (split(a), split(b)) {
        (Some((ha, pa)), Some((hb, pb))) => {
            pa == pb && (ha == hb || wildcard(&ha) || wildcard(&hb))
        }
        _ => false,
    }
}

/// libzmq unlinks an existing `ipc://` socket file on bind, silently stealing the address of
/// another running instance: refuse when something answers on it.
pub(super) fn refuse_live_ipc(endpoint: &str) -> Result<(), ReceiverError> {
    let Some(path) = ipc_path(endpoint) else {
        return Ok(());
    };
    if std::fs::symlink_metadata(path).is_ok() && !is_socket(path) {
        return Err(ReceiverError::IpcNotSocket {
            endpoint: endpoint.to_string(),
            path: path.to_string(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ReceiverError::IpcInUse {
            endpoint: endpoint.to_string(),
            path: path.to_string(),
        }),
        Err(_) => Ok(()),
    }
}

/// Removes our `ipc://` socket file once our listener is gone (nothing answers on it); for
/// the server to call after the ZeroMQ context has closed.
pub fn remove_ipc_file(endpoint: &str) {
    if refuse_live_ipc(endpoint).is_ok() {
        unlink_ipc(endpoint);
    }
}

pub(super) fn unlink_ipc(endpoint: &str) {
    if let Some(path) = ipc_path(endpoint) {
        if is_socket(path) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The file of an `ipc://` endpoint (none for the abstract namespace or a generated name).
fn ipc_path(endpoint: &str) -> Option<&str> {
    let path = endpoint.strip_prefix("ipc://")?;
    (!path.starts_with('@') && path != "*").then_some(path)
}

fn is_socket(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// libzmq's per-frame limit: a peer sending more is disconnected without a reply. Well above
/// `max_message_bytes`, so messages up to there are answered `FALSE too large`.
pub(super) fn guard_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(4).saturating_add(65_536)
}

pub(super) fn configure_router(
    router: &mut zmq::Socket,
    settings: &ZmqSettings,
) -> Result<(), zmq::Error> {
    // A peer sending more than this is disconnected by libzmq: a memory guard well above the
    // size answered `FALSE too large`.
    router.set_maxmsgsize(
        i64::try_from(guard_bytes(settings.max_message_bytes)).unwrap_or(i64::MAX),
    )?;
    router.set_rcvhwm(1000)?;
    router.set_sndhwm(1000)?;
    // A reply to a gone peer or one at its high-water mark fails (EHOSTUNREACH, EAGAIN) instead
    // of vanishing silently, so `feedd_replies_dropped_total` counts it; it is dropped either way.
    router.set_router_mandatory(true)?;
    match &settings.curve_secret_key {
        Some(key) => {
            router.set_zap_domain("feedd")?;
            crate::zmq_ffi::enforce_zap_domain(router)?;
            router.set_curve_server(true)?;
            router.set_curve_secretkey(&key.0)?;
        }
        // Back to the NULL mechanism (libzmq rejects clearing an unset CURVE server flag).
        None => {
            if router.is_curve_server()? {
                router.set_curve_server(false)?;
            }
        }
    }
    Ok(())
}

/// Binds `endpoint`. Right after an unbind of the same address libzmq may still hold the
/// listener (the close is asynchronous), so a rebind retries EADDRINUSE for up to 2 s.
pub(super) fn bind_retrying(socket: &zmq::Socket, endpoint: &str) -> Result<(), zmq::Error> {
    let mut tries = 200;
    loop {
        match socket.bind(endpoint) {
            Err(zmq::Error::EADDRINUSE) if tries > 1 => {
                tries -= 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// The bind error in words; libzmq says ENODEV ("No such device") for a host it cannot resolve.
pub(super) fn bind_reason(error: &zmq::Error) -> String {
    match error {
        zmq::Error::ENODEV => {
            "the host is not a local address, an interface, or a name that resolves".to_string()
        }
        other => other.to_string(),
    }
}

pub(super) fn last_endpoint(socket: &zmq::Socket) -> Option<String> {
    socket.get_last_endpoint().ok().and_then(Result::ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overlapping_addresses_wait_for_the_old_listener() {
        assert!(overlaps("tcp://*:5555", "tcp://127.0.0.1:5555"));
        assert!(overlaps("tcp://127.0.0.1:5555", "tcp://0.0.0.0:5555"));
        assert!(overlaps("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"));
        assert!(!overlaps("tcp://127.0.0.2:5555", "tcp://127.0.0.1:5555"));
        assert!(!overlaps("tcp://*:5556", "tcp://127.0.0.1:5555"));
        assert!(!overlaps("ipc:///tmp/a", "tcp://127.0.0.1:5555"));
    }
}
