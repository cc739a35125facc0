//! User storage. SQL is kept to what SQLite and PostgreSQL both run.

use minimesh_runtime::db::{Db, DbError, is_unique_violation};
use rusqlite::{OptionalExtension, Row, params};
use std::future::Future;
use std::path::Path;

const MIGRATIONS: &[&str] = &["CREATE TABLE users (
        id            TEXT PRIMARY KEY,
        email         TEXT NOT NULL UNIQUE,
        display_name  TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub email: String,
    pub display_name: String,
    pub created_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("email {0} is already used")]
    EmailTaken(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What the user service needs from its storage.
pub trait UserStore: Send + Sync + 'static {
    fn create(
        &self,
        email: String,
        display_name: String,
    ) -> impl Future<Output = Result<UserRecord, StoreError>> + Send;
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

#[derive(Clone)]
pub struct SqliteUserStore {
    db: Db,
}

impl SqliteUserStore {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Ok(Self {
            db: Db::open(path, MIGRATIONS)?,
        })
    }

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
