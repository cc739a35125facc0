//! SQLite access shared by the services.
//!
//! Several replica processes may open one database file, so the database runs
//! in WAL mode with a busy timeout, and every write takes the write lock up
//! front (`BEGIN IMMEDIATE`) instead of upgrading a read lock, which would fail
//! with SQLITE_BUSY under contention.

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database task failed: {0}")]
    Task(String),
    #[error("database connection lock poisoned")]
    Poisoned,
    #[error("waiting for another process to finish opening {path}: {source}")]
    InitLock {
        path: String,
        source: std::io::Error,
    },
    #[error("migration {version} failed: {source}")]
    Migration {
        version: usize,
        source: rusqlite::Error,
    },
}

/// One connection per process, used from blocking threads.
///
/// A single connection keeps the process's writes serialised; readers in other
/// processes are not blocked thanks to WAL.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (creating if needed) the database at `path` and applies every
    /// migration not applied yet. `migrations[i]` becomes schema version i+1.
    ///
    /// Replicas starting together take turns: opening sets up WAL and runs
    /// migrations, which SQLite may refuse with SQLITE_BUSY without waiting
    /// on its busy handler, so one process at a time does it, under an
    /// advisory lock on `<path>.init-lock`.
    pub fn open(path: &Path, migrations: &[&str]) -> Result<Self, DbError> {
        let _turn = InitLock::take(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Self::configure(conn, migrations)
    }

    /// An in-memory database, for tests of a single process.
    pub fn open_in_memory(migrations: &[&str]) -> Result<Self, DbError> {
        Self::configure(Connection::open_in_memory()?, migrations)
    }

    fn configure(mut conn: Connection, migrations: &[&str]) -> Result<Self, DbError> {
        conn.busy_timeout(Duration::from_secs(10))?;
        // journal_mode returns a row, so it cannot go through execute_batch alone.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")?;
        migrate(&mut conn, migrations)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn.lock().map_err(|_| DbError::Poisoned)?;
            f(&guard)
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))?
    }

    /// Runs `f` inside an immediate transaction, committing when it returns
    /// `Ok` and rolling back otherwise, so nothing is ever half-written.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| DbError::Poisoned)?;
            let tx = guard
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(DbError::from)?;
            let value = f(&tx)?;
            tx.commit().map_err(DbError::from)?;
            Ok(value)
        })
        .await
        .map_err(|e| E::from(DbError::Task(e.to_string())))?
    }
}

/// One process at a time opens and migrates a database file.
struct InitLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Longest wait for another process to open the same database.
const INIT_WAIT: Duration = Duration::from_secs(30);

impl InitLock {
    fn take(db: &Path) -> Result<Self, DbError> {
        use nix::fcntl::{Flock, FlockArg};
        let mut name = db.as_os_str().to_owned();
        name.push(".init-lock");
        let path = std::path::PathBuf::from(name);
        let failed = |source: std::io::Error| DbError::InitLock {
            path: db.display().to_string(),
            source,
        };
        let deadline = std::time::Instant::now() + INIT_WAIT;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(failed)?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Self { _lock: lock }),
                Err((_, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < deadline =>
                {
                    // Blocking flock has no timeout; a stopped process
                    // holding the lock must not hang this one forever.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((_, errno)) => return Err(failed(std::io::Error::from(errno))),
            }
        }
    }
}

/// Applies migrations in order under an immediate transaction, so two
/// replicas starting together do not both apply the same step.
fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: usize =
        tx.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    for (index, sql) in migrations.iter().enumerate().skip(current) {
        let version = index + 1;
        tx.execute_batch(sql)
            .map_err(|source| DbError::Migration { version, source })?;
        tx.execute_batch(&format!("PRAGMA user_version = {version}"))?;
    }
    tx.commit()?;
    Ok(())
}

/// True when the error is a violated UNIQUE constraint.
pub fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(e, _)
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATIONS: &[&str] = &[
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE);",
        "ALTER TABLE t ADD COLUMN n INTEGER NOT NULL DEFAULT 0;",
    ];

    #[tokio::test]
    async fn migrations_apply_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = Db::open(&path, MIGRATIONS).unwrap();
        db.write(|tx| {
            tx.execute("INSERT INTO t (v, n) VALUES ('a', 1)", [])
                .map_err(DbError::from)
        })
        .await
        .unwrap();
        drop(db);
        let db = Db::open(&path, MIGRATIONS).unwrap();
        let n: i64 = db
            .read(|c| Ok(c.query_row("SELECT n FROM t WHERE v = 'a'", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn many_openers_of_one_new_file_take_turns() {
        // Replicas starting together: each opens a fresh file, sets WAL and migrates.
        for round in 0..100 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("race{round}.db"));
            let openers: Vec<_> = (0..12)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || Db::open(&path, MIGRATIONS).map(|_| ()))
                })
                .collect();
            for opener in openers {
                opener.join().unwrap().expect("every opener succeeds");
            }
        }
    }

    #[tokio::test]
    async fn failed_write_rolls_back() {
        let db = Db::open_in_memory(MIGRATIONS).unwrap();
        let result: Result<(), DbError> = db
            .write(|tx| {
                tx.execute("INSERT INTO t (v) VALUES ('x')", [])?;
                tx.execute("INSERT INTO t (v) VALUES ('x')", [])?;
                Ok(())
            })
            .await;
        let err = result.unwrap_err();
        assert!(matches!(&err, DbError::Sqlite(e) if is_unique_violation(e)));
        let count: i64 = db
            .read(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(count, 0, "the first insert must have been rolled back");
    }
}
