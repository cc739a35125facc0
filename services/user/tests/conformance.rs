//! One suite for every user store: the same operations, errors, races and
//! pages against SQLite and PostgreSQL.

use minimesh_testpg::PgServer;
use minimesh_user::{PgUserStore, SqliteUserStore, StoreError, UserStore};
use std::collections::HashSet;

async fn every_operation_and_error(store: impl UserStore + Clone) {
    let ada = store
        .create("ada@example.com".into(), "Ada".into())
        .await
        .unwrap();
    assert!(ada.id.starts_with("usr_"));
    assert_eq!(store.get(ada.id.clone()).await.unwrap(), Some(ada.clone()));
    assert_eq!(store.get("usr_missing".into()).await.unwrap(), None);
    match store.create("ada@example.com".into(), "Other".into()).await {
        Err(StoreError::EmailTaken(email)) => assert_eq!(email, "ada@example.com"),
        other => panic!("a second user with one email: {other:?}"),
    }
    // The refused insert left nothing behind.
    assert_eq!(store.list(None, 10).await.unwrap(), vec![ada]);
}

async fn one_email_race_has_one_winner(store: impl UserStore + Clone) {
    let attempts: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create("race@example.com".into(), format!("r{i}"))
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => created += 1,
            Err(StoreError::EmailTaken(_)) => {}
            Err(other) => panic!("unexpected error in a race: {other}"),
        }
    }
    assert_eq!(created, 1);
}

async fn pages_cover_every_user_once(store: impl UserStore + Clone) {
    let mut made = HashSet::new();
    for i in 0..23 {
        made.insert(
            store
                .create(format!("p{i}@example.com"), format!("P{i}"))
                .await
                .unwrap()
                .id,
        );
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(after.clone(), 5).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 5);
        after = page.last().map(|u| u.id.clone());
        seen.extend(page.into_iter().map(|u| u.id));
    }
    assert_eq!(seen.len(), 23, "no user twice");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), made);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages follow id order");
}

fn sqlite() -> (tempfile::TempDir, SqliteUserStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteUserStore::open(&dir.path().join("user.db")).unwrap();
    (dir, store)
}

async fn postgres(server: &PgServer, db: &str) -> PgUserStore {
    let url = server.create_database(db);
    PgUserStore::connect(&url, "minimesh_user").await.unwrap()
}

#[tokio::test]
async fn sqlite_conforms() {
    let (_dir, store) = sqlite();
    every_operation_and_error(store).await;
    let (_dir, store) = sqlite();
    one_email_race_has_one_winner(store).await;
    let (_dir, store) = sqlite();
    pages_cover_every_user_once(store).await;
}

#[tokio::test]
async fn postgres_conforms() {
    let Some(server) = PgServer::start() else {
        return;
    };
    every_operation_and_error(postgres(&server, "ops").await).await;
    one_email_race_has_one_winner(postgres(&server, "race").await).await;
    pages_cover_every_user_once(postgres(&server, "pages").await).await;
}

#[tokio::test]
async fn postgres_replicas_share_one_store() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.create_database("shared");
    // Two processes' worth of stores starting together: migrations take turns.
    let (a, b) = tokio::join!(
        PgUserStore::connect(&url, "minimesh_user"),
        PgUserStore::connect(&url, "minimesh_user")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let user = a.create("x@example.com".into(), "X".into()).await.unwrap();
    assert_eq!(b.get(user.id.clone()).await.unwrap(), Some(user));
    assert!(matches!(
        b.create("x@example.com".into(), "Y".into()).await,
        Err(StoreError::EmailTaken(_))
    ));
}

#[tokio::test]
async fn postgres_down_is_store_down_and_recovers() {
    let Some(mut server) = PgServer::start() else {
        return;
    };
    let url = server.create_database("faults");
    let store = PgUserStore::connect(&url, "minimesh_user").await.unwrap();
    let user = store
        .create("f@example.com".into(), "F".into())
        .await
        .unwrap();
    server.stop();
    match store.get(user.id.clone()).await {
        Err(StoreError::Db(err)) => assert!(err.is_store_down(), "{err}"),
        other => panic!("a call with the server stopped: {other:?}"),
    }
    server.restart();
    assert_eq!(store.get(user.id.clone()).await.unwrap(), Some(user));
}
