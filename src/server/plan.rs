//! A reload as a pure plan: given the running config and the file just read, which parts
//! change, which changed keys wait for a restart (every restart-only rule lives here), and
//! how long the old resources' messages may take to be answered. No I/O; the reload
//! (server/reload.rs) proves what the plan names, then walks it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::Config;
use crate::input::amqp::AmqpSettings;
use crate::input::zmq::ZmqSettings;

#[derive(Debug)]
pub struct Plan {
    /// The config to publish once every part took (restart-only keys keep running values).
    pub config: Config,
    /// Keys that changed in the file but take effect only after a restart (to log).
    pub restart_only: Vec<&'static str>,
    /// How long each input may answer the messages read through its old resource: the
    /// running `shutdown_timeout_ms`, the bound those messages were read under.
    pub drain: Duration,
    /// The receiver's part, asked whenever ZeroMQ is on: it may be bound to nothing after
    /// an earlier failure, and answers at once when nothing changed.
    pub zmq: Option<ZmqSettings>,
    /// The consumer's part, when `[amqp]` changed: the new settings (`None`: off).
    pub amqp: Option<Option<AmqpSettings>>,
    /// `[mysql]` changed: a new pool must be connected and its table judged.
    pub mysql: bool,
    /// `[metrics] listen` changed: the new address (`None`: no listener).
    pub metrics: Option<Option<SocketAddr>>,
}

/// Plans the move from `running` to `new`. `daemon`: the log goes to a file by default.
pub fn plan(running: &Config, mut new: Config, daemon: bool) -> Plan {
    let restart_only = keep_restart_only(running, &mut new, daemon);
    let zmq = (!running.zmq.endpoint.is_empty()).then(|| ZmqSettings::of(&new));
    let amqp = AmqpSettings::of(&new);
    let amqp = (amqp != AmqpSettings::of(running)).then_some(amqp);
    Plan {
        restart_only,
        drain: running.daemon.shutdown_timeout(),
        zmq,
        amqp,
        mysql: new.mysql != running.mysql,
        metrics: (new.metrics.listen != running.metrics.listen).then_some(new.metrics.listen),
        config: new,
    }
}

