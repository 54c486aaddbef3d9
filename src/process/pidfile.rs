//! The pidfile and its lock: "running" means "someone holds the flock", never "the file
//! exists". The lock lives on an open file description opened close-on-exec, so the serving
//! child started by the supervisor never inherits it.
//!
//! The pid to signal is the lock holder's, read from `/proc/locks` for the pidfile's inode,
//! never the file's content alone: anyone who can write the file could otherwise point
//! `stop` at another process. A disagreement is reported; a holder that cannot be found is an
//! error, never a guess.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("already running (pid {0})")]
    AlreadyRunning(i32),
    #[error("pidfile {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "pidfile {path} is locked, but no lock holder is listed in /proc/locks (the file says {stated}); not signalling anyone"
    )]
    HolderUnknown { path: PathBuf, stated: String },
    #[error("pidfile {path} is locked by pid {holder} but holds no pid; not signalling anyone")]
    NoPid { path: PathBuf, holder: i32 },
}

/// Who holds a locked pidfile, and what the file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// The pid holding the exclusive lock (from `/proc/locks`), always > 0.
    pub pid: i32,
    /// The pid written in the file.
    pub stated: i32,
}

impl Holder {
    /// `pidfile says N, lock held by M` when the content disagrees with the lock.
    pub fn disagreement(&self, path: &Path) -> Option<String> {
        (self.stated != self.pid).then(|| {
            format!(
                "pidfile {} says {}, lock held by {}; using {}",
                path.display(),
                self.stated,
                self.pid,
                self.pid
            )
        })
    }
}

/// A held pidfile; dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    /// Held (never read) for the lock it carries.
    _lock: Flock<File>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PidfileError + '_ {
    move |error| PidfileError::Io {
        path: path.to_path_buf(),
        error,
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
                let pid = lock_holder(&file)
                    .or_else(|| read_pid(&mut file))
                    .unwrap_or(0);
                return Err(PidfileError::AlreadyRunning(pid));
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
}

impl Pidfile {
    /// The pidfile path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock's descriptor number, for an upgrade's exec to hand down.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self._lock)
    }

    /// Close-on-exec off only while the supervisor execs itself (an upgrade): the new image
    /// keeps the lock, which no serving child may ever inherit.
    pub fn set_inherited(&self, inherited: bool) -> nix::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let flags = if inherited {
            FdFlag::empty()
        } else {
            FdFlag::FD_CLOEXEC
        };
        fcntl(self.raw_fd(), FcntlArg::F_SETFD(flags)).map(drop)
    }

    /// The pidfile an upgrade's exec handed down as descriptor `fd`: locked again (a no-op on
    /// the open file description that holds the lock) and close-on-exec again.
    pub fn adopt(path: &Path, fd: std::os::fd::OwnedFd) -> Result<Pidfile, PidfileError> {
        let file = File::from(fd);
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io_error(path)(std::io::Error::from_raw_os_error(e as i32)))?;
        let held = Pidfile {
            path: path.to_path_buf(),
            _lock: lock,
        };
        held.set_inherited(false)
            .map_err(|e| io_error(path)(std::io::Error::from_raw_os_error(e as i32)))?;
        Ok(held)
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

/// The exclusive flock holder of `file`, from `/proc/locks`
/// (`N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF`, device numbers in hex).
fn lock_holder(file: &File) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let wanted = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    // One read() is one consistent walk of the kernel's lock list; a small buffer would take
    // several, between which other processes' locks come and go.
    let mut buf = vec![0u8; 1 << 20];
    let n = std::io::Read::read(&mut File::open("/proc/locks").ok()?, &mut buf).ok()?;
    holder_in(&String::from_utf8_lossy(&buf[..n]), &wanted)
}

/// The pid of the granted exclusive FLOCK on `inode` (`MAJ:MIN:INODE`) in `/proc/locks` text.
fn holder_in(locks: &str, inode: &str) -> Option<i32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as `N: -> FLOCK ...`; only granted locks count.
        match fields.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, node, ..] if *node == inode => {
                pid.parse().ok().filter(|p: &i32| *p > 0)
            }
            _ => None,
        }
    })
}

