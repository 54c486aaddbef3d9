//! The `[amqp]` section: the brokers feedd consumes from (SPEC §3, §4b, §9).
//!
//! `url` is one URL or an ordered, comma-separated list of a cluster's nodes (the failover
//! order, like `[mysql] host`). Each URL may hold a password, so it is kept as a `Secret` and
//! shown everywhere (logs, errors, metrics) in its redacted form `amqp://user@host:port/vhost`;
//! a bad entry is named by its position, never by its text.

use std::fmt;
use std::str::FromStr;

use lapin::uri::{AMQPScheme, AMQPUri};

use super::{ConfigError, Secret, Section};

/// Largest prefetch AMQP can carry (`basic.qos` prefetch-count is a short).
pub const MAX_PREFETCH: usize = 65_535;

/// A broker URL, checked at load time; its text is only handed to the client library.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    url: Secret,
    shown: String,
}

impl AmqpUrl {
    pub fn parse(raw: &str) -> Result<AmqpUrl, String> {
        // The parser's message may quote the whole input, password included.
        let uri = AMQPUri::from_str(raw).map_err(|e| {
            let e = e.replace(raw, "…");
            format!("not an AMQP URL ({e}); expected amqp://USER:PASS@HOST:5672/VHOST or amqps://…")
        })?;
        let scheme = match uri.scheme {
            AMQPScheme::AMQP => "amqp",
            AMQPScheme::AMQPS => "amqps",
        };
        let shown = format!(
            "{scheme}://{}@{}:{}/{}",
            uri.authority.userinfo.username, uri.authority.host, uri.authority.port, uri.vhost
        );
        Ok(AmqpUrl {
            url: Secret(raw.to_string()),
            shown,
        })
    }

    /// Whether the URL carries a password (a secret in the file that holds it).
    /// Read from the text: the parsed URI fills in guest/guest when none is written.
    pub fn has_password(&self) -> bool {
        let text = self.url.expose();
        let rest = text.split_once("://").map_or(text, |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or_default();
        authority
            .rsplit_once('@')
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .is_some_and(|(_, password)| !password.is_empty())
    }

    /// The full URL, password included: for the client library only.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({})", self.shown)
    }
}

/// The brokers of `[amqp] url`, in failover order; never empty, no entry twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerList(Vec<AmqpUrl>);

/// A bad `[amqp] url`; the config layer prefixes the file and `[amqp] url`. Entries are named
/// by position (their text may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerListError {
    #[error("entry {position} is empty (a stray comma?)")]
    EmptyEntry { position: usize },
    #[error("{}{reason}", entry_prefix(*.position, *.of))]
    BadEntry {
        position: usize,
        of: usize,
        reason: String,
    },
    #[error("entry {position} ({shown}) repeats entry {first}")]
    Duplicate {
        position: usize,
        first: usize,
        shown: String,
    },
}

/// A one-URL `url` keeps the error it always had; a list names the entry.
fn entry_prefix(position: usize, of: usize) -> String {
    if of == 1 {
        String::new()
    } else {
        format!("entry {position}: ")
    }
}

impl BrokerList {
    /// Parses `amqp://…@mq1/%2f, amqp://…@mq2/%2f`: comma-separated, order kept. A comma inside
    /// a URL (in a password) must be written `%2C`.
    pub fn parse(raw: &str) -> Result<BrokerList, BrokerListError> {
        let entries: Vec<&str> = raw.split(',').map(str::trim).collect();
        let of = entries.len();
        let mut urls: Vec<AmqpUrl> = Vec::with_capacity(of);
        for (i, entry) in entries.into_iter().enumerate() {
            let position = i + 1;
            if entry.is_empty() {
                return Err(BrokerListError::EmptyEntry { position });
            }
            let url = AmqpUrl::parse(entry).map_err(|reason| BrokerListError::BadEntry {
                position,
                of,
                reason,
            })?;
            // Same user, host, port and vhost: the same broker, whatever the password.
            if let Some(first) = urls.iter().position(|u| u.shown == url.shown) {
                return Err(BrokerListError::Duplicate {
                    position,
                    first: first + 1,
                    shown: url.shown,
                });
            }
            urls.push(url);
        }
        Ok(BrokerList(urls))
    }

