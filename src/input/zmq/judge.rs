//! What one ROUTER message is (pure, fuzzed): the routing id, the envelope to echo, the body
//! parsed into records, or the reason to refuse it. Bounded before any parsing.

use crate::input::record;
use crate::message::Record;

/// Most frames a client may send in one message (envelope and body; the routing id the ROUTER
/// adds is not counted); beyond that it is answered `FALSE too many frames`.
const MAX_CLIENT_FRAMES: usize = 64;
/// Most bytes of envelope (routing id included) echoed back: 64 ZeroMQ identities of 255 bytes.
const MAX_ENVELOPE_BYTES: usize = 64 * 256;

/// What to do with one message read from the ROUTER.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Nothing to answer (no body frame after the routing id).
    Ignore,
    /// Answer `FALSE <reason>` to `envelope`.
    Refuse {
        envelope: Vec<Vec<u8>>,
        reason: String,
    },
    /// Queue these records; reply to `envelope` after COMMIT.
    Accept {
        envelope: Vec<Vec<u8>>,
        records: Vec<Record>,
    },
}

/// Judges a message's frames (pure): the first frame is the routing id the ROUTER added, the
/// last the body, every frame before the body the envelope echoed back. Bounded: more than
/// `MAX_CLIENT_FRAMES` client frames, a body over `max_bytes` or an envelope over
/// `MAX_ENVELOPE_BYTES` is refused before parsing, with a short envelope a REQ can match.
pub fn judge(mut frames: Vec<Vec<u8>>, max_bytes: usize) -> Incoming {
    if frames.len() < 2 {
        return Incoming::Ignore; // a ROUTER always adds the identity; nothing to answer
    }
    if frames.len() - 1 > MAX_CLIENT_FRAMES {
        return Incoming::Refuse {
            envelope: short_envelope(frames),
            reason: "too many frames".into(),
        };
    }
    let body = frames.pop().unwrap_or_default();
    // Only the body counts against `max_message_bytes`; the envelope has its own bound.
    let envelope_bytes: usize = frames.iter().map(Vec::len).sum();
    if body.len() > max_bytes || envelope_bytes > MAX_ENVELOPE_BYTES {
        return Incoming::Refuse {
            envelope: short_envelope(frames),
            reason: "too large".into(),
        };
    }
    match record::parse_body(&body) {
        Err(reason) => Incoming::Refuse {
            envelope: frames,
            reason: reason.to_string(),
        },
        Ok(records) => Incoming::Accept {
            envelope: frames,
            records,
        },
    }
}

/// The envelope to answer a refused message with: the routing id and, when an empty delimiter
/// frame comes within `MAX_ENVELOPE_BYTES`, every frame up to it (what a REQ, or a DEALER that
/// sent a delimiter, needs to match the reply); else the routing id alone.
fn short_envelope(mut frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut bytes = 0;
    let mut keep = 1;
    for (i, frame) in frames.iter().enumerate().take(MAX_CLIENT_FRAMES) {
        bytes += frame.len();
        if bytes > MAX_ENVELOPE_BYTES {
            break;
        }
        if i > 0 && frame.is_empty() {
            keep = i + 1;
            break;
        }
    }
    frames.truncate(keep);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn judging_frames() {
        assert_eq!(judge(frames(&[b"id"]), 100), Incoming::Ignore);
        match judge(frames(&[b"id", b"", b"1,2,3"]), 100) {
            Incoming::Accept { envelope, records } => {
                assert_eq!(envelope, frames(&[b"id", b""]));
                assert_eq!(records.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let too_large = judge(frames(&[b"id", b"", b"1,2,3\n4,5,6"]), 8);
        assert!(matches!(too_large, Incoming::Refuse { reason, .. } if reason == "too large"));
        let bad = judge(frames(&[b"id", b"1,2"]), 100);
        assert!(matches!(bad, Incoming::Refuse { reason, .. } if reason.starts_with("line 1:")));
    }

    /// `n` client frames as a REQ sends them (empty delimiter, then `n - 1` parts), after the id.
    fn req_frames(n: usize) -> Vec<Vec<u8>> {
        let mut f = vec![b"id".to_vec(), Vec::new()];
        f.extend((1..n).map(|i| format!("{i},1,1").into_bytes()));
        f
    }

    #[test]
    fn too_many_frames_is_answered_with_the_envelope() {
        // 64 client frames are judged as usual (the body is the last one).
        assert!(matches!(
            judge(req_frames(64), 1 << 20),
            Incoming::Accept { envelope, .. } if envelope.len() == 64
        ));
        match judge(req_frames(65), 1 << 20) {
            Incoming::Refuse { envelope, reason } => {
                assert_eq!(reason, "too many frames");
                assert_eq!(envelope, frames(&[b"id", b""]), "a REQ needs the delimiter");
            }
            other => panic!("{other:?}"),
        }
        // Behind a proxy: every routing id up to the delimiter.
        let mut proxied = frames(&[b"id", b"hop", b""]);
        proxied.extend((0..100).map(|_| b"x".to_vec()));
        assert!(matches!(
            judge(proxied, 1 << 20),
            Incoming::Refuse { envelope, .. } if envelope == frames(&[b"id", b"hop", b""])
        ));
        // No delimiter at all (a DEALER that sent none): the routing id alone.
        let bare: Vec<Vec<u8>> = (0..100).map(|_| b"x".to_vec()).collect();
        assert!(matches!(
            judge(bare, 1 << 20),
            Incoming::Refuse { envelope, .. } if envelope == frames(&[b"x"])
        ));
    }

    #[test]
    fn only_the_body_counts_against_max_bytes() {
        let body = vec![b'1'; 10];
        let exact = vec![b"routing-id".to_vec(), Vec::new(), body.clone()];
        // 10-byte body, limit 10: judged (malformed here), not "too large".
        assert!(matches!(
            judge(exact, 10),
            Incoming::Refuse { reason, .. } if reason != "too large"
        ));
        let over = vec![b"routing-id".to_vec(), Vec::new(), vec![b'1'; 11]];
        assert!(matches!(
            judge(over, 10),
            Incoming::Refuse { reason, envelope } if reason == "too large" && envelope.len() == 2
        ));
        // A huge envelope is refused and not echoed.
        let fat = vec![
            b"id".to_vec(),
            vec![b'e'; MAX_ENVELOPE_BYTES],
            Vec::new(),
            b"1,1,1".to_vec(),
        ];
        assert!(matches!(
            judge(fat, 100),
            Incoming::Refuse { reason, envelope } if reason == "too large" && envelope == frames(&[b"id"])
        ));
    }
}
