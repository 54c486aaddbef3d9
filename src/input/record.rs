//! The wire body: `ticket,login,volume` lines → records, or the reason a message is refused.
//!
//! Pure and allocation-light: fields are parsed straight from the bytes (invalid UTF-8 and NUL
//! bytes are just "not a number"). A message is all-or-nothing, so the first bad line decides.

use std::borrow::Cow;
use std::fmt;

pub use crate::message::{Record, Verdict, Volume};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Ticket,
    Login,
    Volume,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Ticket => "ticket",
            Field::Login => "login",
            Field::Volume => "volume",
        })
    }
}

/// Why a message is refused; its `Display` is the text after `FALSE `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty message")]
    Empty,
    #[error("line {line}: empty line")]
    EmptyLine { line: usize },
    #[error("line {line}: expected 3 fields (ticket,login,volume), found {found}")]
    FieldCount { line: usize, found: usize },
    #[error("line {line}: {field}: {reason}")]
    Field {
        line: usize,
        field: Field,
        reason: &'static str,
    },
    #[error("conflict: ticket {ticket} on line {line} differs from line {first_line}")]
    RepeatedTicket {
        ticket: u64,
        line: usize,
        first_line: usize,
    },
}

/// Spaces around a field are ignored (SPEC §4: spaces only; a tab is not a space).
fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' '] = s {
        s = rest;
    }
    s
}

fn parse_u64(text: &[u8]) -> Result<u64, &'static str> {
    if text.is_empty() {
        return Err("empty");
    }
    let mut value: u64 = 0;
    for &b in text {
        if !b.is_ascii_digit() {
            return Err("not a decimal integer");
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or("out of range (at most 18446744073709551615)")?;
    }
    Ok(value)
}

fn parse_line(line: &[u8], number: usize) -> Result<Record, ParseError> {
    let mut fields = line.splitn(4, |&b| b == b',');
    let (Some(t), Some(l), Some(v), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        let found = line.iter().filter(|&&b| b == b',').count() + 1;
        return Err(ParseError::FieldCount {
            line: number,
            found,
        });
    };
    let field_error = |field, reason| ParseError::Field {
        line: number,
        field,
        reason,
    };
    let ticket = parse_u64(trim(t)).map_err(|r| field_error(Field::Ticket, r))?;
    if ticket == 0 {
        return Err(field_error(Field::Ticket, "must be at least 1"));
    }
    let login = parse_u64(trim(l)).map_err(|r| field_error(Field::Login, r))?;
    let volume = Volume::parse(trim(v)).map_err(|r| field_error(Field::Volume, r))?;
    Ok(Record {
        ticket,
        login,
        volume,
    })
}

/// Parses one message body into its records.
///
/// A ticket repeated with the same values is kept once; repeated with different values, the
/// message is a conflict. The returned records have distinct tickets.
pub fn parse_body(body: &[u8]) -> Result<Vec<Record>, ParseError> {
    // One trailing `\n` or `\r\n` is allowed; a `\r` anywhere but right before a `\n` is not.
    let body = body
        .strip_suffix(b"\n")
        .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
        .unwrap_or(body);
    if body.is_empty() {
        return Err(ParseError::Empty);
    }
    let last = body.split(|&b| b == b'\n').count();
    let mut records: Vec<Record> = Vec::new();
    // line numbers of `records`, kept only to name a repeated ticket's first line
    let mut lines: Vec<usize> = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let number = i + 1;
        // Every line but the last was ended by `\n`, so `\r\n` may have ended it.
        let line = if number < last {
            line.strip_suffix(b"\r").unwrap_or(line)
        } else {
            line
        };
        if line.is_empty() {
            return Err(ParseError::EmptyLine { line: number });
        }
        let record = parse_line(line, number)?;
        records.push(record);
        lines.push(number);
    }
    dedup_tickets(records, &lines)
}

/// Keeps the first of identical repeats; refuses a ticket repeated with other values.
fn dedup_tickets(records: Vec<Record>, lines: &[usize]) -> Result<Vec<Record>, ParseError> {
    if records.len() < 2 {
        return Ok(records);
    }
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_unstable_by_key(|&i| (records[i].ticket, i));
    let mut drop = vec![false; records.len()];
    let mut any = false;
    for pair in order.windows(2) {
        let (a, b) = (records[pair[0]], records[pair[1]]);
        if a.ticket == b.ticket {
            if a != b {
                return Err(ParseError::RepeatedTicket {
                    ticket: a.ticket,
                    line: lines[pair[1]],
                    first_line: lines[pair[0]],
                });
            }
            drop[pair[1]] = true;
            any = true;
        }
    }
    if !any {
        return Ok(records);
    }
    Ok(records
        .into_iter()
        .zip(drop)
        .filter(|(_, d)| !d)
        .map(|(r, _)| r)
        .collect())
}