    pub fn urls(&self) -> &[AmqpUrl] {
        &self.0
    }

    /// Whether any entry carries a password.
    pub fn has_password(&self) -> bool {
        self.0.iter().any(AmqpUrl::has_password)
    }
}

impl fmt::Display for BrokerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AmqpConfig {
    /// `None`: the AMQP input is off.
    pub url: Option<BrokerList>,
    pub queue: String,
    /// 0: 2 × batch_size (see `prefetch_for`).
    pub prefetch: usize,
    /// `None`: rejected deliveries are dropped (logged).
    pub dead_letter_exchange: Option<String>,
    /// The type feedd declares a missing queue with (an existing queue is used as it is).
    pub queue_type: QueueType,
    /// `None`: no exchange (publishers use the default exchange with the queue's name).
    pub exchange: Option<String>,
    pub exchange_type: ExchangeType,
    /// The binding key; `None` (empty in the file): the queue's name.
    pub routing_key: Option<String>,
}

/// `[amqp] queue_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    /// Replicated (Raft); refuses global QoS, `exclusive`, `x-max-priority`.
    Quorum,
}

impl QueueType {
    pub const ALL: [QueueType; 2] = [QueueType::Classic, QueueType::Quorum];

    /// The name, as in the file and in the broker's `x-queue-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// `[amqp] exchange_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeType {
    pub const ALL: [ExchangeType; 4] = [
        ExchangeType::Direct,
        ExchangeType::Fanout,
        ExchangeType::Topic,
        ExchangeType::Headers,
    ];

    /// The name, as in the file and in the broker's `exchange.declare`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }
}

/// One of `all` by its name (case-insensitive), or the reason naming the allowed values.
fn one_of<T: Copy>(raw: &str, all: &[T], name: impl Fn(T) -> &'static str) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|v| name(*v).eq_ignore_ascii_case(raw.trim()))
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            format!("`{raw}` is not one of {}", names.join(", "))
        })
}

impl AmqpConfig {
    pub(super) fn parse(s: &mut Section<'_>) -> Result<AmqpConfig, ConfigError> {
        let url = match s.optional("url")? {
            None => None,
            Some(raw) => Some(BrokerList::parse(&raw).map_err(|e| s.error("url", e.to_string()))?),
        };
        let queue = s.string("queue", "fee")?;
        check_name(&queue).map_err(|reason| s.error("queue", reason))?;
        let prefetch = s.number("prefetch", 0, 0, MAX_PREFETCH)?;
        let dead_letter_exchange = s.string("dead_letter_exchange", "feedd.rejected")?;
        if !dead_letter_exchange.is_empty() {
            check_name(&dead_letter_exchange)
                .map_err(|reason| s.error("dead_letter_exchange", reason))?;
        }
        let queue_type = one_of(&s.string("queue_type", "classic")?, &QueueType::ALL, |t| {
            t.as_str()
        })
        .map_err(|reason| s.error("queue_type", reason))?;
        let exchange = s.string("exchange", "")?;
        if !exchange.is_empty() {
            check_name(&exchange).map_err(|reason| s.error("exchange", reason))?;
        }
        let exchange_type = one_of(
            &s.string("exchange_type", "direct")?,
            &ExchangeType::ALL,
            ExchangeType::as_str,
        )
        .map_err(|reason| s.error("exchange_type", reason))?;
        // Any short string binds (a topic pattern, or ignored by fanout and headers).
        let routing_key = s.string("routing_key", "")?;
        if routing_key.len() > 255 {
            return Err(s.error("routing_key", "must be at most 255 bytes"));
        }
        // A control character is never meant, and would be written raw into log lines.
        if let Some((at, c)) = routing_key.char_indices().find(|(_, c)| c.is_control()) {
            return Err(s.error(
                "routing_key",
                format!(
                    "must not contain control characters (U+{:04X} at byte {at})",
                    u32::from(c)
                ),
            ));
        }
        Ok(AmqpConfig {
            url,
            queue,
            prefetch,
            dead_letter_exchange: (!dead_letter_exchange.is_empty())
                .then_some(dead_letter_exchange),
            queue_type,
            exchange: (!exchange.is_empty()).then_some(exchange),
            exchange_type,
            routing_key: (!routing_key.is_empty()).then_some(routing_key),
        })
    }

