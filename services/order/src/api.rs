//! The gRPC API: the tonic service, and the conversions between the
//! store's records and the proto messages.

use crate::orders::Orders;
use crate::store::{self, Cursor, OrderRecord};
use crate::watch;
use minimesh_proto::order::v1::order_service_server::{OrderService, OrderServiceServer};
use minimesh_proto::order::v1::{
    CancelOrderRequest, CreateOrderRequest, GetOrderRequest, ListOrdersRequest, ListOrdersResponse,
    Order, OrderEvent, OrderItem, TrackRequest, WatchOrderRequest,
};
use minimesh_runtime::{grpc, page};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};

/// When the caller's `grpc-timeout` runs out, less a margin to send the
/// answer back through the mesh.
fn answer_by(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(raw)?;
    let margin = (timeout / 5).max(Duration::from_millis(50));
    Some(Instant::now() + timeout.saturating_sub(margin))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn to_proto(order: OrderRecord) -> Order {
    Order {
        id: order.id,
        user_id: order.user_id,
        items: order
            .items
            .into_iter()
            .map(|i| OrderItem {
                sku: i.sku,
                quantity: i.quantity,
                unit_price_cents: i.unit_price_cents,
            })
            .collect(),
        total_cents: order.total_cents,
        currency: order.currency,
        status: order.status,
        status_reason: order.status_reason,
        payment_id: order.payment_id,
        created_at: Some(minimesh_proto::timestamp_from_unix_millis(
            order.created_at_ms,
        )),
        updated_at: Some(minimesh_proto::timestamp_from_unix_millis(
            order.updated_at_ms,
        )),
    }
}

/// `shop.order.v1.OrderService`: request validation and mapping onto [`Orders`](crate::orders::Orders).
pub struct OrderApi {
    orders: Arc<Orders>,
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let answer_by = answer_by(request.metadata());
        let order = self.orders.create(request.into_inner(), answer_by).await?;
        Ok(Response::new(to_proto(order)))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        match self
            .orders
            .store
            .get(id.clone())
            .await
            .map_err(|e| self.orders.store_status(e))?
        {
            Some(order) => Ok(Response::new(to_proto(order))),
            None => Err(Status::not_found(format!("order {id} not found"))),
        }
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let req = request.into_inner();
        let size = page::page_size(req.page_size)?;
        let after = match page::decode_token(&req.page_token)? {
            None => Cursor::Start,
            Some(last) => match last.parse::<i64>() {
                Ok(seq) => Cursor::Seq(seq),
                Err(_) => Cursor::LegacyId(last),
            },
        };
        let user = (!req.user_id.is_empty()).then_some(req.user_id);
        let mut rows = self
            .orders
            .store
            .list(user, after, size + 1)
            .await
            .map_err(|e| self.orders.store_status(e))?;
        let next_page_token = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last()
                .map(|o| page::encode_token(&o.seq.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListOrdersResponse {
            orders: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let answer_by = answer_by(request.metadata());
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        Ok(Response::new(to_proto(
            self.orders.cancel(id, answer_by).await?,
        )))
    }

    type WatchOrderStream = watch::EventStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        Ok(Response::new(
            watch::watch_one(self.orders.clone(), id).await?,
        ))
    }

    type TrackOrdersStream = watch::EventStream;

    async fn track_orders(
        &self,
        request: Request<Streaming<TrackRequest>>,
    ) -> Result<Response<Self::TrackOrdersStream>, Status> {
        Ok(Response::new(watch::track(
            self.orders.clone(),
            request.into_inner(),
        )))
    }
}

pub(crate) fn event_to_proto(event: &store::EventRecord) -> OrderEvent {
    OrderEvent {
        order_id: event.order_id.clone(),
        status: event.status,
        status_reason: event.status_reason.clone(),
        at: Some(minimesh_proto::timestamp_from_unix_millis(event.at_ms)),
    }
}

/// The tonic service with the project's message size limits.
pub fn service(orders: Arc<Orders>) -> OrderServiceServer<OrderApi> {
    OrderServiceServer::new(OrderApi { orders })
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "S", "12", "123456789S", "1x", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
