//! A reload is all or nothing: a part that fails after another part was applied rolls that
//! one back.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::rabbit::{self, Client};
use common::*;
use mysql::prelude::Queryable;

/// A TCP relay to `target` whose connections the test can cut at once (a broker that
/// vanishes between a reload's preparation and its switch).
struct Relay {
    port: u16,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (kept, target) = (Arc::clone(&streams), target.to_string());
        // Detached: its sockets are shut down by `cut`, and the test process ends with it.
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                kept.lock().unwrap().extend([client, server]);
            }
        });
        Relay { port, streams }
    }

    fn connections(&self) -> usize {
        self.streams.lock().unwrap().len() / 2
    }

    fn cut(&self) {
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn reload_counts(addr: &str) -> (f64, f64) {
    let text = http_get(addr, "/metrics");
    (
        metric(&text, "feedd_config_reloads_total"),
        metric(&text, "feedd_config_reload_failures_total"),
    )
}

/// The receiver moves first; the consumer's new broker link is then found dead, so its part
/// fails and the receiver must go back to the running endpoint (it stayed moved before).
#[test]
fn a_part_failing_after_the_receiver_moved_rolls_the_receiver_back() {
    let db = Db::create("reload_rollback");
    let (queue, _) = rabbit::names("rollback");
    let mq = Client::connect(&rabbit::shared_url());
    mq.delete(&queue);
    let (addr, listen) = metrics_listen();
    let amqp_url = format!("amqp.url = {}", rabbit::shared_url());
    let queue_key = format!("amqp.queue = {queue}");
    let common = [
        listen.as_str(),
        queue_key.as_str(),
        "daemon.shutdown_timeout_ms = 2000",
        "daemon.log_level = info",
    ];
    let mut first = common.to_vec();
    first.push(&amqp_url);
    let f = Feedd::start(&db, &first);
    let relay = Relay::start("127.0.0.1:5672");
    // A message that cannot commit (its ticket is locked) keeps the receiver's move waiting
    // for its drain: the window in which the new broker link dies.
    let mut lock = db.conn();
    lock.query_drop("BEGIN").unwrap();
    lock.query_drop("INSERT INTO fee (ticket, login, volume, status) VALUES (1, 1, 1, 'Y')")
        .unwrap();
    let dealer = Dealer::connect(&f.endpoint());
    dealer.send(1, "1,1,1");
    assert!(wait_until(Duration::from_secs(10), || {
        metric(
            &http_get(&addr, "/metrics"),
            "feedd_messages_received_total",
        ) >= 1.0
    }));
    let moved_port = free_port();
    let zmq_key = format!("zmq.endpoint = tcp://127.0.0.1:{moved_port}");
    let relayed = format!(
        "amqp.url = {}",
        rabbit::shared_url().replace(":5672", &format!(":{}", relay.port))
    );
    let mut second = common.to_vec();
    second.extend([zmq_key.as_str(), relayed.as_str()]);
    let f = f.prepare_in(&db, &second);
    f.signal(libc::SIGHUP);
    // Prepared: the new link consumes the queue beside the running one.
    assert!(
        wait_until(Duration::from_secs(10), || mq
            .counts(&queue)
            .is_some_and(|(_, consumers)| consumers == 2)),
        "{}",
        f.stderr_log()
    );
    assert_eq!(
        relay.connections(),
        1,
        "the preparer connected through the relay"
    );
    relay.cut();
    assert!(
        wait_until(Duration::from_secs(20), || reload_counts(&addr)
            == (0.0, 1.0)),
        "reload counts {:?}\n{}",
        reload_counts(&addr),
        f.stderr_log()
    );
    lock.query_drop("ROLLBACK").unwrap();
    // Nothing of the reload stays: the running endpoint serves, the new one is closed.
    assert_eq!(
        Req::connect(&f.endpoint()).ask("2,1,1"),
        "TRUE",
        "{}",
        f.stderr_log()
    );
    let moved = format!("127.0.0.1:{moved_port}");
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(&moved)
            .is_err()),
        "{moved} still accepts connections\n{}",
        f.stderr_log()
    );
    // And the consumer consumes the running queue again.
    mq.publish(&queue, &["3,1,1".to_string()], &[]);
    assert!(
        wait_until(Duration::from_secs(20), || db.rows().contains_key(&3)),
        "{}",
        f.stderr_log()
    );
    assert!(
        f.stderr_log().contains("rolling back"),
        "{}",
        f.stderr_log()
    );
    mq.delete(&queue);
}
