//! What a MySQL/MariaDB error means for feedd, in one table: retry on this host, move to the
//! next host, or hold the batch until an operator acts; and whether the connection that
//! returned it can be used again.
//!
//! Pure, no I/O. Consulted by the store on worker threads (retry policy, `is_transient`,
//! marking connections broken) and by the failover (`hosts::move_reason`), so each code is
//! judged in one place.

/// 1045: the account or its password is refused (also what a plaintext login gets from a
/// server that sets `require_secure_transport`).
pub const ER_ACCESS_DENIED: u16 = 1045;
/// 1062: a row with one of the batch's tickets exists already.
pub const ER_DUP_ENTRY: u16 = 1062;
/// 1146: the table does not exist (dropped under us).
pub const ER_NO_SUCH_TABLE: u16 = 1146;
/// 1290: "running with the --OPTION option": read-only only when the option is.
pub const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Heals by itself on this host (lock conflicts, a connection lost, too many
    /// connections): retry here after a backoff.
    RetryHere,
    /// This host cannot take writes now: move to the next host of the list.
    MoveHost(Away),
    /// About the table, the data, the grants or the disk: retried too (nothing accepted is
    /// dropped) but logged as an error an operator must fix.
    OperatorMustAct,
    /// A ticket of the batch is stored already: not a fault, the commit strategy reads the
    /// stored rows and classifies (which may reject a conflicting message).
    Duplicate,
}

/// Why a host cannot take writes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Away {
    /// Refused, timed out, or the connection was lost (any client-side error).
    Unreachable,
    /// The server says it is shutting down.
    Going,
    /// `--read-only` or read-only mode.
    ReadOnly,
    /// A Galera node that is not ready or not in the primary component.
    NotPrimary,
}

/// An error's class, and whether the connection that returned it must not be used again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub class: Class,
    pub breaks_connection: bool,
}

const GONE: bool = true;
const KEPT: bool = false;

use Away::{Going, NotPrimary, ReadOnly};
use Class::{Duplicate, MoveHost, OperatorMustAct, RetryHere};

/// Every server error code judged specially, with whether the server closes the connection
/// after it. Any other code: `OperatorMustAct`, connection kept (1054 unknown column, 1264
/// out of range, 1406 too long, 1364 no default, 1142 denied, 1114 table full, …).
const TABLE: &[(u16, Class, bool)] = &[
    (1040, RetryHere, KEPT), // too many connections
    (ER_ACCESS_DENIED, OperatorMustAct, KEPT),
    (1047, MoveHost(NotPrimary), KEPT), // WSREP has not yet prepared node
    (1053, MoveHost(Going), GONE),      // server shutdown in progress
    (ER_DUP_ENTRY, Duplicate, KEPT),
    (ER_NO_SUCH_TABLE, RetryHere, KEPT), // the next attempt recreates the table
    (1152, RetryHere, GONE),             // aborted connection
    (1153, RetryHere, GONE),             // packet too large (the server closes)
    (1154, RetryHere, KEPT),             // read error from the connection pipe
    (1155, RetryHere, KEPT),             // fcntl() error
    (1156, RetryHere, KEPT),             // packets out of order
    (1157, RetryHere, KEPT),             // could not uncompress
    (1158, RetryHere, KEPT),             // error reading packets
    (1159, RetryHere, GONE),             // timeout reading packets
    (1160, RetryHere, GONE),             // error writing packets
    (1161, RetryHere, GONE),             // timeout writing packets
    // Aborted new connection and idle timeout close the connection, yet are logged as faults
    // an operator must look at (as they always were; candidates for RetryHere).
    (1184, OperatorMustAct, GONE),
    (1205, RetryHere, KEPT), // lock wait timeout
    (1213, RetryHere, KEPT), // deadlock (Galera: certification conflict)
    (ER_OPTION_PREVENTS_STATEMENT, MoveHost(ReadOnly), KEPT), // see `judge_server`
    (1317, RetryHere, KEPT), // query interrupted
    (1836, MoveHost(ReadOnly), KEPT), // running in read-only mode
    (1927, RetryHere, GONE), // connection killed
    (4031, OperatorMustAct, GONE), // disconnected by the server for inactivity
];

/// What a driver error means. Client-side errors (I/O, protocol, driver, TLS) mean the host
/// is unreachable, except values that do not convert, which are about the data; either way
/// the connection is not trusted again.
pub fn judge(error: &mysql::Error) -> Judged {
    use mysql::Error;
    match error {
        Error::MySqlError(e) => judge_server(e.code, &e.message),
        Error::FromValueError(_) | Error::FromRowError(_) | Error::UrlError(_) => Judged {
            class: RetryHere,
            breaks_connection: true,
        },
        _ => Judged {
            class: MoveHost(Away::Unreachable),
            breaks_connection: true,
        },
    }
}

