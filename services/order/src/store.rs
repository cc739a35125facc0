//! Order storage. Queries are kept to what SQLite and PostgreSQL both run;
//! only the event sequence column's DDL is SQLite-specific.
//!
//! Every status change is a compare-and-set on the current status plus an
//! appended row in `order_events`, in one transaction. The event log is the
//! change feed every replica tails, and the CAS makes two replicas racing on
//! one order harmless: exactly one of them moves it.

use minimesh_runtime::db::{Db, DbError};
use rusqlite::{OptionalExtension, Row, Transaction, params};
use std::path::Path;

const MIGRATIONS: &[&str] = &["CREATE TABLE orders (
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
    CREATE INDEX order_events_by_order ON order_events (order_id, seq);"];

/// Stored status values; equal to the proto enum numbers.
pub mod status {
    pub const PENDING: i32 = 1;
    pub const PAID: i32 = 2;
    pub const SHIPPED: i32 = 3;
    pub const DELIVERED: i32 = 4;
    pub const CANCELLED: i32 = 5;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRecord {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    pub id: String,
    pub user_id: String,
    pub items: Vec<ItemRecord>,
    pub total_cents: i64,
    pub currency: String,
    pub status: i32,
    pub status_reason: String,
    pub payment_id: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One row of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub seq: i64,
    pub order_id: String,
    pub status: i32,
    pub status_reason: String,
    pub at_ms: i64,
}

/// A validated order, ready to store as PENDING.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub user_id: String,
    pub items: Vec<ItemRecord>,
    pub total_cents: i64,
    pub currency: String,
    pub idempotency_key: Option<String>,
    /// Fingerprint of the request, to tell a retry from a reused key.
    pub request_hash: String,
}

#[derive(Debug)]
pub enum Created {
    New(OrderRecord),
    /// An earlier request with the same idempotency key made this order.
    Existing(OrderRecord),
}

/// A status change to apply only if the order is still in `from`.
#[derive(Debug, Clone)]
pub struct Transition {
    pub from: i32,
    pub to: i32,
    pub reason: String,
    pub payment_id: Option<String>,
    pub next_step_at_ms: Option<i64>,
    pub refund_pending: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("idempotency key {0:?} was already used for a different order")]
    KeyReused(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Db(err.into())
    }
}

#[derive(Clone)]
pub struct OrderStore {
    db: Db,
}

const ORDER_COLUMNS: &str = "id, user_id, total_cents, currency, status, status_reason, payment_id, created_at_ms, updated_at_ms";
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
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO order_events (order_id, status, status_reason, at_ms) VALUES (?1, ?2, ?3, ?4)",
        params![order_id, status, reason, at_ms],
    )?;
    Ok(())
}

fn apply(tx: &Transaction<'_>, id: &str, t: &Transition, now: i64) -> rusqlite::Result<bool> {
    let changed = tx.execute(
        "UPDATE orders SET status = ?1, status_reason = ?2,
            payment_id = COALESCE(?3, payment_id), next_step_at_ms = ?4,
            refund_pending = ?5, updated_at_ms = ?6
         WHERE id = ?7 AND status = ?8",
        params![
            t.to,
            t.reason,
            t.payment_id,
            t.next_step_at_ms,
            t.refund_pending as i32,
            now,
            id,
            t.from
        ],
    )?;
    if changed == 1 {
        append_event(tx, id, t.to, &t.reason, now)?;
    }
    Ok(changed == 1)
}

impl OrderStore {
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

