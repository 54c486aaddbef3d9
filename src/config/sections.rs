//! The typed sections of the config and how each is judged from its raw entries.
//!
//! One struct per INI section, built by `Xxx::from_section`, which consumes keys one by one so
//! leftovers are reported as unknown. Every error names `[section] key` and what is allowed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;

use super::ini::{self, Entry, IniSection};
use super::keys::{read_allow_list, CurveKey, Secret};
use super::ConfigError;
use crate::config::hosts::{parse_hosts, HostAddr};

/// Largest `batch_size`: a prepared multi-row INSERT may hold at most 65,535 placeholders
/// (3 per record); text statements stay far below `max_allowed_packet` at this size.
pub const MAX_BATCH_SIZE: usize = 21_845;

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
    pub endpoint: String,
    pub max_message_bytes: usize,
    pub curve_secret_key: Option<CurveKey>,
    pub curve_allowed_clients: Option<PathBuf>,
    /// The keys read from `curve_allowed_clients` at load time.
    pub allowed_client_keys: Vec<CurveKey>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MysqlConfig {
    /// The failover list in order (one entry for a single host); `port` already applied.
    pub hosts: Vec<HostAddr>,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
    pub table: String,
    /// 0: workers + 1.
    pub pool_size: u32,
    /// TCP connect, and at start-up or reload the whole proof of a host (login, table check).
    pub connect_timeout_ms: u64,
    /// Longest wait for one answer on a serving connection (above the 10 s lock wait).
    pub read_timeout_ms: u64,
    pub tls: TlsMode,
    /// PEM CA bundle; required by `verify_ca` and `verify_identity`.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, both or neither (accounts that REQUIRE X509).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

/// `[mysql] tls`: how the connection to the database is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    /// Encrypted, the server certificate not checked.
    Required,
    /// The server certificate must chain to `tls_ca_file`; its name is not checked.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyIdentity,
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

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

/// One section's raw values, consumed key by key so leftovers are reported as unknown.
pub struct Section<'a> {
    file: &'a Path,
    name: &'static str,
    values: BTreeMap<String, Entry>,
}

impl<'a> Section<'a> {
    /// The section `name` taken out of `sections` (empty if the file has none).
    pub fn take(
        sections: &mut BTreeMap<String, IniSection>,
        file: &'a Path,
        name: &'static str,
    ) -> Section<'a> {
        let values = sections.remove(name).map(|s| s.entries).unwrap_or_default();
        Section { file, name, values }
    }

    pub fn error(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            file: self.file.to_path_buf(),
            section: self.name.to_string(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// The raw value of `key`, or `default` when the key is absent.
    fn raw(&mut self, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.values.remove(key).map(|e| e.value) {
            None => Ok(default.to_string()),
            Some(Some(v)) => Ok(ini::value_text(&v).to_string()),
            Some(None) => Err(self.error(key, "missing `=` and value (key = value)")),
        }
    }

    pub(super) fn string(&mut self, key: &str, default: &str) -> Result<String, ConfigError> {
        self.raw(key, default)
    }

    pub(super) fn optional(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        let v = self.raw(key, "")?;
        Ok(if v.is_empty() { None } else { Some(v) })
    }

    pub(super) fn number<T>(
        &mut self,
        key: &str,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError>
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

    /// Every key left over is unknown; only its name is shown, never its value, and nothing of
    /// a line without `=` (it may be a pasted secret).
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.values.iter().next() {
            None => Ok(()),
            Some((_, entry)) if entry.value.is_none() => Err(ConfigError::Line {
                file: self.file.to_path_buf(),
                line: entry.line,
                reason: format!(
                    "[{}]: not a `key = value` line and no known key (text not shown: it may be a secret)",
                    self.name
                ),
            }),
            Some((key, _)) => Err(self.error(&ini::shown_key(key), "unknown key")),
        }
    }
}

impl DaemonConfig {
    pub fn from_section(s: &mut Section<'_>, base: &Path) -> Result<DaemonConfig, ConfigError> {
        Ok(DaemonConfig {
            pidfile: s.path("pidfile", "run/feedd.pid", base)?,
            log_file: s.optional_path("log_file", base)?,
            log_level: {
                let raw = s.string("log_level", "info")?;
                parse_level(&raw).ok_or_else(|| {
                    s.error(
                        "log_level",
                        format!("`{raw}` is not one of error, warn, info, debug, trace"),
                    )
                })?
            },
            user: s.optional("user")?,
            group: s.optional("group")?,
            umask: {
                let raw = s.string("umask", "077")?;
                u32::from_str_radix(&raw, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        s.error(
                            "umask",
                            format!("`{raw}` is not an octal mode from 000 to 777"),
                        )
                    })?
            },
            shutdown_timeout_ms: s.number("shutdown_timeout_ms", 10_000, 1, 3_600_000)?,
            supervise: s.boolean("supervise", true)?,
        })
    }
}

