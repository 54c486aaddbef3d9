//! The INI configuration, parsed once into typed, validated structs.
//!
//! Loading (`Config::load`) reads the file and judges every key; nothing else in feedd sees a
//! string from the file. Errors name the file, `[section] key` and what is allowed. The same
//! function serves start-up, `feedd check` and SIGHUP reload.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;

mod amqp;
pub use amqp::{AmqpConfig, AmqpUrl};

/// Largest `batch_size`: a prepared multi-row INSERT may hold at most 65,535 placeholders
/// (3 per record); text statements stay far below `max_allowed_packet` at this size.
pub const MAX_BATCH_SIZE: usize = 21_845;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Syntax { file: PathBuf, reason: String },
    #[error("{file}: [{section}] {key}: {reason}")]
    Key {
        file: PathBuf,
        section: String,
        key: String,
        reason: String,
    },
    #[error(
        "{file}: unknown section [{section}] (allowed: daemon, zmq, mysql, amqp, pipeline, metrics)"
    )]
    UnknownSection { file: PathBuf, section: String },
    #[error("{file}: [zmq] endpoint and [amqp] url are both empty: feedd would have no input (set at least one)")]
    NoInput { file: PathBuf },
    #[error("{file}: line {line}: {reason}")]
    AllowList {
        file: PathBuf,
        line: usize,
        reason: String,
    },
}

/// A value that must never reach a log line, an error or metrics.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// A CURVE key, 32 raw bytes (decoded from 40 Z85 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CurveKey(pub [u8; 32]);

impl fmt::Debug for CurveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurveKey(..)")
    }
}

impl CurveKey {
    pub fn from_z85(text: &str) -> Result<CurveKey, String> {
        if text.len() != 40 {
            return Err(format!(
                "a Z85 key is 40 characters, this one has {}",
                text.len()
            ));
        }
        const Z85: &str =
            "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
        if !text.chars().all(|c| Z85.contains(c)) {
            return Err("has characters outside the Z85 alphabet".to_string());
        }
        let bytes = zmq::z85_decode(text).map_err(|_| "not valid Z85".to_string())?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| "not valid Z85".to_string())?;
        Ok(CurveKey(key))
    }

    pub fn to_z85(&self) -> String {
        zmq::z85_encode(&self.0).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from (absolute), so a reload reads the same one.
    pub file: PathBuf,
    /// The directory feedd was started in; relative paths were resolved against it.
    pub base_dir: PathBuf,
    pub daemon: DaemonConfig,
    pub zmq: ZmqConfig,
    pub mysql: MysqlConfig,
    pub amqp: AmqpConfig,
    pub pipeline: PipelineConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub pidfile: PathBuf,
    /// `None`: stderr in the foreground, `log/feedd.log` as a daemon.
    pub log_file: Option<PathBuf>,
    pub log_level: LevelFilter,
    pub user: Option<String>,
    pub group: Option<String>,
    pub umask: u32,
    pub shutdown_timeout_ms: u64,
    pub supervise: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ZmqConfig {
    /// Empty: the ZeroMQ input is off.
    pub endpoint: String,
    pub max_message_bytes: usize,
    pub curve_secret_key: Option<CurveKey>,
    pub curve_allowed_clients: Option<PathBuf>,
    /// The keys read from `curve_allowed_clients` at load time.
    pub allowed_client_keys: Vec<CurveKey>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MysqlConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
    pub table: String,
    /// 0: workers + 1.
    pub pool_size: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// 0: one per core available to the process.
    pub workers: usize,
    pub queue_capacity: usize,
    pub batch_size: usize,
    pub batch_timeout_ms: u64,
    pub pin_threads: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// `None`: no metrics listener.
    pub listen: Option<SocketAddr>,
}

impl Config {
    /// Where log lines go: `log_file`, else `log/feedd.log` for a daemon, else stderr (`None`).
    pub fn log_path(&self, daemon: bool) -> Option<PathBuf> {
        match (&self.daemon.log_file, daemon) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => Some(self.base_dir.join("log/feedd.log")),
            (None, false) => None,
        }
    }
}

