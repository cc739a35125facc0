//! Order storage. Queries are kept to what SQLite and PostgreSQL both run;
//! only the event sequence column's DDL is SQLite-specific.
//!
//! Every status change is a compare-and-set on the current status plus an
//! appended row in `order_events`, in one transaction. The event log is the
//! change feed every replica tails, and the CAS makes two replicas racing on
//! one order harmless: exactly one of them moves it.
//!
//! Rules every backend must keep (the saga and paging depend on them):
//! - `order_events.seq` grows in commit order: a transaction that commits
//!   later gets a larger seq. SQLite gives this for free (one writer at a
//!   time, AUTOINCREMENT); PostgreSQL needs the sequence taken under a lock
//!   held to commit (e.g. `pg_advisory_xact_lock`), since a plain sequence is
//!   allocated at insert time, not at commit. The feed (`events_after`) and
//!   the ListOrders cursor (`orders.seq`, the seq of the order's creation
//!   event) both walk by it and would skip rows otherwise.
//! - Owed background work is a column, written in the same transaction as the
//!   status change that creates it: `retry_at_ms` on a PENDING order (settle
//!   its charge) or on a CANCELLED order with `refund_pending` (compensate its
//!   charge). Work is claimed by pushing `retry_at_ms` forward, so replicas
//!   sharing the database do not work on one order at once, and a claimer that
//!   dies leaves the order due again when the lease runs out.

use crate::pg_store::PgOrderStore;
use minimesh_runtime::db::{Db, DbError, DbFailure};
use minimesh_runtime::store::{Backend, DbTarget};
use rusqlite::{OptionalExtension, Row, Transaction, params};
use std::path::Path;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE orders (
        id              TEXT PRIMARY KEY,
        user_id         TEXT NOT NULL,
        total_cents     BIGINT NOT NULL,
        currency        TEXT NOT NULL,
        status          INTEGER NOT NULL,
        status_reason   TEXT NOT NULL,
        payment_id      TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        request_hash    TEXT NOT NULL,
        refund_pending  INTEGER NOT NULL DEFAULT 0,
        next_step_at_ms BIGINT,
        created_at_ms   BIGINT NOT NULL,
        updated_at_ms   BIGINT NOT NULL
    );
    CREATE INDEX orders_by_user ON orders (user_id, id);
    CREATE INDEX orders_due ON orders (next_step_at_ms);
    CREATE TABLE order_items (
        order_id         TEXT NOT NULL REFERENCES orders (id),
        position         INTEGER NOT NULL,
        sku              TEXT NOT NULL,
        quantity         INTEGER NOT NULL,
        unit_price_cents BIGINT NOT NULL,
        PRIMARY KEY (order_id, position)
    );
    CREATE TABLE order_events (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id      TEXT NOT NULL,
        status        INTEGER NOT NULL,
        status_reason TEXT NOT NULL,
        at_ms         BIGINT NOT NULL
    );
    CREATE INDEX order_events_by_order ON order_events (order_id, seq);",
    // Saga and paging (issue 14): the commit-ordered page cursor, and the
    // retry schedule of owed background work. Orders cancelled while PENDING
    // before this version may have a charge that landed later and was never
    // refunded: they are marked as owing compensation, which checks and
    // refunds it.
    "ALTER TABLE orders ADD COLUMN seq BIGINT;
    UPDATE orders SET seq = (SELECT MIN(e.seq) FROM order_events e WHERE e.order_id = orders.id);
    CREATE UNIQUE INDEX orders_by_seq ON orders (seq);
    CREATE INDEX orders_by_user_seq ON orders (user_id, seq);
    ALTER TABLE orders ADD COLUMN retry_at_ms BIGINT;
    ALTER TABLE orders ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    UPDATE orders SET refund_pending = 1 WHERE status = 5 AND payment_id = '';
    UPDATE orders SET retry_at_ms = updated_at_ms WHERE status = 1 OR refund_pending = 1;
    CREATE INDEX orders_retry ON orders (retry_at_ms);",
];

