//! `minimesh up` as users run it: real processes, readiness, mesh.json,
//! restart of a dead child, clean stop, and data that outlives the mesh.

mod common;

use common::process::*;
use common::*;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{GetOrderRequest, OrderStatus, WatchOrderRequest};
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_proto::payment::v1::{GetPaymentRequest, PaymentStatus};
use minimesh_proto::user::v1::GetUserRequest;
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_testsupport::eventually;
use std::time::Duration;
use tokio_stream::StreamExt;

#[tokio::test]
async fn up_starts_every_instance_serves_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(
        dir.path(),
        &["--replicas", "payment=2", "--fulfilment-step", "200ms"],
    )
    .await;

    let file = mesh.mesh_json();
    assert_eq!(file["trust_domain"], "minimesh.local");
    assert!(file["ca_dir"].as_str().unwrap().ends_with("certs"));
    let instances = file["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 4, "user, 2 payment, order");
    assert_eq!(mesh.instances("payment").len(), 2);
    let mut pids = Vec::new();
    for instance in instances {
        let pid = instance["pid"].as_i64().unwrap();
        assert!(process_alive(pid), "{instance}");
        pids.push(pid);
        assert!(instance["replica"].is_u64());
        let url = format!("http://{}", instance["app"].as_str().unwrap());
        assert!(health_serving(&url).await, "{url} SERVING");
        let mut services = reflected_services(&url).await;
        services.retain(|s| s.starts_with("shop."));
        services.sort();
        assert_eq!(
            services,
            [
                "shop.order.v1.OrderService",
                "shop.payment.v1.PaymentService",
                "shop.user.v1.UserService"
            ]
        );
    }

    let mut users = UserServiceClient::connect(mesh.app_url("user"))
        .await
        .unwrap();
    let mut orders = OrderServiceClient::connect(mesh.app_url("order"))
        .await
        .unwrap();
    let buyer = new_user(&mut users).await;
    let order = place_order(&mut orders, &buyer.id).await;
    let mut watch = orders
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = 0;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .unwrap()
    {
        last = event.unwrap().status;
    }
    assert_eq!(last, OrderStatus::Delivered as i32);

    let status = mesh.terminate().await;
    assert!(status.success(), "up exits 0 on SIGTERM, got {status}");
    for pid in pids {
        assert!(!process_alive(pid), "child {pid} was stopped");
    }
}

#[tokio::test]
async fn killed_order_process_is_restarted_and_data_survives_a_new_up() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &["--fulfilment-step", "1s"]).await;
    let mut users = UserServiceClient::connect(mesh.app_url("user"))
        .await
        .unwrap();
    let mut orders = OrderServiceClient::connect(mesh.app_url("order"))
        .await
        .unwrap();
    let buyer = new_user(&mut users).await;
    let order = place_order(&mut orders, &buyer.id).await;
    assert_eq!(order.status, OrderStatus::Paid as i32);

    let old_pid = mesh.instances("order")[0]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let new_pid = eventually(
        Duration::from_secs(30),
        "order restarted with a new pid",
        || async {
            let pid = mesh.instances("order")[0]["pid"].as_i64()?;
            (pid != 0 && pid != old_pid).then_some(pid)
        },
    )
    .await;
    assert!(process_alive(new_pid));
    let url = mesh.app_url("order");
    eventually(
        Duration::from_secs(30),
        "restarted order serving",
        || async { health_serving(&url).await.then_some(()) },
    )
    .await;

    // The restarted process resumes fulfilment from the database.
    let mut orders = OrderServiceClient::connect(url).await.unwrap();
    let mut watch = orders
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = 0;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .unwrap()
    {
        last = event.unwrap().status;
    }
    assert_eq!(last, OrderStatus::Delivered as i32);
    assert!(mesh.terminate().await.success());

    // A new `up` on the same data dir has everything.
    let mesh = start_mesh(dir.path(), &[]).await;
    let mut users = UserServiceClient::connect(mesh.app_url("user"))
        .await
        .unwrap();
    let mut orders = OrderServiceClient::connect(mesh.app_url("order"))
        .await
        .unwrap();
    let mut payments = PaymentServiceClient::connect(mesh.app_url("payment"))
        .await
        .unwrap();
    let user = users
        .get_user(GetUserRequest {
            id: buyer.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.email, buyer.email);
    let stored = orders
        .get_order(GetOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.status, OrderStatus::Delivered as i32);
    let payment = payments
        .get_payment(GetPaymentRequest {
            id: order.payment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(payment.status, PaymentStatus::Captured as i32);
    assert!(mesh.terminate().await.success());
}
