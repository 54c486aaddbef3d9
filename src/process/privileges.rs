//! Dropping root: supplementary groups, then the group, then the user (real, effective and
//! saved ids), through the libc wrappers that glibc applies to every thread. Afterwards it
//! proves that root cannot be regained.

use std::ffi::CString;
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("[daemon] user: no such user `{0}`")]
    NoUser(String),
    #[error("[daemon] group: no such group `{0}`")]
    NoGroup(String),
    #[error("[daemon] user/group: set only when feedd is started as root")]
    NotRoot,
    #[error("dropping privileges: {step}: {error}")]
    Syscall {
        step: &'static str,
        error: nix::Error,
    },
    #[error("dropping privileges: root could be regained after setuid")]
    NotDropped,
}

/// The ids to drop to, looked up before anything is opened.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Resolves `user`/`group` (group defaults to the user's primary group); `None` when neither
/// is set. Both set while not root is an error: the operator expects the drop to happen.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Target>, PrivilegeError> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    if !Uid::effective().is_root() {
        return Err(PrivilegeError::NotRoot);
    }
    let syscall = |step| move |error| PrivilegeError::Syscall { step, error };
    let (name, uid, user_gid) = match user {
        Some(u) => {
            let found = User::from_name(u)
                .map_err(syscall("getpwnam"))?
                .ok_or_else(|| PrivilegeError::NoUser(u.to_string()))?;
            (found.name, found.uid, Some(found.gid))
        }
        None => ("root".to_string(), Uid::from_raw(0), None),
    };
    let gid = match group {
        Some(g) => {
            Group::from_name(g)
                .map_err(syscall("getgrnam"))?
                .ok_or_else(|| PrivilegeError::NoGroup(g.to_string()))?
                .gid
        }
        None => user_gid.unwrap_or(Gid::from_raw(0)),
    };
    Ok(Some(Target { name, uid, gid }))
}

/// Gives `paths` (log file, its directory) to the target so it can reopen them after a drop.
pub fn hand_over(target: &Target, paths: &[&Path]) {
    for p in paths {
        if let Err(e) = nix::unistd::chown(*p, Some(target.uid), Some(target.gid)) {
            log::warn!("cannot hand {} to {}: {e}", p.display(), target.name);
        }
    }
}

/// initgroups, setgid, setuid — in that order — then checks that setuid(0) fails.
pub fn drop_to(target: &Target) -> Result<(), PrivilegeError> {
    let syscall = |step| move |error| PrivilegeError::Syscall { step, error };
    let name = CString::new(target.name.clone())
        .map_err(|_| PrivilegeError::NoUser(target.name.clone()))?;
    nix::unistd::initgroups(&name, target.gid).map_err(syscall("initgroups"))?;
    nix::unistd::setgid(target.gid).map_err(syscall("setgid"))?;
    nix::unistd::setuid(target.uid).map_err(syscall("setuid"))?;
    if !target.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::NotDropped);
    }
    log::info!(
        "privileges dropped to user {} (uid {}, gid {})",
        target.name,
        target.uid,
        target.gid
    );
    Ok(())
}
