//! Any multipart message (frames split from the input at 0xFF bytes): judging it never
//! panics, and a refusal or acceptance keeps the routing id first in the envelope.
#![no_main]

use feedd::receiver::{judge, Incoming};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames: Vec<Vec<u8>> = data.split(|&b| b == 0xFF).map(<[u8]>::to_vec).collect();
    let id = frames.first().cloned();
    match judge(frames, 4096) {
        Incoming::Ignore => {}
        Incoming::Refuse { envelope, .. } | Incoming::Accept { envelope, .. } => {
            assert_eq!(envelope.first(), id.as_ref());
        }
    }
});
