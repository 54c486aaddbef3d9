//! Does a table fit what feedd writes? The pure judgement of its column definitions.
//!
//! feedd inserts `ticket`, `login` (0 … 2^64−1), `volume` (16 integer and 4 fraction digits,
//! exact) and `status = 'Y'`, and relies on a unique `ticket` for idempotent resends. A column
//! narrower than that would truncate, round or refuse acknowledged data, so such a table is
//! refused at start, on reload and when it is (re)created, naming each column, its type and
//! what is needed. So is a table with a second unique key or a CHECK constraint a valid
//! record can violate (it would be held and retried forever), naming the key or constraint.
//! `store/table.rs` reads `information_schema` and calls the judges.

/// One column as `information_schema.COLUMNS` describes it (types in lower case).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Column {
    pub name: String,
    /// `DATA_TYPE`, e.g. `bigint`, `decimal`, `varchar`.
    pub data_type: String,
    /// `COLUMN_TYPE`, e.g. `bigint(20) unsigned`, `decimal(20,4)`.
    pub column_type: String,
    pub precision: Option<u64>,
    pub scale: Option<u64>,
    pub char_length: Option<u64>,
    pub nullable: bool,
    /// `COLUMN_DEFAULT`; `None` when the column has no default.
    pub default: Option<String>,
    /// `EXTRA`, e.g. `auto_increment`, `VIRTUAL GENERATED`, `STORED GENERATED`, `PERSISTENT`.
    pub extra: String,
}

impl Column {
    fn is_generated(&self) -> bool {
        let extra = self.extra.to_ascii_lowercase();
        ["virtual", "stored", "persistent"]
            .iter()
            .any(|w| extra.split_whitespace().any(|e| e == *w))
    }

    fn is_auto_increment(&self) -> bool {
        self.extra.to_ascii_lowercase().contains("auto_increment")
    }

    fn unsigned_bigint(&self) -> bool {
        self.data_type == "bigint" && self.column_type.contains("unsigned")
    }
}

/// The fraction digits of `volume`: exactly DECIMAL(20,4)'s, so values read back compare as is.
pub const VOLUME_SCALE: u64 = 4;
/// The integer digits `volume` must hold at least.
pub const VOLUME_INT_DIGITS: u64 = 16;

/// Every way `columns` (and the table's single-column unique keys, by column name) do not fit
/// what feedd writes; empty when the table is usable.
pub fn judge(columns: &[Column], unique_columns: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let find = |name: &str| columns.iter().find(|c| c.name.eq_ignore_ascii_case(name));
    let integer = |name: &str, range: &str, problems: &mut Vec<String>| match find(name) {
        None => problems.push(format!("no column `{name}` (needs BIGINT UNSIGNED)")),
        Some(c) if !c.unsigned_bigint() => problems.push(format!(
            "`{name}` is {}, needs BIGINT UNSIGNED ({name} is {range})",
            c.column_type
        )),
        Some(_) => {}
    };
    integer("ticket", "1 … 2^64−1", &mut problems);
    integer("login", "0 … 2^64−1", &mut problems);
    let volume_needs = format!(
        "needs an exact DECIMAL with {VOLUME_SCALE} fraction digits and at least \
         {VOLUME_INT_DIGITS} integer digits, such as DECIMAL(20,4)"
    );
    match find("volume") {
        None => problems.push(format!("no column `volume` ({volume_needs})")),
        Some(c) => {
            let fits = c.data_type == "decimal"
                && c.scale == Some(VOLUME_SCALE)
                && c.precision
                    .is_some_and(|p| p >= VOLUME_INT_DIGITS + VOLUME_SCALE);
            if !fits {
                problems.push(format!("`volume` is {}, {volume_needs}", c.column_type));
            }
        }
    }
    match find("status") {
        None => problems.push("no column `status` (needs CHAR(1) or wider)".to_string()),
        Some(c) => {
            let text = matches!(c.data_type.as_str(), "char" | "varchar")
                && c.char_length.is_some_and(|n| n >= 1);
            if !text {
                problems.push(format!(
                    "`status` is {}, needs CHAR or VARCHAR (feedd writes 'Y')",
                    c.column_type
                ));
            }
        }
    }
    for name in ["ticket", "login", "volume", "status"] {
        if let Some(c) = find(name).filter(|c| c.is_generated()) {
            problems.push(format!(
                "`{}` is a generated column ({}); feedd writes it",
                c.name, c.extra
            ));
        }
    }
    if find("ticket").is_some()
        && !unique_columns
            .iter()
            .any(|u| u.eq_ignore_ascii_case("ticket"))
    {
        problems.push(
            "`ticket` is neither the PRIMARY KEY nor a single-column UNIQUE key \
             (resends would add rows)"
                .to_string(),
        );
    }
    for c in columns {
        let ours = ["ticket", "login", "volume", "status"]
            .iter()
            .any(|n| c.name.eq_ignore_ascii_case(n));
        let filled = c.nullable || c.default.is_some() || c.is_auto_increment() || c.is_generated();
        if !ours && !filled {
            problems.push(format!(
                "`{}` is {} NOT NULL without a default; feedd does not write it, so it needs a \
                 DEFAULT or NULL",
                c.name, c.column_type
            ));
        }
    }
    problems
}

