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

use super::errors::{self, code_of, ER_DUP_ENTRY, ER_NO_SUCH_TABLE};
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
/// Careful-path redos after a duplicate-key race before it counts as a fault to back off from.
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

    fn commit_batch_on(
        &self,
        conn: &mut Connection,
        messages: &[&[Record]],
    ) -> Result<Vec<Verdict>, StoreError> {
        let fast = classify::plan(messages, &HashMap::new());
        let Conn {
            conn, full_chunk, ..
        } = &mut ***conn;
        let attempt = if fast.inserts.is_empty() {
            Ok(())
        } else if fast.inserts.len() <= ROWS_PER_STATEMENT {
            // Autocommit: the statement is its own transaction, so this is the only round trip.
            self.insert(conn, full_chunk, &fast.inserts)
        } else {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            match self.insert(&mut tx, full_chunk, &fast.inserts) {
                Ok(()) => tx.commit(),
                Err(e) => {
                    if code_of(&e) == Some(ER_DUP_ENTRY) {
                        tx.rollback()?;
                    }
                    Err(e)
                }
            }
        };
        match attempt {
            Ok(()) => return Ok(fast.verdicts),
            Err(e) if code_of(&e) == Some(ER_DUP_ENTRY) => {}
            Err(e) => {
                if code_of(&e) == Some(ER_NO_SUCH_TABLE) {
                    // The table was dropped under us: recreate it, then let the caller retry.
                    let _ = self.ensure_table();
                }
                return Err(e.into());
            }
        }
        for _ in 0..RACE_REDOS {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let stored = self.read_stored(&mut tx, messages)?;
            let careful = classify::plan(messages, &stored);
            match self.insert(&mut tx, full_chunk, &careful.inserts) {
                Ok(()) => {}
                Err(e) if code_of(&e) == Some(ER_DUP_ENTRY) => {
                    tx.rollback()?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            if !careful.mark_committed.is_empty() {
                tx.query_drop(format!(
                    "UPDATE `{}` SET status = 'Y' WHERE ticket IN ({})",
                    self.table,
                    join(&careful.mark_committed)
                ))?;
            }
            tx.commit()?;
            return Ok(careful.verdicts);
        }
        Err(StoreError::Race)
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
