//! Orders in PostgreSQL, keeping the rules written at the top of
//! `store.rs` with the database's own tools, so any number of replicas on
//! any number of hosts can share them:
//! - every transaction that appends to `order_events` takes one
//!   transaction-scoped advisory lock, then draws the event's seq: seqs are
//!   handed out and committed in the same order, so a reader walking by seq
//!   never passes over a row that commits later. The lock comes last, after
//!   the transaction's row locks, and after it only events are inserted (and
//!   a new order's seq set): one lock order everywhere (no deadlocks), and
//!   the lock is held for two statements and the commit, which is what
//!   bounds order writes per second across all replicas (BENCHMARKS.md);
//! - one idempotency key is one order: a unique constraint, and the loser of
//!   a race reads the winner's row;
//! - status changes are compare-and-set on the current status;
//! - background work is claimed with `FOR UPDATE SKIP LOCKED`, so replicas
//!   take different orders instead of queueing on one;
//! - every event commit sends a NOTIFY, which wakes the change feed of
//!   every replica; the feed then re-reads the table, so a lost notification
//!   only delays an event until the next poll.

use crate::store::{
    Claimed, Created, Cursor, EventRecord, ItemRecord, NewOrder, OrderFacts, OrderRecord, Schedule,
    StoreError, Transition, Work, status,
};
use deadpool_postgres::GenericClient;
use minimesh_runtime::db::DbError;
use minimesh_runtime::pg::Pg;
use std::sync::Arc;
use tokio::sync::Notify;

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
        updated_at_ms   BIGINT NOT NULL,
        seq             BIGINT UNIQUE,
        retry_at_ms     BIGINT,
        attempts        INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX orders_by_user_seq ON orders (user_id, seq);
    CREATE INDEX orders_due ON orders (next_step_at_ms) WHERE next_step_at_ms IS NOT NULL;
    CREATE INDEX orders_retry ON orders (retry_at_ms) WHERE retry_at_ms IS NOT NULL;
    CREATE TABLE order_items (
        order_id         TEXT NOT NULL REFERENCES orders (id),
        position         INTEGER NOT NULL,
        sku              TEXT NOT NULL,
        quantity         INTEGER NOT NULL,
        unit_price_cents BIGINT NOT NULL,
        PRIMARY KEY (order_id, position)
    );
    CREATE SEQUENCE order_events_seq;
    CREATE TABLE order_events (
        seq           BIGINT PRIMARY KEY,
        order_id      TEXT NOT NULL,
        status        INTEGER NOT NULL,
        status_reason TEXT NOT NULL,
        at_ms         BIGINT NOT NULL
    );
    CREATE INDEX order_events_by_order ON order_events (order_id, seq);"];

const ORDER_COLUMNS: &str = "id, user_id, total_cents, currency, status, status_reason, payment_id, created_at_ms, updated_at_ms, seq";
const EVENT_COLUMNS: &str = "seq, order_id, status, status_reason, at_ms";

/// Orders in PostgreSQL, in the service's own schema; [`OrderStore`](crate::store::OrderStore) documents each call.
#[derive(Clone)]
pub struct PgOrderStore {
    pg: Pg,
    /// NOTIFY channel of this schema's change feed.
    channel: Arc<str>,
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

fn order_from_row(row: &tokio_postgres::Row) -> OrderRecord {
    OrderRecord {
        id: row.get(0),
        user_id: row.get(1),
        items: Vec::new(),
        total_cents: row.get(2),
        currency: row.get(3),
        status: row.get(4),
        status_reason: row.get(5),
        payment_id: row.get(6),
        created_at_ms: row.get(7),
        updated_at_ms: row.get(8),
        seq: row.get::<_, Option<i64>>(9).unwrap_or_default(),
    }
}

fn event_from_row(row: &tokio_postgres::Row) -> EventRecord {
    EventRecord {
        seq: row.get(0),
        order_id: row.get(1),
        status: row.get(2),
        status_reason: row.get(3),
        at_ms: row.get(4),
    }
}

impl PgOrderStore {
    /// Connects, waiting for a server that is still starting.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, DbError> {
        let pg = minimesh_runtime::store::connect_postgres(url, schema, MIGRATIONS).await?;
        Ok(Self {
            channel: format!("{schema}_events").into(),
            pg,
        })
    }

