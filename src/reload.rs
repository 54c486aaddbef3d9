//! Applying a re-read config to the running daemon (SIGHUP), from the signal thread.
//!
//! Everything that can fail is prepared first (new database pool checked, new metrics
//! listener bound); only then is the `ArcSwap<Config>` swapped. A failure keeps the running
//! config whole and counts a failed reload. Batches in flight finish on the old pool.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::{self, Config};
use crate::input::receiver;
use crate::logging::Logging;
use crate::metrics::{Metrics, MetricsServer};
use crate::pipeline::store::Store;

pub struct Reloader {
    pub config_file: PathBuf,
    pub base_dir: PathBuf,
    pub config: Arc<ArcSwap<Config>>,
    pub store: Arc<ArcSwap<Store>>,
    pub logging: Arc<Logging>,
    pub metrics: Metrics,
    pub metrics_server: Arc<Mutex<Option<MetricsServer>>>,
    /// Resolved once at start (`workers` is fixed for the process's life).
    pub workers: usize,
    /// Tells the receiver to look at the new config now (owned by the signal thread).
    pub control: Option<zmq::Socket>,
}

impl Reloader {
    /// Re-reads the file and applies it, or logs why not (the reason is returned too, for
    /// systemd's status line).
    pub fn reload(&mut self) -> Result<(), String> {
        let result = self.try_reload();
        match &result {
            Ok(()) => {
                self.metrics.config_reloads.inc();
                log::info!("config reloaded from {}", self.config_file.display());
            }
            Err(reason) => {
                self.metrics.config_reload_failures.inc();
                log::error!("reload failed, keeping the running config: {reason}");
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let mut new = Config::load(&self.config_file, &self.base_dir).map_err(|e| e.to_string())?;
        let old = self.config.load_full();
        for key in config::restart_only_changes(&old, &new) {
            log::warn!("{key} changed: takes effect only after a restart; keeping the old value");
        }
        new.daemon.pidfile = old.daemon.pidfile.clone();
        new.daemon.user = old.daemon.user.clone();
        new.daemon.group = old.daemon.group.clone();
        new.pipeline.workers = old.pipeline.workers;
        new.pipeline.pin_threads = old.pipeline.pin_threads;

        let new_metrics = if new.metrics.listen != old.metrics.listen {
            match new.metrics.listen {
                None => Some(None),
                Some(addr) => Some(Some(
                    MetricsServer::start(addr, self.metrics.clone()).map_err(|e| e.to_string())?,
                )),
            }
        } else {
            None
        };
        let new_store = if new.mysql != old.mysql {
            let pool_size = new.mysql.pool_size_for(self.workers);
            let store = Store::connect(&new.mysql, pool_size)
                .map_err(|e| format!("new database target not usable: {e}"))?;
            Some(store)
        } else {
            None
        };

        if let Some(store) = new_store {
            self.store.store(Arc::new(store));
            log::info!(
                "database target now {}:{}/{}.{}",
                new.mysql.host,
                new.mysql.port,
                new.mysql.database,
                new.mysql.table
            );
        }
        if let Some(server) = new_metrics {
            // Dropping the old listener stops it; the new one is already bound.
            *self.metrics_server.lock() = server;
        }
        if let Err(e) = self.logging.apply(&new) {
            log::error!("reload: {e}; keeping the old log file");
        }
        self.config.store(Arc::new(new));
        if let Some(control) = &self.control {
            if let Err(e) = control.send(receiver::RELOAD, zmq::DONTWAIT) {
                log::debug!("reload: receiver not told: {e}");
            }
        }
        Ok(())
    }
}
