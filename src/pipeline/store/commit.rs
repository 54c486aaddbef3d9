//! The commit strategy: one batch committed atomically, the fast path first.
//!
//! Fast path: the plan with no stored rows. When its rows fit one statement, that is one
//! multi-row INSERT under autocommit and nothing else — one round trip, atomic in InnoDB (an
//! error such as a duplicate key rolls the whole statement back). Larger batches send their
//! INSERTs in one transaction. Only when the fast path hits a duplicate key does it take the
//! careful path: in one transaction read the batch's stored tickets, classify
//! (`classify::plan`), insert the new rows, COMMIT. Sessions run READ COMMITTED, so two
//! workers racing on one ticket end in 1062 for one of them, which redoes the careful path
//! and then sees the other's row.
//!
//! Used from worker threads, each on its own pooled connection.

use std::collections::HashMap;
use std::fmt::Write as _;

use mysql::prelude::Queryable;
use mysql::TxOpts;

use super::errors::{self, code_of, Class, ER_NO_SUCH_TABLE};
use super::pool::Conn;
use super::{Connection, Store, StoreError};
use crate::message::{Record, Verdict, Volume};
use crate::pipeline::classify::{self, StoredRow};

/// Most rows in one INSERT statement (so a huge message stays far below max_allowed_packet),
/// and so the largest batch that takes the one-round-trip fast path.
///
/// Measured here (MariaDB 10.11, 2 shared cores, rows/s, median of 3 [min–max]), prepared
/// 1,000-row statement under autocommit vs bigger commits, 1 / 2 client connections:
///   1,000 rows, one statement:               405k [378–411k] / 606k [598–648k]
///   2,000 rows, one statement:               331k [327–405k] / 554k [422–663k]
///   2,000 rows, 2 × 1,000 in one transaction: 427k [359–450k] / 561k [486–609k]
///   5,000 rows, one statement:               308k [244–342k] / 246k [224–520k]
///   5,000 rows, 5 × 1,000 in one transaction: 365k [271–383k] / 255k [247–403k]
/// Fewer COMMITs (fsyncs) do not pay beyond 1,000 rows and bigger statements lose, so 1,000
/// stays (and `batch_size = 1000` stays the default: a full batch is one round trip).
pub(super) const ROWS_PER_STATEMENT: usize = 1000;
/// Careful passes (the first and its redos after a duplicate-key race) before it counts as a
/// fault to back off from.
const RACE_REDOS: usize = 8;

impl Store {
    /// Commits one batch atomically and returns a verdict per message.
    /// Any error means nothing of this attempt is committed (or, for a COMMIT whose outcome is
    /// unknown, that a redo will find the rows and accept them). A connection error marks the
    /// connection broken, so the pool drops it; an error that means the host cannot take
    /// writes moves to the next host of the list.
    pub fn commit_batch(
        &self,
        conn: &mut Connection,
        messages: &[&[Record]],
    ) -> Result<Vec<Verdict>, StoreError> {
        let result = self.commit_batch_on(conn, messages);
        if let Err(StoreError::Mysql(e)) = &result {
            if errors::judge(e).breaks_connection {
                conn.mark_broken();
            }
        }
        self.note(conn.host, result.as_ref().map(|_| ()));
        result
    }

    /// The driver: runs the steps `next_step` chooses until it answers or gives up.
    fn commit_batch_on(
        &self,
        conn: &mut Connection,
        messages: &[&[Record]],
    ) -> Result<Vec<Verdict>, StoreError> {
        let classify::Plan {
            inserts,
            verdicts: mut answer,
            ..
        } = classify::plan(messages, &HashMap::new());
        let Conn {
            conn, full_chunk, ..
        } = &mut ***conn;
        let mut progress = Progress::Start {
            rows: inserts.len(),
        };
        let mut pass = 0;
        loop {
            progress = match next_step(progress) {
                Step::FastAutocommit => {
                    // The statement is its own transaction, so this is the only round trip.
                    Progress::Fast(self.fast_outcome(self.insert(conn, full_chunk, &inserts)))
                }
                Step::FastTransaction => {
                    Progress::Fast(self.fast_transaction(conn, full_chunk, &inserts))
                }
                Step::Careful => {
                    pass += 1;
                    let outcome = self.careful_pass(conn, full_chunk, messages, &mut answer);
                    Progress::Careful { pass, outcome }
                }
                Step::Answer => return Ok(answer),
                Step::RecreateTableThenFail(e) => {
                    // The table was dropped under us: recreate it, then let the caller retry.
                    let _ = self.ensure_table();
                    return Err(e);
                }
                Step::Fail(e) => return Err(e),
                Step::GiveUpRace => return Err(StoreError::Race),
            };
        }
    }

