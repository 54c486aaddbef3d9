//! Failover over the ordered host list of `[mysql] host` (SPEC §9; parsed in config/hosts.rs):
//! the move to the next host and its rounds, and the reason logged when an error means "this
//! host cannot take writes now" (which errors do is `store::errors`' table).
//!
//! Pure logic with no threads or I/O; the store owns one `Failover` behind a mutex and is the
//! only place that consults it, so workers never know which host they write to.

use std::fmt;

pub use crate::config::hosts::HostAddr;
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
    }

    #[test]
    fn stale_failures_do_not_move_again() {
        let mut f = Failover::new(3, 0);
        assert!(f.failed(0).is_some());
        // Other workers' connections to host 0 fail too: they must not push past host 1.
        assert_eq!(f.failed(0), None);
        assert_eq!(f.failed(2), None);
        assert_eq!(f.failed(1).map(|m| (m.from, m.to)), Some((1, 2)));
    }

    #[test]
    fn sticks_to_a_working_host() {
        let mut f = Failover::new(2, 0);
        f.failed(0);
        f.worked();
        // Host 0 may be back: no move unless host 1 fails, and that starts a fresh round.
        assert_eq!(f.failed(0), None);
        let m = f.failed(1).unwrap();
        assert_eq!((m.from, m.to, m.full_round), (1, 0, false));
    }

    #[test]
    fn a_round_is_every_host_failing_without_a_success_between() {
        let mut f = Failover::new(2, 0);
        let mut at = 0;
        let mut fail = |f: &mut Failover| {
            let m = f.failed(at).unwrap();
            at = m.to;
            m.full_round
        };
        let rounds: Vec<bool> = (0..4).map(|_| fail(&mut f)).collect();
        assert_eq!(rounds, [false, true, false, true]);
        fail(&mut f);
        f.worked();
        assert!(!fail(&mut f));
    }

    #[test]
    fn a_single_host_is_its_own_round() {
        let mut f = Failover::new(1, 0);
        let m = f.failed(0).unwrap();
        assert_eq!((m.from, m.to, m.full_round), (0, 0, true));
    }
}
