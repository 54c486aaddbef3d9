//! The INI configuration, parsed once into typed, validated structs.
//!
//! Loading (`Config::load`) reads the file and judges every key; nothing else in feedd sees a
//! string from the file. Errors name the file, `[section] key` and what is allowed. The same
//! function serves start-up, `feedd check` and SIGHUP reload. `ini` reads the text into
//! sections, `sections` judges each one, `keys` holds secrets and CURVE keys.

pub mod hosts;
mod ini;
mod keys;
mod sections;

use std::path::{Path, PathBuf};

pub use keys::{read_allow_list, CurveKey, Secret};
pub use sections::{
    DaemonConfig, MetricsConfig, MysqlConfig, PipelineConfig, TlsMode, ZmqConfig, MAX_BATCH_SIZE,
};

use sections::Section;

mod amqp;
pub use amqp::{AmqpConfig, AmqpUrl, BrokerList, BrokerListError, ExchangeType, QueueType};

/// The sections a config file may have.
const SECTIONS: [&str; 6] = ["daemon", "zmq", "mysql", "amqp", "pipeline", "metrics"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The io error is part of the text and deliberately not a `source`, so `{:#}` chains do
    // not print it twice.
    #[error("{file}: cannot read: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: line {line}: {reason}")]
    Line {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{file}: [{section}] {key}: {reason}")]
    Key {
        file: PathBuf,
        section: String,
        key: String,
        reason: String,
    },
    #[error(
        "{file}: line {line}: unknown section [{section}] (allowed: daemon, zmq, mysql, amqp, pipeline, metrics)"
    )]
    UnknownSection {
        file: PathBuf,
        line: usize,
        section: String,
    },
    #[error("{file}: [zmq] endpoint and [amqp] url are both empty: feedd would have no input (set at least one)")]
    NoInput { file: PathBuf },
    #[error("{file}: line {line}: {reason}")]
    AllowList {
        file: PathBuf,
        line: usize,
        reason: String,
    },
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

/// The text of `file` (relative to `base`), and its full path for errors.
fn read(file: &Path, base: &Path) -> Result<(PathBuf, String), ConfigError> {
    let file = base.join(file);
    match std::fs::read_to_string(&file) {
        Ok(text) => Ok((file, text)),
        Err(error) => Err(ConfigError::Read { file, error }),
    }
}

/// What the logger needs of a config; the supervisor follows only this on SIGHUP.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub level: log::LevelFilter,
    /// `[daemon] log_file`; `None`: the default for the mode.
    pub file: Option<PathBuf>,
    /// The directory feedd was started in (the default `log/` is under it).
    pub base_dir: PathBuf,
}

impl LogSettings {
    /// Where log lines go: `log_file`, else `log/feedd.log` for a daemon, else stderr (`None`).
    pub fn path(&self, daemon: bool) -> Option<PathBuf> {
        match (&self.file, daemon) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => Some(self.base_dir.join("log/feedd.log")),
            (None, false) => None,
        }
    }

    /// The log settings of `file`, only when the whole file is valid: the supervisor then
    /// follows a file its serving child can accept, never one it refuses as invalid.
    pub fn load(file: &Path, base: &Path) -> Result<LogSettings, ConfigError> {
        Config::load(file, base).map(|c| c.log())
    }
}

/// Reads `[zmq] endpoint` alone from `file`: the supervisor makes the listener for it (at
/// each start of a serving process, and before it forwards a reload) while its serving child
/// judges the rest of the file.
pub fn zmq_endpoint(file: &Path, base: &Path) -> Result<String, ConfigError> {
    let (file, text) = read(file, base)?;
    let mut ini = ini::read(&text, &file)?;
    let mut zmq_s = Section::take(&mut ini, &file, "zmq");
    ZmqConfig::endpoint(&mut zmq_s)
}

impl Config {
    /// The log settings of this config.
    pub fn log(&self) -> LogSettings {
        LogSettings {
            level: self.daemon.log_level,
            file: self.daemon.log_file.clone(),
            base_dir: self.base_dir.clone(),
        }
    }

    /// Where log lines go: `log_file`, else `log/feedd.log` for a daemon, else stderr (`None`).
    pub fn log_path(&self, daemon: bool) -> Option<PathBuf> {
        self.log().path(daemon)
    }

    /// Reads and validates `file`; relative paths in it are resolved against `base`
    /// (the directory feedd was started in).
    pub fn load(file: &Path, base: &Path) -> Result<Config, ConfigError> {
        let (file, text) = read(file, base)?;
        Self::parse(&text, &file, base)
    }

