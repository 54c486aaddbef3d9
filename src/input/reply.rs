//! The in-process format of a batch of replies, from a worker to the receiver: one inproc
//! message per batch instead of one per client message.
//!
//! Layout: per reply, a u32 frame count, then per frame a u32 length and its bytes (native
//! endianness: it never leaves the process).

/// Appends one reply (its envelope frames, then the reply text) to `buf`.
pub fn push(buf: &mut Vec<u8>, envelope: &[Vec<u8>], text: &[u8]) {
    let count = u32::try_from(envelope.len() + 1).unwrap_or(u32::MAX);
    buf.extend_from_slice(&count.to_ne_bytes());
    for frame in envelope
        .iter()
        .map(Vec::as_slice)
        .chain(std::iter::once(text))
    {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&len.to_ne_bytes());
        buf.extend_from_slice(frame);
    }
}

/// Splits a batch back into replies, each as its frames. Stops at the first malformed
/// byte (which only a bug could produce).
pub fn split(mut buf: &[u8]) -> Vec<Vec<&[u8]>> {
    fn take_u32(buf: &mut &[u8]) -> Option<usize> {
        let (head, rest) = buf.split_first_chunk::<4>()?;
        *buf = rest;
        usize::try_from(u32::from_ne_bytes(*head)).ok()
    }
    let mut replies = Vec::new();
    while !buf.is_empty() {
        let Some(count) = take_u32(&mut buf) else {
            break;
        };
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            let Some(len) = take_u32(&mut buf).filter(|l| *l <= buf.len()) else {
                return replies;
            };
            let (frame, rest) = buf.split_at(len);
            frames.push(frame);
            buf = rest;
        }
        replies.push(frames);
    }
    replies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        push(&mut buf, &[b"id1".to_vec(), Vec::new()], b"TRUE");
        push(&mut buf, &[b"id2".to_vec()], b"FALSE conflict: ticket 1");
        let replies = split(&buf);
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0], vec![&b"id1"[..], b"", b"TRUE"]);
        assert_eq!(replies[1], vec![&b"id2"[..], b"FALSE conflict: ticket 1"]);
        assert!(
            split(&buf[..buf.len() - 3]).len() == 1,
            "a cut batch yields the whole replies"
        );
    }
}
