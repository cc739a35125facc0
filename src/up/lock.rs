//! One `up` per data dir, and a `mesh.json` that is never stale.

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held for as long as this `up` runs; the kernel releases it when the
/// process ends, however it ends, so a crashed `up` leaves no stale lock.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<File>,
}

pub const LOCK_FILE: &str = "up.pid";

impl DataDirLock {
    /// Takes the data dir, or fails at once naming the `up` that holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
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

/// Writes `mesh.json` atomically; remembers a failed write so the
/// supervisor can try again until the disk takes it.
pub struct MeshFile {
    path: PathBuf,
    pending: Option<Vec<u8>>,
}

impl MeshFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            pending: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file with `contents`; on failure keeps them for [`Self::retry`].
    pub fn write(&mut self, contents: Vec<u8>) -> anyhow::Result<()> {
        self.pending = Some(contents);
        self.retry()
    }

    /// Whether a write is still owed.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Tries the owed write again.
    pub fn retry(&mut self) -> anyhow::Result<()> {
        let Some(contents) = &self.pending else {
            return Ok(());
        };
        write_atomically(&self.path, contents)?;
        self.pending = None;
        Ok(())
    }

    /// The mesh has stopped: no file may name its dead pids.
    pub fn remove(&mut self) {
        self.pending = None;
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(tmp_path(&self.path));
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("json.tmp")
}

/// Replaces `path` with `contents` so readers never see a partial file; a
/// failed attempt leaves no temporary file behind.
fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("replacing {}", path.display()));
    }
    Ok(())
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

    #[test]
    fn mesh_file_is_removed_with_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = MeshFile::new(dir.path().join("mesh.json"));
        file.write(b"{}".to_vec()).unwrap();
        assert!(!file.is_pending());
        assert_eq!(std::fs::read(dir.path().join("mesh.json")).unwrap(), b"{}");
        file.remove();
        assert!(!dir.path().join("mesh.json").exists());
    }
}
