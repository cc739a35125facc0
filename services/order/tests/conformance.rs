//! One suite for every order store: each operation, error, idempotency race,
//! fulfilment and saga claim, and commit-ordered paging, against SQLite and
//! PostgreSQL. Where a test needs two replicas it opens two handles on one
//! database.

use minimesh_order::store::{
    Created, Cursor, ItemRecord, NewOrder, OrderRecord, Schedule, Transition, Work, status,
};
use minimesh_order::{OrderStore, StoreError};
use minimesh_runtime::store::DbTarget;
use minimesh_testpg::PgServer;

/// One fresh database per test.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Backend {
    fn sqlite() -> Self {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    async fn handle(&self) -> OrderStore {
        let target = match self {
            Backend::Sqlite(dir) => DbTarget::Sqlite(dir.path().join("order.db")),
            Backend::Postgres(url) => DbTarget::Postgres(url.clone()),
        };
        OrderStore::open_target(&target, "minimesh_order")
            .await
            .unwrap()
    }
}

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
        legacy_hash: None,
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
        retry_at_ms: None,
    }
}

async fn idempotency_key_returns_existing_or_refuses_other_content(db: &Backend) {
    let store = db.handle().await;
    let Created::New(first) = store
        .create_pending(new_order(Some("k"), "h1"), 0)
        .await
        .unwrap()
    else {
        panic!("first create must be new");
    };
    let Created::Existing(again) = store
        .create_pending(new_order(Some("k"), "h1"), 0)
        .await
        .unwrap()
    else {
        panic!("second create must find the first");
    };
    assert_eq!(first, again);
    assert!(matches!(
        store.create_pending(new_order(Some("k"), "h2"), 0).await,
        Err(StoreError::KeyReused(_))
    ));
}

async fn transitions_are_compare_and_set_and_logged(db: &Backend) {
    let store = db.handle().await;
    let Created::New(order) = store.create_pending(new_order(None, "h"), 0).await.unwrap() else {
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

async fn page(store: &OrderStore, after: Cursor) -> Vec<OrderRecord> {
    store.list(None, after, 100).await.unwrap()
}

/// Issue 14, point 5: ids (UUIDv7) from two replicas are ordered only to
/// the millisecond, so an order committed later can have a smaller id.
/// The cursor follows commit order, so a reader never skips it.
async fn paging_follows_commit_order_not_id_order(db: &Backend) {
    // Two handles on one database, as two replicas have.
    let (one, two) = (db.handle().await, db.handle().await);
    one.create_with_id(new_order(None, "h"), 0, "ord_b".into())
        .await
        .unwrap();
    let first = page(&one, Cursor::Start).await;
    assert_eq!(first.len(), 1);
    let cursor = Cursor::Seq(first[0].seq);
    // Committed after the page was read, with an id sorting before it.
    two.create_with_id(new_order(None, "h"), 0, "ord_a".into())
        .await
        .unwrap();
    let next: Vec<String> = page(&one, cursor).await.into_iter().map(|o| o.id).collect();
    assert_eq!(next, ["ord_a"]);
    // A token from before this version (an id) resumes after that order.
    let legacy: Vec<String> = page(&one, Cursor::LegacyId("ord_b".into()))
        .await
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(legacy, ["ord_a"]);
}

async fn owed_work_is_claimed_once_and_comes_back_after_the_lease(db: &Backend) {
    let store = db.handle().await;
    let Created::New(order) = store
        .create_pending(new_order(None, "h"), 100)
        .await
        .unwrap()
    else {
        panic!("new");
    };
    let schedule = Schedule {
        lease_ms: 1_000,
        backoff_ms: 10,
        max_backoff_ms: 50,
    };
    assert!(
        store
            .claim_due(Work::Settle, 99, schedule, 10)
            .await
            .unwrap()
            .is_empty(),
        "not due before settle_at"
    );
    let claimed = store
        .claim_due(Work::Settle, 100, schedule, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].order.id.as_str(), claimed[0].attempts),
        (order.id.as_str(), 0)
    );
    assert!(
        store
            .claim_due(Work::Settle, 200, schedule, 10)
            .await
            .unwrap()
            .is_empty(),
        "claimed: another replica must not take it"
    );
    assert!(
        store
            .claim_due(Work::Compensate, 5_000, schedule, 10)
            .await
            .unwrap()
            .is_empty(),
        "a PENDING order owes no compensation"
    );
    let again = store
        .claim_due(Work::Settle, 100 + 1_000 + 10, schedule, 10)
        .await
        .unwrap();
    assert_eq!(
        again[0].attempts, 1,
        "the claimer died: due again after the lease"
    );
}

