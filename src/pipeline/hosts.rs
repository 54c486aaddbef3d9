//! Failover over the ordered host list of `[mysql] host` (SPEC §9; parsed in config/hosts.rs):
//! telling which database errors mean "this host cannot take writes now", and the move to the
//! next host.
//!
//! Pure logic with no threads or I/O; the store owns one `Failover` behind a mutex and is the
//! only place that consults it, so workers never know which host they write to.

use std::fmt;

pub use crate::config::hosts::HostAddr;

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

pub const ER_UNKNOWN_COM_ERROR: u16 = 1047;
pub const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;
pub const ER_READ_ONLY_MODE: u16 = 1836;

/// Server errors that say the server is going away: 1053 shutdown in progress.
const SERVER_GOING: [u16; 1] = [1053];

/// The reason to leave the host a driver error came from, or `None` when the error is about
/// the statement or transaction (deadlock, certification conflict, duplicate key…) and the
/// host itself is fine. Every client-side error (I/O, protocol, driver, TLS) counts as the
/// host being unreachable: a connection that broke mid-way shows up as several of them.
pub fn move_reason(error: &mysql::Error) -> Option<MoveReason> {
    use mysql::Error;
    match error {
        Error::MySqlError(e) => match e.code {
            ER_UNKNOWN_COM_ERROR => Some(MoveReason::NotPrimary),
            ER_OPTION_PREVENTS_STATEMENT if e.message.contains("read-only") => {
                Some(MoveReason::ReadOnly(e.code))
            }
            ER_READ_ONLY_MODE => Some(MoveReason::ReadOnly(e.code)),
            code if SERVER_GOING.contains(&code) => Some(MoveReason::Unreachable(format!(
                "error {code}: {}",
                e.message
            ))),
            _ => None,
        },
        // Values that do not convert: about the data, not the host.
        Error::FromValueError(_) | Error::FromRowError(_) | Error::UrlError(_) => None,
        other => Some(MoveReason::Unreachable(other.to_string())),
    }
}

/// A move from one host to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: usize,
    pub to: usize,
    /// Every host has failed since the last success (the caller's backoff is what spaces
    /// the rounds; this is for saying so once per round).
    pub full_round: bool,
}

/// Which host of the list takes writes, and how it changes: stay while it works; on a
/// failure of the current host, the next one in order, wrapping around.
#[derive(Debug)]
pub struct Failover {
    len: usize,
    current: usize,
    /// Hosts that failed since the last success.
    failed_in_round: usize,
}

impl Failover {
    /// Starts at host `current` of a list of `len` (at least 1).
    pub fn new(len: usize, current: usize) -> Failover {
        let len = len.max(1);
        Failover {
            len,
            current: current % len,
            failed_in_round: 0,
        }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// Host `host` failed for a reason to move. A failure reported for a host that is no
    /// longer the current one (a connection older than the last move) changes nothing.
    pub fn failed(&mut self, host: usize) -> Option<Move> {
        if host != self.current {
            return None;
        }
        let from = self.current;
        self.current = (self.current + 1) % self.len;
        self.failed_in_round += 1;
        let full_round = self.failed_in_round >= self.len;
        if full_round {
            self.failed_in_round = 0;
        }
        Some(Move {
            from,
            to: self.current,
            full_round,
        })
    }

    /// A write succeeded on the current host: the next failure starts a fresh round.
    pub fn worked(&mut self) {
        self.failed_in_round = 0;
    }

    /// Whether `worked` has anything to reset (lets the store skip the lock on the hot path).
    pub fn in_round(&self) -> bool {
        self.failed_in_round > 0
    }
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

    #[test]
    fn moves_in_order_and_wraps() {
        let mut f = Failover::new(3, 0);
        assert_eq!(f.failed(0).map(|m| (m.from, m.to)), Some((0, 1)));
        assert_eq!(f.failed(1).map(|m| (m.from, m.to)), Some((1, 2)));
        let m = f.failed(2).unwrap();
        assert_eq!((m.from, m.to, m.full_round), (2, 0, true));
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn stale_failures_do_not_move_again() {
        let mut f = Failover::new(3, 0);
        assert!(f.failed(0).is_some());
        // Other workers' connections to host 0 fail too: they must not push past host 1.
        assert_eq!(f.failed(0), None);
        assert_eq!(f.failed(2), None);
        assert_eq!(f.current(), 1);
    }

    #[test]
    fn sticks_to_a_working_host() {
        let mut f = Failover::new(3, 0);
        f.failed(0);
        f.worked();
        // Host 0 may be back: no move unless host 1 fails.
        assert_eq!(f.current(), 1);
        assert!(!f.in_round());
    }

    #[test]
    fn a_round_is_every_host_failing_without_a_success_between() {
        let mut f = Failover::new(2, 0);
        let rounds: Vec<bool> = (0..4)
            .map(|_| f.failed(f.current()).unwrap().full_round)
            .collect();
        assert_eq!(rounds, [false, true, false, true]);
        f.failed(f.current());
        f.worked();
        assert!(!f.failed(f.current()).unwrap().full_round);
    }

    #[test]
    fn a_single_host_is_its_own_round() {
        let mut f = Failover::new(1, 0);
        let m = f.failed(0).unwrap();
        assert_eq!((m.from, m.to, m.full_round), (0, 0, true));
    }
}
