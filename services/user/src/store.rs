//! User storage. SQL is kept to what SQLite and PostgreSQL both run.

use minimesh_runtime::db::{Db, DbError, DbFailure, is_unique_violation};
use minimesh_runtime::pg::Pg;
use minimesh_runtime::store::{Backend, DbTarget};
use rusqlite::{OptionalExtension, Row, params};
use std::future::Future;
use std::path::Path;

const MIGRATIONS: &[&str] = &["CREATE TABLE users (
        id            TEXT PRIMARY KEY,
        email         TEXT NOT NULL UNIQUE,
        display_name  TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );"];

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its id (UUIDv7: ordered by creation).
    pub id: String,
    /// Its email, unique among users.
    pub email: String,
    /// The name shown for it.
    pub display_name: String,
    /// When it was created, milliseconds since the epoch.
    pub created_at_ms: i64,
}

/// Why a user store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The email belongs to another user.
    #[error("email {0} is already used")]
    EmailTaken(String),
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl DbFailure for StoreError {
    fn db_error(&self) -> Option<&DbError> {
        match self {
            StoreError::Db(err) => Some(err),
            _ => None,
        }
    }
}

/// What the user service needs from its storage.
pub trait UserStore: Send + Sync + 'static {
    /// Stores a new user; fails with `EmailTaken` when the email is in use.
    fn create(
        &self,
        email: String,
        display_name: String,
    ) -> impl Future<Output = Result<UserRecord, StoreError>> + Send;
    /// The user with `id`, if any.
    fn get(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Option<UserRecord>, StoreError>> + Send;
    /// Users with id greater than `after`, in id (creation) order.
    fn list(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<UserRecord>, StoreError>> + Send;
}

/// Users in a SQLite file.
#[derive(Clone)]
pub struct SqliteUserStore {
    db: Db,
}

impl SqliteUserStore {
    /// Opens (and migrates) the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Ok(Self {
            db: Db::open(path, MIGRATIONS)?,
        })
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, DbError> {
        Ok(Self {
            db: Db::open_in_memory(MIGRATIONS)?,
        })
    }
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: row.get(0)?,
        email: row.get(1)?,
        display_name: row.get(2)?,
        created_at_ms: row.get(3)?,
    })
}

impl UserStore for SqliteUserStore {
    async fn create(&self, email: String, display_name: String) -> Result<UserRecord, StoreError> {
        let record = UserRecord {
            id: minimesh_runtime::new_id("usr"),
            email,
            display_name,
            created_at_ms: minimesh_runtime::now_millis(),
        };
        let row = record.clone();
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO users (id, email, display_name, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![row.id, row.email, row.display_name, row.created_at_ms],
                )
                .map_err(|err| {
                    if is_unique_violation(&err) {
                        StoreError::EmailTaken(row.email.clone())
                    } else {
                        StoreError::Db(err.into())
                    }
                })?;
                Ok::<(), StoreError>(())
            })
            .await?;
        Ok(record)
    }

    async fn get(&self, id: String) -> Result<Option<UserRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                Ok(conn
                    .query_row(
                        "SELECT id, email, display_name, created_at_ms FROM users WHERE id = ?1",
                        params![id],
                        from_row,
                    )
                    .optional()?)
            })
            .await?)
    }

    async fn list(&self, after: Option<String>, limit: u32) -> Result<Vec<UserRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, email, display_name, created_at_ms FROM users
                     WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = stmt
                    .query_map(params![after.unwrap_or_default(), limit], from_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }
}

/// PostgreSQL: the same table in the service's own schema.
const PG_MIGRATIONS: &[&str] = &["CREATE TABLE users (
        id            TEXT PRIMARY KEY,
        email         TEXT NOT NULL UNIQUE,
        display_name  TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );"];

/// Users in PostgreSQL, in the service's own schema.
#[derive(Clone)]
pub struct PgUserStore {
    pg: Pg,
}

impl PgUserStore {
    /// Connects, waiting for a server that is still starting.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, DbError> {
        Ok(Self {
            pg: minimesh_runtime::store::connect_postgres(url, schema, PG_MIGRATIONS).await?,
        })
    }

    fn failed(&self, err: tokio_postgres::Error) -> StoreError {
        StoreError::Db(self.pg.failed(err))
    }
}

