//! Pipeline threads with an owner: each is spawned (pinned when asked) with a notice that
//! tells the main thread when it ends, and how, even when it panics.

use std::thread::JoinHandle;

use crossbeam_channel::Sender;

/// Which pipeline thread an exit notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Receiver,
    Consumer,
    Worker(usize),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Receiver => f.write_str("receiver"),
            Role::Consumer => f.write_str("amqp-consumer"),
            Role::Worker(id) => write!(f, "worker-{id}"),
        }
    }
}

/// A pipeline thread's end: who, and its error if it failed.
pub type Exit = (Role, Result<(), String>);

/// A thread's end, reported to the main thread (also on panic, from `Drop`).
struct ExitNotice {
    role: Role,
    tx: Sender<Exit>,
    result: Option<Result<(), String>>,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err("panicked".to_string()));
        let _ = self.tx.send((self.role, result));
    }
}

pub fn spawn_pinned<F>(
    role: Role,
    core: Option<core_affinity::CoreId>,
    exits: &Sender<Exit>,
    body: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let tx = exits.clone();
    std::thread::Builder::new()
        .name(role.to_string())
        .spawn(move || {
            let mut notice = ExitNotice {
                role,
                tx,
                result: None,
            };
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    log::debug!("{}: could not pin to core {}", notice.role, core.id);
                }
            }
            notice.result = Some(body());
        })
}