impl DaemonConfig {
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

impl PipelineConfig {
    pub fn batch_timeout(&self) -> Duration {
        Duration::from_millis(self.batch_timeout_ms)
    }

    /// The number of worker threads this config asks for, with 0 resolved.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

impl MysqlConfig {
    /// The pool size this config asks for, with 0 resolved against the worker count.
    pub fn pool_size_for(&self, workers: usize) -> u32 {
        if self.pool_size > 0 {
            self.pool_size
        } else {
            u32::try_from(workers + 1).unwrap_or(u32::MAX)
        }
    }
}

/// A warning when the file holds a secret and group or others can read it.
pub fn exposure_warning(config: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let has_secret = !config.mysql.password.is_empty() || config.zmq.curve_secret_key.is_some();
    let mode = std::fs::metadata(&config.file).ok()?.permissions().mode();
    (has_secret && mode & 0o077 != 0).then(|| {
        format!(
            "{} holds a secret and is readable by group or others (mode {:03o}); chmod 600 it",
            config.file.display(),
            mode & 0o777
        )
    })
}

/// The keys fixed for the process's life: a reload that changes them is logged, not applied.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.daemon.pidfile != new.daemon.pidfile {
        changed.push("[daemon] pidfile");
    }
    if old.daemon.user != new.daemon.user {
        changed.push("[daemon] user");
    }
    if old.daemon.group != new.daemon.group {
        changed.push("[daemon] group");
    }
    if old.pipeline.workers != new.pipeline.workers {
        changed.push("[pipeline] workers");
    }
    if old.pipeline.pin_threads != new.pipeline.pin_threads {
        changed.push("[pipeline] pin_threads");
    }
    changed
}

/// Applies the restart-only policy to a reloaded config: those keys keep their running
/// values in `new`. Returns the keys that changed in the file (to log that a restart is due).
pub fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let changed = restart_only_changes(old, new);
    new.daemon.pidfile = old.daemon.pidfile.clone();
    new.daemon.user = old.daemon.user.clone();
    new.daemon.group = old.daemon.group.clone();
    new.pipeline.workers = old.pipeline.workers;
    new.pipeline.pin_threads = old.pipeline.pin_threads;
    changed
}

/// One section's raw values, consumed key by key so leftovers are reported as unknown.
struct Section<'a> {
    file: &'a Path,
    name: &'static str,
    values: BTreeMap<String, Option<String>>,
}

impl<'a> Section<'a> {
    fn error(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            file: self.file.to_path_buf(),
            section: self.name.to_string(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// The raw value of `key`, or `default` when the key is absent.
    fn raw(&mut self, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.values.remove(key) {
            None => Ok(default.to_string()),
            Some(Some(v)) => Ok(value_text(&v).to_string()),
            Some(None) => Err(self.error(key, "missing `=` and value")),
        }
    }

    fn string(&mut self, key: &str, default: &str) -> Result<String, ConfigError> {
        self.raw(key, default)
    }

    fn optional(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        let v = self.raw(key, "")?;
        Ok(if v.is_empty() { None } else { Some(v) })
    }

    fn number<T>(&mut self, key: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let raw = self.raw(key, "")?;
        if raw.is_empty() {
            return Ok(default);
        }
        let allowed = format!("an integer from {min} to {max}");
        let value: T = raw
            .parse()
            .map_err(|_| self.error(key, format!("`{raw}` is not {allowed}")))?;
        if value < min || value > max {
            return Err(self.error(key, format!("{value} is out of range: {allowed}")));
        }
        Ok(value)
    }

    fn boolean(&mut self, key: &str, default: bool) -> Result<bool, ConfigError> {
        let raw = self.raw(key, "")?;
        match raw.to_ascii_lowercase().as_str() {
            "" => Ok(default),
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err(self.error(key, format!("`{raw}` is not a boolean (true or false)"))),
        }
    }

    fn path(&mut self, key: &str, default: &str, base: &Path) -> Result<PathBuf, ConfigError> {
        let raw = self.raw(key, default)?;
        if raw.is_empty() {
            return Err(self.error(key, "must not be empty"));
        }
        Ok(base.join(raw))
    }

    fn optional_path(&mut self, key: &str, base: &Path) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.optional(key)?.map(|p| base.join(p)))
    }

