//! The order saga under partial failure (issue 14), through real `minimesh
//! up` processes: payment processes are paused (SIGSTOP), resumed and killed
//! while orders are placed and cancelled, and `minimesh reconcile` then
//! checks that no money is kept without an order and no order without its
//! money. The chaos run goes on SQLite and on PostgreSQL.

mod common;

use common::backend::Backend;
use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{
    CancelOrderRequest, CreateOrderRequest, ListOrdersRequest, Order, OrderStatus,
    WatchOrderRequest,
};
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Short upstream deadline, so a hung payment costs a call about a second.
const UPSTREAM_TIMEOUT: &str = "1s";

async fn start(backend: &Backend, dir: &Path, extra: &[&str]) -> Mesh {
    start_with_timeout(backend, dir, extra, UPSTREAM_TIMEOUT).await
}

async fn start_with_timeout(
    backend: &Backend,
    dir: &Path,
    extra: &[&str],
    upstream_timeout: &str,
) -> Mesh {
    backend
        .start_mesh(
            dir,
            extra,
            &[("MINIMESH_UPSTREAM_TIMEOUT", upstream_timeout)],
        )
        .await
}

/// Payment processes stopped with SIGSTOP; every one still stopped is
/// continued on drop, so a failing test leaves no frozen process behind
/// (a stopped child would not act on its parent-death signal).
#[derive(Default, Clone)]
struct Paused(Arc<Mutex<BTreeSet<i32>>>);

/// A real process id: mesh.json says 0 for a child being restarted, and
/// signalling 0 (or -1) would hit the whole process group (this test too).
fn real_pid(pid: i64) -> i32 {
    let pid = i32::try_from(pid).unwrap_or(0);
    assert!(pid > 1, "not a process id: {pid}");
    pid
}

/// Whether `pid` is (still) a payment service process. mesh.json may name
/// a process that just died, and pids are reused soon (pid_max is often
/// 32768), even as thread ids of other processes; a signal to a thread id
/// hits its whole process. Checked right before each signal.
fn is_payment_process(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let own_process = status
        .lines()
        .any(|l| l.strip_prefix("Tgid:").map(str::trim) == Some(&pid.to_string()));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    own_process
        && cmdline
            .windows(b"service\0payment".len())
            .any(|w| w == b"service\0payment")
}

impl Paused {
    /// Stops a payment process; false if `pid` is not one (any more).
    fn pause(&self, pid: i64) -> bool {
        let pid = real_pid(pid);
        let stopped = is_payment_process(pid) && kill(Pid::from_raw(pid), Signal::SIGSTOP).is_ok();
        if stopped {
            self.0.lock().unwrap().insert(pid);
        }
        stopped
    }
    fn resume(&self, pid: i64) {
        let pid = real_pid(pid);
        if self.0.lock().unwrap().remove(&pid) && is_payment_process(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }
    /// The process is gone: nothing to resume.
    fn forget(&self, pid: i64) {
        self.0.lock().unwrap().remove(&real_pid(pid));
    }

    fn resume_all(&self) {
        let pids: Vec<i32> = self.0.lock().unwrap().iter().copied().collect();
        for pid in pids {
            self.resume(i64::from(pid));
        }
    }
    fn is_paused(&self, pid: i64) -> bool {
        self.0.lock().unwrap().contains(&(pid as i32))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) == 1 {
            self.resume_all();
        }
    }
}

/// Pids of the running payment processes (one being restarted is left out).
fn payment_pids(mesh: &Mesh) -> Vec<i64> {
    mesh.instances("payment")
        .iter()
        .filter_map(|i| i["pid"].as_i64())
        .filter(|pid| *pid > 1)
        .collect()
}

/// Statuses of the payments of one order, from the payment store.
async fn payments_of(backend: &Backend, dir: &Path, order_id: &str) -> Vec<i64> {
    backend
        .column_i64(
            dir,
            "payment",
            "SELECT status FROM payments WHERE order_id = $1",
            &[order_id],
        )
        .await
}

const CAPTURED: i64 = 1;
const REFUNDED: i64 = 3;