/// Stored status values; equal to the proto enum numbers.
pub mod status {
    /// Created, its charge not settled yet.
    pub const PENDING: i32 = 1;
    /// Charged; fulfilment starts.
    pub const PAID: i32 = 2;
    /// On its way.
    pub const SHIPPED: i32 = 3;
    /// Arrived (terminal).
    pub const DELIVERED: i32 = 4;
    /// Cancelled, by the caller or a declined charge (terminal).
    pub const CANCELLED: i32 = 5;

    /// Whether no status follows this one.
    pub fn is_terminal(status: i32) -> bool {
        status == DELIVERED || status == CANCELLED
    }

    /// Lower-case label value for metrics.
    pub fn metric_name(status: i32) -> &'static str {
        match status {
            PENDING => "pending",
            PAID => "paid",
            SHIPPED => "shipped",
            DELIVERED => "delivered",
            CANCELLED => "cancelled",
            _ => "unspecified",
        }
    }

    /// The proto enum value's name without its prefix, e.g. `PAID`.
    pub fn name(status: i32) -> &'static str {
        match status {
            PENDING => "PENDING",
            PAID => "PAID",
            SHIPPED => "SHIPPED",
            DELIVERED => "DELIVERED",
            CANCELLED => "CANCELLED",
            _ => "UNSPECIFIED",
        }
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRecord {
    /// The caller's product code.
    pub sku: String,
    /// How many, at least 1.
    pub quantity: i32,
    /// Price of one, minor units.
    pub unit_price_cents: i64,
}

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    /// Its id.
    pub id: String,
    /// The user who placed it.
    pub user_id: String,
    /// Its lines.
    pub items: Vec<ItemRecord>,
    /// Sum of quantity × unit price, minor units.
    pub total_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// One of the [`status`] values.
    pub status: i32,
    /// Why it is in that status (e.g. the decline reason); may be empty.
    pub status_reason: String,
    /// The payment that paid it; empty until one did.
    pub payment_id: String,
    /// When it was created, milliseconds since the epoch.
    pub created_at_ms: i64,
    /// When it last changed, milliseconds since the epoch.
    pub updated_at_ms: i64,
    /// Position in commit order (the seq of the order's creation event).
    pub seq: i64,
}

/// One row of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Position in the feed; grows with commit order.
    pub seq: i64,
    /// The order that changed.
    pub order_id: String,
    /// The status it moved to.
    pub status: i32,
    /// Why, as stored on the order.
    pub status_reason: String,
    /// When, milliseconds since the epoch.
    pub at_ms: i64,
}

/// A validated order, ready to store as PENDING.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// The user placing it.
    pub user_id: String,
    /// Its lines.
    pub items: Vec<ItemRecord>,
    /// Sum of the lines, minor units.
    pub total_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// The caller's key: the same key returns the same order.
    pub idempotency_key: Option<String>,
    /// Fingerprint of the request, to tell a retry from a reused key.
    pub request_hash: String,
    /// The fingerprint older versions stored, accepted for their orders only.
    pub legacy_hash: Option<String>,
}

/// What `create_pending` did.
#[derive(Debug)]
pub enum Created {
    /// A new order was stored.
    New(OrderRecord),
    /// An earlier request with the same idempotency key made this order.
    Existing(OrderRecord),
}

/// A status change to apply only if the order is still in `from`.
#[derive(Debug, Clone)]
pub struct Transition {
    /// The status it must still be in.
    pub from: i32,
    /// The status it moves to.
    pub to: i32,
    /// Stored as its `status_reason`.
    pub reason: String,
    /// The payment to record on it, if any.
    pub payment_id: Option<String>,
    /// When its next fulfilment step is due (PAID and SHIPPED only).
    pub next_step_at_ms: Option<i64>,
    /// Whether a refund is owed after this change.
    pub refund_pending: bool,
    /// When background work on the order is next due (None: nothing owed).
    pub retry_at_ms: Option<i64>,
}