    fn finish(self) -> Result<(), ConfigError> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(key) => Err(self.error(key, "unknown key")),
        }
    }
}

/// The value without its inline comment (`;` or `#` at the start or after a space) and quotes.
/// A value in double or single quotes is taken whole, so a password may hold `;` or `#`.
fn value_text(v: &str) -> &str {
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

impl Config {
    /// Reads and validates `file`; relative paths in it are resolved against `base`
    /// (the directory feedd was started in).
    pub fn load(file: &Path, base: &Path) -> Result<Config, ConfigError> {
        let file = base.join(file);
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file, base)
    }

    /// Validates the text of a config file (`file` names it in errors).
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut defaults = configparser::ini::IniDefault::default();
        // Keys written before any section header land here and are reported as unknown.
        defaults.default_section = "(no section)".to_string();
        defaults.delimiters = vec!['='];
        defaults.case_sensitive = true;
        // Inline comments are cut by `value_text`, which respects quotes.
        defaults.enable_inline_comments = false;
        let mut ini = configparser::ini::Ini::new_from_defaults(defaults);
        let mut map = ini
            .read(text.to_string())
            .map_err(|reason| ConfigError::Syntax {
                file: file.to_path_buf(),
                reason,
            })?;
        let mut take = |name: &'static str| Section {
            file,
            name,
            values: map
                .remove(name)
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
        };
        let mut daemon_s = take("daemon");
        let mut zmq_s = take("zmq");
        let mut mysql_s = take("mysql");
        let mut amqp_s = take("amqp");
        let mut pipeline_s = take("pipeline");
        let mut metrics_s = take("metrics");
        if let Some(section) = map.keys().next() {
            return Err(ConfigError::UnknownSection {
                file: file.to_path_buf(),
                section: section.clone(),
            });
        }

        let daemon = DaemonConfig {
            pidfile: daemon_s.path("pidfile", "run/feedd.pid", base)?,
            log_file: daemon_s.optional_path("log_file", base)?,
            log_level: {
                let raw = daemon_s.string("log_level", "info")?;
                parse_level(&raw).ok_or_else(|| {
                    daemon_s.error(
                        "log_level",
                        format!("`{raw}` is not one of error, warn, info, debug, trace"),
                    )
                })?
            },
            user: daemon_s.optional("user")?,
            group: daemon_s.optional("group")?,
            umask: {
                let raw = daemon_s.string("umask", "077")?;
                u32::from_str_radix(&raw, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        daemon_s.error(
                            "umask",
                            format!("`{raw}` is not an octal mode from 000 to 777"),
                        )
                    })?
            },
            shutdown_timeout_ms: daemon_s.number("shutdown_timeout_ms", 10_000, 1, 3_600_000)?,
            supervise: daemon_s.boolean("supervise", true)?,
        };
        daemon_s.finish()?;

        let curve_secret_key = match zmq_s.optional("curve_secret_key")? {
            None => None,
            Some(text) => Some(CurveKey::from_z85(&text).map_err(|reason| {
                zmq_s.error(
                    "curve_secret_key",
                    format!("{reason} (make one with `feedd keygen`)"),
                )
            })?),
        };
        let curve_allowed_clients = zmq_s.optional_path("curve_allowed_clients", base)?;
        let allowed_client_keys = match &curve_allowed_clients {
            None => Vec::new(),
            Some(path) => {
                if curve_secret_key.is_none() {
                    return Err(zmq_s.error(
                        "curve_allowed_clients",
                        "needs curve_secret_key to be set (an allowlist only applies to CURVE)",
                    ));
                }
                read_allow_list(path).map_err(|e| match e {
                    ConfigError::Read { source, .. } => zmq_s.error(
                        "curve_allowed_clients",
                        format!("cannot read {}: {source}", path.display()),
                    ),
                    other => other,
                })?
            }
        };
        let zmq = ZmqConfig {
            endpoint: {
                let raw = zmq_s.string("endpoint", "tcp://127.0.0.1:5555")?;
                if !raw.is_empty() {
                    validate_endpoint(&raw).map_err(|reason| zmq_s.error("endpoint", reason))?;
                }
                raw
            },
            max_message_bytes: zmq_s.number("max_message_bytes", 1_048_576, 64, 64 << 20)?,
            curve_secret_key,
            curve_allowed_clients,
            allowed_client_keys,
        };
        zmq_s.finish()?;

        let mysql = MysqlConfig {
            host: {
                let raw = mysql_s.string("host", "127.0.0.1")?;
                if raw.is_empty() {
                    return Err(mysql_s.error("host", "must not be empty"));
                }
                raw
            },
            port: mysql_s.number("port", 3306, 1, 65535)?,
            user: mysql_s.string("user", "root")?,
            password: Secret(mysql_s.string("password", "")?),
            database: {
                let raw = mysql_s.string("database", "test")?;
                validate_identifier(&raw).map_err(|reason| mysql_s.error("database", reason))?;
                raw
            },
            table: {
                let raw = mysql_s.string("table", "fee")?;
                validate_identifier(&raw).map_err(|reason| mysql_s.error("table", reason))?;
                raw
            },
            pool_size: mysql_s.number("pool_size", 0, 0, 1024)?,
        };
        mysql_s.finish()?;

        let amqp = AmqpConfig::parse(&mut amqp_s)?;
        amqp_s.finish()?;
        if zmq.endpoint.is_empty() && amqp.url.is_none() {
            return Err(ConfigError::NoInput {
                file: file.to_path_buf(),
            });
        }

        let pipeline = PipelineConfig {
            workers: pipeline_s.number("workers", 0, 0, 256)?,
            queue_capacity: pipeline_s.number("queue_capacity", 65_536, 1, 16_777_216)?,
            batch_size: pipeline_s.number("batch_size", 1000, 1, MAX_BATCH_SIZE)?,
            batch_timeout_ms: pipeline_s.number("batch_timeout_ms", 2, 0, 60_000)?,
            pin_threads: pipeline_s.boolean("pin_threads", true)?,
        };
        pipeline_s.finish()?;

        let metrics = MetricsConfig {
            listen: match metrics_s.string("listen", "127.0.0.1:9187")? {
                raw if raw.is_empty() => None,
                raw => Some(
                    raw.to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or_else(|| {
                            metrics_s.error(
                                "listen",
                                format!("`{raw}` is not host:port (e.g. 127.0.0.1:9187), or empty for off"),
                            )
                        })?,
                ),
            },
        };
        metrics_s.finish()?;

        Ok(Config {
            file: file.to_path_buf(),
            base_dir: base.to_path_buf(),
            daemon,
            zmq,
            mysql,
            amqp,
            pipeline,
            metrics,
        })
    }
}

