//! The reconciliation check: do the order and payment records agree that no
//! money is kept without an order, and no order is kept without its money?
//!
//! Rules (see the saga section of the README):
//! 1. every CAPTURED payment belongs to a PAID, SHIPPED or DELIVERED order
//!    whose `payment_id` names it (so a second capture for one order breaks it);
//! 2. every PAID, SHIPPED or DELIVERED order names a CAPTURED payment of its total;
//! 3. every CANCELLED order's payment, if it has one, is REFUNDED or DECLINED;
//! 4. no order stays PENDING, and no refund stays owed, longer than `bound`.
//!
//! A discrepancy the saga is still working on (a PENDING order, a refund
//! owed) younger than `bound` is reported as in flight, not as a violation.
//!
//! The two databases cannot be read at one instant, so read the payments
//! twice, before and after the orders. Every payment read before has its
//! order in the order snapshot (an order is stored before it is charged);
//! every payment an order names was written before the order named it, so
//! it is in the read after, which also has every refund the orders say is
//! done (a refund is recorded on the order after the payment service made it).

use crate::status;
use crate::store::OrderFacts;
use serde::Serialize;
use std::collections::HashMap;

/// Payment status numbers (equal to `shop.payment.v1.PaymentStatus`).
pub mod payment_status {
    /// The charge went through.
    pub const CAPTURED: i32 = 1;
    /// The charge was refused; nothing was taken.
    pub const DECLINED: i32 = 2;
    /// The charge was given back.
    pub const REFUNDED: i32 = 3;
}

/// What the check needs of one payment.
#[derive(Debug, Clone)]
pub struct PaymentFacts {
    /// Its id.
    pub id: String,
    /// The order it pays for.
    pub order_id: String,
    /// One of the [`payment_status`] values.
    pub status: i32,
    /// Amount in minor units.
    pub amount_cents: i64,
}

/// What the reconciliation check found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Payments looked at.
    pub payments: usize,
    /// Orders looked at.
    pub orders: usize,
    /// Broken rules (a double charge, a paid order without its payment, …), one line each.
    pub violations: Vec<String>,
    /// Orders still being settled or compensated: not wrong yet, only unfinished.
    pub in_flight: Vec<String>,
}

impl Report {
    /// True when no rule is broken (work in flight is allowed).
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

fn payment_status_name(status: i32) -> &'static str {
    match status {
        payment_status::CAPTURED => "CAPTURED",
        payment_status::DECLINED => "DECLINED",
        payment_status::REFUNDED => "REFUNDED",
        _ => "UNSPECIFIED",
    }
}