/// The keys fixed for the process's life keep their running values in `new`; returns those
/// that changed in the file.
fn keep_restart_only(old: &Config, new: &mut Config, daemon: bool) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut keep = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    keep("[daemon] pidfile", old.daemon.pidfile != new.daemon.pidfile);
    keep("[daemon] user", old.daemon.user != new.daemon.user);
    keep("[daemon] group", old.daemon.group != new.daemon.group);
    keep(
        "[pipeline] workers",
        old.pipeline.workers != new.pipeline.workers,
    );
    keep(
        "[pipeline] pin_threads",
        old.pipeline.pin_threads != new.pipeline.pin_threads,
    );
    // The receiver thread exists, or not, for the process's life.
    keep(
        "[zmq] endpoint (turning ZeroMQ on or off)",
        old.zmq.endpoint.is_empty() != new.zmq.endpoint.is_empty(),
    );
    // The logger writes to stderr or to a file for the process's life; the file may change.
    keep(
        "[daemon] log_file (switching between stderr and a file)",
        old.log_path(daemon).is_some() != new.log_path(daemon).is_some(),
    );
    new.daemon.pidfile = old.daemon.pidfile.clone();
    new.daemon.user = old.daemon.user.clone();
    new.daemon.group = old.daemon.group.clone();
    new.pipeline.workers = old.pipeline.workers;
    new.pipeline.pin_threads = old.pipeline.pin_threads;
    if old.zmq.endpoint.is_empty() != new.zmq.endpoint.is_empty() {
        new.zmq.endpoint = old.zmq.endpoint.clone();
    }
    if old.log_path(daemon).is_some() != new.log_path(daemon).is_some() {
        new.daemon.log_file = old.daemon.log_file.clone();
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/feedd/feed.ini"), Path::new("/"))
            .unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    const BASE: &str = "[zmq]\nendpoint = tcp://127.0.0.1:5555\n";

    #[test]
    fn nothing_changed_asks_only_the_receiver() {
        let p = plan(&config(BASE), config(BASE), false);
        assert!(p.restart_only.is_empty());
        assert_eq!(p.zmq, Some(ZmqSettings::of(&config(BASE))));
        assert_eq!((p.amqp, p.mysql, p.metrics), (None, false, None));
    }

    #[test]
    fn drain_is_the_running_bound() {
        let running = config(&format!("{BASE}[daemon]\nshutdown_timeout_ms = 700\n"));
        let new = config(&format!("{BASE}[daemon]\nshutdown_timeout_ms = 9000\n"));
        let p = plan(&running, new, false);
        assert_eq!(p.drain, Duration::from_millis(700));
        assert_eq!(
            p.config.daemon.shutdown_timeout_ms, 9000,
            "published for the next drain"
        );
    }

    #[test]
    fn restart_only_keys_keep_running_values() {
        let running = config(BASE);
        let new = config(&format!(
            "{BASE}[pipeline]\nworkers = 3\nbatch_size = 5\n[daemon]\nuser = nobody\n"
        ));
        let p = plan(&running, new, false);
        assert_eq!(p.restart_only, vec!["[daemon] user", "[pipeline] workers"]);
        assert_eq!(p.config.pipeline.workers, running.pipeline.workers);
        assert_eq!(p.config.daemon.user, None);
        assert_eq!(
            p.config.pipeline.batch_size, 5,
            "a plain setting is published"
        );
    }

    #[test]
    fn zeromq_cannot_be_turned_off_or_on() {
        let both = format!("{BASE}[amqp]\nurl = amqp://localhost/%2f\n");
        let amqp_only = "[zmq]\nendpoint =\n[amqp]\nurl = amqp://localhost/%2f\n";
        let p = plan(&config(&both), config(amqp_only), false);
        assert_eq!(
            p.restart_only,
            vec!["[zmq] endpoint (turning ZeroMQ on or off)"]
        );
        assert_eq!(p.config.zmq.endpoint, "tcp://127.0.0.1:5555");
        let p = plan(&config(amqp_only), config(&both), false);
        assert_eq!(p.zmq, None, "no receiver runs: nothing to ask");
        assert_eq!(p.config.zmq.endpoint, "");
    }

    #[test]
    fn stderr_and_file_do_not_swap_but_files_do() {
        let to_file = format!("{BASE}[daemon]\nlog_file = /tmp/a.log\n");
        let p = plan(&config(BASE), config(&to_file), false);
        assert_eq!(
            p.config.daemon.log_file, None,
            "foreground on stderr stays there"
        );
        assert_eq!(p.restart_only.len(), 1);
        // A daemon logs to a file either way: the default and an explicit one swap.
        let p = plan(&config(BASE), config(&to_file), true);
        assert!(p.restart_only.is_empty());
        assert_eq!(
            p.config.daemon.log_file.as_deref(),
            Some(Path::new("/tmp/a.log"))
        );
    }

    #[test]
    fn topology_keys_switch_the_consumer_without_a_restart() {
        let on = format!("{BASE}[amqp]\nurl = amqp://localhost/%2f\n");
        for key in [
            "exchange = fees",
            "exchange = fees\nexchange_type = topic",
            "routing_key = fee.eu",
            "queue_type = quorum",
        ] {
            let p = plan(&config(&on), config(&format!("{on}{key}\n")), false);
            assert!(p.restart_only.is_empty(), "{key}");
            assert_eq!(
                p.amqp,
                Some(AmqpSettings::of(&p.config)),
                "{key}: the consumer gets the new settings"
            );
        }
        // An empty routing_key binds with the queue's name: writing that name changes nothing.
        let p = plan(
            &config(&format!("{on}exchange = fees\n")),
            config(&format!("{on}exchange = fees\nrouting_key = fee\n")),
            false,
        );
        assert_eq!(p.amqp, None);
    }

    #[test]
    fn changed_parts_are_named() {
        let running = config(BASE);
        let new = config(
            "[zmq]\nendpoint = tcp://127.0.0.1:6666\n[mysql]\ndatabase = other\n[metrics]\nlisten = 127.0.0.1:9100\n[amqp]\nurl = amqp://localhost/%2f\n",
        );
        let p = plan(&running, new, false);
        assert_eq!(
            p.zmq.map(|z| z.endpoint).as_deref(),
            Some("tcp://127.0.0.1:6666")
        );
        assert!(p.mysql);
        assert_eq!(p.metrics, Some(Some("127.0.0.1:9100".parse().unwrap())));
        assert!(matches!(p.amqp, Some(Some(_))));
        let off = plan(
            &config(&format!("{BASE}[amqp]\nurl = amqp://localhost/%2f\n")),
            config(BASE),
            false,
        );
        assert!(matches!(off.amqp, Some(None)), "AMQP turned off");
    }
}
