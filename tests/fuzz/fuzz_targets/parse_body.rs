//! Any byte string: the parser returns records or a reason, never panics; accepted records
//! survive a format → parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(records) = feedd::record::parse_body(body) {
        let again = feedd::record::parse_body(feedd::record::format_body(&records).as_bytes());
        assert_eq!(again.as_ref(), Ok(&records));
    }
});