    /// Stores a new PENDING order, or returns the one an earlier request with
    /// the same idempotency key created (checked and inserted atomically).
    pub async fn create_pending(&self, order: NewOrder) -> Result<Created, StoreError> {
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
                    return if hash == order.request_hash {
                        Ok(Created::Existing(existing))
                    } else {
                        Err(StoreError::KeyReused(key.clone()))
                    };
                }
                let now = minimesh_runtime::now_millis();
                let record = OrderRecord {
                    id: minimesh_runtime::new_id("ord"),
                    user_id: order.user_id,
                    items: order.items,
                    total_cents: order.total_cents,
                    currency: order.currency,
                    status: status::PENDING,
                    status_reason: String::new(),
                    payment_id: String::new(),
                    created_at_ms: now,
                    updated_at_ms: now,
                };
                tx.execute(
                    "INSERT INTO orders (id, user_id, total_cents, currency, status, status_reason, payment_id,
                        idempotency_key, request_hash, created_at_ms, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, '', '', ?6, ?7, ?8, ?8)",
                    params![
                        record.id,
                        record.user_id,
                        record.total_cents,
                        record.currency,
                        record.status,
                        order.idempotency_key,
                        order.request_hash,
                        now
                    ],
                )?;
                for (position, item) in record.items.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO order_items (order_id, position, sku, quantity, unit_price_cents)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![record.id, position as i64, item.sku, item.quantity, item.unit_price_cents],
                    )?;
                }
                append_event(tx, &record.id, status::PENDING, "", now)?;
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

    pub async fn get(&self, id: String) -> Result<Option<OrderRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| Ok(select_order(conn, "id", &id)?))
            .await?)
    }

    /// Orders with id greater than `after` (optionally of one user), in creation order.
    pub async fn list(
        &self,
        user_id: Option<String>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {ORDER_COLUMNS} FROM orders
                     WHERE id > ?1 AND (?2 IS NULL OR user_id = ?2) ORDER BY id LIMIT ?3"
                ))?;
                let mut orders = stmt
                    .query_map(
                        params![after.unwrap_or_default(), user_id, limit],
                        order_from_row,
                    )?
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
                    };
                    if apply(tx, &id, &t, now_ms)? {
                        moved.push(to);
                    }
                }
                Ok(moved)
            })
            .await
    }

    /// Cancelled orders whose refund has not gone through yet: (order id, payment id).
    pub async fn pending_refunds(&self, limit: u32) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, payment_id FROM orders WHERE refund_pending = 1 ORDER BY id LIMIT ?1",
                )?;
                let rows = stmt
                    .query_map(params![limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    pub async fn refund_done(&self, order_id: String) -> Result<(), StoreError> {
        self.db
            .write(move |tx| {
                tx.execute(
                    "UPDATE orders SET refund_pending = 0 WHERE id = ?1",
                    params![order_id],
                )?;
                Ok(())
            })
            .await
    }

    /// PENDING orders last touched before `before_ms`, whose charge never settled.
    pub async fn stale_pending(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        Ok(self
            .db
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {ORDER_COLUMNS} FROM orders WHERE status = ?1 AND updated_at_ms < ?2 ORDER BY id LIMIT ?3"
                ))?;
                let mut orders = stmt
                    .query_map(params![status::PENDING, before_ms, limit], order_from_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                for order in &mut orders {
                    load_items(conn, order)?;
                }
                Ok(orders)
            })
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_order(key: Option<&str>, hash: &str) -> NewOrder {
        NewOrder {
            user_id: "usr_1".into(),
            items: vec![ItemRecord {
                sku: "a".into(),
                quantity: 2,
                unit_price_cents: 150,
            }],
            total_cents: 300,
            currency: "EUR".into(),
            idempotency_key: key.map(str::to_owned),
            request_hash: hash.into(),
        }
    }

    fn paid(payment: &str, next: i64) -> Transition {
        Transition {
            from: status::PENDING,
            to: status::PAID,
            reason: String::new(),
            payment_id: Some(payment.into()),
            next_step_at_ms: Some(next),
            refund_pending: false,
        }
    }

    #[tokio::test]
    async fn idempotency_key_returns_existing_or_refuses_other_content() {
        let store = OrderStore::in_memory().unwrap();
        let Created::New(first) = store
            .create_pending(new_order(Some("k"), "h1"))
            .await
            .unwrap()
        else {
            panic!("first create must be new");
        };
        let Created::Existing(again) = store
            .create_pending(new_order(Some("k"), "h1"))
            .await
            .unwrap()
        else {
            panic!("second create must find the first");
        };
        assert_eq!(first, again);
        assert!(matches!(
            store.create_pending(new_order(Some("k"), "h2")).await,
            Err(StoreError::KeyReused(_))
        ));
    }

    #[tokio::test]
    async fn transitions_are_compare_and_set_and_logged() {
        let store = OrderStore::in_memory().unwrap();
        let Created::New(order) = store.create_pending(new_order(None, "h")).await.unwrap() else {
            panic!("must be new");
        };
        let (after, moved) = store
            .transition(order.id.clone(), paid("pay_1", 10))
            .await
            .unwrap()
            .unwrap();
        assert!(moved);
        assert_eq!(
            (after.status, after.payment_id.as_str()),
            (status::PAID, "pay_1")
        );
        let (_, moved_again) = store
            .transition(order.id.clone(), paid("pay_2", 10))
            .await
            .unwrap()
            .unwrap();
        assert!(!moved_again, "a second PENDING->PAID must not apply");

        assert_eq!(
            store.advance_due(5, 10, 10).await.unwrap(),
            Vec::<i32>::new(),
            "not due yet"
        );
        assert_eq!(
            store.advance_due(10, 10, 10).await.unwrap(),
            [status::SHIPPED]
        );
        assert_eq!(
            store.advance_due(20, 10, 10).await.unwrap(),
            [status::DELIVERED]
        );
        assert_eq!(
            store.advance_due(1000, 10, 10).await.unwrap(),
            Vec::<i32>::new(),
            "delivered is final"
        );

        let statuses: Vec<i32> = store
            .events_after(0, Some(order.id.clone()), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.status)
            .collect();
        assert_eq!(
            statuses,
            [
                status::PENDING,
                status::PAID,
                status::SHIPPED,
                status::DELIVERED
            ]
        );
        assert_eq!(
            store.latest_event(order.id).await.unwrap().unwrap().status,
            status::DELIVERED
        );
    }
}