    /// The pool, for bounding calls by the store's health.
    pub fn pg(&self) -> &Pg {
        &self.pg
    }

    /// Wakes `wake` whenever any replica commits an event.
    pub fn listen(&self, wake: Arc<Notify>) -> Result<minimesh_runtime::pg::ListenHandle, DbError> {
        self.pg.listen(&self.channel, wake)
    }

    fn failed(&self, err: tokio_postgres::Error) -> StoreError {
        StoreError::Db(self.pg.failed(err))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pg.client().await?)
    }

    /// A statement prepared once per connection: one round trip per call
    /// instead of two, which matters most while the event lock is held.
    async fn stmt<C: GenericClient>(
        &self,
        client: &C,
        sql: &str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        client.prepare_cached(sql).await.map_err(|e| self.failed(e))
    }

    /// Takes the event lock: the last lock of a transaction that appends
    /// events, after its row locks, so seqs are drawn in commit order and
    /// the lock is held only for the appends and the commit.
    async fn lock_events(&self, tx: &Tx<'_>) -> Result<(), StoreError> {
        let lock = self
            .stmt(
                tx,
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ' order events'))",
            )
            .await?;
        tx.execute(&lock, &[]).await.map_err(|e| self.failed(e))?;
        Ok(())
    }

    async fn commit(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        tx.commit().await.map_err(|e| self.failed(e))
    }

    /// Appends one event (under the event lock) and notifies every
    /// replica's feed at commit; returns its seq. One statement.
    async fn append_event(
        &self,
        tx: &Tx<'_>,
        order_id: &str,
        status: i32,
        reason: &str,
        at_ms: i64,
    ) -> Result<i64, StoreError> {
        let append = self
            .stmt(
                tx,
                "WITH e AS (
                     INSERT INTO order_events (seq, order_id, status, status_reason, at_ms)
                     VALUES (nextval('order_events_seq'), $1, $2, $3, $4) RETURNING seq)
                 SELECT seq, pg_notify($5, '') FROM e",
            )
            .await?;
        let row = tx
            .query_one(
                &append,
                &[&order_id, &status, &reason, &at_ms, &&*self.channel],
            )
            .await
            .map_err(|e| self.failed(e))?;
        Ok(row.get(0))
    }

    /// Moves one order if it is still in `t.from`: a row lock, no event yet.
    async fn move_order(
        &self,
        tx: &Tx<'_>,
        id: &str,
        t: &Transition,
        now: i64,
    ) -> Result<bool, StoreError> {
        let update = self
            .stmt(
                tx,
                "UPDATE orders SET status = $1, status_reason = $2,
                    payment_id = COALESCE($3, payment_id), next_step_at_ms = $4,
                    refund_pending = $5, updated_at_ms = $6, retry_at_ms = $9, attempts = 0
                 WHERE id = $7 AND status = $8",
            )
            .await?;
        let changed = tx
            .execute(
                &update,
                &[
                    &t.to,
                    &t.reason,
                    &t.payment_id,
                    &t.next_step_at_ms,
                    &(t.refund_pending as i32),
                    &now,
                    &id,
                    &t.from,
                    &t.retry_at_ms,
                ],
            )
            .await
            .map_err(|e| self.failed(e))?;
        Ok(changed == 1)
    }

    async fn load_items<C: GenericClient>(
        &self,
        client: &C,
        order: &mut OrderRecord,
    ) -> Result<(), StoreError> {
        let items = self
            .stmt(
                client,
                "SELECT sku, quantity, unit_price_cents FROM order_items
                 WHERE order_id = $1 ORDER BY position",
            )
            .await?;
        let rows = client
            .query(&items, &[&order.id])
            .await
            .map_err(|e| self.failed(e))?;
        order.items = rows
            .iter()
            .map(|r| ItemRecord {
                sku: r.get(0),
                quantity: r.get(1),
                unit_price_cents: r.get(2),
            })
            .collect();
        Ok(())
    }

    async fn select_order<C: GenericClient>(
        &self,
        client: &C,
        column: &str,
        value: &str,
    ) -> Result<Option<OrderRecord>, StoreError> {
        let select = self
            .stmt(
                client,
                &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE {column} = $1"),
            )
            .await?;
        let row = client
            .query_opt(&select, &[&value])
            .await
            .map_err(|e| self.failed(e))?;
        match row {
            Some(row) => {
                let mut order = order_from_row(&row);
                self.load_items(client, &mut order).await?;
                Ok(Some(order))
            }
            None => Ok(None),
        }
    }

    /// The order an earlier request with this key made, if the request was
    /// the same; a different request with the key is refused.
    async fn existing_for_key<C: GenericClient>(
        &self,
        client: &C,
        key: &str,
        order: &NewOrder,
    ) -> Result<Option<Created>, StoreError> {
        let Some(existing) = self.select_order(client, "idempotency_key", key).await? else {
            return Ok(None);
        };
        let row = client
            .query_one(
                "SELECT request_hash FROM orders WHERE id = $1",
                &[&existing.id],
            )
            .await
            .map_err(|e| self.failed(e))?;
        let hash: String = row.get(0);
        let same =
            hash == order.request_hash || order.legacy_hash.as_deref() == Some(hash.as_str());
        if same {
            Ok(Some(Created::Existing(existing)))
        } else {
            Err(StoreError::KeyReused(key.to_owned()))
        }
    }

    /// The PostgreSQL side of `OrderStore::create_with_id`.
    pub async fn create_with_id(
        &self,
        order: NewOrder,
        settle_at_ms: i64,
        id: String,
    ) -> Result<Created, StoreError> {
        let mut client = self.client().await?;
        if let Some(key) = &order.idempotency_key
            && let Some(found) = self.existing_for_key(&client, key, &order).await?
        {
            return Ok(found);
        }
        let now = minimesh_runtime::now_millis();
        let tx = client.transaction().await.map_err(|e| self.failed(e))?;
        // The key's unique index decides a race: the loser's insert waits
        // for the winner's commit, inserts nothing, and reads the winner's row.
        let insert = self
            .stmt(
                &tx,
                "INSERT INTO orders (id, user_id, total_cents, currency, status, status_reason,
                    payment_id, idempotency_key, request_hash, created_at_ms, updated_at_ms, retry_at_ms)
                 VALUES ($1, $2, $3, $4, $5, '', '', $6, $7, $8, $8, $9)
                 ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .await?;
        let inserted = tx
            .execute(
                &insert,
                &[
                    &id,
                    &order.user_id,
                    &order.total_cents,
                    &order.currency,
                    &status::PENDING,
                    &order.idempotency_key,
                    &order.request_hash,
                    &now,
                    &settle_at_ms,
                ],
            )
            .await
            .map_err(|e| self.failed(e))?;
        if inserted == 0 {
            drop(tx);
            let key = order.idempotency_key.clone().unwrap_or_default();
            return match self.existing_for_key(&client, &key, &order).await? {
                Some(found) => Ok(found),
                None => Err(StoreError::Db(DbError::Task(format!(
                    "order for key {key:?} vanished"
                )))),
            };
        }
        let item = self
            .stmt(
                &tx,
                "INSERT INTO order_items (order_id, position, sku, quantity, unit_price_cents)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await?;
        for (position, line) in order.items.iter().enumerate() {
            tx.execute(
                &item,
                &[
                    &id,
                    &(position as i32),
                    &line.sku,
                    &line.quantity,
                    &line.unit_price_cents,
                ],
            )
            .await
            .map_err(|e| self.failed(e))?;
        }
        // Last: the event lock, the creation event and the order's place in
        // commit order, then commit.
        self.lock_events(&tx).await?;
        let seq = self
            .append_event(&tx, &id, status::PENDING, "", now)
            .await?;
        let set_seq = self
            .stmt(&tx, "UPDATE orders SET seq = $2 WHERE id = $1")
            .await?;
        tx.execute(&set_seq, &[&id, &seq])
            .await
            .map_err(|e| self.failed(e))?;
        self.commit(tx).await?;
        Ok(Created::New(OrderRecord {
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
        }))
    }

    /// The PostgreSQL side of `OrderStore::transition`.
    pub async fn transition(
        &self,
        id: String,
        transition: Transition,
    ) -> Result<Option<(OrderRecord, bool)>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.failed(e))?;
        let now = minimesh_runtime::now_millis();
        let moved = self.move_order(&tx, &id, &transition, now).await?;
        let order = self.select_order(&tx, "id", &id).await?;
        if moved {
            self.lock_events(&tx).await?;
            self.append_event(&tx, &id, transition.to, &transition.reason, now)
                .await?;
        }
        self.commit(tx).await?;
        Ok(order.map(|order| (order, moved)))
    }

    /// The PostgreSQL side of `OrderStore::get`.
    pub async fn get(&self, id: String) -> Result<Option<OrderRecord>, StoreError> {
        let client = self.client().await?;
        self.select_order(&client, "id", &id).await
    }

    /// The PostgreSQL side of `OrderStore::list`.
    pub async fn list(
        &self,
        user_id: Option<String>,
        after: Cursor,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        let client = self.client().await?;
        let after_seq = match after {
            Cursor::Start => 0,
            Cursor::Seq(seq) => seq,
            Cursor::LegacyId(id) => client
                .query_opt("SELECT seq FROM orders WHERE id = $1", &[&id])
                .await
                .map_err(|e| self.failed(e))?
                .and_then(|r| r.get::<_, Option<i64>>(0))
                .unwrap_or(0),
        };
        let rows = client
            .query(
                &format!(
                    "SELECT {ORDER_COLUMNS} FROM orders
                     WHERE seq > $1 AND ($2::text IS NULL OR user_id = $2) ORDER BY seq LIMIT $3"
                ),
                &[&after_seq, &user_id, &i64::from(limit)],
            )
            .await
            .map_err(|e| self.failed(e))?;
        let mut orders: Vec<OrderRecord> = rows.iter().map(order_from_row).collect();
        for order in &mut orders {
            self.load_items(&client, order).await?;
        }
        Ok(orders)
    }

    /// The PostgreSQL side of `OrderStore::latest_event`.
    pub async fn latest_event(&self, order_id: String) -> Result<Option<EventRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM order_events WHERE order_id = $1
                     ORDER BY seq DESC LIMIT 1"
                ),
                &[&order_id],
            )
            .await
            .map_err(|e| self.failed(e))?;
        Ok(row.as_ref().map(event_from_row))
    }

    /// The PostgreSQL side of `OrderStore::events_after`.
    pub async fn events_after(
        &self,
        seq: i64,
        order_id: Option<String>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM order_events
                     WHERE seq > $1 AND ($2::text IS NULL OR order_id = $2) ORDER BY seq LIMIT $3"
                ),
                &[&seq, &order_id, &i64::from(limit)],
            )
            .await
            .map_err(|e| self.failed(e))?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    /// The PostgreSQL side of `OrderStore::last_seq`.
    pub async fn last_seq(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(seq), 0) FROM order_events", &[])
            .await
            .map_err(|e| self.failed(e))?;
        Ok(row.get(0))
    }

    /// The PostgreSQL side of `OrderStore::advance_due`.
    pub async fn advance_due(
        &self,
        now_ms: i64,
        step_ms: i64,
        batch: u32,
    ) -> Result<Vec<i32>, StoreError> {
        let mut client = self.client().await?;
        // Look before taking the event lock: most ticks find nothing due.
        let any = client
            .query_opt(
                "SELECT 1 FROM orders WHERE next_step_at_ms IS NOT NULL AND next_step_at_ms <= $1 LIMIT 1",
                &[&now_ms],
            )
            .await
            .map_err(|e| self.failed(e))?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let tx = client.transaction().await.map_err(|e| self.failed(e))?;
        let due = tx
            .query(
                "SELECT id, status FROM orders WHERE next_step_at_ms IS NOT NULL
                   AND next_step_at_ms <= $1 ORDER BY next_step_at_ms LIMIT $2
                   FOR UPDATE SKIP LOCKED",
                &[&now_ms, &i64::from(batch)],
            )
            .await
            .map_err(|e| self.failed(e))?;
        let mut moved = Vec::new();
        let mut events = Vec::new();
        for row in due {
            let id: String = row.get(0);
            let from: i32 = row.get(1);
            let (to, next) = match from {
                status::PAID => (status::SHIPPED, Some(now_ms + step_ms)),
                status::SHIPPED => (status::DELIVERED, None),
                _ => {
                    // Not in fulfilment any more (e.g. cancelled): stop scheduling it.
                    tx.execute(
                        "UPDATE orders SET next_step_at_ms = NULL WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(|e| self.failed(e))?;
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
            if self.move_order(&tx, &id, &t, now_ms).await? {
                moved.push(to);
                events.push((id, to));
            }
        }
        if !events.is_empty() {
            self.lock_events(&tx).await?;
            for (id, to) in &events {
                self.append_event(&tx, id, *to, "", now_ms).await?;
            }
        }
        self.commit(tx).await?;
        Ok(moved)
    }

    /// The PostgreSQL side of `OrderStore::claim_due`.
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
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.failed(e))?;
        // The new due time is Schedule::next_due, computed per row from its
        // attempts (the same doubling, capped).
        let rows = tx
            .query(
                &format!(
                    "UPDATE orders SET attempts = attempts + 1,
                        retry_at_ms = $1::bigint + $3::bigint
                          + LEAST($4::bigint * (1::bigint << LEAST(attempts, 20)), $5::bigint)
                     WHERE id IN (
                         SELECT id FROM orders
                         WHERE retry_at_ms IS NOT NULL AND retry_at_ms <= $1 AND {filter}
                         ORDER BY retry_at_ms LIMIT $2
                         FOR UPDATE SKIP LOCKED)
                     RETURNING id, attempts - 1"
                ),
                &[
                    &now_ms,
                    &i64::from(limit),
                    &schedule.lease_ms,
                    &schedule.backoff_ms,
                    &schedule.max_backoff_ms,
                ],
            )
            .await
            .map_err(|e| self.failed(e))?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get(0);
            let attempts: i32 = row.get(1);
            if let Some(order) = self.select_order(&tx, "id", &id).await? {
                claimed.push(Claimed {
                    order,
                    attempts: attempts.max(0) as u32,
                });
            }
        }
        self.commit(tx).await?;
        Ok(claimed)
    }

    /// The PostgreSQL side of `OrderStore::reschedule`.
    pub async fn reschedule(&self, id: String, work: Work, at_ms: i64) -> Result<(), StoreError> {
        let filter = match work {
            Work::Settle => "status = 1",
            Work::Compensate => "status = 5 AND refund_pending = 1",
        };
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "UPDATE orders SET retry_at_ms = $1
                     WHERE id = $2 AND retry_at_ms IS NOT NULL AND {filter}"
                ),
                &[&at_ms, &id],
            )
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// The PostgreSQL side of `OrderStore::record_payment`.
    pub async fn record_payment(
        &self,
        id: String,
        payment_id: String,
        captured: bool,
    ) -> Result<Option<OrderRecord>, StoreError> {
        let client = self.client().await?;
        let now = minimesh_runtime::now_millis();
        client
            .execute(
                "UPDATE orders SET payment_id = $2, refund_pending = $3,
                    retry_at_ms = CASE WHEN $3 = 1 THEN COALESCE(retry_at_ms, $4) ELSE NULL END
                 WHERE id = $1 AND status = $5 AND refund_pending = 1 AND payment_id = ''",
                &[
                    &id,
                    &payment_id,
                    &(captured as i32),
                    &now,
                    &status::CANCELLED,
                ],
            )
            .await
            .map_err(|e| self.failed(e))?;
        self.select_order(&client, "id", &id).await
    }

    /// The PostgreSQL side of `OrderStore::refund_done`.
    pub async fn refund_done(&self, order_id: String) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE orders SET refund_pending = 0, retry_at_ms = NULL WHERE id = $1",
                &[&order_id],
            )
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// The PostgreSQL side of `OrderStore::facts`.
    pub async fn facts(&self) -> Result<Vec<OrderFacts>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, status, payment_id, total_cents, refund_pending, updated_at_ms FROM orders",
                &[],
            )
            .await
            .map_err(|e| self.failed(e))?;
        Ok(rows
            .iter()
            .map(|r| OrderFacts {
                id: r.get(0),
                status: r.get(1),
                payment_id: r.get(2),
                total_cents: r.get(3),
                refund_pending: r.get::<_, i32>(4) != 0,
                updated_at_ms: r.get(5),
            })
            .collect())
    }
}
