//! One `up` per data dir.

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Held for as long as this `up` runs; the kernel releases it when the
/// process ends, however it ends, so a crashed `up` leaves no stale lock.
#[derive(Debug)]
pub(super) struct DataDirLock {
    _lock: Flock<File>,
}

pub(super) const LOCK_FILE: &str = "up.pid";

impl DataDirLock {
    /// Takes the data dir, or fails at once naming the `up` that holds it.
    pub(super) fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)
                    .and_then(|()| lock.rewind())
                    .and_then(|()| writeln!(lock, "{}", std::process::id()))
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(Self { _lock: lock })
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let holder = if pid.is_empty() {
                    "another minimesh up".to_owned()
                } else {
                    format!("minimesh up (pid {pid})")
                };
                bail!(
                    "data dir {} is in use by {holder}; stop it first or pass another --data-dir",
                    data_dir.display()
                )
            }
            Err((_, errno)) => Err(errno).with_context(|| format!("locking {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_dir_fails_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once released");
    }
}