/// One unique index: its name and columns, in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    pub name: String,
    pub columns: Vec<String>,
}

/// Unique keys a valid record can violate: any that holds neither `ticket` (which makes the
/// row unique already) nor an AUTO_INCREMENT column. A second record with the same `login`,
/// say, would be refused forever; the resend check reads rows by ticket and cannot help.
pub fn judge_unique_keys(columns: &[Column], keys: &[UniqueKey]) -> Vec<String> {
    let auto = |name: &String| {
        columns
            .iter()
            .any(|c| c.name.eq_ignore_ascii_case(name) && c.is_auto_increment())
    };
    keys.iter()
        .filter(|k| {
            !k.columns
                .iter()
                .any(|c| c.eq_ignore_ascii_case("ticket") || auto(c))
        })
        .map(|k| {
            format!(
                "unique key `{}` on ({}) does not hold `ticket`: two valid records may share \
                 it, and the second would be refused forever (only `ticket` may be unique)",
                k.name,
                k.columns
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect()
}

/// One CHECK constraint: its name and clause as the server shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub clause: String,
}

/// CHECK constraints a valid record can violate: those that read a column feedd fills from
/// records (`ticket`, `login`, `volume`, `status`). Checks on other columns (MariaDB's
/// `json_valid` of a JSON column, say) see only their defaults, the same for every row.
pub fn judge_checks(checks: &[Check]) -> Vec<String> {
    checks
        .iter()
        .filter_map(|c| {
            let ours: Vec<&str> = c
                .clause
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == '$'))
                .filter(|w| {
                    ["ticket", "login", "volume", "status"]
                        .iter()
                        .any(|n| w.eq_ignore_ascii_case(n))
                })
                .collect();
            let first = ours.first()?;
            Some(format!(
                "CHECK constraint `{}` ({}) reads `{}`, which feedd writes from records: a \
                 valid record may fail it and be held forever",
                c.name,
                c.clause,
                first.to_ascii_lowercase()
            ))
        })
        .collect()
}