/// Background work an order can owe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A PENDING order whose charge outcome is unknown: charge it (same key) and record the result.
    Settle,
    /// A CANCELLED order whose charge may exist: find it (same key) and refund it.
    Compensate,
}

/// An order claimed for background work, and how many times it was tried before.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The order as claimed.
    pub order: OrderRecord,
    /// Attempts made on it before this one.
    pub attempts: u32,
}

/// When a claimed order becomes due again if the claimer does not finish:
/// the lease (longer than one attempt) plus a back-off that doubles per attempt.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// How long a claim holds before another replica may take the order.
    pub lease_ms: i64,
    /// Back-off after the first attempt; doubles per attempt.
    pub backoff_ms: i64,
    /// The longest back-off.
    pub max_backoff_ms: i64,
}

impl Schedule {
    /// Due time of a claim: past the lease, so only a dead claimer's order comes back early.
    pub fn next_due(&self, now_ms: i64, attempts: u32) -> i64 {
        now_ms + self.lease_ms + self.backoff_ms(attempts)
    }

    /// The back-off after `attempts` attempts.
    pub fn backoff_ms(&self, attempts: u32) -> i64 {
        self.backoff_ms
            .saturating_mul(1i64 << attempts.min(20))
            .min(self.max_backoff_ms)
    }
}

/// What the reconciliation check needs of one order.
#[derive(Debug, Clone)]
pub struct OrderFacts {
    /// Its id.
    pub id: String,
    /// One of the [`status`] values.
    pub status: i32,
    /// The payment recorded on it; empty if none.
    pub payment_id: String,
    /// What it should have been charged, minor units.
    pub total_cents: i64,
    /// Whether a refund is still owed.
    pub refund_pending: bool,
    /// When it last changed, milliseconds since the epoch.
    pub updated_at_ms: i64,
}

/// Why an order store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key was used for an order with other content.
    #[error("idempotency key {0:?} was already used for a different order")]
    KeyReused(String),
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

/// Orders in SQLite (one host; replicas share the file).
#[derive(Clone)]
pub struct SqliteOrderStore {
    db: Db,
}

const ORDER_COLUMNS: &str = "id, user_id, total_cents, currency, status, status_reason, payment_id, created_at_ms, updated_at_ms, seq";
const EVENT_COLUMNS: &str = "seq, order_id, status, status_reason, at_ms";

fn order_from_row(row: &Row<'_>) -> rusqlite::Result<OrderRecord> {
    Ok(OrderRecord {
        id: row.get(0)?,
        user_id: row.get(1)?,
        items: Vec::new(),
        total_cents: row.get(2)?,
        currency: row.get(3)?,
        status: row.get(4)?,
        status_reason: row.get(5)?,
        payment_id: row.get(6)?,
        created_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
        seq: row.get::<_, Option<i64>>(9)?.unwrap_or_default(),
    })
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        seq: row.get(0)?,
        order_id: row.get(1)?,
        status: row.get(2)?,
        status_reason: row.get(3)?,
        at_ms: row.get(4)?,
    })
}