/// The reply frame for a verdict (SPEC §3); `TRUE`, the common case, is not allocated.
pub fn reply_text(verdict: &Verdict) -> Cow<'static, [u8]> {
    match verdict {
        Verdict::Accept { .. } => Cow::Borrowed(b"TRUE"),
        Verdict::Conflict(reason) => Cow::Owned(format!("FALSE {reason}").into_bytes()),
    }
}

/// The wire body for records, one line each (the inverse of `parse_body`).
pub fn format_body(records: &[Record]) -> String {
    let mut s = String::with_capacity(records.len() * 32);
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&r.to_line());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_texts() {
        assert_eq!(
            reply_text(&Verdict::Accept { inserted: 3 }).as_ref(),
            b"TRUE"
        );
        assert_eq!(
            reply_text(&Verdict::Conflict("x".into())).as_ref(),
            b"FALSE x"
        );
    }

    fn ok(body: &str) -> Vec<Record> {
        parse_body(body.as_bytes()).unwrap_or_else(|e| panic!("{body:?}: {e}"))
    }

    fn reason(body: &[u8]) -> String {
        match parse_body(body) {
            Ok(r) => panic!("{body:?} parsed as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn rec(ticket: u64, login: u64, volume: u128) -> Record {
        Record {
            ticket,
            login,
            volume: Volume(volume),
        }
    }

    #[test]
    fn one_record() {
        assert_eq!(ok("1,2,3"), vec![rec(1, 2, 30_000)]);
        assert_eq!(ok("7,0,0.01"), vec![rec(7, 0, 100)]);
        assert_eq!(ok("7,0,12.5000"), vec![rec(7, 0, 125_000)]);
    }

    #[test]
    fn ticket_range() {
        assert_eq!(reason(b"0,1,1"), "line 1: ticket: must be at least 1");
        assert_eq!(ok("18446744073709551615,1,1")[0].ticket, u64::MAX);
        assert_eq!(
            reason(b"18446744073709551616,1,1"),
            "line 1: ticket: out of range (at most 18446744073709551615)"
        );
        assert_eq!(ok("1,18446744073709551615,1")[0].login, u64::MAX);
        assert!(reason(b"1,18446744073709551616,1").starts_with("line 1: login: out of range"));
    }

    #[test]
    fn numbers_are_plain_decimal() {
        for bad in ["-1", "+1", "1e3", "0x10", "1.0", " 1 2", "١"] {
            let body = format!("{bad},1,1");
            assert_eq!(
                reason(body.as_bytes()),
                "line 1: ticket: not a decimal integer",
                "{bad}"
            );
        }
        assert_eq!(reason(b"1,-2,1"), "line 1: login: not a decimal integer");
        assert_eq!(
            reason(b"1,2,-1"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(
            reason(b"1,2,+1"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(
            reason(b"1,2,1e3"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(
            reason(b"1,2,0x1"),
            "line 1: volume: not a non-negative decimal number"
        );
    }

    #[test]
    fn empty_fields_and_field_count() {
        assert_eq!(reason(b",1,1"), "line 1: ticket: empty");
        assert_eq!(reason(b"1,,1"), "line 1: login: empty");
        assert_eq!(reason(b"1,1,"), "line 1: volume: empty");
        assert_eq!(
            reason(b"1,1"),
            "line 1: expected 3 fields (ticket,login,volume), found 2"
        );
        assert_eq!(
            reason(b"1,1,1,1"),
            "line 1: expected 3 fields (ticket,login,volume), found 4"
        );
    }

    #[test]
    fn volume_digits() {
        assert_eq!(
            ok("1,1,9999999999999999.9999")[0].volume,
            Volume(99_999_999_999_999_999_999)
        );
        assert_eq!(
            reason(b"1,1,10000000000000000"),
            "line 1: volume: more than 16 integer digits"
        );
        assert_eq!(
            reason(b"1,1,1.00001"),
            "line 1: volume: more than 4 fraction digits"
        );
        assert_eq!(
            reason(b"1,1,.5"),
            "line 1: volume: no digits before the decimal point"
        );
        assert_eq!(
            reason(b"1,1,5."),
            "line 1: volume: no digits after the decimal point"
        );
        assert_eq!(
            reason(b"1,1,1.2.3"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(ok("1,1,1.5")[0].volume, ok("1,1,1.5000")[0].volume);
        assert_eq!(ok("1,1,0005")[0].volume, Volume(50_000));
    }

    #[test]
    fn spaces_and_line_endings() {
        assert_eq!(ok(" 1 , 2 , 3 "), vec![rec(1, 2, 30_000)]);
        assert_eq!(
            ok("1,2,3\r\n4,5,6\r\n"),
            vec![rec(1, 2, 30_000), rec(4, 5, 60_000)]
        );
        assert_eq!(ok("1,2,3\n").len(), 1);
        assert_eq!(reason(b"1,2,3\n\n"), "line 2: empty line");
        assert_eq!(reason(b"1,2,3\n\n4,5,6"), "line 2: empty line");
        assert_eq!(reason(b""), "empty message");
        assert_eq!(reason(b"\n"), "empty message");
        assert_eq!(reason(b"\r\n"), "empty message");
    }

    /// SPEC §4: spaces only around fields, and `\r` only as part of `\r\n`.
    #[test]
    fn no_tabs_and_no_lone_carriage_returns() {
        assert_eq!(
            reason(b"1,2,\t3"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(reason(b"\t1,2,3"), "line 1: ticket: not a decimal integer");
        assert_eq!(
            reason(b"1004,1,5\r"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(
            reason(b"1004,1,5\r\r\n"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(
            reason(b"1,1,5\r\r\n2,1,5"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(
            reason(b"1,1,5\r2,1,5"),
            "line 1: expected 3 fields (ticket,login,volume), found 5"
        );
        assert_eq!(ok("1,1,5\r\n2,1,5\r\n").len(), 2);
    }

    #[test]
    fn bytes_that_are_not_text() {
        assert_eq!(
            reason(b"1,2,\xff\xfe"),
            "line 1: volume: not a non-negative decimal number"
        );
        assert_eq!(reason(b"1\0,2,3"), "line 1: ticket: not a decimal integer");
        assert_eq!(
            reason(b"1,2,3\n4,\x005,6"),
            "line 2: login: not a decimal integer"
        );
    }

    #[test]
    fn bad_line_is_named() {
        let mut body = String::new();
        for t in 1..=100 {
            if t == 57 {
                body.push_str("57,1,1.00001\n");
            } else {
                body.push_str(&format!("{t},1,1\n"));
            }
        }
        assert_eq!(
            reason(body.as_bytes()),
            "line 57: volume: more than 4 fraction digits"
        );
    }

    #[test]
    fn repeated_ticket() {
        assert_eq!(
            ok("5,1,1\n6,1,1\n5,1,1.0"),
            vec![rec(5, 1, 10_000), rec(6, 1, 10_000)]
        );
        assert_eq!(
            reason(b"5,1,1\n6,1,1\n5,1,2"),
            "conflict: ticket 5 on line 3 differs from line 1"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_give_a_reason(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            match parse_body(&body) {
                Ok(records) => proptest::prop_assert!(!records.is_empty()),
                Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn text_like_input_never_panics(body in "[0-9, .\r\n+-]{0,200}") {
            let _ = parse_body(body.as_bytes());
        }

        #[test]
        fn format_then_parse_gives_the_same_records(
            rows in proptest::collection::btree_map(1u64.., (proptest::num::u64::ANY, 0u128..100_000_000_000_000_000_000), 1..50)
        ) {
            let records: Vec<Record> = rows
                .into_iter()
                .map(|(ticket, (login, v))| Record { ticket, login, volume: Volume(v) })
                .collect();
            proptest::prop_assert_eq!(parse_body(format_body(&records).as_bytes()), Ok(records));
        }
    }

    #[test]
    fn format_round_trip() {
        let records = vec![
            rec(1, 0, 0),
            rec(u64::MAX, u64::MAX, 99_999_999_999_999_999_999),
        ];
        assert_eq!(
            parse_body(format_body(&records).as_bytes()).unwrap(),
            records
        );
        assert_eq!(Volume(125_000).to_string(), "12.5000");
    }
}