    /// The fast plan's INSERTs in one transaction (more rows than one statement takes).
    fn fast_transaction(
        &self,
        conn: &mut mysql::Conn,
        full_chunk: &mut Option<mysql::Statement>,
        rows: &[Record],
    ) -> Outcome<StoreError> {
        let mut tx = match conn.start_transaction(TxOpts::default()) {
            Ok(tx) => tx,
            Err(e) => return Outcome::Failed(e.into()),
        };
        match self.insert(&mut tx, full_chunk, rows) {
            Ok(()) => self.fast_outcome(tx.commit()),
            Err(e) if self.is_duplicate(&e) => match tx.rollback() {
                Ok(()) => Outcome::DuplicateKey,
                Err(e) => Outcome::Failed(e.into()),
            },
            // Dropping the transaction rolls it back.
            Err(e) => self.fast_outcome(Err(e)),
        }
    }

    /// One careful pass in one transaction: read the batch's stored tickets, classify, insert
    /// the new rows, mark rows committed, COMMIT; on COMMIT `answer` holds its verdicts. Only
    /// the INSERT's duplicate key (another writer won a race) is worth a redo.
    fn careful_pass(
        &self,
        conn: &mut mysql::Conn,
        full_chunk: &mut Option<mysql::Statement>,
        messages: &[&[Record]],
        answer: &mut Vec<Verdict>,
    ) -> Outcome<StoreError> {
        let mut tx = match conn.start_transaction(TxOpts::default()) {
            Ok(tx) => tx,
            Err(e) => return Outcome::Failed(e.into()),
        };
        let stored = match self.read_stored(&mut tx, messages) {
            Ok(stored) => stored,
            Err(e) => return Outcome::Failed(e),
        };
        let careful = classify::plan(messages, &stored);
        match self.insert(&mut tx, full_chunk, &careful.inserts) {
            Ok(()) => {}
            Err(e) if self.is_duplicate(&e) => {
                return match tx.rollback() {
                    Ok(()) => Outcome::DuplicateKey,
                    Err(e) => Outcome::Failed(e.into()),
                }
            }
            Err(e) => return Outcome::Failed(e.into()),
        }
        if !careful.mark_committed.is_empty() {
            let mark = format!(
                "UPDATE `{}` SET status = 'Y' WHERE ticket IN ({})",
                self.table,
                join(&careful.mark_committed)
            );
            if let Err(e) = tx.query_drop(mark) {
                return Outcome::Failed(e.into());
            }
        }
        match tx.commit() {
            Ok(()) => {
                *answer = careful.verdicts;
                Outcome::Committed
            }
            Err(e) => Outcome::Failed(e.into()),
        }
    }