/// The engine must be InnoDB: a batch is all-or-nothing only in a transactional table (a
/// rolled-back MyISAM insert stays), and Galera replicates InnoDB only.
pub fn judge_engine(engine: &str) -> Option<String> {
    (!engine.eq_ignore_ascii_case("innodb"))
        .then(|| format!("the engine is {engine}, needs InnoDB (transactions)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, data_type: &str, column_type: &str) -> Column {
        let (precision, scale) = match column_type.split_once('(') {
            Some((_, rest)) if data_type == "decimal" => {
                let inner = rest.trim_end_matches(')');
                let (p, s) = inner.split_once(',').unwrap_or((inner, "0"));
                (p.parse().ok(), s.parse().ok())
            }
            _ => (None, None),
        };
        let char_length = match data_type {
            "char" | "varchar" => column_type
                .split_once('(')
                .and_then(|(_, r)| r.trim_end_matches(')').parse().ok()),
            _ => None,
        };
        Column {
            name: name.into(),
            data_type: data_type.into(),
            column_type: column_type.into(),
            precision,
            scale,
            char_length,
            nullable: false,
            default: None,
            extra: String::new(),
        }
    }

    fn feedd_table() -> Vec<Column> {
        let mut status = col("status", "char", "char(1)");
        status.default = Some("'N'".into());
        vec![
            col("ticket", "bigint", "bigint(20) unsigned"),
            col("login", "bigint", "bigint(20) unsigned"),
            col("volume", "decimal", "decimal(20,4)"),
            status,
        ]
    }

    fn with(mut columns: Vec<Column>, replace: Column) -> Vec<Column> {
        match columns
            .iter_mut()
            .find(|c| c.name.eq_ignore_ascii_case(&replace.name))
        {
            Some(c) => *c = replace,
            None => columns.push(replace),
        }
        columns
    }

    fn pk() -> Vec<String> {
        vec!["ticket".to_string()]
    }

    #[test]
    fn the_table_feedd_creates_fits() {
        assert_eq!(judge(&feedd_table(), &pk()), Vec::<String>::new());
        // MySQL 8 spells types without widths; wider volume and status are fine.
        let wide = with(
            with(feedd_table(), col("volume", "decimal", "decimal(30,4)")),
            col("status", "varchar", "varchar(16)"),
        );
        let wide = with(wide, col("ticket", "bigint", "bigint unsigned"));
        assert_eq!(judge(&wide, &pk()), Vec::<String>::new());
    }

    #[test]
    fn narrow_or_inexact_volume_is_named() {
        for (data_type, column_type) in [
            ("decimal", "decimal(20,2)"),
            ("decimal", "decimal(19,4)"),
            ("decimal", "decimal(22,6)"),
            ("double", "double"),
            ("float", "float"),
            ("varchar", "varchar(30)"),
        ] {
            let p = judge(
                &with(feedd_table(), col("volume", data_type, column_type)),
                &pk(),
            );
            assert_eq!(p.len(), 1, "{column_type}: {p:?}");
            assert!(
                p[0].starts_with(&format!(
                    "`volume` is {column_type}, needs an exact DECIMAL"
                )),
                "{p:?}"
            );
        }
    }

    #[test]
    fn narrow_integers_are_named() {
        let p = judge(
            &with(feedd_table(), col("login", "int", "int(10) unsigned")),
            &pk(),
        );
        assert_eq!(
            p,
            vec!["`login` is int(10) unsigned, needs BIGINT UNSIGNED (login is 0 … 2^64−1)"]
        );
        let p = judge(
            &with(feedd_table(), col("ticket", "varchar", "varchar(5)")),
            &pk(),
        );
        assert_eq!(
            p,
            vec!["`ticket` is varchar(5), needs BIGINT UNSIGNED (ticket is 1 … 2^64−1)"]
        );
        let p = judge(
            &with(feedd_table(), col("login", "bigint", "bigint(20)")),
            &pk(),
        );
        assert_eq!(p.len(), 1, "signed BIGINT stops at 2^63−1: {p:?}");
    }

    #[test]
    fn status_must_be_text() {
        let p = judge(
            &with(feedd_table(), col("status", "tinyint", "tinyint(1)")),
            &pk(),
        );
        assert_eq!(
            p,
            vec!["`status` is tinyint(1), needs CHAR or VARCHAR (feedd writes 'Y')"]
        );
    }

    #[test]
    fn missing_columns_and_key() {
        let p = judge(&feedd_table()[..2], &pk());
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("no column `volume`"));
        assert!(p[1].starts_with("no column `status`"));
        let p = judge(&feedd_table(), &[]);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("neither the PRIMARY KEY nor a single-column UNIQUE key"));
    }

    #[test]
    fn other_columns_need_a_default_or_null() {
        let extra = col("note", "int", "int(11)");
        let p = judge(&with(feedd_table(), extra.clone()), &pk());
        assert_eq!(
            p,
            vec![
                "`note` is int(11) NOT NULL without a default; feedd does not write it, so it \
                 needs a DEFAULT or NULL"
            ]
        );
        for fixed in [
            Column {
                nullable: true,
                ..extra.clone()
            },
            Column {
                default: Some("0".into()),
                ..extra.clone()
            },
            Column {
                extra: "auto_increment".into(),
                ..extra.clone()
            },
            Column {
                extra: "VIRTUAL GENERATED".into(),
                ..extra.clone()
            },
        ] {
            assert_eq!(
                judge(&with(feedd_table(), fixed.clone()), &pk()),
                Vec::<String>::new(),
                "{fixed:?}"
            );
        }
    }

    #[test]
    fn generated_columns_of_ours_are_refused() {
        let mut login = col("login", "bigint", "bigint(20) unsigned");
        login.extra = "STORED GENERATED".into();
        let p = judge(&with(feedd_table(), login), &pk());
        assert_eq!(
            p,
            vec!["`login` is a generated column (STORED GENERATED); feedd writes it"]
        );
    }

    fn key(name: &str, columns: &[&str]) -> UniqueKey {
        UniqueKey {
            name: name.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn only_ticket_may_be_unique() {
        let mut id = col("id", "bigint", "bigint(20)");
        id.extra = "auto_increment".into();
        let columns = with(feedd_table(), id);
        let fine = [
            key("PRIMARY", &["id"]),
            key("t", &["TICKET"]),
            key("tl", &["login", "ticket"]),
        ];
        assert_eq!(judge_unique_keys(&columns, &fine), Vec::<String>::new());
        let p = judge_unique_keys(&columns, &[key("lv", &["login", "volume"])]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("unique key `lv` on (`login`, `volume`) does not hold `ticket`"),
            "{p:?}"
        );
    }

    #[test]
    fn checks_on_record_columns_are_refused() {
        let check = |name: &str, clause: &str| Check {
            name: name.into(),
            clause: clause.into(),
        };
        let p = judge_checks(&[
            check("small", "`volume` < 1000"),
            check("doc", "json_valid(`doc`)"),
            check("st", "STATUS in ('Y','N')"),
        ]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("CHECK constraint `small` (`volume` < 1000) reads `volume`"));
        assert!(p[1].contains("reads `status`"), "{p:?}");
    }

    #[test]
    fn engine() {
        assert_eq!(judge_engine("InnoDB"), None);
        assert_eq!(
            judge_engine("MyISAM").as_deref(),
            Some("the engine is MyISAM, needs InnoDB (transactions)")
        );
    }

    #[test]
    fn column_names_are_case_insensitive() {
        let mut t = feedd_table();
        t[0].name = "Ticket".into();
        assert_eq!(judge(&t, &["TICKET".to_string()]), Vec::<String>::new());
    }
}
