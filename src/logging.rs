//! Log output through `flexi_logger`: stderr or a file, a level and a file that can change on
//! reload, and a reopen for logrotate (SIGHUP, SIGUSR1).

use std::path::{Path, PathBuf};

use flexi_logger::writers::FileLogWriter;
use flexi_logger::{FileSpec, LogSpecification, Logger, LoggerHandle, WriteMode};
use parking_lot::Mutex;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log file {path}: {source}")]
    File {
        path: PathBuf,
        source: flexi_logger::FlexiLoggerError,
    },
    #[error("logger: {0}")]
    Start(#[from] flexi_logger::FlexiLoggerError),
}

pub struct Logging {
    handle: LoggerHandle,
    /// The file written now; `None` for stderr.
    file: Mutex<Option<PathBuf>>,
    daemon: bool,
}

fn file_writer(path: &Path) -> Result<flexi_logger::writers::FileLogWriterBuilder, LogError> {
    let spec = FileSpec::try_from(path).map_err(|source| LogError::File {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(FileLogWriter::builder(spec)
        .append()
        .format(flexi_logger::opt_format))
}

impl Logging {
    /// Starts the global logger as `config` says (`daemon`: default to `log/feedd.log`).
    pub fn start(config: &Config, daemon: bool) -> Result<Logging, LogError> {
        let spec = LogSpecification::builder()
            .default(config.daemon.log_level)
            .build();
        let path = config.log_path(daemon);
        let logger = Logger::with(spec)
            .format(flexi_logger::opt_format)
            .write_mode(WriteMode::Direct);
        let handle = match &path {
            None => logger.log_to_stderr().start()?,
            Some(p) => {
                if let Some(dir) = p.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let spec = FileSpec::try_from(p).map_err(|source| LogError::File {
                    path: p.clone(),
                    source,
                })?;
                logger
                    .log_to_file(spec)
                    .append()
                    .start()
                    .map_err(|source| LogError::File {
                        path: p.clone(),
                        source,
                    })?
            }
        };
        Ok(Logging {
            handle,
            file: Mutex::new(path),
            daemon,
        })
    }

    /// Applies a reloaded level and file; a file that cannot be opened keeps the old one.
    pub fn apply(&self, config: &Config) -> Result<(), LogError> {
        self.handle.set_new_spec(
            LogSpecification::builder()
                .default(config.daemon.log_level)
                .build(),
        );
        let wanted = config.log_path(self.daemon);
        let mut file = self.file.lock();
        if wanted == *file {
            return Ok(());
        }
        match (&*file, &wanted) {
            (Some(_), Some(new)) => {
                if let Some(dir) = new.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                self.handle
                    .reset_flw(&file_writer(new)?)
                    .map_err(|source| LogError::File {
                        path: new.clone(),
                        source,
                    })?;
                *file = wanted;
            }
            _ => log::warn!(
                "[daemon] log_file: switching between stderr and a file takes effect after a restart"
            ),
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
