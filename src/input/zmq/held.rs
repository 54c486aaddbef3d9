//! Replies the ROUTER could not take yet (the peer's pipe at its high-water mark), kept per
//! peer in the order they were due, so one slow reader never delays another's replies. Pure
//! bookkeeping: the receiver thread that owns the socket does the sending.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

/// Held replies past which the receiver stops reading new messages: memory stays bounded by
/// the work in flight, not by how slowly a client reads (about 150 bytes a reply).
pub const HELD_MAX: usize = 16_384;

/// One reply due to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub envelope: Vec<Vec<u8>>,
    pub text: Cow<'static, [u8]>,
    /// Records acknowledged once it is handed to the client (0 for `FALSE`).
    pub records: usize,
}

impl Reply {
    /// The peer it goes to: a ROUTER's first envelope frame is the routing id.
    fn peer(&self) -> &[u8] {
        self.envelope.first().map_or(&[], Vec::as_slice)
    }
}

/// What the socket did with one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Handed to the peer's pipe.
    Handed,
    /// The pipe is full: try again once the socket is writable.
    Full,
    /// No such peer (disconnected): the reply cannot be delivered.
    Gone,
}

/// What a flush did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Replies handed over, and the records they acknowledge.
    pub handed: usize,
    pub records: usize,
    /// Replies dropped because their peer is gone.
    pub gone: usize,
}

#[derive(Debug, Default)]
pub struct Held {
    peers: HashMap<Vec<u8>, VecDeque<Reply>>,
    count: usize,
}

impl Held {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count >= HELD_MAX
    }

    /// True when `reply` must wait behind replies already held for its peer (order kept).
    pub fn waiting_for(&self, reply: &Reply) -> bool {
        self.peers.contains_key(reply.peer())
    }

    pub fn hold(&mut self, reply: Reply) {
        self.count += 1;
        self.peers
            .entry(reply.peer().to_vec())
            .or_default()
            .push_back(reply);
    }

    /// Offers each peer's replies in order to `send` until its pipe is full again; a gone
    /// peer's replies are all dropped.
    pub fn flush(&mut self, mut send: impl FnMut(&Reply) -> Sent) -> Flushed {
        let mut done = Flushed::default();
        self.peers.retain(|_, queue| {
            while let Some(reply) = queue.front() {
                match send(reply) {
                    Sent::Handed => {
                        done.handed += 1;
                        done.records += reply.records;
                        queue.pop_front();
                    }
                    Sent::Full => return true,
                    Sent::Gone => {
                        done.gone += queue.len();
                        return false;
                    }
                }
            }
            false
        });
        self.count -= done.handed + done.gone;
        done
    }

    /// Empties the store (the socket is closing); returns how many were dropped.
    pub fn clear(&mut self) -> usize {
        self.peers.clear();
        std::mem::take(&mut self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(peer: &str, n: usize) -> Reply {
        Reply {
            envelope: vec![peer.as_bytes().to_vec(), Vec::new()],
            text: format!("TRUE {n}").into_bytes().into(),
            records: n,
        }
    }

    #[test]
    fn each_peer_gets_its_replies_in_order_while_its_pipe_takes_them() {
        let mut held = Held::default();
        for n in 1..=3 {
            held.hold(reply("a", n));
        }
        held.hold(reply("b", 10));
        assert_eq!(held.len(), 4);
        assert!(held.waiting_for(&reply("a", 9)));
        assert!(!held.waiting_for(&reply("c", 9)));
        // a's pipe takes one more, b's takes all.
        let mut sent = Vec::new();
        let mut room_a = 1;
        let done = held.flush(|r| {
            if r.envelope[0] == b"a" {
                if room_a == 0 {
                    return Sent::Full;
                }
                room_a -= 1;
            }
            sent.push(r.records);
            Sent::Handed
        });
        sent.sort_unstable();
        assert_eq!(sent, [1, 10]);
        assert_eq!(
            done,
            Flushed {
                handed: 2,
                records: 11,
                gone: 0
            }
        );
        assert_eq!(held.len(), 2);
        assert!(!held.waiting_for(&reply("b", 0)), "b is drained");
        let mut next = Vec::new();
        held.flush(|r| {
            next.push(r.records);
            Sent::Handed
        });
        assert_eq!(next, [2, 3], "a's in order");
        assert!(held.is_empty());
    }

    #[test]
    fn a_gone_peer_drops_all_it_held_and_no_one_elses() {
        let mut held = Held::default();
        for n in 1..=5 {
            held.hold(reply("gone", n));
        }
        held.hold(reply("live", 1));
        let done = held.flush(|r| {
            if r.envelope[0] == b"gone" {
                Sent::Gone
            } else {
                Sent::Full
            }
        });
        assert_eq!(done.gone, 5);
        assert_eq!(held.len(), 1);
        assert_eq!(held.clear(), 1);
        assert!(held.is_empty());
    }

    #[test]
    fn full_at_the_bound() {
        let mut held = Held::default();
        for n in 0..HELD_MAX {
            assert!(!held.is_full());
            held.hold(reply("a", n));
        }
        assert!(held.is_full());
    }
}