fn parse_level(raw: &str) -> Option<LevelFilter> {
    match raw.to_ascii_lowercase().as_str() {
        "error" => Some(LevelFilter::Error),
        "warn" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// `table` and `database` are spliced into SQL, so only plain identifiers pass.
fn validate_identifier(raw: &str) -> Result<(), String> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
        && !raw.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{raw}` is not a plain identifier (1 to 64 of A-Z a-z 0-9 _ $, not only digits)"
        ))
    }
}

/// The transports a ROUTER can bind for remote clients: `tcp://host:port` or `ipc://path`.
fn validate_endpoint(raw: &str) -> Result<(), String> {
    let allowed = "allowed: tcp://HOST:PORT (HOST an address, a name or *) or ipc://PATH";
    if let Some(path) = raw.strip_prefix("ipc://") {
        return if path.is_empty() {
            Err(format!("`{raw}` has an empty path; {allowed}"))
        } else {
            Ok(())
        };
    }
    let Some(rest) = raw.strip_prefix("tcp://") else {
        return Err(format!("`{raw}` is not a supported endpoint; {allowed}"));
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("`{raw}` has no port; {allowed}"));
    };
    let port_ok = port == "*" || port.parse::<u16>().map(|p| p > 0).unwrap_or(false);
    if host.is_empty() || !port_ok {
        return Err(format!(
            "`{raw}` needs a host and a port from 1 to 65535; {allowed}"
        ));
    }
    Ok(())
}

/// Reads a CURVE allowlist: one Z85 public key per line, `#` comments and blank lines allowed.
pub fn read_allow_list(path: &Path) -> Result<Vec<CurveKey>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // `#` is a Z85 character, so a comment starts a line or follows whitespace.
        let mut words = line.split_whitespace();
        let Some(word) = words.next().filter(|w| !w.starts_with('#')) else {
            continue;
        };
        if words.next().is_some_and(|w| !w.starts_with('#')) {
            return Err(ConfigError::AllowList {
                file: path.to_path_buf(),
                line: i + 1,
                reason: "one key per line (a comment after it starts with #)".into(),
            });
        }
        let key = CurveKey::from_z85(word).map_err(|reason| ConfigError::AllowList {
            file: path.to_path_buf(),
            line: i + 1,
            reason: format!("not a Z85 public key: {reason}"),
        })?;
        keys.push(key);
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/feed.ini"), Path::new("/srv"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.daemon.pidfile, PathBuf::from("/srv/run/feedd.pid"));
        assert_eq!(c.daemon.log_file, None);
        assert_eq!(c.daemon.log_level, LevelFilter::Info);
        assert_eq!(c.daemon.umask, 0o077);
        assert_eq!(c.daemon.shutdown_timeout_ms, 10_000);
        assert!(c.daemon.supervise);
        assert_eq!(c.zmq.endpoint, "tcp://127.0.0.1:5555");
        assert_eq!(c.zmq.max_message_bytes, 1_048_576);
        assert_eq!(c.mysql.port, 3306);
        assert_eq!(c.mysql.table, "fee");
        assert_eq!(c.pipeline.queue_capacity, 65_536);
        assert_eq!(c.pipeline.batch_size, 1000);
        assert_eq!(c.pipeline.batch_timeout_ms, 2);
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));
    }

    #[test]
    fn shipped_config_is_valid_and_default() {
        let text = include_str!("../../conf/feed.ini");
        let shipped = parse(text).unwrap();
        assert_eq!(shipped, parse("").unwrap());
    }

    #[test]
    fn inline_comments_and_quotes() {
        let c = parse("[mysql]\npassword = \"a;b#c\"\nuser = feed ; the writer\n").unwrap();
        assert_eq!(c.mysql.password.expose(), "a;b#c");
        assert_eq!(c.mysql.user, "feed");
    }

    #[test]
    fn unknown_section_and_key() {
        assert!(err("[nope]\na=1").contains("unknown section [nope]"));
        let e = err("[pipeline]\nbatchsize = 5");
        assert!(e.contains("[pipeline] batchsize: unknown key"), "{e}");
        assert!(e.contains("/etc/feed.ini"), "{e}");
        assert!(err("stray = 1").contains("unknown section"));
    }

    #[test]
    fn numbers_are_checked() {
        let e = err("[pipeline]\nbatch_size = 0");
        assert!(
            e.contains("[pipeline] batch_size: 0 is out of range"),
            "{e}"
        );
        assert!(err("[pipeline]\nbatch_size = 21846").contains("out of range"));
        assert!(parse("[pipeline]\nbatch_size = 21845").is_ok());
        assert!(err("[pipeline]\nbatch_size = ten").contains("is not an integer"));
        assert!(err("[pipeline]\nbatch_size = -1").contains("batch_size"));
        assert!(err("[mysql]\nport = 70000").contains("[mysql] port"));
        assert!(err("[pipeline]\nqueue_capacity = 0").contains("queue_capacity"));
        assert!(err("[daemon]\nshutdown_timeout_ms = 0").contains("shutdown_timeout_ms"));
        assert!(err("[zmq]\nmax_message_bytes = 1").contains("max_message_bytes"));
    }

    #[test]
    fn booleans_levels_umask() {
        assert!(
            !parse("[pipeline]\npin_threads = false")
                .unwrap()
                .pipeline
                .pin_threads
        );
        assert!(err("[pipeline]\npin_threads = maybe").contains("not a boolean"));
        assert!(err("[daemon]\nlog_level = loud").contains("[daemon] log_level"));
        assert_eq!(
            parse("[daemon]\nlog_level = DEBUG")
                .unwrap()
                .daemon
                .log_level,
            LevelFilter::Debug
        );
        assert_eq!(parse("[daemon]\numask = 027").unwrap().daemon.umask, 0o027);
        assert!(err("[daemon]\numask = 999").contains("[daemon] umask"));
        assert!(err("[daemon]\numask = 1777").contains("[daemon] umask"));
    }

    #[test]
    fn identifiers() {
        assert!(err("[mysql]\ntable = fee; DROP").contains("[mysql] table"));
        assert!(err("[mysql]\ntable = `fee`").contains("not a plain identifier"));
        assert!(err("[mysql]\ntable = 123").contains("[mysql] table"));
        assert!(err("[mysql]\ndatabase = a-b").contains("[mysql] database"));
        assert!(parse("[mysql]\ntable = fee_2026").is_ok());
    }

    #[test]
    fn endpoints() {
        for ok in [
            "tcp://*:5555",
            "tcp://0.0.0.0:1",
            "tcp://localhost:5555",
            "ipc:///tmp/f",
        ] {
            assert!(parse(&format!("[zmq]\nendpoint = {ok}")).is_ok(), "{ok}");
        }
        for bad in [
            "tcp://127.0.0.1",
            "udp://x:1",
            "tcp://:5555",
            "tcp://h:0",
            "ipc://",
            "5555",
        ] {
            let e = err(&format!("[zmq]\nendpoint = {bad}"));
            assert!(e.contains("[zmq] endpoint"), "{e}");
        }
    }

    #[test]
    fn curve_keys() {
        let pair = zmq::CurveKeyPair::new().unwrap();
        let secret = zmq::z85_encode(&pair.secret_key).unwrap();
        let c = parse(&format!("[zmq]\ncurve_secret_key = {secret}")).unwrap();
        assert_eq!(c.zmq.curve_secret_key.unwrap().0, pair.secret_key);
        let e = err("[zmq]\ncurve_secret_key = tooshort");
        assert!(
            e.contains("[zmq] curve_secret_key: a Z85 key is 40 characters"),
            "{e}"
        );
        // Never echo the secret back.
        let bad = "~".repeat(40);
        let e = err(&format!("[zmq]\ncurve_secret_key = {bad}"));
        assert!(!e.contains(&bad), "{e}");
        assert!(format!("{c:?}").find(&secret).is_none());
    }

    #[test]
    fn allow_list_file() {
        let dir = tempfile::tempdir().unwrap();
        let pair = zmq::CurveKeyPair::new().unwrap();
        let public = zmq::z85_encode(&pair.public_key).unwrap();
        let secret = zmq::z85_encode(&pair.secret_key).unwrap();
        let list = dir.path().join("clients");
        std::fs::write(&list, format!("# ops\n\n{public}  # laptop\n")).unwrap();
        let text = format!(
            "[zmq]\ncurve_secret_key = {secret}\ncurve_allowed_clients = {}",
            list.display()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.zmq.allowed_client_keys, vec![CurveKey(pair.public_key)]);
        std::fs::write(&list, format!("{public}\nnot-a-key\n")).unwrap();
        let e = err(&text);
        assert!(e.contains("clients: line 2: not a Z85 public key"), "{e}");
        let e = err(&format!(
            "[zmq]\ncurve_allowed_clients = {}",
            list.display()
        ));
        assert!(e.contains("needs curve_secret_key"), "{e}");
    }

    #[test]
    fn password_never_in_debug() {
        let c = parse("[mysql]\npassword = hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn metrics_listen() {
        assert_eq!(parse("[metrics]\nlisten =").unwrap().metrics.listen, None);
        assert!(err("[metrics]\nlisten = nowhere").contains("[metrics] listen"));
    }

    #[test]
    fn restart_only_keys() {
        let a = parse("").unwrap();
        let b = parse("[pipeline]\nworkers = 3\nbatch_size = 5").unwrap();
        assert_eq!(restart_only_changes(&a, &b), vec!["[pipeline] workers"]);
    }
}
