//! The INI reader: text → sections of `key = value` entries, each with its line number.
//!
//! Deliberately small and strict, because a silently ignored line is a config the operator did
//! not mean: a repeated section or key is an error naming both lines, a key before any section
//! header is an error, a UTF-8 byte-order mark at the start is accepted. Comment lines start
//! with `;` or `#`; inline comments and quotes are cut later by `value_text`. Lines are never
//! echoed whole in errors, because a line that lost its `=` may be a secret.

use std::collections::BTreeMap;
use std::path::Path;

use super::ConfigError;

/// One `key = value` line. `value` is `None` when the line had no `=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Option<String>,
    pub line: usize,
}

/// One `[section]` and its entries by key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IniSection {
    pub line: usize,
    pub entries: BTreeMap<String, Entry>,
}

/// Reads `text` (`file` names it in errors) into its sections by name.
pub fn read(text: &str, file: &Path) -> Result<BTreeMap<String, IniSection>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let line_error = |line: usize, reason: String| ConfigError::Line {
        file: file.to_path_buf(),
        line,
        reason,
    };
    let mut sections: BTreeMap<String, IniSection> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(line_error(
                    number,
                    "a section header is `[name]`, this one has no closing `]`".into(),
                ));
            };
            let name = name.trim().to_string();
            if let Some(first) = sections.get(&name) {
                return Err(line_error(
                    number,
                    format!(
                        "section [{name}] appears twice, on lines {} and {number}; merge them",
                        first.line
                    ),
                ));
            }
            sections.insert(
                name.clone(),
                IniSection {
                    line: number,
                    entries: BTreeMap::new(),
                },
            );
            current = Some(name);
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) if !k.trim().contains(char::is_whitespace) => {
                (k.trim().to_string(), Some(v.trim().to_string()))
            }
            // No `=` right after one word (Z85 keys contain `=`): only the first word can be
            // a key; the rest may be a secret.
            _ => (
                line.split_whitespace().next().unwrap_or("").to_string(),
                None,
            ),
        };
        let Some(section) = current.as_ref().and_then(|name| sections.get_mut(name)) else {
            return Err(line_error(
                number,
                format!(
                    "{} comes before any section header (such as [mysql])",
                    shown_key(&key)
                ),
            ));
        };
        if let Some(first) = section.entries.get(&key) {
            return Err(ConfigError::Key {
                file: file.to_path_buf(),
                section: current.clone().unwrap_or_default(),
                key: shown_key(&key),
                reason: format!("set twice, on lines {} and {number}; keep one", first.line),
            });
        }
        section.entries.insert(
            key,
            Entry {
                value,
                line: number,
            },
        );
    }
    Ok(sections)
}

/// A key as it may appear in an error: a plain word is shown, anything else (which could be a
/// pasted secret or password) is not.
pub fn shown_key(key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= 40
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        key.to_string()
    } else {
        "(a key not shown: not a plain lowercase word)".to_string()
    }
}

/// The value without its inline comment (`;` or `#` at the start or after a space) and quotes.
/// A value in double or single quotes is taken whole, so a password may hold `;` or `#`.
pub fn value_text(v: &str) -> &str {
    let b = v.as_bytes();
    if let Some(&q) = b.first().filter(|q| **q == b'"' || **q == b'\'') {
        if let Some(end) = v[1..].find(q as char) {
            return &v[1..1 + end];
        }
    }
    let cut = b
        .iter()
        .enumerate()
        .find(|(i, c)| (**c == b';' || **c == b'#') && (*i == 0 || b[i - 1].is_ascii_whitespace()))
        .map(|(i, _)| i)
        .unwrap_or(b.len());
    v[..cut].trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_ok(text: &str) -> BTreeMap<String, IniSection> {
        read(text, Path::new("/f.ini")).unwrap()
    }

    fn read_err(text: &str) -> String {
        read(text, Path::new("/f.ini")).unwrap_err().to_string()
    }

    #[test]
    fn sections_keys_comments() {
        let s = read_ok("; top\n[a]\nx = 1\n# c\ny=2 ; note\nflag\n\n[b]\n");
        assert_eq!(s["a"].entries["x"].value.as_deref(), Some("1"));
        assert_eq!(s["a"].entries["y"].line, 5);
        assert_eq!(s["a"].entries["flag"].value, None);
        assert!(s["b"].entries.is_empty());
    }

    #[test]
    fn duplicates_name_both_lines() {
        let e = read_err("[mysql]\ntable = a\nuser = u\ntable = b\n");
        assert_eq!(
            e,
            "/f.ini: [mysql] table: set twice, on lines 2 and 4; keep one"
        );
        let e = read_err("[mysql]\ntable = a\n[zmq]\n[mysql]\n");
        assert_eq!(
            e,
            "/f.ini: line 4: section [mysql] appears twice, on lines 1 and 4; merge them"
        );
    }

    #[test]
    fn bom_is_accepted() {
        let s = read_ok("\u{feff}[mysql]\ntable = a\n");
        assert_eq!(s["mysql"].entries["table"].value.as_deref(), Some("a"));
    }

    #[test]
    fn key_before_any_section() {
        let e = read_err("table = a\n");
        assert_eq!(
            e,
            "/f.ini: line 1: table comes before any section header (such as [mysql])"
        );
    }

    #[test]
    fn a_line_without_equals_is_never_echoed_whole() {
        let secret = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
        let s = read_ok(&format!("[zmq]\ncurve_secret_key {secret}\n"));
        assert!(s["zmq"].entries.contains_key("curve_secret_key"));
        let e = read_err(&format!("{secret}\n"));
        assert!(!e.contains(secret), "{e}");
        let e = read_err(&format!("[zmq]\n{secret}\n{secret}\n"));
        assert!(!e.contains("rq:rM"), "{e}");
    }

    #[test]
    fn bad_header() {
        assert!(read_err("[mysql\n").contains("line 1: a section header"));
    }

    #[test]
    fn values_cut_comments_and_quotes() {
        assert_eq!(value_text("\"a;b#c\""), "a;b#c");
        assert_eq!(value_text("feed ; the writer"), "feed");
        assert_eq!(value_text("a#b"), "a#b");
    }
}
