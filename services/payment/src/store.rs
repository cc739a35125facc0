//! Payment storage. SQL is kept to what SQLite and PostgreSQL both run.

use minimesh_runtime::db::{Db, DbError, DbFailure};
use minimesh_runtime::pg::Pg;
use minimesh_runtime::store::{Backend, DbTarget};
use rusqlite::{OptionalExtension, Row, Transaction, params};
use std::future::Future;
use std::path::Path;

const MIGRATIONS: &[&str] = &["CREATE TABLE payments (
        id              TEXT PRIMARY KEY,
        order_id        TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        amount_cents    BIGINT NOT NULL,
        currency        TEXT NOT NULL,
        status          INTEGER NOT NULL,
        decline_reason  TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        created_at_ms   BIGINT NOT NULL,
        updated_at_ms   BIGINT NOT NULL
    );
    CREATE INDEX payments_by_order ON payments (order_id);"];

/// Stored status values; equal to the proto enum numbers.
pub const CAPTURED: i32 = 1;
/// A charge refused (over the limit): nothing was taken.
pub const DECLINED: i32 = 2;
/// A captured payment given back.
pub const REFUNDED: i32 = 3;

/// A payment as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    /// Its id.
    pub id: String,
    /// The order it pays for.
    pub order_id: String,
    /// The user charged.
    pub user_id: String,
    /// Amount in minor units of `currency`.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// One of [`CAPTURED`], [`DECLINED`], [`REFUNDED`].
    pub status: i32,
    /// Why it was declined; empty otherwise.
    pub decline_reason: String,
    /// When it was made, milliseconds since the epoch.
    pub created_at_ms: i64,
}

/// A validated charge, ready to store.
#[derive(Debug, Clone)]
pub struct NewCharge {
    /// The order it pays for.
    pub order_id: String,
    /// The user charged.
    pub user_id: String,
    /// Amount in minor units of `currency`.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// The caller's key: the same key returns the same payment.
    pub idempotency_key: Option<String>,
    /// Set when the charge is declined.
    pub decline_reason: Option<String>,
}

/// Why a payment store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key was used for a charge with other content.
    #[error("idempotency key {0:?} was already used for a different charge")]
    KeyReused(String),
    /// No payment with that id.
    #[error("payment {0} not found")]
    NotFound(String),
    /// The payment was declined, so there is nothing to refund.
    #[error("payment {0} was declined and cannot be refunded")]
    NotRefundable(String),
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

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Db(err.into())
    }
}

/// What the payment service needs from its storage.
pub trait PaymentStore: Send + Sync + 'static {
    /// Stores a charge, or returns the payment an earlier charge with the same
    /// idempotency key made (checked and inserted in one transaction). The
    /// flag is true when this call created the payment.
    fn charge(
        &self,
        charge: NewCharge,
    ) -> impl Future<Output = Result<(PaymentRecord, bool), StoreError>> + Send;
    /// Marks a captured payment refunded; refunding twice is a no-op.
    fn refund(&self, id: String) -> impl Future<Output = Result<PaymentRecord, StoreError>> + Send;
    /// The payment with `id`, if any.
    fn get(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Option<PaymentRecord>, StoreError>> + Send;
    /// Every payment, for the reconciliation check.
    fn all(&self) -> impl Future<Output = Result<Vec<PaymentRecord>, StoreError>> + Send;
}

/// Payments in a SQLite file.
#[derive(Clone)]
pub struct SqlitePaymentStore {
    db: Db,
}

impl SqlitePaymentStore {
    /// Opens (and migrates) the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Ok(Self {
            db: Db::open(path, MIGRATIONS)?,
        })
    }

    /// Opens a database read-only, without migrating it (reconciliation).
    pub fn open_read_only(path: &Path) -> Result<Self, DbError> {
        Ok(Self {
            db: Db::open_read_only(path)?,
        })
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, DbError> {
        Ok(Self {
            db: Db::open_in_memory(MIGRATIONS)?,
        })
    }
}

const COLUMNS: &str =
    "id, order_id, user_id, amount_cents, currency, status, decline_reason, created_at_ms";

fn from_row(row: &Row<'_>) -> rusqlite::Result<PaymentRecord> {
    Ok(PaymentRecord {
        id: row.get(0)?,
        order_id: row.get(1)?,
        user_id: row.get(2)?,
        amount_cents: row.get(3)?,
        currency: row.get(4)?,
        status: row.get(5)?,
        decline_reason: row.get(6)?,
        created_at_ms: row.get(7)?,
    })
}

fn select_by(
    tx: &Transaction<'_>,
    column: &str,
    value: &str,
) -> rusqlite::Result<Option<PaymentRecord>> {
    tx.query_row(
        &format!("SELECT {COLUMNS} FROM payments WHERE {column} = ?1"),
        params![value],
        from_row,
    )
    .optional()
}