    /// Multi-row INSERTs of up to `ROWS_PER_STATEMENT` rows. A full chunk goes through one
    /// prepared statement (binary protocol, cached per connection by the driver), which costs
    /// the server less than parsing text; smaller chunks go as text.
    ///
    /// Why not prepared at every size: measured (rows/s, 1 connection, autocommit, median of
    /// 3), text vs prepared (already cached): 1 row 3.6k vs 4.4k, 10 rows 33k vs 37k, 100 rows
    /// 203k vs 228k, 1,000 rows 316k vs 345k. But a partial batch can have any size from 1 to
    /// 999, and each new size costs a PREPARE round trip (and a server-side statement, the
    /// driver's cache holds 32), so the 10% would be paid for with a second round trip;
    /// text keeps every small batch at exactly one.
    fn insert<Q: Queryable>(
        &self,
        tx: &mut Q,
        full_chunk: &mut Option<mysql::Statement>,
        rows: &[Record],
    ) -> Result<(), mysql::Error> {
        let mut digits = itoa::Buffer::new();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            if chunk.len() == ROWS_PER_STATEMENT {
                let params: Vec<mysql::Value> = chunk
                    .iter()
                    .flat_map(|r| {
                        let mut volume = String::with_capacity(24);
                        push_volume(&mut volume, &mut digits, r.volume);
                        [
                            mysql::Value::UInt(r.ticket),
                            mysql::Value::UInt(r.login),
                            mysql::Value::Bytes(volume.into_bytes()),
                        ]
                    })
                    .collect();
                let stmt = match full_chunk {
                    Some(stmt) => stmt,
                    None => full_chunk.insert(tx.prep(&self.full_chunk_sql)?),
                };
                tx.exec_drop(&*stmt, params)?;
                continue;
            }
            let mut sql = String::with_capacity(64 + chunk.len() * 52);
            let _ = write!(
                sql,
                "INSERT INTO `{}` (ticket, login, volume, status) VALUES ",
                self.table
            );
            for (i, r) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                // Validated integers and decimals only: nothing here needs escaping.
                sql.push('(');
                sql.push_str(digits.format(r.ticket));
                sql.push(',');
                sql.push_str(digits.format(r.login));
                sql.push(',');
                push_volume(&mut sql, &mut digits, r.volume);
                sql.push_str(",'Y')");
            }
            tx.query_drop(sql)?;
        }
        Ok(())
    }

    fn read_stored(
        &self,
        tx: &mut mysql::Transaction<'_>,
        messages: &[&[Record]],
    ) -> Result<HashMap<u64, StoredRow>, StoreError> {
        let tickets: Vec<u64> = messages
            .iter()
            .flat_map(|m| m.iter().map(|r| r.ticket))
            .collect();
        let mut stored = HashMap::new();
        for chunk in tickets.chunks(ROWS_PER_STATEMENT) {
            let rows: Vec<(u64, u64, String, String)> = tx.query(format!(
                "SELECT ticket, login, CAST(volume AS CHAR), status FROM `{}` WHERE ticket IN ({})",
                self.table,
                join(chunk)
            ))?;
            for (ticket, login, volume, status) in rows {
                let volume =
                    Volume::parse(volume.as_bytes()).map_err(|_| StoreError::BadStoredVolume {
                        table: self.table.clone(),
                        ticket,
                        value: volume.clone(),
                    })?;
                stored.insert(
                    ticket,
                    StoredRow {
                        login,
                        volume,
                        committed: status == "Y",
                    },
                );
            }
        }
        Ok(stored)
    }
}

/// What happened so far in committing one batch: the input of `next_step`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Progress<E> {
    /// Nothing tried yet; the fast plan (no stored rows assumed) has `rows` rows to insert.
    Start { rows: usize },
    /// The fast path ended so.
    Fast(Outcome<E>),
    /// Careful pass number `pass` (from 1) ended so.
    Careful { pass: usize, outcome: Outcome<E> },
}

/// How a step that writes ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome<E> {
    Committed,
    /// 1062 from the INSERT, rolled back: a ticket of the batch is stored already.
    DuplicateKey,
    /// 1146 on the fast path: the table is gone.
    NoSuchTable(E),
    /// Anything else; nothing of this step is committed (or a redo will find it).
    Failed(E),
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step<E> {
    /// One multi-row INSERT under autocommit (the rows fit one statement).
    FastAutocommit,
    /// The fast plan's INSERTs in one transaction.
    FastTransaction,
    /// In one transaction: read the stored tickets (`SELECT … WHERE ticket IN`), classify,
    /// insert the new rows, mark, COMMIT.
    Careful,
    /// Answer with the verdicts of the plan that committed (the fast one if nothing was
    /// written).
    Answer,
    /// Recreate the table, then fail this attempt: the caller's retry finds it again.
    RecreateTableThenFail(E),
    /// Fail this attempt with the error: the caller backs off and retries.
    Fail(E),
    /// Other writers kept winning the race for these tickets (`StoreError::Race`).
    GiveUpRace,
}

