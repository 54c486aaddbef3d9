//! The libzmq calls feedd needs beyond what `zmq` 0.9 wraps, in one place: the only module
//! allowed `unsafe` (the crate root denies it). Each call says why it is sound. It also adopts
//! the file descriptors a parent handed down by number (listening sockets, the pidfile lock
//! across an upgrade's exec), which std can only do unsafely.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_char, c_int};

extern "C" {
    // In libzmq ≥ 4.2.1 (linked through zmq-sys), which zmq-sys 0.11 does not declare.
    fn zmq_curve_public(z85_public_key: *mut c_char, z85_secret_key: *const c_char) -> c_int;
}

/// Sets `ZMQ_ZAP_ENFORCE_DOMAIN` (libzmq 4.3's option 93, no setter in `zmq` 0.9): with CURVE
/// on, a handshake no ZAP handler answers is refused instead of let through unchecked.
pub fn enforce_zap_domain(socket: &mut zmq::Socket) -> Result<(), zmq::Error> {
    const ZMQ_ZAP_ENFORCE_DOMAIN: c_int = 93;
    set_int(socket, ZMQ_ZAP_ENFORCE_DOMAIN, 1)
}

/// Sets an int-valued socket option by number.
fn set_int(socket: &mut zmq::Socket, option: c_int, value: c_int) -> Result<(), zmq::Error> {
    // SAFETY: a live socket borrowed mutably (so no other thread uses it); the value is a
    // c_int of the size given.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            socket.as_mut_ptr(),
            option,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: reads this thread's errno as libzmq left it.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
}

/// Sets `ZMQ_USE_FD` (libzmq 4.3's option 89, stable, no setter in `zmq` 0.9): the next
/// `bind` listens on `fd` (a bound, listening socket) instead of making its own. libzmq takes
/// ownership and closes `fd` when the socket closes, so the caller hands over a `dup`.
pub fn use_fd(socket: &mut zmq::Socket, fd: OwnedFd) -> Result<(), zmq::Error> {
    const ZMQ_USE_FD: c_int = 89;
    let raw: c_int = std::os::fd::IntoRawFd::into_raw_fd(fd);
    set_int(socket, ZMQ_USE_FD, raw).inspect_err(|_| {
        // Refused: it is still ours to close.
        // SAFETY: `raw` came from an OwnedFd just above, and libzmq did not take it.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
    })
}

/// Takes ownership of descriptor `raw` handed to this process: inherited from the parent
/// (named in an environment variable) or just received in an SCM_RIGHTS message; `None` if no
/// such descriptor is open.
///
/// Call once per number: at start-up, before anything else could have opened or closed it, or
/// right after `recvmsg` installed it.
pub fn adopt_inherited_fd(raw: RawFd) -> Option<OwnedFd> {
    if raw < 3 {
        return None; // stdio is never a handed socket or lock
    }
    nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD).ok()?;
    // SAFETY: `raw` is open (F_GETFD succeeded); it came from our parent across exec or from
    // the kernel in a received message, so nothing in this process owns it yet, and callers
    // adopt each number once.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Decodes 40 Z85 characters into 32 bytes; `None` when libzmq refuses them (a group of 5
/// whose value overflows 32 bits: `zmq` 0.9's `z85_decode` ignores that NULL return).
pub fn z85_decode_key(text: &str) -> Option<[u8; 32]> {
    if text.len() != 40 {
        return None;
    }
    let c_text = CString::new(text).ok()?;
    let mut key = [0u8; 32];
    // SAFETY: `key` has room for 40 * 4 / 5 = 32 bytes; `c_text` is NUL-terminated.
    let out = unsafe { zmq_sys::zmq_z85_decode(key.as_mut_ptr(), c_text.as_ptr()) };
    (!out.is_null()).then_some(key)
}

/// The Z85 public key of a Z85 CURVE secret key (libzmq's `zmq_curve_public`).
pub fn curve_public_z85(secret_z85: &str) -> Option<String> {
    let secret = CString::new(secret_z85).ok()?;
    if secret.as_bytes().len() != 40 {
        return None;
    }
    let mut public = [0 as c_char; 41];
    // SAFETY: the output buffer holds 40 Z85 characters + NUL, the input is 40 characters +
    // NUL, as zmq_curve_public requires.
    let rc = unsafe { zmq_curve_public(public.as_mut_ptr(), secret.as_ptr()) };
    (rc == 0).then(|| public[..40].iter().map(|&c| c as u8 as char).collect())
}