/// Who holds `path`: `None` if nobody (absent or stale). An error when it is locked but the
/// holder or its pid cannot be established: then nobody may be signalled.
pub fn holder(path: &Path) -> Result<Option<Holder>, PidfileError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    let mut file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // We got a lock, so nobody holds it: stale. Dropping it releases ours.
        Ok(_) => return Ok(None),
        Err((file, _)) => file,
    };
    // Locked: the holder writes its pid right after locking; wait for it briefly.
    let mut stated = None;
    for _ in 0..50 {
        stated = read_pid(&mut file).filter(|p| *p > 0);
        if stated.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // /proc/locks is read in pieces while other processes take and drop locks, so one read
    // can skip a line: look again a few times before calling the holder unknown.
    let mut found = None;
    for _ in 0..5 {
        found = lock_holder(&file);
        if found.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let Some(pid) = found else {
        // Released between our probe and the read of /proc/locks (a daemon exiting): stale.
        if Flock::lock(file, FlockArg::LockSharedNonblock).is_ok() {
            return Ok(None);
        }
        return Err(PidfileError::HolderUnknown {
            path: path.to_path_buf(),
            stated: stated.map_or("no pid".to_string(), |p| p.to_string()),
        });
    };
    match stated {
        Some(stated) => Ok(Some(Holder { pid, stated })),
        // The same race: a daemon truncating nothing but removing and releasing the file.
        None if Flock::lock(file, FlockArg::LockSharedNonblock).is_ok() => Ok(None),
        None => Err(PidfileError::NoPid {
            path: path.to_path_buf(),
            holder: pid,
        }),
    }
}

/// The pid of the process holding `path`'s lock, or `None` if nobody holds it. For the command
/// line: a pidfile whose content disagrees with the lock is reported on stderr.
pub fn running_pid(path: &Path) -> Result<Option<i32>, PidfileError> {
    let held = holder(path)?;
    if let Some(note) = held.and_then(|h| h.disagreement(path)) {
        eprintln!("feedd: {note}");
    }
    Ok(held.map(|h| h.pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_second_holder_and_stale_file_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/feedd.pid");
        let me = std::process::id() as i32;
        assert_eq!(running_pid(&path).unwrap(), None);
        let held = Pidfile::acquire(&path, me as u32).unwrap();
        assert_eq!(running_pid(&path).unwrap(), Some(me));
        match Pidfile::acquire(&path, 1) {
            Err(PidfileError::AlreadyRunning(pid)) => assert_eq!(pid, me),
            other => panic!("{other:?}"),
        }
        drop(held);
        assert!(!path.exists());
        std::fs::write(&path, "999999\n").unwrap(); // left by kill -9
        assert_eq!(running_pid(&path).unwrap(), None);
        let _again = Pidfile::acquire(&path, 7).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "7\n");
    }

    /// The file's content is not trusted: the lock holder (this process) is what counts.
    #[test]
    fn the_lock_holder_wins_over_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedd.pid");
        let me = std::process::id() as i32;
        let _held = Pidfile::acquire(&path, 4242).unwrap();
        let h = holder(&path).unwrap().unwrap();
        assert_eq!(
            h,
            Holder {
                pid: me,
                stated: 4242
            }
        );
        let note = h.disagreement(&path).unwrap();
        assert!(
            note.contains(&format!("says 4242, lock held by {me}")),
            "{note}"
        );
        assert_eq!(running_pid(&path).unwrap(), Some(me));
        // Locked, but no pid in it: an error, never pid 0.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let e = holder(&path).unwrap_err().to_string();
        assert!(e.contains("holds no pid"), "{e}");
    }

    #[test]
    fn proc_locks_lines() {
        let locks = "1: FLOCK  ADVISORY  WRITE 13660 fe:00:5358445 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 99 fe:00:77 0 EOF\n\
                     3: FLOCK  ADVISORY  READ 12 fe:00:78 0 EOF\n\
                     4: POSIX  ADVISORY  WRITE 13 fe:00:79 0 EOF\n\
                     5: FLOCK  ADVISORY  WRITE 0 fe:00:80 0 EOF\n";
        assert_eq!(holder_in(locks, "fe:00:5358445"), Some(13660));
        assert_eq!(holder_in(locks, "fe:00:77"), None, "a waiter holds nothing");
        assert_eq!(
            holder_in(locks, "fe:00:78"),
            None,
            "shared is not the daemon's lock"
        );
        assert_eq!(holder_in(locks, "fe:00:79"), None);
        assert_eq!(
            holder_in(locks, "fe:00:80"),
            None,
            "pid 0 is never a holder"
        );
        assert_eq!(holder_in(locks, "fe:00:5"), None);
    }
}