    /// The key the queue is bound with: `routing_key`, or the queue's name when empty (what a
    /// seed-style producer publishing with the queue's name as routing key expects).
    pub fn binding_key(&self) -> &str {
        self.routing_key.as_deref().unwrap_or(&self.queue)
    }

    /// The prefetch in force: `prefetch`, or 2 × `batch_size` for 0 (a smaller window would
    /// keep batches from filling), capped at what AMQP can carry.
    pub fn prefetch_for(&self, batch_size: usize) -> u16 {
        let p = if self.prefetch > 0 {
            self.prefetch
        } else {
            batch_size.saturating_mul(2)
        };
        u16::try_from(p.min(MAX_PREFETCH)).unwrap_or(u16::MAX)
    }
}

/// Queue and exchange names: AMQP short strings, and no `amq.` prefix (reserved).
fn check_name(raw: &str) -> Result<(), String> {
    if raw.is_empty() || raw.len() > 255 {
        return Err(format!("`{raw}` must be 1 to 255 bytes"));
    }
    if raw.starts_with("amq.") {
        return Err(format!(
            "`{raw}`: names starting with `amq.` are reserved by the broker"
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(format!("`{raw}` holds a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/feed.ini"), Path::new("/srv"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_password_is_seen_only_when_written() {
        let url = |t: &str| super::AmqpUrl::parse(t).unwrap();
        assert!(url("amqp://feed:s3cret@mq:5672/%2f").has_password());
        assert!(!url("amqp://mq:5672/%2f").has_password());
        assert!(!url("amqp://feed@mq/%2f").has_password());
    }

    #[test]
    fn defaults_and_url() {
        let c = parse("").unwrap();
        assert_eq!(c.amqp.url, None);
        assert_eq!(c.amqp.queue, "fee");
        assert_eq!(
            c.amqp.dead_letter_exchange.as_deref(),
            Some("feedd.rejected")
        );
        assert_eq!(c.amqp.prefetch_for(1000), 2000);
        assert_eq!(c.amqp.prefetch_for(21_845), 43_690);
        let c = parse(
            "[amqp]\nurl = amqp://feed:hunter2@mq:5673/prod\nprefetch = 10\ndead_letter_exchange =",
        )
        .unwrap();
        let url = c.amqp.url.as_ref().unwrap();
        assert_eq!(url.to_string(), "amqp://feed@mq:5673/prod");
        assert_eq!(url.urls().len(), 1);
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.amqp.prefetch_for(1000), 10);
        assert_eq!(c.amqp.dead_letter_exchange, None);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("[amqp]\nurl = http://x").unwrap_err();
        assert!(e.contains("[amqp] url: not an AMQP URL"), "{e}");
        let e = parse("[amqp]\nqueue = amq.x").unwrap_err();
        assert!(e.contains("[amqp] queue"), "{e}");
        assert!(parse("[amqp]\nprefetch = 70000")
            .unwrap_err()
            .contains("[amqp] prefetch"));
        let e = parse("[amqp]\nexchange = fees\nexchange_type = fan").unwrap_err();
        assert!(
            e.contains("[amqp] exchange_type: `fan` is not one of direct, fanout, topic, headers"),
            "{e}"
        );
        let e = parse("[amqp]\nqueue_type = mirrored").unwrap_err();
        assert!(
            e.contains("[amqp] queue_type: `mirrored` is not one of classic, quorum"),
            "{e}"
        );
        let e = parse("[amqp]\nexchange = amq.direct").unwrap_err();
        assert!(e.contains("[amqp] exchange: `amq.direct`"), "{e}");
        let e = parse(&format!("[amqp]\nrouting_key = {}", "k".repeat(256))).unwrap_err();
        assert!(e.contains("[amqp] routing_key: must be at most 255"), "{e}");
        let e = parse("[amqp]\nrouting_key = fee.\u{1b}[2Jeu").unwrap_err();
        assert!(
            e.contains(
                "[amqp] routing_key: must not contain control characters (U+001B at byte 4)"
            ),
            "{e}"
        );
        assert!(parse("[amqp]\nnope = 1")
            .unwrap_err()
            .contains("[amqp] nope: unknown key"));
    }

    #[test]
    fn topology_defaults_and_values() {
        let c = parse("").unwrap().amqp;
        assert_eq!(c.queue_type, super::QueueType::Classic);
        assert_eq!(c.exchange, None);
        assert_eq!(c.exchange_type, super::ExchangeType::Direct);
        assert_eq!(
            c.binding_key(),
            "fee",
            "empty routing_key: the queue's name"
        );
        let c = parse(
            "[amqp]\nqueue = q1\nqueue_type = Quorum\nexchange = fees\nexchange_type = topic\nrouting_key = fee.*",
        )
        .unwrap()
        .amqp;
        assert_eq!(c.queue_type, super::QueueType::Quorum);
        assert_eq!(c.exchange.as_deref(), Some("fees"));
        assert_eq!(c.exchange_type, super::ExchangeType::Topic);
        assert_eq!(c.binding_key(), "fee.*");
        for t in super::ExchangeType::ALL {
            let c = parse(&format!("[amqp]\nexchange_type = {}", t.as_str())).unwrap();
            assert_eq!(c.amqp.exchange_type, t);
        }
    }

    #[test]
    fn a_list_keeps_its_order_and_hides_every_password() {
        let c = parse(
            "[amqp]\nurl = amqp://a:pw1@mq1:5672/%2f, amqp://b:pw2@mq2/%2f ,amqps://c:pw3@mq3:5671/prod?heartbeat=5",
        )
        .unwrap();
        let list = c.amqp.url.as_ref().unwrap();
        let shown: Vec<String> = list.urls().iter().map(|u| u.to_string()).collect();
        assert_eq!(
            shown,
            [
                "amqp://a@mq1:5672//",
                "amqp://b@mq2:5672//",
                "amqps://c@mq3:5671/prod"
            ]
        );
        assert_eq!(
            list.urls()[2].expose(),
            "amqps://c:pw3@mq3:5671/prod?heartbeat=5"
        );
        assert!(list.has_password());
        let all = format!("{c:?} {list}");
        for pw in ["pw1", "pw2", "pw3"] {
            assert!(!all.contains(pw), "{all}");
        }
    }

    #[test]
    fn a_bad_entry_is_named_by_position_never_by_its_text() {
        let cases = [
            (
                "amqp://a:pw1@mq1/%2f, http://b:pw2@mq2/%2f, amqp://c:pw3@mq3/%2f",
                "[amqp] url: entry 2: not an AMQP URL",
            ),
            (
                "amqp://a:pw1@mq1/%2f, amqp://b:pw2@mq2:99999/%2f",
                "[amqp] url: entry 2: not an AMQP URL",
            ),
            (
                "amqp://a:pw1@mq1/%2f,, amqp://c:pw3@mq3/%2f",
                "[amqp] url: entry 2 is empty",
            ),
            (
                "amqp://a:pw1@mq1/%2f, amqp://a:pw2@mq1:5672/%2f",
                "[amqp] url: entry 2 (amqp://a@mq1:5672//) repeats entry 1",
            ),
            (
                "amqp://a:pw1@mq1/%2f, amqp:b:pw2@mq2",
                "entry 2: not an AMQP URL (Invalid URL: '…')",
            ),
            (
                "amqp://a:pw1@[mq1/%2f, amqp://b:pw2@mq2/%2f",
                "[amqp] url: entry 1: not an AMQP URL",
            ),
        ];
        for (list, want) in cases {
            let bad = parse(&format!("[amqp]\nurl = {list}")).unwrap_err();
            assert!(bad.contains(want), "{bad}");
            for pw in ["pw1", "pw2", "pw3"] {
                assert!(!bad.contains(pw), "{bad}");
            }
        }
    }

    #[test]
    fn zeromq_off_needs_amqp_on() {
        let e = parse("[zmq]\nendpoint =").unwrap_err();
        assert!(
            e.contains("[zmq] endpoint and [amqp] url are both empty"),
            "{e}"
        );
        let c = parse("[zmq]\nendpoint =\n[amqp]\nurl = amqp://127.0.0.1").unwrap();
        assert!(c.zmq.endpoint.is_empty());
    }
}
