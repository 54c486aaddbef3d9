//! Log output through `flexi_logger`: stderr or a file, a level and a file that can change on
//! reload, and a reopen for logrotate (SIGHUP, SIGUSR1).
//!
//! A log file is opened for appending by feedd itself before it is handed to the logger (at
//! start and on reload), because the logger loses lines silently on a file it cannot write.
//! No directory is created for an explicit `log_file`; only the default `log/` is.

use std::path::{Path, PathBuf};

use flexi_logger::writers::FileLogWriter;
use flexi_logger::{FileSpec, LogSpecification, Logger, LoggerHandle, WriteMode};
use parking_lot::Mutex;

use crate::config::LogSettings;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log file {path}: {error}")]
    File {
        path: PathBuf,
        error: flexi_logger::FlexiLoggerError,
    },
    #[error("{key} {path}: cannot open for appending: {error}")]
    Open {
        /// `[daemon] log_file`, or a note that the default path is meant.
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("logger: {0}")]
    Start(flexi_logger::FlexiLoggerError),
}

// Not `#[from]`: that would also make it the error's source, printed twice in a `{:#}` chain.
impl From<flexi_logger::FlexiLoggerError> for LogError {
    fn from(e: flexi_logger::FlexiLoggerError) -> Self {
        LogError::Start(e)
    }
}

/// Proves `path` can be appended to (creating the file, never a directory, except the default
/// `log/` when `log_file` is empty), so a bad path is a start-up or reload error.
pub fn check_file(settings: &LogSettings, path: &Path) -> Result<(), LogError> {
    let key = if settings.file.is_some() {
        "[daemon] log_file"
    } else {
        "log file (default for an empty [daemon] log_file)"
    };
    if settings.file.is_none() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|error| LogError::Open {
                key,
                path: path.to_path_buf(),
                error,
            })?;
        }
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map(drop)
        .map_err(|error| LogError::Open {
            key,
            path: path.to_path_buf(),
            error,
        })
}

pub struct Logging {
    handle: LoggerHandle,
    /// The file written now; `None` for stderr.
    file: Mutex<Option<PathBuf>>,
    daemon: bool,
}

fn file_writer(path: &Path) -> Result<flexi_logger::writers::FileLogWriterBuilder, LogError> {
    let spec = FileSpec::try_from(path).map_err(|error| LogError::File {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(FileLogWriter::builder(spec)
        .append()
        .format(flexi_logger::opt_format))
}

impl Logging {
    /// Starts the global logger as `config` says (`daemon`: default to `log/feedd.log`).
    pub fn start(settings: &LogSettings, daemon: bool) -> Result<Logging, LogError> {
        let spec = LogSpecification::builder().default(settings.level).build();
        let path = settings.path(daemon);
        let logger = Logger::with(spec)
            .format(flexi_logger::opt_format)
            .write_mode(WriteMode::Direct);
        let handle = match &path {
            None => logger.log_to_stderr().start()?,
            Some(p) => {
                check_file(settings, p)?;
                let spec = FileSpec::try_from(p).map_err(|error| LogError::File {
                    path: p.clone(),
                    error,
                })?;
                logger
                    .log_to_file(spec)
                    .append()
                    .start()
                    .map_err(|error| LogError::File {
                        path: p.clone(),
                        error,
                    })?
            }
        };
        Ok(Logging {
            handle,
            file: Mutex::new(path),
            daemon,
        })
    }

    /// Whether the log defaults to a file (a daemon) rather than stderr.
    pub fn daemon(&self) -> bool {
        self.daemon
    }

    /// Whether `config`'s log file could be applied: for a reload to check before it commits.
    pub fn check(&self, settings: &LogSettings) -> Result<(), LogError> {
        match settings.path(self.daemon) {
            Some(path) if Some(&path) != self.file.lock().as_ref() => check_file(settings, &path),
            _ => Ok(()),
        }
    }

    /// Applies a reloaded level and file; a file that cannot be opened keeps the old one.
    pub fn apply(&self, settings: &LogSettings) -> Result<(), LogError> {
        self.check(settings)?;
        self.handle
            .set_new_spec(LogSpecification::builder().default(settings.level).build());
        let wanted = settings.path(self.daemon);
        let mut file = self.file.lock();
        if wanted == *file {
            return Ok(());
        }
        // Only file to file: the reload plan keeps stderr↔file switches for a restart
        // (server/plan.rs).
        if let (Some(_), Some(new)) = (&*file, &wanted) {
            self.handle
                .reset_flw(&file_writer(new)?)
                .map_err(|error| LogError::File {
                    path: new.clone(),
                    error,
                })?;
            *file = wanted;
        }
        Ok(())
    }

    /// Reopens the log file (after logrotate moved it); nothing to do for stderr.
    pub fn reopen(&self) {
        if self.file.lock().is_some() {
            if let Err(e) = self.handle.reopen_output() {
                eprintln!("feedd: cannot reopen log file: {e}");
            }
        }
    }

    pub fn flush(&self) {
        self.handle.flush();
    }
}
