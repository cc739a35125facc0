//! Every RPC of the shop APIs against real servers on loopback ports: the
//! success paths and each error code the contract names.

mod common;

use common::*;
use minimesh_proto::order::v1::{
    CancelOrderRequest, GetOrderRequest, ListOrdersRequest, OrderStatus, WatchOrderRequest,
};
use minimesh_proto::payment::v1::{ChargeRequest, GetPaymentRequest, PaymentStatus, RefundRequest};
use minimesh_proto::user::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

const SLOW: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn users_create_get_list_and_refuse_bad_input() {
    let shop = start_shop(SLOW).await;
    let mut users = shop.users().await;

    let ada = users
        .create_user(CreateUserRequest {
            email: "Ada@Example.com".into(),
            display_name: " Ada Lovelace ".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ada.email, "ada@example.com");
    assert_eq!(ada.display_name, "Ada Lovelace");
    assert!(ada.created_at.is_some());
    let fetched = users
        .get_user(GetUserRequest { id: ada.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, ada);

    let dup = users
        .create_user(CreateUserRequest {
            email: "ADA@example.com".into(),
            display_name: "Other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(
        dup.message().contains("ada@example.com"),
        "{}",
        dup.message()
    );

    for (email, name) in [
        ("not-an-email", "X"),
        ("x@nodot", "X"),
        ("", "X"),
        ("ok@example.com", "  "),
    ] {
        let err = users
            .create_user(CreateUserRequest {
                email: email.into(),
                display_name: name.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{email:?}/{name:?}: {}",
            err.message()
        );
    }

    let missing = users
        .get_user(GetUserRequest {
            id: "usr_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("usr_nope"));

    let mut created = vec![ada.id.clone()];
    for _ in 0..4 {
        created.push(new_user(&mut users).await.id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = users
            .list_users(ListUsersRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, created, "pages walk every user once, oldest first");

    let bad = users
        .list_users(ListUsersRequest {
            page_size: 2,
            page_token: "garbage!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

fn charge(order: &str, amount: i64, key: &str) -> ChargeRequest {
    ChargeRequest {
        order_id: order.into(),
        user_id: "usr_1".into(),
        amount_cents: amount,
        currency: "EUR".into(),
        idempotency_key: key.into(),
    }
}

#[tokio::test]
async fn payments_charge_decline_refund_and_idempotency() {
    let shop = start_shop(SLOW).await;
    let mut payments = shop.payments().await;

    let paid = payments
        .charge(charge("ord_1", 4200, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid.status, PaymentStatus::Captured as i32);
    assert_eq!((paid.amount_cents, paid.currency.as_str()), (4200, "EUR"));
    let again = payments
        .charge(charge("ord_1", 4200, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, paid.id, "same key, same payment");
    assert_eq!(
        payments_for_order(&shop.payment_db(), "ord_1"),
        1,
        "charged once"
    );
    let reused = payments
        .charge(charge("ord_1", 9999, "k1"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);

    let declined = payments
        .charge(charge("ord_2", 100_001, "k2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(declined.status, PaymentStatus::Declined as i32);
    assert!(
        declined.decline_reason.contains("limit"),
        "{}",
        declined.decline_reason
    );

    for bad in [
        charge("ord_3", 0, ""),
        charge("", 5, ""),
        ChargeRequest {
            currency: "euro".into(),
            ..charge("o", 5, "")
        },
    ] {
        assert_eq!(
            payments.charge(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    let refunded = payments
        .refund(RefundRequest {
            payment_id: paid.id.clone(),
            idempotency_key: "r1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refunded.status, PaymentStatus::Refunded as i32);
    let fetched = payments
        .get_payment(GetPaymentRequest {
            id: paid.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.status, PaymentStatus::Refunded as i32);
    let not_refundable = payments
        .refund(RefundRequest {
            payment_id: declined.id.clone(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_refundable.code(), Code::FailedPrecondition);
    let missing = payments
        .get_payment(GetPaymentRequest {
            id: "pay_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing = payments
        .refund(RefundRequest {
            payment_id: "pay_nope".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn orders_are_validated_paid_declined_listed() {
    let shop = start_shop(SLOW).await;
    let mut users = shop.users().await;
    let mut orders = shop.orders().await;
    let mut payments = shop.payments().await;
    let buyer = new_user(&mut users).await;

    let order = place_order(&mut orders, &buyer.id).await;
    assert_eq!(order.status, OrderStatus::Paid as i32);
    assert_eq!(order.total_cents, 2 * 1250 + 300);
    assert_eq!(order.items.len(), 2);
    let payment = payments
        .get_payment(GetPaymentRequest {
            id: order.payment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (payment.order_id.as_str(), payment.amount_cents),
        (order.id.as_str(), order.total_cents)
    );
    assert_eq!(payment.status, PaymentStatus::Captured as i32);

    let unknown = orders
        .create_order(order_request("usr_ghost", vec![item("a", 1, 1)]))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition);
    assert!(unknown.message().contains("usr_ghost"));

    for items in [vec![], vec![item("a", 0, 100)], vec![item("a", 1, -1)]] {
        let err = orders
            .create_order(order_request(&buyer.id, items))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }

    let expensive = orders
        .create_order(order_request(&buyer.id, vec![item("car", 1, 2_000_000)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expensive.status, OrderStatus::Cancelled as i32);
    assert!(
        expensive.status_reason.contains("declined"),
        "{}",
        expensive.status_reason
    );

    let fetched = orders
        .get_order(GetOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.id, order.id);
    let missing = orders
        .get_order(GetOrderRequest {
            id: "ord_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let other = new_user(&mut users).await;
    place_order(&mut orders, &other.id).await;
    let mine = orders
        .list_orders(ListOrdersRequest {
            user_id: buyer.id.clone(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.orders.len(), 1);
    assert_eq!(mine.orders[0].id, order.id);
    let rest = orders
        .list_orders(ListOrdersRequest {
            user_id: buyer.id.clone(),
            page_size: 1,
            page_token: mine.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.orders
            .iter()
            .map(|o| o.id.as_str())
            .collect::<Vec<_>>(),
        [expensive.id.as_str()]
    );
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn cancel_refunds_paid_and_is_refused_once_shipped() {
    let shop = start_shop(Duration::from_millis(300)).await;
    let mut users = shop.users().await;
    let mut orders = shop.orders().await;
    let mut payments = shop.payments().await;
    let buyer = new_user(&mut users).await;

    let order = place_order(&mut orders, &buyer.id).await;
    let cancelled = orders
        .cancel_order(CancelOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, OrderStatus::Cancelled as i32);
    let payment = payments
        .get_payment(GetPaymentRequest {
            id: order.payment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(payment.status, PaymentStatus::Refunded as i32);
    // Cancelling again is harmless and returns the cancelled order.
    let again = orders
        .cancel_order(CancelOrderRequest {
            id: order.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.status, OrderStatus::Cancelled as i32);

    let shipped = place_order(&mut orders, &buyer.id).await;
    let mut watch = orders
        .watch_order(WatchOrderRequest {
            id: shipped.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = watch.next().await {
        if event.unwrap().status == OrderStatus::Shipped as i32 {
            break;
        }
    }
    let refused = orders
        .cancel_order(CancelOrderRequest {
            id: shipped.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("SHIPPED") || refused.message().contains("DELIVERED"),
        "{}",
        refused.message()
    );
    let payment = payments
        .get_payment(GetPaymentRequest {
            id: shipped.payment_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        payment.status,
        PaymentStatus::Captured as i32,
        "a refused cancel refunds nothing"
    );

    let missing = orders
        .cancel_order(CancelOrderRequest {
            id: "ord_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn concurrent_creates_with_one_key_make_one_order_and_one_payment() {
    let shop = start_shop(SLOW).await;
    let mut users = shop.users().await;
    let buyer = new_user(&mut users).await;
    let orders = shop.orders().await;

    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut client = orders.clone();
        let mut request = order_request(&buyer.id, vec![item("lamp", 1, 4999)]);
        request.idempotency_key = "checkout-42".into();
        calls.push(tokio::spawn(
            async move { client.create_order(request).await },
        ));
    }
    let mut ids = std::collections::BTreeSet::new();
    for call in calls {
        let order = call
            .await
            .unwrap()
            .expect("every retry succeeds")
            .into_inner();
        assert_eq!(order.status, OrderStatus::Paid as i32);
        ids.insert(order.id);
    }
    assert_eq!(ids.len(), 1, "one order for one idempotency key");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(
        payments_for_order(&shop.payment_db(), &id),
        1,
        "one charge for one order"
    );

    let mut client = orders.clone();
    let listed = client
        .list_orders(ListOrdersRequest {
            user_id: buyer.id.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.orders.len(), 1);

    let mut reused = order_request(&buyer.id, vec![item("lamp", 2, 4999)]);
    reused.idempotency_key = "checkout-42".into();
    let err = client.create_order(reused).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

/// Issue 14, point 4: the old fingerprint fed these two requests to the hash
/// as the same bytes, so the second was answered with the first order.
#[tokio::test]
async fn a_reused_key_with_another_request_is_never_taken_for_a_retry() {
    let shop = start_shop(SLOW).await;
    let mut users = shop.users().await;
    let buyer = new_user(&mut users).await;
    let mut orders = shop.orders().await;

    let mut first = order_request(&buyer.id, vec![item("a", 1, 100), item("b", 1, 100)]);
    first.idempotency_key = "NULK".into();
    let order = orders
        .create_order(first.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (order.status, order.total_cents),
        (OrderStatus::Paid as i32, 200)
    );

    let mut forged = order_request(
        &buyer.id,
        vec![item("a\x01\0\0\0d\0\0\0\0\0\0\0\0b", 1, 100)],
    );
    forged.idempotency_key = "NULK".into();
    let err = orders.create_order(forged).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("control"), "{}", err.message());

    let mut other = order_request(&buyer.id, vec![item("ab", 1, 100)]);
    other.idempotency_key = "NULK".into();
    let err = orders.create_order(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let again = orders.create_order(first).await.unwrap().into_inner();
    assert_eq!(again.id, order.id, "the same request is a retry");
    assert_eq!(payments_for_order(&shop.payment_db(), &order.id), 1);
}