fn from_pg_row(row: &tokio_postgres::Row) -> UserRecord {
    UserRecord {
        id: row.get(0),
        email: row.get(1),
        display_name: row.get(2),
        created_at_ms: row.get(3),
    }
}

impl UserStore for PgUserStore {
    async fn create(&self, email: String, display_name: String) -> Result<UserRecord, StoreError> {
        let record = UserRecord {
            id: minimesh_runtime::new_id("usr"),
            email,
            display_name,
            created_at_ms: minimesh_runtime::now_millis(),
        };
        let client = self.pg.client().await?;
        client
            .execute(
                &client.prepare_cached("INSERT INTO users (id, email, display_name, created_at_ms) VALUES ($1, $2, $3, $4)").await.map_err(|err| self.failed(err))?,
                &[&record.id, &record.email, &record.display_name, &record.created_at_ms],
            )
            .await
            .map_err(|err| {
                if minimesh_runtime::pg::is_unique_violation(&err) {
                    StoreError::EmailTaken(record.email.clone())
                } else {
                    self.failed(err)
                }
            })?;
        Ok(record)
    }

    async fn get(&self, id: String) -> Result<Option<UserRecord>, StoreError> {
        let client = self.pg.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT id, email, display_name, created_at_ms FROM users WHERE id = $1",
                    )
                    .await
                    .map_err(|err| self.failed(err))?,
                &[&id],
            )
            .await
            .map_err(|err| self.failed(err))?;
        Ok(row.as_ref().map(from_pg_row))
    }

    async fn list(&self, after: Option<String>, limit: u32) -> Result<Vec<UserRecord>, StoreError> {
        let client = self.pg.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT id, email, display_name, created_at_ms FROM users
                 WHERE id > $1 ORDER BY id LIMIT $2",
                    )
                    .await
                    .map_err(|err| self.failed(err))?,
                &[&after.unwrap_or_default(), &i64::from(limit)],
            )
            .await
            .map_err(|err| self.failed(err))?;
        Ok(rows.iter().map(from_pg_row).collect())
    }
}

/// The store `--db` chose.
#[derive(Clone)]
pub enum AnyUserStore {
    /// SQLite.
    Sqlite(SqliteUserStore),
    /// PostgreSQL.
    Postgres(PgUserStore),
}

impl AnyUserStore {
    /// Opens (and migrates) the store `target` names; `schema` is used on PostgreSQL.
    pub async fn open(target: &DbTarget, schema: &str) -> Result<Self, DbError> {
        Ok(match target {
            DbTarget::Sqlite(path) => AnyUserStore::Sqlite(SqliteUserStore::open(path)?),
            DbTarget::Postgres(url) => {
                AnyUserStore::Postgres(PgUserStore::connect(url, schema).await?)
            }
        })
    }

    /// The open backend, for health probing.
    pub fn backend(&self) -> Backend {
        match self {
            AnyUserStore::Sqlite(s) => Backend::Sqlite(s.db.clone()),
            AnyUserStore::Postgres(s) => Backend::Postgres(s.pg.clone()),
        }
    }
}

impl UserStore for AnyUserStore {
    async fn create(&self, email: String, display_name: String) -> Result<UserRecord, StoreError> {
        match self {
            AnyUserStore::Sqlite(s) => s.create(email, display_name).await,
            AnyUserStore::Postgres(s) => s.pg.bounded(s.create(email, display_name)).await,
        }
    }

    async fn get(&self, id: String) -> Result<Option<UserRecord>, StoreError> {
        match self {
            AnyUserStore::Sqlite(s) => s.get(id).await,
            AnyUserStore::Postgres(s) => s.pg.bounded(s.get(id)).await,
        }
    }

    async fn list(&self, after: Option<String>, limit: u32) -> Result<Vec<UserRecord>, StoreError> {
        match self {
            AnyUserStore::Sqlite(s) => s.list(after, limit).await,
            AnyUserStore::Postgres(s) => s.pg.bounded(s.list(after, limit)).await,
        }
    }
}
