//! The ordered host list of `[mysql] host` (SPEC §9): `host[:port]` entries, IPv6 in brackets,
//! parsed once into `HostAddr`s. Pure; the failover over the list is pipeline/hosts.rs.

use std::fmt;
use std::net::Ipv6Addr;

/// One database server of the list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostAddr {
    /// A host name or IP address; an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
}

impl HostAddr {
    /// The host as the driver takes it: IPv6 in brackets so it is not read as a name.
    pub fn driver_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.driver_host(), self.port)
    }
}

/// A bad entry of the host list; the config layer prefixes the file and `[mysql] host`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostListError {
    #[error("must name at least one host")]
    Empty,
    #[error("entry {position} is empty (a stray comma?)")]
    EmptyEntry { position: usize },
    #[error("entry `{entry}`: {reason}")]
    BadEntry { entry: String, reason: &'static str },
    #[error("entry `{entry}` is listed twice")]
    Duplicate { entry: String },
}

/// Parses `db1:3306, db2, [::1]:3307`: comma-separated, `port` for entries without one, IPv6
/// in brackets. Order is kept; it is the failover order.
pub fn parse_hosts(raw: &str, default_port: u16) -> Result<Vec<HostAddr>, HostListError> {
    if raw.trim().is_empty() {
        return Err(HostListError::Empty);
    }
    let mut hosts: Vec<HostAddr> = Vec::new();
    for (i, entry) in raw.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(HostListError::EmptyEntry { position: i + 1 });
        }
        let host = parse_entry(entry, default_port).map_err(|reason| HostListError::BadEntry {
            entry: entry.to_string(),
            reason,
        })?;
        if hosts.contains(&host) {
            return Err(HostListError::Duplicate {
                entry: entry.to_string(),
            });
        }
        hosts.push(host);
    }
    Ok(hosts)
}

fn parse_entry(entry: &str, default_port: u16) -> Result<HostAddr, &'static str> {
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("an opening `[` needs its `]`")?;
        inside
            .parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address inside [ ]")?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("after `]` only `:port` may follow")?,
            ),
        };
        (inside, port)
    } else {
        match entry.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address needs brackets, e.g. [::1]:3306")
            }
            Some((h, p)) => (h, Some(p)),
            None => (entry, None),
        }
    };
    if host.is_empty() {
        return Err("no host before the port");
    }
    if !host.contains(':')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("a host name has only letters, digits, `.`, `-` and `_`");
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err("the port must be a number from 1 to 65535"),
        },
    };
    Ok(HostAddr {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(host: &str, port: u16) -> HostAddr {
        HostAddr {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn one_host_takes_the_default_port() {
        assert_eq!(
            parse_hosts("127.0.0.1", 3306),
            Ok(vec![h("127.0.0.1", 3306)])
        );
        assert_eq!(parse_hosts(" db1 ", 3307), Ok(vec![h("db1", 3307)]));
    }

    #[test]
    fn list_keeps_order_and_ports() {
        assert_eq!(
            parse_hosts("db1:3306, db2, [::1]:3307, [fe80::1]", 3310),
            Ok(vec![
                h("db1", 3306),
                h("db2", 3310),
                h("::1", 3307),
                h("fe80::1", 3310)
            ])
        );
    }

    #[test]
    fn display_round_trips() {
        let hosts = parse_hosts("db1:3306, [::1]:3307", 1).unwrap();
        let text: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        assert_eq!(text, ["db1:3306", "[::1]:3307"]);
        assert_eq!(parse_hosts(&text.join(","), 9), Ok(hosts));
        assert_eq!(h("::1", 1).driver_host(), "[::1]");
        assert_eq!(h("db", 1).driver_host(), "db");
    }

    #[test]
    fn bad_entries_are_named() {
        let bad = |raw: &str| parse_hosts(raw, 3306).unwrap_err().to_string();
        assert_eq!(bad(""), "must name at least one host");
        assert_eq!(bad("db1,,db2"), "entry 2 is empty (a stray comma?)");
        assert_eq!(bad("db1,"), "entry 2 is empty (a stray comma?)");
        assert!(bad("db1:0").contains("entry `db1:0`: the port"));
        assert!(bad("db1:70000").contains("entry `db1:70000`"));
        assert!(bad("db1:x").contains("1 to 65535"));
        assert!(bad("::1").contains("needs brackets"));
        assert!(bad("[::1").contains("needs its `]`"));
        assert!(bad("[db1]:3306").contains("not an IPv6 address"));
        assert!(bad("[::1]3306").contains("only `:port`"));
        assert!(bad(":3306").contains("no host"));
        assert!(bad("db 1").contains("entry `db 1`"));
        assert!(bad("db1; DROP").contains("letters, digits"));
        assert_eq!(bad("db1, db1:3306"), "entry `db1:3306` is listed twice");
    }
}