/// The commit strategy, pure: given what happened so far, what to do next.
pub(super) fn next_step<E>(progress: Progress<E>) -> Step<E> {
    match progress {
        Progress::Start { rows: 0 } => Step::Answer,
        Progress::Start { rows } if rows <= ROWS_PER_STATEMENT => Step::FastAutocommit,
        Progress::Start { .. } => Step::FastTransaction,
        Progress::Fast(Outcome::Committed)
        | Progress::Careful {
            outcome: Outcome::Committed,
            ..
        } => Step::Answer,
        Progress::Fast(Outcome::DuplicateKey) => Step::Careful,
        Progress::Fast(Outcome::NoSuchTable(e)) => Step::RecreateTableThenFail(e),
        // Only the fast path recreates the table; the caller's next attempt starts there.
        Progress::Fast(Outcome::Failed(e))
        | Progress::Careful {
            outcome: Outcome::NoSuchTable(e) | Outcome::Failed(e),
            ..
        } => Step::Fail(e),
        Progress::Careful {
            pass,
            outcome: Outcome::DuplicateKey,
        } if pass < RACE_REDOS => Step::Careful,
        Progress::Careful { .. } => Step::GiveUpRace,
    }
}

impl Store {
    /// A fast-path statement's result as an outcome.
    fn fast_outcome(&self, result: Result<(), mysql::Error>) -> Outcome<StoreError> {
        fast_outcome(result, |e| self.is_duplicate(e))
    }

    /// A duplicate key on a key holding `ticket` (a resend, or a race): anything else is
    /// no duplicate ticket but a unique key an operator must fix (an error like any other).
    fn is_duplicate(&self, e: &mysql::Error) -> bool {
        is_duplicate(e, &self.ticket_keys.lock())
    }
}

fn fast_outcome(
    result: Result<(), mysql::Error>,
    is_duplicate: impl Fn(&mysql::Error) -> bool,
) -> Outcome<StoreError> {
    match result {
        Ok(()) => Outcome::Committed,
        Err(e) if is_duplicate(&e) => Outcome::DuplicateKey,
        Err(e) if code_of(&e) == Some(ER_NO_SUCH_TABLE) => Outcome::NoSuchTable(e.into()),
        Err(e) => Outcome::Failed(e.into()),
    }
}

fn is_duplicate(e: &mysql::Error, ticket_keys: &[String]) -> bool {
    errors::judge(e).class == Class::Duplicate
        && match e {
            mysql::Error::MySqlError(e) => errors::duplicate_key(&e.message)
                .is_none_or(|k| ticket_keys.iter().any(|t| t.eq_ignore_ascii_case(k))),
            _ => true,
        }
}

/// Appends a volume as DECIMAL(20,4) text ("12.3400"), like its Display but without the
/// formatter and u128 arithmetic, which cost a visible share of a worker's CPU at 100 records
/// per message: the integer part has at most 16 digits, so it fits a u64.
fn push_volume(out: &mut String, digits: &mut itoa::Buffer, v: Volume) {
    let (int, frac) = ((v.0 / 10_000) as u64, (v.0 % 10_000) as u16);
    out.push_str(digits.format(int));
    out.push('.');
    let frac = digits.format(frac + 10_000); // "1xxxx": keeps the leading zeros
    out.push_str(&frac[1..]);
}