/// Checks the rules at `now_ms` on payments read `before` the orders and
/// `after` them; saga work younger than `bound_ms` is in flight.
pub fn check(
    before: &[PaymentFacts],
    orders: &[OrderFacts],
    after: &[PaymentFacts],
    now_ms: i64,
    bound_ms: i64,
) -> Report {
    let mut report = Report {
        payments: after.len(),
        orders: orders.len(),
        ..Report::default()
    };
    let by_id: HashMap<&str, &OrderFacts> = orders.iter().map(|o| (o.id.as_str(), o)).collect();
    let payment_by_id: HashMap<&str, &PaymentFacts> =
        after.iter().map(|p| (p.id.as_str(), p)).collect();
    // The payments whose orders are surely in the snapshot, as they are now.
    let payments = before
        .iter()
        .map(|p| payment_by_id.get(p.id.as_str()).copied().unwrap_or(p));
    let young = |order: &OrderFacts| now_ms - order.updated_at_ms < bound_ms;
    let fulfilled = |s: i32| matches!(s, status::PAID | status::SHIPPED | status::DELIVERED);

    for payment in payments.filter(|p| p.status == payment_status::CAPTURED) {
        let Some(order) = by_id.get(payment.order_id.as_str()) else {
            report.violations.push(format!(
                "payment {} is CAPTURED ({} cents) for order {}, which does not exist",
                payment.id, payment.amount_cents, payment.order_id
            ));
            continue;
        };
        if fulfilled(order.status) && order.payment_id == payment.id {
            continue;
        }
        let owed = order.status == status::CANCELLED && order.refund_pending;
        if (order.status == status::PENDING || owed) && young(order) {
            report.in_flight.push(format!(
                "payment {} is CAPTURED for order {} ({}{})",
                payment.id,
                order.id,
                status::name(order.status),
                if owed { ", refund owed" } else { "" }
            ));
            continue;
        }
        report.violations.push(format!(
            "payment {} is CAPTURED ({} cents) but order {} is {} with payment {:?}",
            payment.id,
            payment.amount_cents,
            order.id,
            status::name(order.status),
            order.payment_id
        ));
    }

    for order in orders {
        let payment = payment_by_id.get(order.payment_id.as_str());
        match order.status {
            s if fulfilled(s) => match payment {
                Some(p)
                    if p.status == payment_status::CAPTURED
                        && p.order_id == order.id
                        && p.amount_cents == order.total_cents => {}
                Some(p) => report.violations.push(format!(
                    "order {} is {} but its payment {} is {} of {} cents for order {}",
                    order.id,
                    status::name(s),
                    p.id,
                    payment_status_name(p.status),
                    p.amount_cents,
                    p.order_id
                )),
                None => report.violations.push(format!(
                    "order {} is {} without a payment (payment_id {:?})",
                    order.id,
                    status::name(s),
                    order.payment_id
                )),
            },
            status::CANCELLED => {
                // A captured payment here was reported above.
                if let Some(p) = payment
                    && !matches!(
                        p.status,
                        payment_status::REFUNDED
                            | payment_status::DECLINED
                            | payment_status::CAPTURED
                    )
                {
                    report.violations.push(format!(
                        "order {} is CANCELLED but its payment {} is {}",
                        order.id,
                        p.id,
                        payment_status_name(p.status)
                    ));
                }
                if order.refund_pending {
                    let what = format!(
                        "order {} is CANCELLED and still owes a refund check (payment {:?})",
                        order.id, order.payment_id
                    );
                    if young(order) {
                        report.in_flight.push(what);
                    } else {
                        report
                            .violations
                            .push(format!("{what} after {} ms", now_ms - order.updated_at_ms));
                    }
                }
            }
            status::PENDING => {
                let what = format!("order {} is PENDING", order.id);
                if young(order) {
                    report.in_flight.push(what);
                } else {
                    report
                        .violations
                        .push(format!("{what} since {} ms", now_ms - order.updated_at_ms));
                }
            }
            other => report
                .violations
                .push(format!("order {} has unknown status {other}", order.id)),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, status: i32, payment: &str, refund_pending: bool) -> OrderFacts {
        OrderFacts {
            id: id.into(),
            status,
            payment_id: payment.into(),
            total_cents: 700,
            refund_pending,
            updated_at_ms: 1_000,
        }
    }

    fn payment(id: &str, order: &str, status: i32) -> PaymentFacts {
        PaymentFacts {
            id: id.into(),
            order_id: order.into(),
            status,
            amount_cents: 700,
        }
    }

    #[test]
    fn consistent_records_are_clean() {
        let payments = [
            payment("p1", "o1", payment_status::CAPTURED),
            payment("p2", "o2", payment_status::REFUNDED),
            payment("p3", "o3", payment_status::DECLINED),
        ];
        let orders = [
            order("o1", status::DELIVERED, "p1", false),
            order("o2", status::CANCELLED, "p2", false),
            order("o3", status::CANCELLED, "p3", false),
            order("o4", status::CANCELLED, "", false),
        ];
        let report = check(&payments, &orders, &payments, 100_000, 60_000);
        assert!(report.is_clean(), "{report:?}");
        assert!(report.in_flight.is_empty());
    }

    #[test]
    fn each_rule_is_enforced() {
        let payments = [
            // A cancelled order kept the money (issue 14, scenario 1).
            payment("p1", "o1", payment_status::CAPTURED),
            // A second capture for one order.
            payment("p2a", "o2", payment_status::CAPTURED),
            payment("p2b", "o2", payment_status::CAPTURED),
            // Money without any order.
            payment("p9", "o9", payment_status::CAPTURED),
        ];
        let orders = [
            order("o1", status::CANCELLED, "", false),
            order("o2", status::PAID, "p2a", false),
            // Paid without money.
            order("o3", status::SHIPPED, "", false),
            // Stuck.
            order("o4", status::PENDING, "", false),
            order("o5", status::CANCELLED, "", true),
        ];
        let report = check(&payments, &orders, &payments, 100_000, 60_000);
        let text = report.violations.join("\n");
        for needle in [
            "payment p1 is CAPTURED",
            "payment p2b is CAPTURED",
            "order o9, which does not exist",
            "order o3 is SHIPPED without a payment",
            "order o4 is PENDING",
            "order o5 is CANCELLED and still owes",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(report.violations.len(), 6, "{text}");
    }

    #[test]
    fn young_saga_work_is_in_flight_not_a_violation() {
        let payments = [payment("p1", "o1", payment_status::CAPTURED)];
        let orders = [
            order("o1", status::CANCELLED, "p1", true),
            order("o2", status::PENDING, "", false),
        ];
        let report = check(&payments, &orders, &payments, 1_500, 60_000);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.in_flight.len(), 3, "{report:?}");
    }

    #[test]
    fn reads_taken_at_different_moments_raise_no_false_alarm() {
        // Read before the orders: p1 not refunded yet, p2 not made yet.
        let before = [payment("p1", "o1", payment_status::CAPTURED)];
        // The orders: o1's refund done, o2 paid with p2.
        let orders = [
            order("o1", status::CANCELLED, "p1", false),
            order("o2", status::PAID, "p2", false),
            // Created after the orders were read... is simply absent: o3.
        ];
        let after = [
            payment("p1", "o1", payment_status::REFUNDED),
            payment("p2", "o2", payment_status::CAPTURED),
            payment("p3", "o3", payment_status::CAPTURED),
        ];
        let report = check(&before, &orders, &after, 100_000, 60_000);
        assert!(report.is_clean(), "{report:?}");
    }
}
