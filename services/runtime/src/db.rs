//! SQLite access shared by the services.
//!
//! Several replica processes may open one database file, so the database runs
//! in WAL mode with a busy timeout, and every write takes the write lock up
//! front (`BEGIN IMMEDIATE`) instead of upgrading a read lock, which would fail
//! with SQLITE_BUSY under contention.

use crate::health::StoreHealth;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A storage failure, from either backend.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (or its connection did).
    #[error("postgres: {}", pg_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The store is marked down; calls fail fast until the probe sees it back.
    #[error("store is down: {0}")]
    Down(String),
    /// The database URL or path is not usable.
    #[error("database configuration: {0}")]
    Config(String),
    /// The blocking task running the query panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(String),
    /// A thread panicked holding the SQLite connection.
    #[error("database connection lock poisoned")]
    Poisoned,
    /// The lock that serialises first opening of a SQLite file (migrations) failed.
    #[error("waiting for another process to finish opening {path}: {source}")]
    InitLock {
        /// The database file.
        path: String,
        /// What the lock failed with.
        source: std::io::Error,
    },
    /// A SQLite migration failed.
    #[error("migration {version} failed: {source}")]
    Migration {
        /// The migration's number, counting from 1.
        version: usize,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A PostgreSQL migration failed.
    #[error("migration {version} failed: {}", pg_message(.source))]
    PgMigration {
        /// The migration's number, counting from 1.
        version: usize,
        /// What PostgreSQL said.
        source: tokio_postgres::Error,
    },
}

/// tokio-postgres prints "db error" for server errors; the server's own
/// message is what an operator needs.
fn pg_message(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        },
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match err {
            PoolError::Backend(err) => DbError::Postgres(err),
            PoolError::Timeout(_) => DbError::Down("no database connection within 3s".into()),
            other => DbError::Down(other.to_string()),
        }
    }
}

impl DbError {
    /// True when the store cannot serve at all (unreachable, read-only,
    /// full, failing I/O), rather than this one statement failing. Callers
    /// get UNAVAILABLE and the service reports NOT_SERVING until it is back.
    pub fn is_store_down(&self) -> bool {
        match self {
            DbError::Down(_) => true,
            DbError::Postgres(err) => crate::pg::is_down(err),
            DbError::Sqlite(err) => is_storage_fault(err),
            _ => false,
        }
    }

    /// A store fault that fixes itself or that an operator fixes without
    /// touching the service: a read-only file or a full volume.
    pub fn is_transient_fault(&self) -> bool {
        match self {
            DbError::Down(_) => true,
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::DiskFull
            ),
            _ => false,
        }
    }

    /// True for lock contention that a retry may get past.
    pub fn is_busy(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            DbError::Postgres(err) => matches!(
                err.code().map(|c| c.code()),
                Some("40001" | "40P01" | "55P03" | "57014")
            ),
            _ => false,
        }
    }
}

/// SQLite errors that say the file or its volume is unusable: read-only,
/// failing I/O, full, or gone. A fresh connection is needed once it is
/// fixed, since SQLite opens a file it may not write read-only for good.
fn is_storage_fault(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(e, _) if matches!(
            e.code,
            rusqlite::ErrorCode::ReadOnly
                | rusqlite::ErrorCode::SystemIoFailure
                | rusqlite::ErrorCode::DiskFull
                | rusqlite::ErrorCode::CannotOpen
        )
    )
}

/// Errors that may carry a database error, so [`Db::write`] can tell a
/// storage fault from a refusal the caller made.
pub trait DbFailure {
    /// The database error inside, if there is one.
    fn db_error(&self) -> Option<&DbError>;
}

impl DbFailure for DbError {
    fn db_error(&self) -> Option<&DbError> {
        Some(self)
    }
}

/// One connection per process, used from blocking threads.
///
/// A single connection keeps the process's writes serialised; readers in other
/// processes are not blocked thanks to WAL. After a storage fault the
/// connection is dropped and the next call (or the health probe) opens a new
/// one, so the service recovers by itself when the volume is usable again.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    slot: Mutex<Option<Connection>>,
    /// None for an in-memory database, which cannot be reopened.
    path: Option<PathBuf>,
    migrations: Vec<String>,
    health: StoreHealth,
}

impl Db {
    /// Opens (creating if needed) the database at `path` and applies every
    /// migration not applied yet. `migrations[i]` becomes schema version i+1.
    ///
    /// Replicas starting together take turns: opening sets up WAL and runs
    /// migrations, which SQLite may refuse with SQLITE_BUSY without waiting
    /// on its busy handler, so one process at a time does it, under an
    /// advisory lock on `<path>.init-lock`.
    ///
    /// A file that cannot be written yet (read-only, full volume) still
    /// gives a `Db`: it reports the store down and opens the file again on
    /// later calls, instead of the process dying in a restart loop.
    pub fn open(path: &Path, migrations: &[&str]) -> Result<Self, DbError> {
        let db = Self {
            inner: Arc::new(Inner {
                slot: Mutex::new(None),
                path: Some(path.to_path_buf()),
                migrations: migrations.iter().map(|m| m.to_string()).collect(),
                health: StoreHealth::new(),
            }),
        };
        match open_file(path, migrations) {
            Ok(conn) => *db.inner.slot.lock().map_err(|_| DbError::Poisoned)? = Some(conn),
            // Read-only or full: an operator fixes it and the service picks
            // it up. A path that cannot be a database at all fails at once.
            Err(err) if err.is_transient_fault() => {
                tracing::warn!(db = %path.display(), %err, "database not usable yet; will retry");
                db.inner.health.report(&err);
            }
            Err(err) => return Err(err),
        }
        Ok(db)
    }