fn join(tickets: &[u64]) -> String {
    let mut s = String::with_capacity(tickets.len() * 12);
    for (i, t) in tickets.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{t}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    type P = Progress<&'static str>;

    #[test]
    fn an_empty_plan_is_answered_without_a_round_trip() {
        assert_eq!(next_step(P::Start { rows: 0 }), Step::Answer);
    }

    #[test]
    fn rows_that_fit_one_statement_go_under_autocommit() {
        assert_eq!(next_step(P::Start { rows: 1 }), Step::FastAutocommit);
        assert_eq!(
            next_step(P::Start {
                rows: ROWS_PER_STATEMENT
            }),
            Step::FastAutocommit
        );
        assert_eq!(
            next_step(P::Start {
                rows: ROWS_PER_STATEMENT + 1
            }),
            Step::FastTransaction
        );
    }

    #[test]
    fn a_committed_fast_path_answers() {
        assert_eq!(next_step(P::Fast(Outcome::Committed)), Step::Answer);
    }

    #[test]
    fn a_duplicate_on_the_fast_path_takes_the_careful_path() {
        assert_eq!(next_step(P::Fast(Outcome::DuplicateKey)), Step::Careful);
    }

    #[test]
    fn a_missing_table_on_the_fast_path_is_recreated_and_the_attempt_fails() {
        assert_eq!(
            next_step(P::Fast(Outcome::NoSuchTable("1146"))),
            Step::RecreateTableThenFail("1146")
        );
    }

    #[test]
    fn other_fast_path_errors_fail_the_attempt() {
        assert_eq!(
            next_step(P::Fast(Outcome::Failed("1213"))),
            Step::Fail("1213")
        );
    }

    #[test]
    fn a_committed_careful_pass_answers() {
        let p = P::Careful {
            pass: 3,
            outcome: Outcome::Committed,
        };
        assert_eq!(next_step(p), Step::Answer);
    }

    #[test]
    fn careful_errors_fail_the_attempt_without_recreating() {
        for outcome in [Outcome::Failed("e"), Outcome::NoSuchTable("e")] {
            let p = P::Careful { pass: 1, outcome };
            assert_eq!(next_step(p), Step::Fail("e"));
        }
    }

    /// Racing writers: redo the careful pass, `RACE_REDOS` passes in all, then give up.
    #[test]
    fn a_lost_race_is_redone_then_given_up() {
        let mut progress = P::Fast(Outcome::DuplicateKey);
        let mut passes = 0;
        loop {
            match next_step(progress) {
                Step::Careful => passes += 1,
                Step::GiveUpRace => break,
                other => panic!("{other:?}"),
            }
            progress = P::Careful {
                pass: passes,
                outcome: Outcome::DuplicateKey,
            };
        }
        assert_eq!(passes, RACE_REDOS);
    }

    #[test]
    fn only_duplicate_keys_take_the_careful_path() {
        let server = |code| {
            mysql::Error::MySqlError(mysql::MySqlError {
                state: "23000".into(),
                message: "x".into(),
                code,
            })
        };
        let keys = ["PRIMARY".to_string()];
        let fast_outcome = |r| fast_outcome(r, |e: &mysql::Error| is_duplicate(e, &keys));
        assert!(matches!(
            fast_outcome(Err(server(1062))),
            Outcome::DuplicateKey
        ));
        assert!(matches!(
            fast_outcome(Err(server(1146))),
            Outcome::NoSuchTable(StoreError::Mysql(_))
        ));
        assert!(matches!(
            fast_outcome(Err(server(1213))),
            Outcome::Failed(StoreError::Mysql(_))
        ));
        assert!(matches!(fast_outcome(Ok(())), Outcome::Committed));
    }

    #[test]
    fn a_duplicate_on_another_key_is_no_resend() {
        let dup = |message: &str| {
            mysql::Error::MySqlError(mysql::MySqlError {
                state: "23000".into(),
                message: message.into(),
                code: 1062,
            })
        };
        let keys = ["PRIMARY".to_string(), "t".to_string()];
        assert!(is_duplicate(
            &dup("Duplicate entry '7' for key 'PRIMARY'"),
            &keys
        ));
        assert!(is_duplicate(
            &dup("Duplicate entry '7' for key 'fee.t'"),
            &keys
        ));
        assert!(!is_duplicate(
            &dup("Duplicate entry '3' for key 'login'"),
            &keys
        ));
        assert!(
            is_duplicate(&dup("no key named"), &keys),
            "unknown: as before"
        );
    }

    #[test]
    fn volumes_are_written_like_display() {
        let mut digits = itoa::Buffer::new();
        for v in [
            0u128,
            1,
            9_999,
            10_000,
            123_456_789,
            99_999_999_999_999_999_999,
        ] {
            let mut out = String::new();
            push_volume(&mut out, &mut digits, Volume(v));
            assert_eq!(out, Volume(v).to_string());
        }
    }

    #[test]
    fn join_lists() {
        assert_eq!(join(&[1, 2, 3]), "1,2,3");
        assert_eq!(join(&[]), "");
    }
}