fn load_items(conn: &rusqlite::Connection, order: &mut OrderRecord) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT sku, quantity, unit_price_cents FROM order_items WHERE order_id = ?1 ORDER BY position",
    )?;
    order.items = stmt
        .query_map(params![order.id], |row| {
            Ok(ItemRecord {
                sku: row.get(0)?,
                quantity: row.get(1)?,
                unit_price_cents: row.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(())
}

fn select_order(
    conn: &rusqlite::Connection,
    column: &str,
    value: &str,
) -> rusqlite::Result<Option<OrderRecord>> {
    let order = conn
        .query_row(
            &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE {column} = ?1"),
            params![value],
            order_from_row,
        )
        .optional()?;
    match order {
        Some(mut order) => {
            load_items(conn, &mut order)?;
            Ok(Some(order))
        }
        None => Ok(None),
    }
}

fn append_event(
    tx: &Transaction<'_>,
    order_id: &str,
    status: i32,
    reason: &str,
    at_ms: i64,
) -> rusqlite::Result<i64> {
    tx.execute(
        "INSERT INTO order_events (order_id, status, status_reason, at_ms) VALUES (?1, ?2, ?3, ?4)",
        params![order_id, status, reason, at_ms],
    )?;
    Ok(tx.last_insert_rowid())
}

fn apply(tx: &Transaction<'_>, id: &str, t: &Transition, now: i64) -> rusqlite::Result<bool> {
    let changed = tx.execute(
        "UPDATE orders SET status = ?1, status_reason = ?2,
            payment_id = COALESCE(?3, payment_id), next_step_at_ms = ?4,
            refund_pending = ?5, updated_at_ms = ?6, retry_at_ms = ?9, attempts = 0
         WHERE id = ?7 AND status = ?8",
        params![
            t.to,
            t.reason,
            t.payment_id,
            t.next_step_at_ms,
            t.refund_pending as i32,
            now,
            id,
            t.from,
            t.retry_at_ms
        ],
    )?;
    if changed == 1 {
        append_event(tx, id, t.to, &t.reason, now)?;
    }
    Ok(changed == 1)
}

impl SqliteOrderStore {
    /// Opens (and migrates) the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Ok(Self {
            db: Db::open(path, MIGRATIONS)?,
        })
    }

    /// Opens a database read-only, without migrating it (reconciliation
    /// reads only columns every schema version has).
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

    /// The SQLite side of `OrderStore::create_with_id`.
    pub async fn create_with_id(
        &self,
        order: NewOrder,
        settle_at_ms: i64,
        id: String,
    ) -> Result<Created, StoreError> {
        self.db
            .write(move |tx| {
                if let Some(key) = &order.idempotency_key
                    && let Some(existing) = select_order(tx, "idempotency_key", key)?
                {
                    let hash: String = tx.query_row(
                        "SELECT request_hash FROM orders WHERE id = ?1",
                        params![existing.id],
                        |r| r.get(0),
                    )?;
                    // Orders stored before fingerprints were versioned carry the legacy one.
                    let same = hash == order.request_hash
                        || order.legacy_hash.as_deref() == Some(hash.as_str());
                    return if same {
                        Ok(Created::Existing(existing))
                    } else {
                        Err(StoreError::KeyReused(key.clone()))
                    };
                }
                let now = minimesh_runtime::now_millis();
                // The creation event's seq is the order's place in commit order.
                let seq = append_event(tx, &id, status::PENDING, "", now)?;
                let record = OrderRecord {
                    id,
                    user_id: order.user_id,
                    items: order.items,
                    total_cents: order.total_cents,
                    currency: order.currency,
                    status: status::PENDING,
                    status_reason: String::new(),
                    payment_id: String::new(),
                    created_at_ms: now,
                    updated_at_ms: now,
                    seq,
                };
                tx.execute(
                    "INSERT INTO orders (id, user_id, total_cents, currency, status, status_reason, payment_id,
                        idempotency_key, request_hash, created_at_ms, updated_at_ms, seq, retry_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, '', '', ?6, ?7, ?8, ?8, ?9, ?10)",
                    params![
                        record.id,
                        record.user_id,
                        record.total_cents,
                        record.currency,
                        record.status,
                        order.idempotency_key,
                        order.request_hash,
                        now,
                        seq,
                        settle_at_ms
                    ],
                )?;
                for (position, item) in record.items.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO order_items (order_id, position, sku, quantity, unit_price_cents)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![record.id, position as i64, item.sku, item.quantity, item.unit_price_cents],
                    )?;
                }
                Ok(Created::New(record))
            })
            .await
    }

    /// Applies `transition` if the order is still in `transition.from`.
    /// Returns the order as it is afterwards and whether this call moved it.
    pub async fn transition(
        &self,
        id: String,
        transition: Transition,
    ) -> Result<Option<(OrderRecord, bool)>, StoreError> {
        self.db
            .write(move |tx| {
                let now = minimesh_runtime::now_millis();
                let moved = apply(tx, &id, &transition, now)?;
                Ok(select_order(tx, "id", &id)?.map(|order| (order, moved)))
            })
            .await
    }

    /// The SQLite side of `OrderStore::get`.
    pub async fn get(&self, id: String) -> Result<Option<OrderRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| Ok(select_order(conn, "id", &id)?))
            .await?)
    }

    /// Orders after cursor position `after` (optionally of one user), in
    /// commit order. Any order committed after a page was read has a larger
    /// seq than every order on it, so following the cursor never skips one.
    pub async fn list(
        &self,
        user_id: Option<String>,
        after: Cursor,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                let after_seq = match after {
                    Cursor::Start => 0,
                    Cursor::Seq(seq) => seq,
                    // A token from a version that paged by id: resume after that order.
                    Cursor::LegacyId(id) => conn
                        .query_row("SELECT seq FROM orders WHERE id = ?1", params![id], |r| {
                            r.get::<_, Option<i64>>(0)
                        })
                        .optional()?
                        .flatten()
                        .unwrap_or(0),
                };
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {ORDER_COLUMNS} FROM orders
                     WHERE seq > ?1 AND (?2 IS NULL OR user_id = ?2) ORDER BY seq LIMIT ?3"
                ))?;
                let mut orders = stmt
                    .query_map(params![after_seq, user_id, limit], order_from_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                for order in &mut orders {
                    load_items(conn, order)?;
                }
                Ok(orders)
            })
            .await?)
    }

    /// The newest event of one order: its current status and feed position.
    pub async fn latest_event(&self, order_id: String) -> Result<Option<EventRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                Ok(conn
                    .query_row(
                        &format!("SELECT {EVENT_COLUMNS} FROM order_events WHERE order_id = ?1 ORDER BY seq DESC LIMIT 1"),
                        params![order_id],
                        event_from_row,
                    )
                    .optional()?)
            })
            .await?)
    }

    /// Events after `seq`, optionally of one order, oldest first.
    pub async fn events_after(
        &self,
        seq: i64,
        order_id: Option<String>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM order_events
                     WHERE seq > ?1 AND (?2 IS NULL OR order_id = ?2) ORDER BY seq LIMIT ?3"
                ))?;
                let rows = stmt
                    .query_map(params![seq, order_id, limit], event_from_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// The SQLite side of `OrderStore::last_seq`.
    pub async fn last_seq(&self) -> Result<i64, StoreError> {
        Ok(self
            .db
            .read(|conn| {
                Ok(
                    conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM order_events", [], |r| {
                        r.get(0)
                    })?,
                )
            })
            .await?)
    }

    /// Moves every order whose fulfilment step is due one step on
    /// (PAID → SHIPPED → DELIVERED). Returns the statuses they moved to.
    pub async fn advance_due(
        &self,
        now_ms: i64,
        step_ms: i64,
        batch: u32,
    ) -> Result<Vec<i32>, StoreError> {
        // Look before taking the write lock: most ticks find nothing due, and
        // replicas sharing the file should not serialise on empty passes.
        let any_due = self
            .db
            .read(move |conn| {
                Ok(conn
                    .query_row(
                        "SELECT 1 FROM orders WHERE next_step_at_ms IS NOT NULL AND next_step_at_ms <= ?1 LIMIT 1",
                        params![now_ms],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some())
            })
            .await?;
        if !any_due {
            return Ok(Vec::new());
        }
        self.db
            .write(move |tx| {
                let due: Vec<(String, i32)> = {
                    let mut stmt = tx.prepare_cached(
                        "SELECT id, status FROM orders WHERE next_step_at_ms IS NOT NULL
                           AND next_step_at_ms <= ?1 ORDER BY next_step_at_ms LIMIT ?2",
                    )?;
                    stmt.query_map(params![now_ms, batch], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?
                };
                let mut moved = Vec::new();
                for (id, from) in due {
                    let (to, next) = match from {
                        status::PAID => (status::SHIPPED, Some(now_ms + step_ms)),
                        status::SHIPPED => (status::DELIVERED, None),
                        _ => {
                            // Not in fulfilment any more (e.g. cancelled): stop scheduling it.
                            tx.execute(
                                "UPDATE orders SET next_step_at_ms = NULL WHERE id = ?1",
                                params![id],
                            )?;
                            continue;
                        }
                    };
                    let t = Transition {
                        from,
                        to,
                        reason: String::new(),
                        payment_id: None,
                        next_step_at_ms: next,
                        refund_pending: false,
                        retry_at_ms: None,
                    };
                    if apply(tx, &id, &t, now_ms)? {
                        moved.push(to);
                    }
                }
                Ok(moved)
            })
            .await
    }

    /// Claims up to `limit` orders owing `work` that are due at `now_ms`:
    /// each one's `retry_at_ms` moves on per `schedule` and its attempt count
    /// grows, in one transaction, so no other replica claims it meanwhile.
    pub async fn claim_due(
        &self,
        work: Work,
        now_ms: i64,
        schedule: Schedule,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let filter = match work {
            Work::Settle => "status = 1",
            Work::Compensate => "status = 5 AND refund_pending = 1",
        };
        let query = format!(
            "SELECT id, attempts FROM orders WHERE retry_at_ms IS NOT NULL AND retry_at_ms <= ?1
               AND {filter} ORDER BY retry_at_ms LIMIT ?2"
        );
        let probe = query.clone();
        // Most passes find nothing: look before taking the write lock.
        let any = self
            .db
            .read(move |conn| {
                Ok(conn
                    .query_row(&probe, params![now_ms, 1], |_| Ok(()))
                    .optional()?
                    .is_some())
            })
            .await?;
        if !any {
            return Ok(Vec::new());
        }
        self.db
            .write(move |tx| {
                let due: Vec<(String, u32)> = {
                    let mut stmt = tx.prepare_cached(&query)?;
                    stmt.query_map(params![now_ms, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?
                };
                let mut claimed = Vec::with_capacity(due.len());
                for (id, attempts) in due {
                    tx.execute(
                        "UPDATE orders SET retry_at_ms = ?1, attempts = attempts + 1 WHERE id = ?2",
                        params![schedule.next_due(now_ms, attempts), id],
                    )?;
                    if let Some(order) = select_order(tx, "id", &id)? {
                        claimed.push(Claimed { order, attempts });
                    }
                }
                Ok(claimed)
            })
            .await
    }

    /// Sets when owed `work` on an order is next due, if it is still owed.
    pub async fn reschedule(&self, id: String, work: Work, at_ms: i64) -> Result<(), StoreError> {
        let filter = match work {
            Work::Settle => "status = 1",
            Work::Compensate => "status = 5 AND refund_pending = 1",
        };
        self.db
            .write(move |tx| {
                tx.execute(
                    &format!("UPDATE orders SET retry_at_ms = ?1 WHERE id = ?2 AND retry_at_ms IS NOT NULL AND {filter}"),
                    params![at_ms, id],
                )?;
                Ok(())
            })
            .await
    }

    /// Records the payment of a CANCELLED order whose charge outcome was
    /// unknown. A captured payment stays owed a refund (on its schedule: the
    /// caller tries the refund next); a declined one settles the debt.
    /// Returns the order afterwards.
    pub async fn record_payment(
        &self,
        id: String,
        payment_id: String,
        captured: bool,
    ) -> Result<Option<OrderRecord>, StoreError> {
        self.db
            .write(move |tx| {
                let now = minimesh_runtime::now_millis();
                tx.execute(
                    "UPDATE orders SET payment_id = ?2, refund_pending = ?3,
                        retry_at_ms = CASE WHEN ?3 = 1 THEN COALESCE(retry_at_ms, ?4) ELSE NULL END
                     WHERE id = ?1 AND status = ?5 AND refund_pending = 1 AND payment_id = ''",
                    params![id, payment_id, captured as i32, now, status::CANCELLED],
                )?;
                Ok(select_order(tx, "id", &id)?)
            })
            .await
    }

    /// The refund of a cancelled order went through (or nothing was owed).
    pub async fn refund_done(&self, order_id: String) -> Result<(), StoreError> {
        self.db
            .write(move |tx| {
                tx.execute(
                    "UPDATE orders SET refund_pending = 0, retry_at_ms = NULL WHERE id = ?1",
                    params![order_id],
                )?;
                Ok(())
            })
            .await
    }

    /// Every order, as the reconciliation check sees it.
    pub async fn facts(&self) -> Result<Vec<OrderFacts>, StoreError> {
        Ok(self
            .db
            .read(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT id, status, payment_id, total_cents, refund_pending, updated_at_ms FROM orders",
                )?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok(OrderFacts {
                            id: r.get(0)?,
                            status: r.get(1)?,
                            payment_id: r.get(2)?,
                            total_cents: r.get(3)?,
                            refund_pending: r.get::<_, i64>(4)? != 0,
                            updated_at_ms: r.get(5)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }
}

/// The order store `--db` chose; every method behaves the same on both.
#[derive(Clone)]
pub struct OrderStore {
    backend: Orders,
}

#[derive(Clone)]
enum Orders {
    Sqlite(SqliteOrderStore),
    Postgres(PgOrderStore),
}

/// Calls the same method on whichever backend holds the orders.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.backend {
            Orders::Sqlite(store) => store.$method($($arg),*).await,
            Orders::Postgres(store) => store.pg().bounded(store.$method($($arg),*)).await,
        }
    };
}

impl OrderStore {
    /// Opens (and migrates) the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Ok(Self {
            backend: Orders::Sqlite(SqliteOrderStore::open(path)?),
        })
    }

    /// Opens the SQLite file or connects to PostgreSQL (schema `schema`).
    pub async fn open_target(target: &DbTarget, schema: &str) -> Result<Self, DbError> {
        Ok(match target {
            DbTarget::Sqlite(path) => Self::open(path)?,
            DbTarget::Postgres(url) => Self {
                backend: Orders::Postgres(PgOrderStore::connect(url, schema).await?),
            },
        })
    }

    /// Opens a SQLite database read-only, without migrating it.
    pub fn open_read_only(path: &Path) -> Result<Self, DbError> {
        Ok(Self {
            backend: Orders::Sqlite(SqliteOrderStore::open_read_only(path)?),
        })
    }

    /// A private in-memory SQLite database, for tests.
    pub fn in_memory() -> Result<Self, DbError> {
        Ok(Self {
            backend: Orders::Sqlite(SqliteOrderStore::in_memory()?),
        })
    }

    /// The open backend, for health probing.
    pub fn backend(&self) -> Backend {
        match &self.backend {
            Orders::Sqlite(store) => Backend::Sqlite(store.db.clone()),
            Orders::Postgres(store) => Backend::Postgres(store.pg().clone()),
        }
    }

    /// Wakes `wake` when another process commits an event (PostgreSQL's
    /// NOTIFY); SQLite has no such signal and the feed polls it.
    pub fn listen(
        &self,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Result<Option<minimesh_runtime::pg::ListenHandle>, DbError> {
        match &self.backend {
            Orders::Sqlite(_) => Ok(None),
            Orders::Postgres(store) => store.listen(wake).map(Some),
        }
    }

    /// Stores a new PENDING order, or returns the one an earlier request with
    /// the same idempotency key created (checked and inserted atomically).
    /// Its settlement is owed from `settle_at_ms` on: the caller charges it
    /// before then, and background settlement takes over if it does not.
    pub async fn create_pending(
        &self,
        order: NewOrder,
        settle_at_ms: i64,
    ) -> Result<Created, StoreError> {
        let id = minimesh_runtime::new_id("ord");
        dispatch!(self.create_with_id(order, settle_at_ms, id))
    }

    /// [`create_pending`](Self::create_pending) with a chosen id (tests of
    /// commit order against id order).
    pub async fn create_with_id(
        &self,
        order: NewOrder,
        settle_at_ms: i64,
        id: String,
    ) -> Result<Created, StoreError> {
        dispatch!(self.create_with_id(order, settle_at_ms, id))
    }

    /// Applies `transition` if the order is still in `transition.from`.
    /// Returns the order as it is afterwards and whether this call moved it.
    pub async fn transition(
        &self,
        id: String,
        transition: Transition,
    ) -> Result<Option<(OrderRecord, bool)>, StoreError> {
        dispatch!(self.transition(id, transition))
    }

    /// The order with `id`, if any.
    pub async fn get(&self, id: String) -> Result<Option<OrderRecord>, StoreError> {
        dispatch!(self.get(id))
    }

    /// Orders after cursor position `after` (optionally of one user), in
    /// commit order. Any order committed after a page was read has a larger
    /// seq than every order on it, so following the cursor never skips one.
    pub async fn list(
        &self,
        user_id: Option<String>,
        after: Cursor,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        dispatch!(self.list(user_id, after, limit))
    }

    /// The newest event of one order: its current status and feed position.
    pub async fn latest_event(&self, order_id: String) -> Result<Option<EventRecord>, StoreError> {
        dispatch!(self.latest_event(order_id))
    }

    /// Events after `seq`, optionally of one order, oldest first.
    pub async fn events_after(
        &self,
        seq: i64,
        order_id: Option<String>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        dispatch!(self.events_after(seq, order_id, limit))
    }

    /// The newest position in the feed (0 when empty): where a new feed starts.
    pub async fn last_seq(&self) -> Result<i64, StoreError> {
        dispatch!(self.last_seq())
    }

    /// Moves every order whose fulfilment step is due one step on
    /// (PAID → SHIPPED → DELIVERED). Returns the statuses they moved to.
    pub async fn advance_due(
        &self,
        now_ms: i64,
        step_ms: i64,
        batch: u32,
    ) -> Result<Vec<i32>, StoreError> {
        dispatch!(self.advance_due(now_ms, step_ms, batch))
    }

    /// Claims up to `limit` orders owing `work` that are due at `now_ms`:
    /// each one's `retry_at_ms` moves on per `schedule` and its attempt count
    /// grows, in one transaction, so no other replica claims it meanwhile.
    pub async fn claim_due(
        &self,
        work: Work,
        now_ms: i64,
        schedule: Schedule,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        dispatch!(self.claim_due(work, now_ms, schedule, limit))
    }

    /// Sets when owed `work` on an order is next due, if it is still owed.
    pub async fn reschedule(&self, id: String, work: Work, at_ms: i64) -> Result<(), StoreError> {
        dispatch!(self.reschedule(id, work, at_ms))
    }

    /// Records the payment of a CANCELLED order whose charge outcome was
    /// unknown (see [`SqliteOrderStore::record_payment`]).
    pub async fn record_payment(
        &self,
        id: String,
        payment_id: String,
        captured: bool,
    ) -> Result<Option<OrderRecord>, StoreError> {
        dispatch!(self.record_payment(id, payment_id, captured))
    }

    /// The refund of a cancelled order went through (or nothing was owed).
    pub async fn refund_done(&self, order_id: String) -> Result<(), StoreError> {
        dispatch!(self.refund_done(order_id))
    }

    /// Every order, as the reconciliation check sees it.
    pub async fn facts(&self) -> Result<Vec<OrderFacts>, StoreError> {
        dispatch!(self.facts())
    }
}

/// Where a ListOrders page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// The first page.
    Start,
    /// After this commit-order position.
    Seq(i64),
    /// After this order id (tokens issued before paging followed commit order).
    LegacyId(String),
}