impl ZmqConfig {
    /// `endpoint`, checked; empty turns the ZeroMQ input off (then [amqp] url must be set).
    pub fn endpoint(s: &mut Section<'_>) -> Result<String, ConfigError> {
        let raw = s.string("endpoint", "tcp://127.0.0.1:5555")?;
        if !raw.is_empty() {
            validate_endpoint(&raw).map_err(|reason| s.error("endpoint", reason))?;
        }
        Ok(raw)
    }

    pub fn from_section(s: &mut Section<'_>, base: &Path) -> Result<ZmqConfig, ConfigError> {
        let curve_secret_key = match s.optional("curve_secret_key")? {
            None => None,
            Some(text) => Some(CurveKey::from_z85(&text).map_err(|reason| {
                s.error(
                    "curve_secret_key",
                    format!("{reason} (make one with `feedd keygen`)"),
                )
            })?),
        };
        let curve_allowed_clients = s.optional_path("curve_allowed_clients", base)?;
        let allowed_client_keys = match &curve_allowed_clients {
            None => Vec::new(),
            Some(path) => {
                if curve_secret_key.is_none() {
                    return Err(s.error(
                        "curve_allowed_clients",
                        "needs curve_secret_key to be set (an allowlist only applies to CURVE)",
                    ));
                }
                read_allow_list(path).map_err(|e| match e {
                    ConfigError::Read { error, .. } => s.error(
                        "curve_allowed_clients",
                        format!("cannot read {}: {error}", path.display()),
                    ),
                    other => other,
                })?
            }
        };
        Ok(ZmqConfig {
            endpoint: ZmqConfig::endpoint(s)?,
            max_message_bytes: s.number("max_message_bytes", 1_048_576, 64, 64 << 20)?,
            curve_secret_key,
            curve_allowed_clients,
            allowed_client_keys,
        })
    }
}

impl MysqlConfig {
    pub fn from_section(s: &mut Section<'_>, base: &Path) -> Result<MysqlConfig, ConfigError> {
        let raw_hosts = s.string("host", "127.0.0.1")?;
        let port = s.number("port", 3306, 1, 65535)?;
        let hosts = parse_hosts(&raw_hosts, port).map_err(|e| s.error("host", e.to_string()))?;
        let tls = match s.string("tls", "off")?.to_ascii_lowercase().as_str() {
            "off" => TlsMode::Off,
            "required" => TlsMode::Required,
            "verify_ca" => TlsMode::VerifyCa,
            "verify_identity" => TlsMode::VerifyIdentity,
            other => {
                return Err(s.error(
                    "tls",
                    format!("`{other}` is not one of off, required, verify_ca, verify_identity"),
                ))
            }
        };
        let tls_ca_file = s.optional_path("tls_ca_file", base)?;
        let tls_cert_file = s.optional_path("tls_cert_file", base)?;
        let tls_key_file = s.optional_path("tls_key_file", base)?;
        check_tls_files(s, tls, &tls_ca_file, &tls_cert_file, &tls_key_file)?;
        Ok(MysqlConfig {
            hosts,
            port,
            user: s.string("user", "root")?,
            password: Secret(s.string("password", "")?),
            database: {
                let raw = s.string("database", "test")?;
                validate_identifier(&raw).map_err(|reason| s.error("database", reason))?;
                raw
            },
            table: {
                let raw = s.string("table", "fee")?;
                validate_identifier(&raw).map_err(|reason| s.error("table", reason))?;
                raw
            },
            pool_size: s.number("pool_size", 0, 0, 1024)?,
            connect_timeout_ms: s.number("connect_timeout_ms", 3_000, 100, 600_000)?,
            read_timeout_ms: s.number("read_timeout_ms", 15_000, 100, 3_600_000)?,
            tls,
            tls_ca_file,
            tls_cert_file,
            tls_key_file,
        })
    }
}

