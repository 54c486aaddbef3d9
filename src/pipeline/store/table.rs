//! The table check: `CREATE TABLE IF NOT EXISTS`, then the table's definition read from
//! `information_schema` and judged by the pure `pipeline/schema.rs`.
//!
//! Used by the thread that builds a `Store` (start-up, reload) and by a worker thread when
//! its batch finds the table gone or an operator must act (`diagnose`).

use mysql::prelude::Queryable;

use super::{Connection, Store, StoreError};
use crate::pipeline::schema::{self, Check, Column, UniqueKey};

impl Store {
    /// `CREATE TABLE IF NOT EXISTS`, then checks the table fits what feedd writes.
    pub fn ensure_table(&self) -> Result<(), StoreError> {
        let active = self.active.load();
        let mut conn = Connection {
            conn: active.pool.get()?,
            host: active.host,
        };
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS `{}` (
               ticket BIGINT UNSIGNED NOT NULL PRIMARY KEY,
               login  BIGINT UNSIGNED NOT NULL,
               volume DECIMAL(20,4)   NOT NULL,
               status CHAR(1)         NOT NULL DEFAULT 'N'
             ) ENGINE=InnoDB",
            self.table
        ))?;
        self.check_table(&mut conn)
    }

    /// Reads the table's definition and judges it (`schema::judge`).
    fn check_table(&self, conn: &mut Connection) -> Result<(), StoreError> {
        type Row = (
            String,
            String,
            String,
            Option<u64>,
            Option<u64>,
            Option<u64>,
            String,
            Option<String>,
            String,
        );
        let rows: Vec<Row> = conn.exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_PRECISION, NUMERIC_SCALE,
                    CHARACTER_MAXIMUM_LENGTH, IS_NULLABLE, COLUMN_DEFAULT, EXTRA
             FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (&self.table,),
        )?;
        let columns: Vec<Column> = rows
            .into_iter()
            .map(
                |(
                    name,
                    data_type,
                    column_type,
                    precision,
                    scale,
                    char_length,
                    nullable,
                    default,
                    extra,
                )| {
                    Column {
                        name,
                        data_type: data_type.to_ascii_lowercase(),
                        column_type: column_type.to_ascii_lowercase(),
                        precision,
                        scale,
                        char_length,
                        nullable: nullable.eq_ignore_ascii_case("YES"),
                        default,
                        extra,
                    }
                },
            )
            .collect();
        let keys = read_unique_keys(conn, &self.table)?;
        let checks = read_checks(conn, &self.table)?;
        // Which key names a duplicate-key error may name for a resent ticket.
        *self.ticket_keys.lock() = keys
            .iter()
            .filter(|k| k.columns.iter().any(|c| c.eq_ignore_ascii_case("ticket")))
            .map(|k| k.name.clone())
            .collect();
        let unique: Vec<String> = keys
            .iter()
            .filter(|k| k.columns.len() == 1)
            .map(|k| k.columns[0].clone())
            .collect();
        let engine: Option<String> = conn.exec_first(
            "SELECT ENGINE FROM information_schema.TABLES
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (&self.table,),
        )?;
        let problems = if columns.is_empty() {
            vec!["it does not exist".to_string()]
        } else {
            let mut problems = schema::judge(&columns, &unique);
            problems.extend(schema::judge_unique_keys(&columns, &keys));
            problems.extend(schema::judge_checks(&checks));
            problems.extend(engine.as_deref().and_then(schema::judge_engine));
            problems
        };
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Schema {
                table: self.table.clone(),
                problems,
            })
        }
    }

    /// For the log when an operator must act: what the table check says now.
    pub fn diagnose(&self) -> String {
        let active = self.active.load();
        match active
            .pool
            .get()
            .map_err(StoreError::from)
            .map(|conn| Connection {
                conn,
                host: active.host,
            })
            .and_then(|mut c| self.check_table(&mut c))
        {
            Ok(()) => "the table's columns fit; check grants, disk and the server log".to_string(),
            Err(e) => e.to_string(),
        }
    }
}

/// The table's unique indexes with their columns in index order.
fn read_unique_keys(conn: &mut Connection, table: &str) -> Result<Vec<UniqueKey>, StoreError> {
    let rows: Vec<(String, String)> = conn.exec(
        "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND NON_UNIQUE = 0
         ORDER BY INDEX_NAME, SEQ_IN_INDEX",
        (table,),
    )?;
    let mut keys: Vec<UniqueKey> = Vec::new();
    for (name, column) in rows {
        match keys.last_mut().filter(|k| k.name == name) {
            Some(k) => k.columns.push(column),
            None => keys.push(UniqueKey {
                name,
                columns: vec![column],
            }),
        }
    }
    Ok(keys)
}

/// The table's CHECK constraints (MariaDB names the table in `CHECK_CONSTRAINTS`; MySQL 8
/// only through `TABLE_CONSTRAINTS`).
fn read_checks(conn: &mut Connection, table: &str) -> Result<Vec<Check>, StoreError> {
    let rows: Result<Vec<(String, String)>, _> = conn.exec(
        "SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS
         WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = ?",
        (table,),
    );
    let rows = match rows {
        Ok(rows) => rows,
        Err(_) => conn.exec(
            "SELECT tc.CONSTRAINT_NAME, cc.CHECK_CLAUSE
             FROM information_schema.TABLE_CONSTRAINTS tc
             JOIN information_schema.CHECK_CONSTRAINTS cc
               ON cc.CONSTRAINT_SCHEMA = tc.CONSTRAINT_SCHEMA
              AND cc.CONSTRAINT_NAME = tc.CONSTRAINT_NAME
             WHERE tc.TABLE_SCHEMA = DATABASE() AND tc.TABLE_NAME = ?
               AND tc.CONSTRAINT_TYPE = 'CHECK'",
            (table,),
        )?,
    };
    Ok(rows
        .into_iter()
        .map(|(name, clause)| Check { name, clause })
        .collect())
}
