//! The wire protocol (SPEC §4): which bodies, lines, frames and sizes are refused, with what
//! reply, and that a refused message takes nothing else down with it.

use crate::harness::*;

#[test]
fn bad_line_refuses_the_whole_message() {
    let db = Db::create("bad_line");
    let feedd = Feedd::start(&db, &[]);
    let mut body: Vec<String> = (1..=100).map(|t| format!("{t},1,1")).collect();
    body[72] = "73,1,1.00001".into();
    let req = Req::connect(&feedd.endpoint());
    assert_eq!(
        req.ask(&body.join("\n")),
        "FALSE line 73: volume: more than 4 fraction digits"
    );
    assert_eq!(db.count(), 0);
    assert_eq!(
        req.ask("1,2,x"),
        "FALSE line 1: volume: not a non-negative decimal number"
    );
    assert_eq!(req.ask(""), "FALSE empty message");
    // The daemon keeps serving.
    assert_eq!(req.ask("5,5,5"), "TRUE");
}

#[test]
fn oversize_message_is_refused_and_others_still_served() {
    let db = Db::create("oversize");
    let feedd = Feedd::start(&db, &["zmq.max_message_bytes = 4096"]);
    let big = Req::connect(&feedd.endpoint());
    let body = one_record_bodies(1, 1000).join("\n");
    assert!(body.len() > 4096);
    assert_eq!(big.ask(&body), "FALSE too large");
    let other = Req::connect(&feedd.endpoint());
    assert_eq!(other.ask("7,7,7"), "TRUE");
    assert_eq!(big.ask("8,8,8"), "TRUE");
    assert_eq!(db.count(), 2);
}

#[test]
fn frames_and_sizes_as_the_spec_says() {
    let db = Db::create("hostile_frames");
    let f = Feedd::start(&db, &["zmq.max_message_bytes = 100"]);
    let req = Req::connect(&f.endpoint());
    // 64 parts after a REQ's delimiter: 65 client frames, one too many, and the REQ hears it.
    let parts: Vec<Vec<u8>> = (0..64).map(|i| format!("{i},1,1").into_bytes()).collect();
    req.0.send_multipart(parts, 0).unwrap();
    let reply = req.0.recv_multipart(0).expect("a reply to the REQ");
    assert_eq!(reply, vec![b"FALSE too many frames".to_vec()]);
    // The body alone counts: exactly max_message_bytes is judged, one more is too large.
    let exact = format!("{:<100}", "1,1,1");
    assert_eq!(exact.len(), 100);
    assert_eq!(req.ask(&exact), "TRUE");
    assert_eq!(req.ask(&format!("{exact} ")), "FALSE too large");
    // SPEC §4: spaces only, and `\r` only before `\n`.
    assert!(req.ask("1004,1,5\r").starts_with("FALSE line 1: volume"));
    assert!(req
        .ask("1005,1,5\r\r\n")
        .starts_with("FALSE line 1: volume"));
    assert!(req.ask("1006,1,\t5").starts_with("FALSE line 1: volume"));
    assert_eq!(req.ask("1007 , 1 , 5\r\n"), "TRUE");
}