async fn a_charge_landing_on_a_cancelled_order_stays_owed_until_refunded(db: &Backend) {
    let store = db.handle().await;
    let Created::New(order) = store.create_pending(new_order(None, "h"), 0).await.unwrap() else {
        panic!("new");
    };
    let cancel = Transition {
        from: status::PENDING,
        to: status::CANCELLED,
        reason: "cancelled by the customer".into(),
        payment_id: None,
        next_step_at_ms: None,
        refund_pending: true,
        retry_at_ms: Some(10),
    };
    store.transition(order.id.clone(), cancel).await.unwrap();
    let schedule = Schedule {
        lease_ms: 1_000_000,
        backoff_ms: 10,
        max_backoff_ms: 50,
    };
    // Claimed by compensation; meanwhile the charge lands and is recorded.
    assert_eq!(
        store
            .claim_due(Work::Compensate, 10, schedule, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let recorded = store
        .record_payment(order.id.clone(), "pay_1".into(), true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recorded.payment_id, "pay_1");
    let owed = store
        .claim_due(Work::Compensate, 10 + 1_000_000 + 10, schedule, 10)
        .await
        .unwrap();
    // The claimer died before refunding: the refund comes due after the lease.
    assert_eq!(owed.len(), 1, "the refund is still owed");
    assert_eq!(owed[0].order.payment_id, "pay_1");
    store.refund_done(order.id.clone()).await.unwrap();
    assert!(
        store
            .claim_due(Work::Compensate, i64::MAX / 2, schedule, 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing owed once refunded"
    );
    assert!(!store.facts().await.unwrap()[0].refund_pending);
}

/// Twenty callers on two replicas with one key: one order, the same to all.
async fn one_key_race_creates_one_order(db: &Backend) {
    let handles = [db.handle().await, db.handle().await];
    let racers: Vec<_> = (0..20)
        .map(|i| {
            let store = handles[i % 2].clone();
            tokio::spawn(async move { store.create_pending(new_order(Some("race"), "h"), 0).await })
        })
        .collect();
    let (mut new, mut ids) = (0, std::collections::HashSet::new());
    for racer in racers {
        match racer.await.unwrap().expect("every racer gets the order") {
            Created::New(order) => {
                new += 1;
                ids.insert(order.id);
            }
            Created::Existing(order) => {
                ids.insert(order.id);
            }
        }
    }
    assert_eq!((new, ids.len()), (1, 1));
    assert_eq!(
        handles[0]
            .list(None, Cursor::Start, 100)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A change made through one replica is in the other's feed, in order.
async fn one_replicas_events_reach_the_other(db: &Backend) {
    let (one, two) = (db.handle().await, db.handle().await);
    let start = two.last_seq().await.unwrap();
    let Created::New(order) = one.create_pending(new_order(None, "h"), 0).await.unwrap() else {
        panic!("new");
    };
    one.transition(order.id.clone(), paid("pay_1", 0))
        .await
        .unwrap();
    let seen: Vec<(String, i32)> = two
        .events_after(start, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.order_id, e.status))
        .collect();
    assert_eq!(
        seen,
        [
            (order.id.clone(), status::PENDING),
            (order.id, status::PAID)
        ]
    );
}

async fn pages_of_one_user(db: &Backend) {
    let store = db.handle().await;
    for i in 0..7 {
        let mut order = new_order(None, "h");
        order.user_id = if i % 2 == 0 {
            "usr_even".into()
        } else {
            "usr_odd".into()
        };
        store.create_pending(order, 0).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor = Cursor::Start;
    loop {
        let page = store
            .list(Some("usr_even".into()), cursor, 2)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Cursor::Seq(last.seq);
        assert!(
            page.iter()
                .all(|o| o.user_id == "usr_even" && o.items.len() == 1)
        );
        seen.extend(page.into_iter().map(|o| o.id));
    }
    assert_eq!(seen.len(), 4, "every order of the user, once");
    assert_eq!(store.get("ord_missing".into()).await.unwrap(), None);
}

async fn every_case(db: impl Fn(&str) -> Backend) {
    idempotency_key_returns_existing_or_refuses_other_content(&db("idempotency")).await;
    transitions_are_compare_and_set_and_logged(&db("transitions")).await;
    paging_follows_commit_order_not_id_order(&db("paging")).await;
    owed_work_is_claimed_once_and_comes_back_after_the_lease(&db("claims")).await;
    a_charge_landing_on_a_cancelled_order_stays_owed_until_refunded(&db("compensate")).await;
    one_key_race_creates_one_order(&db("race")).await;
    one_replicas_events_reach_the_other(&db("feed")).await;
    pages_of_one_user(&db("pages")).await;
}

#[tokio::test]
async fn sqlite_conforms() {
    every_case(|_| Backend::sqlite()).await;
}

#[tokio::test]
async fn postgres_conforms() {
    let Some(server) = PgServer::start() else {
        return;
    };
    every_case(|name| Backend::Postgres(server.create_database(name))).await;
}

#[tokio::test]
async fn postgres_notifies_other_replicas() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let db = Backend::Postgres(server.create_database("notify"));
    let (one, two) = (db.handle().await, db.handle().await);
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let _listening = two
        .listen(wake.clone())
        .unwrap()
        .expect("PostgreSQL listens");
    // The first wake-up comes when LISTEN is in place.
    tokio::time::timeout(std::time::Duration::from_secs(10), wake.notified())
        .await
        .unwrap();
    one.create_pending(new_order(None, "h"), 0).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), wake.notified())
        .await
        .expect("a commit on one replica wakes the other");
}