    /// Opens an existing database read-only, as it is: no migrations, no
    /// file created (for tools that inspect a running service's data).
    pub fn open_read_only(path: &Path) -> Result<Self, DbError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(Self::with_connection(conn, None))
    }

    /// An in-memory database, for tests of a single process.
    pub fn open_in_memory(migrations: &[&str]) -> Result<Self, DbError> {
        Ok(Self::with_connection(
            configure(Connection::open_in_memory()?, migrations)?,
            None,
        ))
    }

    fn with_connection(conn: Connection, path: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                slot: Mutex::new(Some(conn)),
                path,
                migrations: Vec::new(),
                health: StoreHealth::new(),
            }),
        }
    }

    /// Whether the store is serving, as calls and probes last saw it.
    pub fn health(&self) -> &StoreHealth {
        &self.inner.health
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.with_connection(|conn| f(conn)))
            .await
            .map_err(|e| DbError::Task(e.to_string()))?
    }

    /// Runs `f` inside an immediate transaction, committing when it returns
    /// `Ok` and rolling back otherwise, so nothing is ever half-written.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + DbFailure + Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut outcome: Option<Result<T, E>> = None;
            let status = inner.with_connection(|conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(DbError::from)?;
                match f(&tx) {
                    Ok(value) => {
                        tx.commit().map_err(DbError::from)?;
                        outcome = Some(Ok(value));
                    }
                    // Dropping `tx` rolls back.
                    Err(err) => {
                        let fault = err
                            .db_error()
                            .filter(|db| db.is_store_down())
                            .map(|db| db.to_string());
                        outcome = Some(Err(err));
                        // Let with_connection see the fault, report it and
                        // drop the connection.
                        if let Some(fault) = fault {
                            return Err(DbError::Down(fault));
                        }
                    }
                }
                Ok(())
            });
            match (outcome, status) {
                (Some(result), _) => result,
                (None, Err(err)) => Err(E::from(err)),
                (None, Ok(())) => Err(E::from(DbError::Task("write did not run".into()))),
            }
        })
        .await
        .map_err(|e| E::from(DbError::Task(e.to_string())))?
    }

    /// Checks that the store can take a write, reopening the file after a
    /// fault. The health probe runs this.
    pub async fn probe(&self) -> Result<(), DbError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.with_connection(|conn| {
                if inner.path.is_none() {
                    return Ok(());
                }
                // A real write: a read-only file or a full volume fails here.
                conn.execute_batch(
                    "BEGIN IMMEDIATE;
                     INSERT INTO minimesh_probe (id, at_ms) VALUES (1, 0)
                       ON CONFLICT (id) DO UPDATE SET at_ms = at_ms + 1;
                     COMMIT;",
                )
                .inspect_err(|_| {
                    let _ = conn.execute_batch("ROLLBACK");
                })?;
                Ok(())
            })
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))?
    }
}

impl Inner {
    /// Runs `f` on the connection, opening the file again if an earlier
    /// fault dropped it, and dropping it when `f` hits a storage fault.
    fn with_connection<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let mut slot = self.slot.lock().map_err(|_| DbError::Poisoned)?;
        if slot.is_none()
            && let Some(path) = &self.path
        {
            let migrations: Vec<&str> = self.migrations.iter().map(String::as_str).collect();
            match open_file(path, &migrations) {
                Ok(conn) => *slot = Some(conn),
                Err(err) => {
                    self.health.report(&err);
                    return Err(err);
                }
            }
        }
        let Some(conn) = slot.as_mut() else {
            return Err(DbError::Down("database is not open".into()));
        };
        let result = f(conn);
        if let Err(err) = &result
            && err.is_store_down()
        {
            self.health.report(err);
            if self.path.is_some() {
                *slot = None;
            }
        }
        result
    }
}

fn open_file(path: &Path, migrations: &[&str]) -> Result<Connection, DbError> {
    let _turn = InitLock::take(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // SQLite quietly opens a file it may not write read-only, and such a
    // connection never writes again: refuse it and try later instead.
    if conn.is_readonly(rusqlite::MAIN_DB)? {
        return Err(DbError::Down(format!(
            "database file {} is read-only",
            path.display()
        )));
    }
    configure(conn, migrations)
}

fn configure(mut conn: Connection, migrations: &[&str]) -> Result<Connection, DbError> {
    conn.busy_timeout(Duration::from_secs(10))?;
    // journal_mode returns a row, so it cannot go through execute_batch alone.
    let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;
         CREATE TABLE IF NOT EXISTS minimesh_probe (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);",
    )?;
    migrate(&mut conn, migrations)?;
    Ok(conn)
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