    /// Validates the text of a config file (`file` names it in errors).
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut ini = ini::read(text, file)?;
        if let Some((name, section)) = ini.iter().find(|(n, _)| !SECTIONS.contains(&n.as_str())) {
            return Err(ConfigError::UnknownSection {
                file: file.to_path_buf(),
                line: section.line,
                section: name.clone(),
            });
        }
        let mut daemon_s = Section::take(&mut ini, file, "daemon");
        let daemon = DaemonConfig::from_section(&mut daemon_s, base)?;
        daemon_s.finish()?;
        let mut zmq_s = Section::take(&mut ini, file, "zmq");
        let zmq = ZmqConfig::from_section(&mut zmq_s, base)?;
        zmq_s.finish()?;
        let mut mysql_s = Section::take(&mut ini, file, "mysql");
        let mysql = MysqlConfig::from_section(&mut mysql_s, base)?;
        mysql_s.finish()?;
        let mut amqp_s = Section::take(&mut ini, file, "amqp");
        let amqp = AmqpConfig::parse(&mut amqp_s)?;
        amqp_s.finish()?;
        if zmq.endpoint.is_empty() && amqp.url.is_none() {
            return Err(ConfigError::NoInput {
                file: file.to_path_buf(),
            });
        }
        let mut pipeline_s = Section::take(&mut ini, file, "pipeline");
        let pipeline = PipelineConfig::from_section(&mut pipeline_s)?;
        pipeline_s.finish()?;
        let mut metrics_s = Section::take(&mut ini, file, "metrics");
        let metrics = MetricsConfig::from_section(&mut metrics_s)?;
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

/// A warning when the file holds a secret and group or others can read it.
pub fn exposure_warning(config: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let has_secret = !config.mysql.password.is_empty()
        || config.zmq.curve_secret_key.is_some()
        || config.amqp.url.as_ref().is_some_and(|u| u.has_password());
    let mode = std::fs::metadata(&config.file).ok()?.permissions().mode();
    (has_secret && mode & 0o077 != 0).then(|| {
        format!(
            "{} holds a secret and is readable by group or others (mode {:03o}); chmod 600 it",
            config.file.display(),
            mode & 0o777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::LevelFilter;

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
        assert!(err("stray = 1").contains("line 1: stray comes before any section header"));
    }

    #[test]
    fn duplicates_bom_and_secrets_in_whole_configs() {
        let e = err("[mysql]\ntable = a\ntable = b\n");
        assert!(
            e.contains("[mysql] table: set twice, on lines 2 and 3"),
            "{e}"
        );
        let e = err("[mysql]\n[pipeline]\n[mysql]\n");
        assert!(
            e.contains("section [mysql] appears twice, on lines 1 and 3"),
            "{e}"
        );
        assert_eq!(
            parse("\u{feff}[mysql]\ntable = t").unwrap().mysql.table,
            "t"
        );
        // The `=` forgotten: the key is named, the secret is not shown.
        // Z85 has `=` in its alphabet: a key holding one would read as `key = value` here.
        let secret = std::iter::repeat_with(|| {
            zmq::z85_encode(&zmq::CurveKeyPair::new().unwrap().secret_key).unwrap()
        })
        .find(|s| !s.contains('='))
        .unwrap();
        let e = err(&format!("[zmq]\ncurve_secret_key {secret}\n"));
        assert!(
            e.contains("[zmq] curve_secret_key: missing `=` and value"),
            "{e}"
        );
        assert!(!e.contains(&secret), "{e}");
        let e = err(&format!("[zmq]\ncurve_secretkey {secret}\n"));
        assert!(e.contains("line 2: [zmq]: not a `key = value` line"), "{e}");
        assert!(!e.contains(&secret), "{e}");
        let e = err("[mysql]\nhunter2\n");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn read_errors_print_the_os_error_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = Config::load(dir.path(), dir.path()).unwrap_err();
        let chained = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chained.matches("os error 21").count(), 1, "{chained}");
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
        let e = err(&format!("[zmq]\ncurve_secret_key = \"{}\"", "#".repeat(40)));
        assert!(e.contains("not valid Z85"), "{e}");
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
    fn host_list() {
        let c = parse("[mysql]\nhost = db1:3307, db2, [::1]\nport = 3310").unwrap();
        let host = |host: &str, port| hosts::HostAddr {
            host: host.into(),
            port,
        };
        assert_eq!(
            c.mysql.hosts,
            [host("db1", 3307), host("db2", 3310), host("::1", 3310)]
        );
        assert_eq!(parse("").unwrap().mysql.hosts, [host("127.0.0.1", 3306)]);
        let e = err("[mysql]\nhost = db1, db2:99999");
        assert!(
            e.contains("[mysql] host") && e.contains("entry `db2:99999`"),
            "{e}"
        );
        assert!(err("[mysql]\nhost =").contains("[mysql] host: must name at least one host"));
        assert!(err("[mysql]\nhost = db1,,db2").contains("entry 2 is empty"));
    }

    #[test]
    fn tls_settings() {
        let c = parse("[mysql]\ntls = required").unwrap();
        assert_eq!(c.mysql.tls, TlsMode::Required);
        assert_eq!(parse("").unwrap().mysql.tls, TlsMode::Off);
        assert!(err("[mysql]\ntls = yes").contains("not one of off, required"));
        let e = err("[mysql]\ntls = verify_identity");
        assert!(e.contains("[mysql] tls_ca_file: must name the CA"), "{e}");
        let e = err("[mysql]\ntls_ca_file = ca.pem");
        assert!(e.contains("no effect with tls = off"), "{e}");
        let e = err("[mysql]\ntls = required\ntls_cert_file = c.pem");
        assert!(
            e.contains("[mysql] tls_key_file: tls_cert_file and tls_key_file go together"),
            "{e}"
        );
        // Relative to the start directory; a missing file is named with the reason.
        let e = err("[mysql]\ntls = verify_ca\ntls_ca_file = nope/ca.pem");
        assert!(e.contains("cannot read /srv/nope/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleSBieXRlcw==\n",
        )
        .unwrap();
        let e = err(&format!(
            "[mysql]\ntls = verify_ca\ntls_ca_file = {}",
            junk.display()
        ));
        assert!(e.contains("no PEM certificate in it"), "{e}");
        let e = err(&format!(
            "[mysql]\ntls = required\ntls_cert_file = {0}\ntls_key_file = {0}",
            junk.display()
        ));
        assert!(
            e.contains("tls_cert_file") && e.contains("no PEM certificate"),
            "{e}"
        );
        assert!(
            !e.contains("c2VjcmV0"),
            "nothing read from a key file is shown: {e}"
        );
    }
}
