//! The pidfile and its lock: "running" means "someone holds the flock", never "the file
//! exists". The lock lives on an open file description opened close-on-exec, so the serving
//! child started by the supervisor never inherits it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("already running (pid {0})")]
    AlreadyRunning(i32),
    #[error("pidfile {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A held pidfile; dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    /// Held (never read) for the lock it carries.
    _lock: Flock<File>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PidfileError + '_ {
    move |source| PidfileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Pidfile {
    /// Creates (with its directory) and locks the pidfile, then writes `pid` into it.
    pub fn acquire(path: &Path, pid: u32) -> Result<Pidfile, PidfileError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error(path))?;
        }
        // No truncation before the lock is ours: the file may be a running daemon's.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_error(path))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, _)) => {
                return Err(PidfileError::AlreadyRunning(
                    read_pid(&mut file).unwrap_or(0),
                ))
            }
        };
        file.set_len(0).map_err(io_error(path))?;
        file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
        writeln!(file, "{pid}").map_err(io_error(path))?;
        file.flush().map_err(io_error(path))?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            _lock: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Removed while still locked, so no starter can mistake it for ours.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The pid of the daemon holding `path`, or `None` if nobody holds it (absent or stale).
pub fn running_pid(path: &Path) -> Option<i32> {
    let file = File::open(path).ok()?;
    let mut file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // We got a lock, so nobody holds it: stale. Dropping it releases ours.
        Ok(_) => return None,
        Err((file, _)) => file,
    };
    // Locked: the holder writes its pid right after locking; wait for it briefly.
    for _ in 0..50 {
        if let Some(pid) = read_pid(&mut file).filter(|p| *p > 0) {
            return Some(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_second_holder_and_stale_file_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/feedd.pid");
        assert_eq!(running_pid(&path), None);
        let held = Pidfile::acquire(&path, 4242).unwrap();
        assert_eq!(running_pid(&path), Some(4242));
        match Pidfile::acquire(&path, 1) {
            Err(PidfileError::AlreadyRunning(4242)) => {}
            other => panic!("{other:?}"),
        }
        drop(held);
        assert!(!path.exists());
        std::fs::write(&path, "999999\n").unwrap(); // left by kill -9
        assert_eq!(running_pid(&path), None);
        let again = Pidfile::acquire(&path, 7).unwrap();
        assert_eq!(std::fs::read_to_string(again.path()).unwrap(), "7\n");
    }
}