/// A server error by code and message (only 1290 needs the message).
pub fn judge_server(code: u16, message: &str) -> Judged {
    let (class, breaks_connection) = TABLE
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or((OperatorMustAct, KEPT), |&(_, class, gone)| (class, gone));
    // 1290 for another option (e.g. --skip-grant-tables) is not read-only: stay and retry.
    let class = if code == ER_OPTION_PREVENTS_STATEMENT && !message.contains("read-only") {
        RetryHere
    } else {
        class
    };
    Judged {
        class,
        breaks_connection,
    }
}

impl Class {
    /// Heals without an operator (logged as a warning, not as an error).
    pub fn is_transient(self) -> bool {
        matches!(self, RetryHere | MoveHost(_))
    }
}

/// The key a 1062 message names ("Duplicate entry '7' for key 'PRIMARY'"; MySQL 8 writes
/// `table.key`), without the table.
pub fn duplicate_key(message: &str) -> Option<&str> {
    let (_, key) = message.rsplit_once("for key '")?;
    let key = key.strip_suffix('\'')?;
    Some(key.rsplit_once('.').map_or(key, |(_, k)| k))
}

/// A driver error as one line for people: the driver's Display wraps server and connection
/// errors in their variant names (`MySqlError { ERROR 1049 (42000): … }`).
pub fn text(e: &mysql::Error) -> String {
    match e {
        mysql::Error::MySqlError(e) => e.to_string(),
        mysql::Error::DriverError(e) => e.to_string(),
        mysql::Error::IoError(e) => e.to_string(),
        e => e.to_string(),
    }
}

/// The server error code, if `e` is a server error.
pub fn code_of(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(e) => Some(e.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(code: u16) -> Class {
        judge_server(code, "x").class
    }

    #[test]
    fn each_code_is_in_the_table_once() {
        let mut codes: Vec<u16> = TABLE.iter().map(|(c, _, _)| *c).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), TABLE.len());
    }

    /// The codes the store retried quietly before the table existed, exactly.
    #[test]
    fn transient_codes_are_the_old_list() {
        let transient: Vec<u16> = (1000..5000)
            .filter(|&c| judge_server(c, "read-only").class.is_transient())
            .collect();
        assert_eq!(
            transient,
            [
                1040, 1047, 1053, 1146, 1152, 1153, 1154, 1155, 1156, 1157, 1158, 1159, 1160, 1161,
                1205, 1213, 1290, 1317, 1836, 1927
            ]
        );
        // 1290 stays transient for another option too, it only does not move.
        assert!(class(1290).is_transient());
    }

    /// The codes after which the connection was dropped before the table existed, exactly.
    #[test]
    fn connection_gone_codes_are_the_old_list() {
        let gone: Vec<u16> = (1000..5000)
            .filter(|&c| judge_server(c, "").breaks_connection)
            .collect();
        assert_eq!(gone, [1053, 1152, 1153, 1159, 1160, 1161, 1184, 1927, 4031]);
    }

    #[test]
    fn classes() {
        assert_eq!(class(1213), RetryHere);
        assert_eq!(class(1205), RetryHere);
        assert_eq!(class(1146), RetryHere);
        assert_eq!(class(1062), Duplicate);
        assert_eq!(class(1047), MoveHost(NotPrimary));
        assert_eq!(class(1053), MoveHost(Going));
        assert_eq!(class(1836), MoveHost(ReadOnly));
        assert_eq!(
            judge_server(1290, "running with the --read-only option").class,
            MoveHost(ReadOnly)
        );
        assert_eq!(
            judge_server(1290, "running with the --skip-grant-tables option").class,
            RetryHere
        );
        for code in [1045, 1054, 1264, 1406, 1364, 1366, 1142, 1114, 1184, 4031] {
            assert_eq!(class(code), OperatorMustAct, "{code}");
            assert!(!class(code).is_transient(), "{code}");
        }
        assert!(!Duplicate.is_transient());
    }

    #[test]
    fn client_side_errors() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            judge(&mysql::Error::IoError(refused)),
            Judged {
                class: MoveHost(Away::Unreachable),
                breaks_connection: true
            }
        );
        let timeout = mysql::Error::DriverError(mysql::DriverError::ConnectTimeout);
        assert_eq!(judge(&timeout).class, MoveHost(Away::Unreachable));
        let url = mysql::Error::UrlError(mysql::UrlError::BadUrl);
        assert_eq!(
            judge(&url),
            Judged {
                class: RetryHere,
                breaks_connection: true
            }
        );
        assert_eq!(code_of(&url), None);
    }
}
