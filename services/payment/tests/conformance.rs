//! One suite for every payment store: the same operations, errors and
//! idempotency races against SQLite and PostgreSQL.

use minimesh_payment::store::{CAPTURED, DECLINED, REFUNDED};
use minimesh_payment::{NewCharge, PaymentStore, PgPaymentStore, SqlitePaymentStore, StoreError};
use minimesh_testpg::PgServer;

fn charge(key: Option<&str>, amount: i64) -> NewCharge {
    NewCharge {
        order_id: "ord_1".into(),
        user_id: "usr_1".into(),
        amount_cents: amount,
        currency: "EUR".into(),
        idempotency_key: key.map(str::to_owned),
        decline_reason: None,
    }
}

async fn every_operation_and_error(store: impl PaymentStore + Clone) {
    let (paid, created) = store.charge(charge(Some("k1"), 500)).await.unwrap();
    assert!(created);
    assert_eq!(paid.status, CAPTURED);
    let (again, created_again) = store.charge(charge(Some("k1"), 500)).await.unwrap();
    assert!(!created_again);
    assert_eq!(again, paid);
    assert!(matches!(
        store.charge(charge(Some("k1"), 501)).await,
        Err(StoreError::KeyReused(key)) if key == "k1"
    ));
    // Charges without a key are each their own payment.
    let (a, _) = store.charge(charge(None, 500)).await.unwrap();
    let (b, _) = store.charge(charge(None, 500)).await.unwrap();
    assert_ne!(a.id, b.id);
    let mut declined = charge(Some("k2"), 900);
    declined.decline_reason = Some("over the limit".into());
    let (declined, _) = store.charge(declined).await.unwrap();
    assert_eq!(declined.status, DECLINED);
    assert_eq!(declined.decline_reason, "over the limit");

    assert_eq!(
        store.get(paid.id.clone()).await.unwrap(),
        Some(paid.clone())
    );
    assert_eq!(store.get("pay_missing".into()).await.unwrap(), None);
    let refunded = store.refund(paid.id.clone()).await.unwrap();
    assert_eq!(refunded.status, REFUNDED);
    assert_eq!(
        store.refund(paid.id.clone()).await.unwrap().status,
        REFUNDED,
        "twice is a no-op"
    );
    assert!(matches!(
        store.refund(declined.id.clone()).await,
        Err(StoreError::NotRefundable(_))
    ));
    assert!(matches!(
        store.refund("pay_missing".into()).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.all().await.unwrap().len(),
        4,
        "the refused charge stored nothing"
    );
}

/// Many callers (replicas, in the PostgreSQL case) charging one key at once.
async fn one_key_race_charges_once(stores: Vec<impl PaymentStore + Clone>) {
    let attempts: Vec<_> = (0..20)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            tokio::spawn(async move { store.charge(charge(Some("race"), 700)).await })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for attempt in attempts {
        let (payment, was_created) = attempt
            .await
            .unwrap()
            .expect("every racer gets the payment");
        ids.insert(payment.id);
        created += usize::from(was_created);
    }
    assert_eq!(ids.len(), 1, "one payment");
    assert_eq!(created, 1, "created once");
    assert_eq!(stores[0].all().await.unwrap().len(), 1);
}

async fn refunds_race_to_one_refund(store: impl PaymentStore + Clone) {
    let (paid, _) = store.charge(charge(Some("r"), 300)).await.unwrap();
    let refunds: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let id = paid.id.clone();
            tokio::spawn(async move { store.refund(id).await })
        })
        .collect();
    for refund in refunds {
        assert_eq!(refund.await.unwrap().unwrap().status, REFUNDED);
    }
}

fn sqlite() -> (tempfile::TempDir, SqlitePaymentStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlitePaymentStore::open(&dir.path().join("payment.db")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn sqlite_conforms() {
    let (_dir, store) = sqlite();
    every_operation_and_error(store).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payment.db");
    // Three "replicas": three connections to one file.
    let replicas: Vec<_> = (0..3)
        .map(|_| SqlitePaymentStore::open(&path).unwrap())
        .collect();
    one_key_race_charges_once(replicas).await;
    let (_dir, store) = sqlite();
    refunds_race_to_one_refund(store).await;
}

#[tokio::test]
async fn postgres_conforms() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.create_database("ops");
    every_operation_and_error(
        PgPaymentStore::connect(&url, "minimesh_payment")
            .await
            .unwrap(),
    )
    .await;
    let url = server.create_database("race");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(
            PgPaymentStore::connect(&url, "minimesh_payment")
                .await
                .unwrap(),
        );
    }
    one_key_race_charges_once(replicas).await;
    let url = server.create_database("refunds");
    refunds_race_to_one_refund(
        PgPaymentStore::connect(&url, "minimesh_payment")
            .await
            .unwrap(),
    )
    .await;
}
