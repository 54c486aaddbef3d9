//! Failover over the ordered host list of `[mysql] host` (SPEC §9; parsed in config/hosts.rs):
//! the move to the next host and its rounds (`crate::failover`, shared with the AMQP broker
//! list), and the reason logged when an error means "this
//! host cannot take writes now" (which errors do is `store::errors`' table).
//!
//! Pure logic with no threads or I/O; the store owns one `Failover` behind a mutex and is the
//! only place that consults it, so workers never know which host they write to.

use std::fmt;

pub use crate::config::hosts::HostAddr;
pub use crate::failover::{Failover, Move};
use crate::pipeline::store::errors::{self, Away, Class};

/// Why writes cannot go to a host now (and feedd moves to the next one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveReason {
    /// Refused, timed out, or the connection was lost.
    Unreachable(String),
    /// 1290 (`--read-only`) or 1836 (read-only mode).
    ReadOnly(u16),
    /// 1047: a Galera node that is not ready or not in the primary component.
    NotPrimary,
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoveReason::Unreachable(why) => write!(f, "unreachable ({why})"),
            MoveReason::ReadOnly(code) => write!(f, "read-only (error {code})"),
            MoveReason::NotPrimary => {
                write!(f, "Galera node not ready or not primary (error 1047)")
            }
        }
    }
}

/// The reason to leave the host a driver error came from, or `None` when the error is about
/// the statement or transaction (deadlock, certification conflict, duplicate key…) and the
/// host itself is fine. Which errors move is decided by the store's one error table
/// (`store::errors`); this only words the reason for the log.
pub fn move_reason(error: &mysql::Error) -> Option<MoveReason> {
    let Class::MoveHost(away) = errors::judge(error).class else {
        return None;
    };
    Some(match (away, error) {
        (Away::NotPrimary, _) => MoveReason::NotPrimary,
        (Away::ReadOnly, mysql::Error::MySqlError(e)) => MoveReason::ReadOnly(e.code),
        (_, mysql::Error::MySqlError(e)) => {
            MoveReason::Unreachable(format!("error {}: {}", e.code, e.message))
        }
        (_, other) => MoveReason::Unreachable(errors::text(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(code: u16, message: &str) -> mysql::Error {
        mysql::Error::MySqlError(mysql::MySqlError {
            state: "HY000".into(),
            message: message.into(),
            code,
        })
    }

    #[test]
    fn which_errors_move() {
        assert_eq!(
            move_reason(&server_error(
                1047,
                "WSREP has not yet prepared node for application use"
            )),
            Some(MoveReason::NotPrimary)
        );
        assert_eq!(
            move_reason(&server_error(
                1290,
                "The MariaDB server is running with the --read-only option so it cannot execute this statement"
            )),
            Some(MoveReason::ReadOnly(1290))
        );
        assert_eq!(
            move_reason(&server_error(1836, "Running in read-only mode")),
            Some(MoveReason::ReadOnly(1836))
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            move_reason(&mysql::Error::IoError(refused)),
            Some(MoveReason::Unreachable(_))
        ));
        assert!(matches!(
            move_reason(&mysql::Error::DriverError(
                mysql::DriverError::ConnectTimeout
            )),
            Some(MoveReason::Unreachable(_))
        ));
        // Statement-level trouble stays on the host.
        for code in [1213, 1205, 1062, 1146, 1406] {
            assert_eq!(move_reason(&server_error(code, "x")), None, "{code}");
        }
        // 1290 for another option (e.g. --skip-grant-tables) is not read-only.
        assert_eq!(
            move_reason(&server_error(
                1290,
                "running with the --skip-grant-tables option"
            )),
            None
        );
    }
}