impl PaymentStore for SqlitePaymentStore {
    async fn charge(&self, charge: NewCharge) -> Result<(PaymentRecord, bool), StoreError> {
        self.db
            .write(move |tx| {
                if let Some(key) = &charge.idempotency_key
                    && let Some(existing) = select_by(tx, "idempotency_key", key)?
                {
                    let same = existing.order_id == charge.order_id
                        && existing.user_id == charge.user_id
                        && existing.amount_cents == charge.amount_cents
                        && existing.currency == charge.currency;
                    return if same {
                        Ok((existing, false))
                    } else {
                        Err(StoreError::KeyReused(key.clone()))
                    };
                }
                let now = minimesh_runtime::now_millis();
                let record = PaymentRecord {
                    id: minimesh_runtime::new_id("pay"),
                    order_id: charge.order_id,
                    user_id: charge.user_id,
                    amount_cents: charge.amount_cents,
                    currency: charge.currency,
                    status: if charge.decline_reason.is_some() {
                        DECLINED
                    } else {
                        CAPTURED
                    },
                    decline_reason: charge.decline_reason.unwrap_or_default(),
                    created_at_ms: now,
                };
                tx.execute(
                    "INSERT INTO payments (id, order_id, user_id, amount_cents, currency, status,
                        decline_reason, idempotency_key, created_at_ms, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
                    params![
                        record.id,
                        record.order_id,
                        record.user_id,
                        record.amount_cents,
                        record.currency,
                        record.status,
                        record.decline_reason,
                        charge.idempotency_key,
                        now
                    ],
                )?;
                Ok((record, true))
            })
            .await
    }

    async fn refund(&self, id: String) -> Result<PaymentRecord, StoreError> {
        self.db
            .write(move |tx| {
                let mut record =
                    select_by(tx, "id", &id)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
                match record.status {
                    REFUNDED => Ok(record),
                    CAPTURED => {
                        tx.execute(
                            "UPDATE payments SET status = ?1, updated_at_ms = ?2 WHERE id = ?3",
                            params![REFUNDED, minimesh_runtime::now_millis(), id],
                        )?;
                        record.status = REFUNDED;
                        Ok(record)
                    }
                    _ => Err(StoreError::NotRefundable(id.clone())),
                }
            })
            .await
    }

    async fn get(&self, id: String) -> Result<Option<PaymentRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                Ok(conn
                    .query_row(
                        &format!("SELECT {COLUMNS} FROM payments WHERE id = ?1"),
                        params![id],
                        from_row,
                    )
                    .optional()?)
            })
            .await?)
    }

    async fn all(&self) -> Result<Vec<PaymentRecord>, StoreError> {
        Ok(self
            .db
            .read(|conn| {
                let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM payments"))?;
                let rows = stmt
                    .query_map([], from_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }
}

/// PostgreSQL: the same table in the service's own schema. A NULL key never
/// conflicts, so charges without a key are all kept.
const PG_MIGRATIONS: &[&str] = &["CREATE TABLE payments (
        id              TEXT PRIMARY KEY,
        order_id        TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        amount_cents    BIGINT NOT NULL,
        currency        TEXT NOT NULL,
        status          INTEGER NOT NULL,
        decline_reason  TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        created_at_ms   BIGINT NOT NULL,
        updated_at_ms   BIGINT NOT NULL
    );
    CREATE INDEX payments_by_order ON payments (order_id);"];

/// Payments in PostgreSQL, in the service's own schema.
#[derive(Clone)]
pub struct PgPaymentStore {
    pg: Pg,
}

impl PgPaymentStore {
    /// Connects, waiting for a server that is still starting.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, DbError> {
        Ok(Self {
            pg: minimesh_runtime::store::connect_postgres(url, schema, PG_MIGRATIONS).await?,
        })
    }

    fn failed(&self, err: tokio_postgres::Error) -> StoreError {
        StoreError::Db(self.pg.failed(err))
    }

    async fn select(
        &self,
        client: &deadpool_postgres::Client,
        column: &str,
        value: &str,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let row = client
            .query_opt(
                &client
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM payments WHERE {column} = $1"
                    ))
                    .await
                    .map_err(|err| self.failed(err))?,
                &[&value],
            )
            .await
            .map_err(|err| self.failed(err))?;
        Ok(row.as_ref().map(from_pg_row))
    }
}

fn from_pg_row(row: &tokio_postgres::Row) -> PaymentRecord {
    PaymentRecord {
        id: row.get(0),
        order_id: row.get(1),
        user_id: row.get(2),
        amount_cents: row.get(3),
        currency: row.get(4),
        status: row.get(5),
        decline_reason: row.get(6),
        created_at_ms: row.get(7),
    }
}