/// Every event of an order until its stream ends: (status, at in ms).
async fn watch_to_end(orders: &mut OrderServiceClient<Channel>, id: &str) -> Vec<(i32, i64)> {
    let mut stream = orders
        .watch_order(WatchOrderRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("an event within 60 s")
    {
        let event = event.expect("stream ok");
        let at = event.at.unwrap();
        seen.push((
            event.status,
            at.seconds * 1000 + i64::from(at.nanos) / 1_000_000,
        ));
    }
    seen
}

/// Scenarios 1 and 3: while payment hangs, CreateOrder answers PENDING (no
/// retryable error, so an unkeyed client has nothing to retry), even before
/// the caller's own deadline; an order cancelled while its charge hangs gets
/// that charge refunded once it lands, and the other order is settled PAID.
#[tokio::test]
async fn a_hung_payment_never_keeps_money_or_invites_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    // An upstream timeout longer than the caller deadline used below.
    let backend = Backend::Sqlite;
    let mesh = start_with_timeout(&backend, dir.path(), &["--fulfilment-step", "1h"], "3s").await;
    let channel = mesh.gateway_channel().await;
    let mut orders = OrderServiceClient::new(channel.clone());
    let buyer = new_user(&mut UserServiceClient::new(channel)).await;
    let paused = Paused::default();
    let pid = payment_pids(&mesh)[0];
    assert!(paused.pause(pid), "payment process {pid} paused");

    // Scenario 3: no key; the outcome is unknown, so the answer is the order, PENDING.
    let started = Instant::now();
    let unkeyed = orders
        .create_order(order_request(&buyer.id, vec![item("tea", 1, 700)]))
        .await
        .expect("OK with the order PENDING, not a retryable error")
        .into_inner();
    assert_eq!(unkeyed.status, OrderStatus::Pending as i32, "{unkeyed:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered after {:?}",
        started.elapsed()
    );

    // Scenario 1, with a caller deadline shorter than the upstream timeout:
    // still answered PENDING, before that deadline.
    let mut keyed = order_request(&buyer.id, vec![item("tea", 1, 700)]);
    keyed.idempotency_key = "K1".into();
    let mut request = Request::new(keyed.clone());
    request.set_timeout(Duration::from_millis(2000));
    let cancelled_later = orders
        .create_order(request)
        .await
        .expect("answered before the caller's deadline")
        .into_inner();
    assert_eq!(cancelled_later.status, OrderStatus::Pending as i32);
    let cancelled = orders
        .cancel_order(CancelOrderRequest {
            id: cancelled_later.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, OrderStatus::Cancelled as i32);

    paused.resume(pid);
    // The unkeyed order is settled in the background: its watcher sees PAID.
    let events = watch_to_end_or_paid(&mut orders, &unkeyed.id).await;
    assert!(
        events.contains(&(OrderStatus::Paid as i32)),
        "the pending order is settled PAID: {events:?}"
    );
    let report = backend
        .settled_and_reconciled(dir.path(), Duration::from_secs(60))
        .await;
    eprintln!("reconcile: {report}");

    // Whether or not the hung charge landed, the cancelled order ends with
    // exactly one payment, refunded; the other with one, captured.
    assert_eq!(
        payments_of(&backend, dir.path(), &cancelled_later.id).await,
        [REFUNDED]
    );
    assert_eq!(
        payments_of(&backend, dir.path(), &unkeyed.id).await,
        [CAPTURED]
    );
    // Retrying K1 returns the cancelled order, and charges nothing more.
    let again = orders.create_order(keyed).await.unwrap().into_inner();
    assert_eq!(
        (again.id.as_str(), again.status),
        (cancelled_later.id.as_str(), OrderStatus::Cancelled as i32)
    );
    let listed = orders
        .list_orders(ListOrdersRequest {
            user_id: buyer.id.clone(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.orders.len(), 2, "two purchases, two orders");
    assert_eq!(
        payments_of(&backend, dir.path(), &cancelled_later.id).await,
        [REFUNDED]
    );
    assert!(mesh.terminate().await.success());
}

/// Follows an order until PAID or its stream ends; returns the statuses seen.
async fn watch_to_end_or_paid(orders: &mut OrderServiceClient<Channel>, id: &str) -> Vec<i32> {
    let mut stream = orders
        .watch_order(WatchOrderRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("an event within 60 s")
    {
        let status = event.expect("stream ok").status;
        seen.push(status);
        if status == OrderStatus::Paid as i32 {
            break;
        }
    }
    seen
}

/// Scenario 2: paid orders keep shipping on schedule (within one step)
/// while the payment service hangs with refunds and settlements owed.
#[tokio::test]
async fn fulfilment_keeps_its_pace_while_payment_hangs() {
    const STEP: Duration = Duration::from_secs(2);
    const OWED: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite;
    let mesh = start(&backend, dir.path(), &["--fulfilment-step", "2s"]).await;
    let channel = mesh.gateway_channel().await;
    let mut orders = OrderServiceClient::new(channel.clone());
    let buyer = new_user(&mut UserServiceClient::new(channel.clone())).await;
    let mut to_cancel = Vec::new();
    for _ in 0..OWED {
        to_cancel.push(place_order(&mut orders, &buyer.id).await);
    }
    let watched = place_order(&mut orders, &buyer.id).await;
    assert_eq!(watched.status, OrderStatus::Paid as i32);
    let paused = Paused::default();
    let pid = payment_pids(&mesh)[0];
    assert!(paused.pause(pid), "payment process {pid} paused");
    // While payment hangs: OWED refunds (cancelled PAID orders) and OWED
    // settlements (orders answered PENDING), every attempt at which waits
    // for the upstream timeout.
    let mut calls = Vec::new();
    for order in &to_cancel {
        let mut client = orders.clone();
        let id = order.id.clone();
        calls.push(tokio::spawn(async move {
            let cancelled = client
                .cancel_order(CancelOrderRequest { id })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(cancelled.status, OrderStatus::Cancelled as i32);
        }));
        let mut client = orders.clone();
        let request = order_request(&buyer.id, vec![item("tea", 1, 700)]);
        calls.push(tokio::spawn(async move {
            let order = client.create_order(request).await.unwrap().into_inner();
            assert_eq!(order.status, OrderStatus::Pending as i32);
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let events = watch_to_end(&mut orders, &watched.id).await;
    paused.resume(pid);
    let at = |status: OrderStatus| {
        events
            .iter()
            .find(|(s, _)| *s == status as i32)
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("no {status:?} in {events:?}"))
    };
    let paid = watched.updated_at.unwrap();
    let paid = paid.seconds * 1000 + i64::from(paid.nanos) / 1_000_000;
    let step = STEP.as_millis() as i64;
    let shipped_late = at(OrderStatus::Shipped) - paid - step;
    let delivered_late = at(OrderStatus::Delivered) - paid - 2 * step;
    eprintln!(
        "with payment hung: shipped {shipped_late} ms and delivered {delivered_late} ms after schedule (step {step} ms)"
    );
    assert!(
        shipped_late <= step && delivered_late <= step,
        "fulfilment fell behind by more than one step: shipped {shipped_late} ms, delivered {delivered_late} ms late"
    );
    // Once payment is back, every refund and settlement completes.
    backend
        .settled_and_reconciled(dir.path(), Duration::from_secs(60))
        .await;
    for order in &to_cancel {
        assert_eq!(
            payments_of(&backend, dir.path(), &order.id).await,
            [REFUNDED]
        );
    }
    assert!(mesh.terminate().await.success());
}

/// Tiny deterministic generator (no rand crate in the tree); the seed is printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

/// What a client saw of one purchase.
#[derive(Default, Debug)]
struct Tally {
    purchases: usize,
    keyed: usize,
    pending_answers: usize,
    retries: usize,
    /// Why calls were retried: code and the start of the message.
    retried_for: std::collections::BTreeMap<String, usize>,
    cancels: usize,
    /// Calls that ran out of the client's own deadline (outcome unknown; not retried).
    deadline_exceeded: usize,
    failed: Vec<String>,
}

/// A gRPC client's retry policy: repeat on UNAVAILABLE (and the other codes
/// gRPC deems retryable) a few times, backing off.
async fn with_retries<T, F, Fut>(tally: &Mutex<Tally>, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::ResourceExhausted | Code::Aborted
                ) && attempt < 5 =>
            {
                attempt += 1;
                {
                    let mut t = tally.lock().unwrap();
                    t.retries += 1;
                    let why: String = status.message().chars().take(48).collect();
                    *t.retried_for
                        .entry(format!("{:?}: {why}", status.code()))
                        .or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            other => return other,
        }
    }
}

/// One chaos client: places purchases (half with keys) and cancels some,
/// retrying like a gRPC client, until `until`.
async fn shopper(
    channel: Channel,
    user_id: String,
    client: usize,
    until: Instant,
    mut rng: Rng,
    tally: Arc<Mutex<Tally>>,
) {
    let orders = OrderServiceClient::new(channel);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        // The SKU names the purchase, so duplicates can be told apart later.
        let sku = format!("purchase-{client}-{n}");
        // One in twenty is over the charge limit and is declined.
        let price = if rng.below(20) == 0 { 200_000 } else { 700 };
        let mut request = CreateOrderRequest {
            user_id: user_id.clone(),
            items: vec![item(&sku, 1, price)],
            currency: "EUR".into(),
            idempotency_key: String::new(),
        };
        let keyed = rng.below(2) == 0;
        if keyed {
            request.idempotency_key = format!("key-{sku}");
        }
        let placed = with_retries(&tally, || {
            let mut orders = orders.clone();
            let mut request = Request::new(request.clone());
            request.set_timeout(Duration::from_secs(5));
            async move { orders.create_order(request).await }
        })
        .await;
        let order: Order = match placed {
            Ok(order) => order.into_inner(),
            Err(status) if status.code() == Code::DeadlineExceeded => {
                tally.lock().unwrap().deadline_exceeded += 1;
                continue;
            }
            Err(status) => {
                tally
                    .lock()
                    .unwrap()
                    .failed
                    .push(format!("CreateOrder {sku}: {status:?}"));
                continue;
            }
        };
        {
            let mut t = tally.lock().unwrap();
            t.purchases += 1;
            t.keyed += usize::from(keyed);
            t.pending_answers += usize::from(order.status == OrderStatus::Pending as i32);
        }
        if rng.below(3) == 0 {
            if rng.below(2) == 0 {
                tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
            }
            let cancelled = with_retries(&tally, || {
                let mut orders = orders.clone();
                let id = order.id.clone();
                async move { orders.cancel_order(CancelOrderRequest { id }).await }
            })
            .await;
            match cancelled {
                Ok(_) => tally.lock().unwrap().cancels += 1,
                // Already shipped: too late to cancel, as the contract says.
                Err(status) if status.code() == Code::FailedPrecondition => {}
                Err(status) => tally
                    .lock()
                    .unwrap()
                    .failed
                    .push(format!("CancelOrder {}: {status:?}", order.id)),
            }
        }
    }
}

/// Follows ListOrders (page size 5) from the start while orders are written
/// by two order replicas; returns every id seen, in the order seen.
async fn follow_list(channel: Channel, stop: Arc<tokio::sync::Notify>) -> Vec<String> {
    let mut orders = OrderServiceClient::new(channel);
    let mut token = String::new();
    let mut seen = Vec::new();
    let mut known = BTreeSet::new();
    let mut stopping = false;
    loop {
        let page = match orders
            .list_orders(ListOrdersRequest {
                user_id: String::new(),
                page_size: 5,
                page_token: token.clone(),
            })
            .await
        {
            Ok(page) => page.into_inner(),
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(status) => panic!("ListOrders failed: {status:?}"),
        };
        for order in page.orders {
            if known.insert(order.id.clone()) {
                seen.push(order.id);
            }
        }
        if !page.next_page_token.is_empty() {
            token = page.next_page_token;
            continue;
        }
        // The last page carries no token: read it again for what comes next.
        if stopping {
            return seen;
        }
        tokio::select! {
            _ = stop.notified() => stopping = true,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Done-when 2: 16 clients place and cancel orders (with and without keys,
/// retrying on retryable codes) for 60 s while payment replicas are paused,
/// resumed and killed at random; then reconciliation finds nothing wrong,
/// no purchase was charged twice, and a ListOrders follower saw every order.
#[tokio::test]
async fn chaos_loses_no_money_and_charges_no_purchase_twice() {
    chaos(Backend::Sqlite).await;
}

#[tokio::test]
async fn chaos_loses_no_money_and_charges_no_purchase_twice_on_postgres() {
    if let Some(backend) = Backend::postgres().await {
        chaos(backend).await;
    }
}

async fn chaos(backend: Backend) {
    const CLIENTS: usize = 16;
    let run_for = std::env::var("MINIMESH_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    let seed = seed();
    eprintln!("chaos seed {seed} on {}", backend.name());
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mesh = start(
        &backend,
        dir.path(),
        &[
            "--replicas",
            "payment=3,order=2",
            "--fulfilment-step",
            "500ms",
            "--restart-delay",
            "200ms",
        ],
    )
    .await;
    let channel = mesh.gateway_channel().await;
    let buyer = new_user(&mut UserServiceClient::new(channel.clone())).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let until = Instant::now() + run_for;
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        clients.push(tokio::spawn(shopper(
            channel.clone(),
            buyer.id.clone(),
            client,
            until,
            Rng(rng.next() | 1),
            tally.clone(),
        )));
    }
    let stop_follower = Arc::new(tokio::sync::Notify::new());
    let follower = tokio::spawn(follow_list(channel.clone(), stop_follower.clone()));

    let paused = Paused::default();
    let (mut pauses, mut resumes, mut kills) = (0, 0, 0);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        let pids = payment_pids(&mesh);
        if pids.is_empty() {
            continue;
        }
        let pid = pids[rng.below(pids.len() as u64) as usize];
        match rng.below(10) {
            0..=3 if !paused.is_paused(pid) => {
                if paused.pause(pid) {
                    pauses += 1;
                }
            }
            0..=6 => {
                if paused.is_paused(pid) {
                    paused.resume(pid);
                    resumes += 1;
                }
            }
            _ => {
                // `up` restarts it; a paused one dies too.
                if is_payment_process(real_pid(pid)) {
                    let _ = kill(Pid::from_raw(real_pid(pid)), Signal::SIGKILL);
                    kills += 1;
                }
                paused.forget(pid);
            }
        }
    }
    paused.resume_all();
    for client in clients {
        client.await.unwrap();
    }
    let report = backend
        .settled_and_reconciled(dir.path(), Duration::from_secs(90))
        .await;
    stop_follower.notify_one();
    let followed = follower.await.unwrap();

    let tally = std::mem::take(&mut *tally.lock().unwrap());
    eprintln!(
        "chaos: {pauses} pauses, {resumes} resumes, {kills} kills; {tally:?}; reconcile: {} payments, {} orders",
        report["payments"], report["orders"]
    );
    assert!(tally.failed.is_empty(), "calls failed: {:?}", tally.failed);
    assert!(
        tally.purchases >= 100 && pauses > 0 && kills > 0,
        "the run exercised too little"
    );

    // No purchase made two orders, and no order was charged twice.
    let per_purchase = backend
        .rows(
            dir.path(),
            "order",
            "SELECT sku, count(*) FROM order_items GROUP BY sku HAVING count(*) > 1",
            &[],
        )
        .await;
    assert!(
        per_purchase.is_empty(),
        "purchases with several orders: {per_purchase:?}"
    );
    let twice = backend.orders_charged_twice(dir.path()).await;
    assert!(twice.is_empty(), "orders charged twice: {twice:?}");

    // Scenario 5: the follower missed no order, whichever replica wrote it.
    let all: BTreeSet<String> = backend
        .rows(dir.path(), "order", "SELECT id FROM orders", &[])
        .await
        .into_iter()
        .map(|row| row[0].clone())
        .collect();
    let followed_set: BTreeSet<String> = followed.iter().cloned().collect();
    let missed: Vec<_> = all.difference(&followed_set).collect();
    assert!(
        missed.is_empty(),
        "ListOrders follower missed {} of {} orders: {missed:?}",
        missed.len(),
        all.len()
    );
    let by_id: HashMap<&String, usize> =
        followed.iter().enumerate().map(|(i, id)| (id, i)).collect();
    assert_eq!(by_id.len(), followed.len(), "no order listed twice");
    assert!(mesh.terminate().await.success());
}
