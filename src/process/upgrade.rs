//! `feedd upgrade` (SIGUSR2 to the supervisor, like nginx): the supervisor execs the binary now
//! on disk in place of itself, handing down its pidfile lock, listening socket and the serving
//! child's control channel by number (close-on-exec cleared for the exec only), and the new
//! image resumes supervising: it starts a new serving child, and once that one is ready tells
//! the old one to drain (supervisor.rs).
//!
//! Across the exec the pid, the session, the working directory and the children stay; the
//! threads do not (the exec ends them), so the new image waits for the adopted old child
//! itself. The outcome travels to the `feedd upgrade` command through a small file beside the
//! pidfile (`<pidfile>.upgrade`: `OK <pid>` or `ERR <reason>`).
//!
//! No threads of its own.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::input::zmq::listener::{Listener, HANDED_FDS_VAR};
use crate::process::control::Control;
use crate::process::pidfile::Pidfile;

/// The hidden flag of a supervisor resumed by an upgrade's exec.
pub const RESUME_FLAG: &str = "--upgraded";
const PIDFILE_FD_VAR: &str = "FEEDD_PIDFILE_FD";
const OLD_CHILD_VAR: &str = "FEEDD_UPGRADE_FROM";
/// The supervisor's end of the old child's control channel.
const OLD_CONTROL_VAR: &str = "FEEDD_UPGRADE_CONTROL_FD";
/// The path children are started from: the one the first supervisor was started as (a
/// wrapper script there stays in the chain), not what the new image resolves itself to.
const EXE_VAR: &str = "FEEDD_EXE";

/// Where the supervisor leaves the outcome of an upgrade for `feedd upgrade`.
pub fn result_path(pidfile: &Path) -> PathBuf {
    let mut name = pidfile.as_os_str().to_owned();
    name.push(".upgrade");
    PathBuf::from(name)
}

/// Writes the outcome (replacing, so a reader never sees half of it).
pub fn report(pidfile: &Path, outcome: &Result<u32, String>) {
    let path = result_path(pidfile);
    let line = match outcome {
        Ok(pid) => format!("OK {pid}\n"),
        Err(reason) => format!("ERR {}\n", reason.replace('\n', " ")),
    };
    let tmp = path.with_extension("upgrade.tmp");
    let written = std::fs::write(&tmp, line).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        log::error!("supervisor: cannot write {}: {e}", path.display());
    }
}

/// What an upgrade hands down, as the old image sees it.
pub struct Handover<'a> {
    pub exe: &'a Path,
    pub conf: &'a Path,
    pub pidfile: &'a Pidfile,
    pub listener: Option<&'a Listener>,
    pub control: Option<&'a Control>,
    pub old_child: u32,
}

/// Replaces this process with the binary at `exe`, handing everything down. Returns only if
/// that failed, with the reason (then nothing changed).
pub fn exec(h: &Handover<'_>) -> String {
    // A binary that cannot even print its version would leave nobody supervising.
    match Command::new(h.exe).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return format!("{} --version failed ({})", h.exe.display(), out.status),
        Err(e) => return format!("cannot run {}: {e}", h.exe.display()),
    }
    let inherit = |on: bool| -> nix::Result<()> {
        h.pidfile.set_inherited(on)?;
        h.control.map_or(Ok(()), |c| c.set_inherited(on))?;
        h.listener.map_or(Ok(()), |l| l.set_inherited(on))
    };
    if let Err(e) = inherit(true) {
        let _ = inherit(false);
        return format!("cannot hand the pidfile lock or the listener down: {e}");
    }
    let mut cmd = Command::new(h.exe);
    cmd.arg(RESUME_FLAG)
        .arg("--conf")
        .arg(h.conf)
        .env(PIDFILE_FD_VAR, h.pidfile.raw_fd().to_string())
        .env(OLD_CHILD_VAR, h.old_child.to_string())
        .env(EXE_VAR, h.exe)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    match h.listener {
        Some(l) => cmd.env(HANDED_FDS_VAR, l.raw_fd().to_string()),
        None => cmd.env_remove(HANDED_FDS_VAR),
    };
    match h.control {
        Some(c) => cmd.env(OLD_CONTROL_VAR, c.raw_fd().to_string()),
        None => cmd.env_remove(OLD_CONTROL_VAR),
    };
    log::logger().flush();
    let error = cmd.exec();
    let _ = inherit(false);
    format!("cannot execute {}: {error}", h.exe.display())
}

/// What the new image takes over.
pub struct Resumed {
    pub pidfile: Pidfile,
    pub listener: Option<Listener>,
    /// The old child's control channel, when it was handed down.
    pub control: Option<Control>,
    pub old_child: u32,
    pub exe: PathBuf,
}

/// Adopts what the old image handed down (`pidfile`: its path in the config).
pub fn resume(pidfile: &Path) -> Result<Resumed, String> {
    let number = |var: &str| -> Result<i32, String> {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{var} is not set: {RESUME_FLAG} is for an upgrade's exec only"))
    };
    let fd = number(PIDFILE_FD_VAR)?;
    let old_child = u32::try_from(number(OLD_CHILD_VAR)?).map_err(|e| e.to_string())?;
    let fd = crate::zmq_ffi::adopt_inherited_fd(fd)
        .ok_or_else(|| format!("the pidfile lock (fd {fd}) was not handed down"))?;
    let pidfile = Pidfile::adopt(pidfile, fd).map_err(|e| e.to_string())?;
    let listener = Listener::inherited()
        .map_err(|e| e.to_string())?
        .into_iter()
        .next();
    let control = number(OLD_CONTROL_VAR).ok().and_then(Control::adopt);
    let exe = match std::env::var_os(EXE_VAR) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().map_err(|e| e.to_string())?,
    };
    Ok(Resumed {
        pidfile,
        listener,
        control,
        old_child,
        exe,
    })
}

/// For `feedd upgrade`: forgets the last outcome, so the next one read is this upgrade's.
pub fn clear_result(pidfile: &Path) {
    let _ = std::fs::remove_file(result_path(pidfile));
}

/// For `feedd upgrade`: waits for the outcome (`Ok(pid)` of the new serving process, or the
/// supervisor's reason).
pub fn await_result(pidfile: &Path, timeout: Duration) -> Result<u32, String> {
    let path = result_path(pidfile);
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let text = text.trim_end();
            if let Some(pid) = text.strip_prefix("OK ") {
                return pid
                    .parse()
                    .map_err(|_| format!("unreadable result: {text}"));
            }
            if let Some(reason) = text.strip_prefix("ERR ") {
                return Err(reason.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "no outcome in {} within {} s; see the log",
        path.display(),
        timeout.as_secs()
    ))
}
