//! Checking a CreateOrder request: limits, currency, items, the total, and
//! the fingerprint that tells a retry from a reused idempotency key.

use crate::store::{ItemRecord, NewOrder};
use minimesh_proto::order::v1::CreateOrderRequest;
use sha2::{Digest, Sha256};
use tonic::Status;

const MAX_ITEMS: usize = 1000;
const MAX_FIELD_LEN: usize = 128;

/// Checks a CreateOrder request and computes its total and fingerprint.
pub(crate) fn validate_order(req: CreateOrderRequest) -> Result<NewOrder, Status> {
    let invalid = |msg: String| Status::invalid_argument(msg);
    if req.user_id.is_empty() {
        return Err(invalid("user_id is required".into()));
    }
    if req.user_id.len() > MAX_FIELD_LEN || req.idempotency_key.len() > MAX_FIELD_LEN {
        return Err(invalid(format!(
            "user_id and idempotency_key must be at most {MAX_FIELD_LEN} bytes"
        )));
    }
    if !minimesh_runtime::is_currency_code(&req.currency) {
        return Err(invalid(format!(
            "currency {:?} is not an ISO 4217 code (three upper-case letters)",
            req.currency
        )));
    }
    if req.items.is_empty() {
        return Err(invalid("an order needs at least one item".into()));
    }
    if req.items.len() > MAX_ITEMS {
        return Err(invalid(format!(
            "an order may have at most {MAX_ITEMS} items"
        )));
    }
    let mut total: i64 = 0;
    let mut items = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.into_iter().enumerate() {
        if item.sku.is_empty() || item.sku.len() > MAX_FIELD_LEN {
            return Err(invalid(format!(
                "items[{i}].sku must be 1 to {MAX_FIELD_LEN} bytes"
            )));
        }
        if let Some(c) = item.sku.chars().find(|c| c.is_control()) {
            return Err(invalid(format!(
                "items[{i}].sku must not contain control characters, found U+{:04X}",
                u32::from(c)
            )));
        }
        if item.quantity < 1 {
            return Err(invalid(format!(
                "items[{i}].quantity must be at least 1, got {}",
                item.quantity
            )));
        }
        if item.unit_price_cents < 0 {
            return Err(invalid(format!(
                "items[{i}].unit_price_cents must not be negative, got {}",
                item.unit_price_cents
            )));
        }
        total = item
            .unit_price_cents
            .checked_mul(i64::from(item.quantity))
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| invalid("order total overflows".into()))?;
        items.push(ItemRecord {
            sku: item.sku,
            quantity: item.quantity,
            unit_price_cents: item.unit_price_cents,
        });
    }
    if total <= 0 {
        return Err(invalid("order total must be greater than zero".into()));
    }
    Ok(NewOrder {
        request_hash: fingerprint(&req.user_id, &req.currency, &items),
        legacy_hash: Some(legacy_fingerprint(&req.user_id, &req.currency, &items)),
        user_id: req.user_id,
        items,
        total_cents: total,
        currency: req.currency,
        idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
    })
}

/// What tells a retry from a reused idempotency key. Every string is
/// length-prefixed and every number fixed-width, so two different requests
/// can never feed the hash the same bytes.
fn fingerprint(user_id: &str, currency: &str, items: &[ItemRecord]) -> String {
    fn field(hasher: &mut Sha256, bytes: &[u8]) {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let mut hasher = Sha256::new();
    field(&mut hasher, b"shop.order.v1.CreateOrderRequest");
    field(&mut hasher, user_id.as_bytes());
    field(&mut hasher, currency.as_bytes());
    hasher.update((items.len() as u64).to_le_bytes());
    for item in items {
        field(&mut hasher, item.sku.as_bytes());
        hasher.update(item.quantity.to_le_bytes());
        hasher.update(item.unit_price_cents.to_le_bytes());
    }
    format!("v2:{}", hex(&hasher.finalize()))
}

/// The ambiguous fingerprint of earlier versions, still stored on their
/// orders: only compared against those, so their keys keep working.
fn legacy_fingerprint(user_id: &str, currency: &str, items: &[ItemRecord]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(user_id.as_bytes());
    hasher.update([0]);
    hasher.update(currency.as_bytes());
    for item in items {
        hasher.update([0]);
        hasher.update(item.sku.as_bytes());
        hasher.update(item.quantity.to_le_bytes());
        hasher.update(item.unit_price_cents.to_le_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use minimesh_proto::order::v1::OrderItem;
    use tonic::Code;

    fn item(sku: &str, quantity: i32, price: i64) -> OrderItem {
        OrderItem {
            sku: sku.into(),
            quantity,
            unit_price_cents: price,
        }
    }

    fn request(items: Vec<OrderItem>) -> CreateOrderRequest {
        CreateOrderRequest {
            user_id: "usr".into(),
            items,
            currency: "EUR".into(),
            idempotency_key: String::new(),
        }
    }

    #[test]
    fn totals_and_fingerprints() {
        let a = validate_order(request(vec![item("a", 2, 150), item("b", 1, 5)])).unwrap();
        assert_eq!(a.total_cents, 305);
        let b = validate_order(request(vec![item("a", 2, 150), item("b", 1, 6)])).unwrap();
        assert_ne!(a.request_hash, b.request_hash);
    }

    #[test]
    fn bad_orders_are_invalid_argument() {
        for (items, needle) in [
            (vec![], "at least one item"),
            (vec![item("a", 0, 1)], "quantity"),
            (vec![item("a", 1, -1)], "negative"),
            (vec![item("", 1, 1)], "sku"),
            (vec![item("a", i32::MAX, i64::MAX)], "overflows"),
        ] {
            let err = validate_order(request(items)).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains(needle), "{}", err.message());
        }
    }

    /// Issue 14, point 4: these two requests fed the old fingerprint the same bytes.
    #[test]
    fn fingerprints_of_different_requests_differ() {
        let two = [
            ItemRecord {
                sku: "a".into(),
                quantity: 1,
                unit_price_cents: 100,
            },
            ItemRecord {
                sku: "b".into(),
                quantity: 1,
                unit_price_cents: 100,
            },
        ];
        let one = [ItemRecord {
            sku: "a\x01\0\0\0d\0\0\0\0\0\0\0\0b".into(),
            quantity: 1,
            unit_price_cents: 100,
        }];
        assert_eq!(
            legacy_fingerprint("usr", "EUR", &two),
            legacy_fingerprint("usr", "EUR", &one),
            "the collision this guards against"
        );
        assert_ne!(
            fingerprint("usr", "EUR", &two),
            fingerprint("usr", "EUR", &one)
        );
        assert_ne!(
            fingerprint("usr", "EUR", &two),
            fingerprint("usrE", "UR", &two)
        );
    }

    #[test]
    fn skus_with_control_characters_are_invalid_argument() {
        for sku in ["a\0b", "tab\there", "line\n", "del\u{7f}"] {
            let err = validate_order(request(vec![item(sku, 1, 1)])).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains("control"), "{}", err.message());
        }
    }
}