impl PaymentStore for PgPaymentStore {
    async fn charge(&self, charge: NewCharge) -> Result<(PaymentRecord, bool), StoreError> {
        let client = self.pg.client().await?;
        let now = minimesh_runtime::now_millis();
        let record = PaymentRecord {
            id: minimesh_runtime::new_id("pay"),
            order_id: charge.order_id.clone(),
            user_id: charge.user_id.clone(),
            amount_cents: charge.amount_cents,
            currency: charge.currency.clone(),
            status: if charge.decline_reason.is_some() {
                DECLINED
            } else {
                CAPTURED
            },
            decline_reason: charge.decline_reason.clone().unwrap_or_default(),
            created_at_ms: now,
        };
        // The unique key decides between racing replicas: the loser's insert
        // waits for the winner's commit, does nothing, and reads its row.
        let inserted = client
            .execute(
                &client.prepare_cached("INSERT INTO payments (id, order_id, user_id, amount_cents, currency, status,
                    decline_reason, idempotency_key, created_at_ms, updated_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
                 ON CONFLICT (idempotency_key) DO NOTHING").await.map_err(|err| self.failed(err))?,
                &[
                    &record.id,
                    &record.order_id,
                    &record.user_id,
                    &record.amount_cents,
                    &record.currency,
                    &record.status,
                    &record.decline_reason,
                    &charge.idempotency_key,
                    &now,
                ],
            )
            .await
            .map_err(|err| self.failed(err))?;
        if inserted == 1 {
            return Ok((record, true));
        }
        let key = charge.idempotency_key.unwrap_or_default();
        let existing = self
            .select(&client, "idempotency_key", &key)
            .await?
            .ok_or_else(|| {
                StoreError::Db(DbError::Task(format!("payment for key {key:?} vanished")))
            })?;
        let same = existing.order_id == charge.order_id
            && existing.user_id == charge.user_id
            && existing.amount_cents == charge.amount_cents
            && existing.currency == charge.currency;
        if same {
            Ok((existing, false))
        } else {
            Err(StoreError::KeyReused(key))
        }
    }

    async fn refund(&self, id: String) -> Result<PaymentRecord, StoreError> {
        let client = self.pg.client().await?;
        let refunded = client
            .query_opt(
                &client
                    .prepare_cached(&format!(
                        "UPDATE payments SET status = $1, updated_at_ms = $2
                     WHERE id = $3 AND status = $4 RETURNING {COLUMNS}"
                    ))
                    .await
                    .map_err(|err| self.failed(err))?,
                &[&REFUNDED, &minimesh_runtime::now_millis(), &id, &CAPTURED],
            )
            .await
            .map_err(|err| self.failed(err))?;
        if let Some(row) = refunded {
            return Ok(from_pg_row(&row));
        }
        match self.select(&client, "id", &id).await? {
            None => Err(StoreError::NotFound(id)),
            Some(record) if record.status == REFUNDED => Ok(record),
            Some(_) => Err(StoreError::NotRefundable(id)),
        }
    }

    async fn get(&self, id: String) -> Result<Option<PaymentRecord>, StoreError> {
        let client = self.pg.client().await?;
        self.select(&client, "id", &id).await
    }

    async fn all(&self) -> Result<Vec<PaymentRecord>, StoreError> {
        let client = self.pg.client().await?;
        let rows = client
            .query(&format!("SELECT {COLUMNS} FROM payments"), &[])
            .await
            .map_err(|err| self.failed(err))?;
        Ok(rows.iter().map(from_pg_row).collect())
    }
}

/// The store `--db` chose.
#[derive(Clone)]
pub enum AnyPaymentStore {
    /// SQLite.
    Sqlite(SqlitePaymentStore),
    /// PostgreSQL.
    Postgres(PgPaymentStore),
}

impl AnyPaymentStore {
    /// Opens (and migrates) the store `target` names; `schema` is used on PostgreSQL.
    pub async fn open(target: &DbTarget, schema: &str) -> Result<Self, DbError> {
        Ok(match target {
            DbTarget::Sqlite(path) => AnyPaymentStore::Sqlite(SqlitePaymentStore::open(path)?),
            DbTarget::Postgres(url) => {
                AnyPaymentStore::Postgres(PgPaymentStore::connect(url, schema).await?)
            }
        })
    }

    /// The open backend, for health probing.
    pub fn backend(&self) -> Backend {
        match self {
            AnyPaymentStore::Sqlite(s) => Backend::Sqlite(s.db.clone()),
            AnyPaymentStore::Postgres(s) => Backend::Postgres(s.pg.clone()),
        }
    }
}

impl PaymentStore for AnyPaymentStore {
    async fn charge(&self, charge: NewCharge) -> Result<(PaymentRecord, bool), StoreError> {
        match self {
            AnyPaymentStore::Sqlite(s) => s.charge(charge).await,
            AnyPaymentStore::Postgres(s) => s.pg.bounded(s.charge(charge)).await,
        }
    }

    async fn refund(&self, id: String) -> Result<PaymentRecord, StoreError> {
        match self {
            AnyPaymentStore::Sqlite(s) => s.refund(id).await,
            AnyPaymentStore::Postgres(s) => s.pg.bounded(s.refund(id)).await,
        }
    }

    async fn get(&self, id: String) -> Result<Option<PaymentRecord>, StoreError> {
        match self {
            AnyPaymentStore::Sqlite(s) => s.get(id).await,
            AnyPaymentStore::Postgres(s) => s.pg.bounded(s.get(id)).await,
        }
    }

    async fn all(&self) -> Result<Vec<PaymentRecord>, StoreError> {
        match self {
            AnyPaymentStore::Sqlite(s) => s.all().await,
            AnyPaymentStore::Postgres(s) => s.pg.bounded(s.all()).await,
        }
    }
}