/// The TLS files fit the mode, are readable and hold what they should (certificates, a
/// private key). Errors name the key and the file, never anything read from it.
fn check_tls_files(
    s: &Section<'_>,
    tls: TlsMode,
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if tls == TlsMode::Off {
        for (name, file) in [
            ("tls_ca_file", ca),
            ("tls_cert_file", cert),
            ("tls_key_file", key),
        ] {
            if file.is_some() {
                return Err(s.error(name, "has no effect with tls = off; set tls or remove it"));
            }
        }
        return Ok(());
    }
    if matches!(tls, TlsMode::VerifyCa | TlsMode::VerifyIdentity) && ca.is_none() {
        return Err(s.error(
            "tls_ca_file",
            "must name the CA bundle that signed the server certificate (tls = verify_ca or verify_identity)",
        ));
    }
    if cert.is_some() != key.is_some() {
        return Err(s.error(
            if cert.is_some() {
                "tls_key_file"
            } else {
                "tls_cert_file"
            },
            "tls_cert_file and tls_key_file go together (a client certificate and its key)",
        ));
    }
    let read = |name: &str, path: &Path| -> Result<Vec<u8>, ConfigError> {
        std::fs::read(path)
            .map_err(|e| s.error(name, format!("cannot read {}: {e}", path.display())))
    };
    for (name, file) in [("tls_ca_file", ca), ("tls_cert_file", cert)] {
        if let Some(path) = file {
            let pem = read(name, path)?;
            let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>();
            if !certs.is_ok_and(|c| !c.is_empty()) {
                return Err(s.error(
                    name,
                    format!(
                        "{}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    ),
                ));
            }
        }
    }
    if let Some(path) = key {
        let pem = read("tls_key_file", path)?;
        // The parser's own error is not shown: it could quote a line of the key.
        if PrivateKeyDer::from_pem_slice(&pem).is_err() {
            return Err(s.error(
                "tls_key_file",
                format!("{}: no PEM private key in it", path.display()),
            ));
        }
    }
    Ok(())
}

impl PipelineConfig {
    pub fn from_section(s: &mut Section<'_>) -> Result<PipelineConfig, ConfigError> {
        Ok(PipelineConfig {
            workers: s.number("workers", 0, 0, 256)?,
            queue_capacity: s.number("queue_capacity", 65_536, 1, 16_777_216)?,
            batch_size: s.number("batch_size", 1000, 1, MAX_BATCH_SIZE)?,
            batch_timeout_ms: s.number("batch_timeout_ms", 2, 0, 60_000)?,
            pin_threads: s.boolean("pin_threads", true)?,
        })
    }
}

impl MetricsConfig {
    pub fn from_section(s: &mut Section<'_>) -> Result<MetricsConfig, ConfigError> {
        let listen = match s.string("listen", "127.0.0.1:9187")? {
            raw if raw.is_empty() => None,
            raw => Some(
                raw.to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        s.error(
                            "listen",
                            format!(
                                "`{raw}` is not host:port (e.g. 127.0.0.1:9187), or empty for off"
                            ),
                        )
                    })?,
            ),
        };
        Ok(MetricsConfig { listen })
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
