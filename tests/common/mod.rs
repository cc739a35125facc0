//! Shared test helpers: the three services started in-process on ephemeral
//! loopback ports, each with its own SQLite file in a temporary directory.
#![allow(dead_code)]

pub(crate) mod backend;
pub(crate) mod collector;
pub(crate) mod process;
pub(crate) mod shop;

use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{CreateOrderRequest, Order, OrderItem};
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_proto::user::v1::{CreateUserRequest, User};
use minimesh_testsupport::loopback_listener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub(crate) struct Shop {
    pub user_url: String,
    pub payment_url: String,
    pub order_url: String,
    pub dir: tempfile::TempDir,
    stops: Vec<oneshot::Sender<()>>,
}

impl Drop for Shop {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

fn stopper(stops: &mut Vec<oneshot::Sender<()>>) -> impl Future<Output = ()> + Send + 'static {
    let (tx, rx) = oneshot::channel();
    stops.push(tx);
    async move {
        let _ = rx.await;
    }
}

/// Starts user, payment and order with the given fulfilment step.
/// The listeners are bound before this returns, so clients can connect at once.
pub(crate) async fn start_shop(step: Duration) -> Shop {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stops = Vec::new();
    let (user_listener, user_url) = loopback_listener().await.expect("bind loopback");
    let (payment_listener, payment_url) = loopback_listener().await.expect("bind loopback");
    let (order_listener, order_url) = loopback_listener().await.expect("bind loopback");
    let db = |name: &str| {
        minimesh_runtime::store::DbTarget::Sqlite(dir.path().join(format!("{name}.db")))
    };

    let user = minimesh_user::UserConfig {
        listen: String::new(),
        db: db("user"),
        db_schema: "minimesh_user".into(),
        metrics_listen: None,
    };
    tokio::spawn(minimesh_user::serve(
        user_listener,
        user,
        stopper(&mut stops),
    ));
    let payment = minimesh_payment::PaymentConfig {
        listen: String::new(),
        db: db("payment"),
        db_schema: "minimesh_payment".into(),
        metrics_listen: None,
        charge_limit_cents: 100_000,
        debug_delay: None,
    };
    tokio::spawn(minimesh_payment::serve(
        payment_listener,
        payment,
        stopper(&mut stops),
    ));
    let order = minimesh_order::OrderConfig {
        listen: String::new(),
        db: db("order"),
        db_schema: "minimesh_order".into(),
        metrics_listen: None,
        user_addr: user_url.clone(),
        payment_addr: payment_url.clone(),
        fulfilment_step: step,
        upstream_timeout: Duration::from_secs(5),
    };
    tokio::spawn(minimesh_order::serve(
        order_listener,
        order,
        stopper(&mut stops),
    ));
    Shop {
        user_url,
        payment_url,
        order_url,
        dir,
        stops,
    }
}

impl Shop {
    pub(crate) async fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::connect(self.user_url.clone())
            .await
            .expect("connect user")
    }
    pub(crate) async fn payments(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::connect(self.payment_url.clone())
            .await
            .expect("connect payment")
    }
    pub(crate) async fn orders(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::connect(self.order_url.clone())
            .await
            .expect("connect order")
    }
    pub(crate) fn payment_db(&self) -> PathBuf {
        self.dir.path().join("payment.db")
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

pub(crate) async fn new_user(users: &mut UserServiceClient<Channel>) -> User {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    users
        .create_user(CreateUserRequest {
            email: format!("buyer{n}-{}@example.com", std::process::id()),
            display_name: format!("Buyer {n}"),
        })
        .await
        .expect("create user")
        .into_inner()
}

pub(crate) fn item(sku: &str, quantity: i32, unit_price_cents: i64) -> OrderItem {
    OrderItem {
        sku: sku.into(),
        quantity,
        unit_price_cents,
    }
}

pub(crate) fn order_request(user_id: &str, items: Vec<OrderItem>) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user_id.into(),
        items,
        currency: "EUR".into(),
        idempotency_key: String::new(),
    }
}

pub(crate) async fn place_order(orders: &mut OrderServiceClient<Channel>, user_id: &str) -> Order {
    orders
        .create_order(order_request(
            user_id,
            vec![item("book", 2, 1250), item("pen", 1, 300)],
        ))
        .await
        .expect("create order")
        .into_inner()
}

/// Payments stored for an order, read from the payment database itself.
pub(crate) fn payments_for_order(db: &std::path::Path, order_id: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open payment db");
    conn.query_row(
        "SELECT count(*) FROM payments WHERE order_id = ?1",
        [order_id],
        |r| r.get(0),
    )
    .expect("count payments")
}
