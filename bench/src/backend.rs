//! The benchmark's target: an echo implementation of the shop APIs that does
//! no work of its own, so the numbers measure the path, not the service.

use minimesh_proto::order::v1::order_service_server::{OrderService, OrderServiceServer};
use minimesh_proto::order::v1::{
    CancelOrderRequest, CreateOrderRequest, GetOrderRequest, ListOrdersRequest, ListOrdersResponse,
    Order, OrderEvent, TrackRequest, WatchOrderRequest,
};
use minimesh_proto::payment::v1::payment_service_server::{PaymentService, PaymentServiceServer};
use minimesh_proto::payment::v1::{
    ChargeRequest, ChargeResult, GetPaymentRequest, Payment, RefundRequest, charge_result,
};
use std::pin::Pin;
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The echo backend: answers every call at once, payload back, so the benchmark measures the path, not the service.
#[derive(Default, Clone)]
pub struct Echo;

#[tonic::async_trait]
impl PaymentService for Echo {
    /// Echoes the id (the payload) back.
    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        Ok(Response::new(Payment {
            id: request.into_inner().id,
            ..Default::default()
        }))
    }

    async fn charge(&self, request: Request<ChargeRequest>) -> Result<Response<Payment>, Status> {
        let req = request.into_inner();
        Ok(Response::new(Payment {
            id: req.order_id.clone(),
            order_id: req.order_id,
            ..Default::default()
        }))
    }

    async fn refund(&self, _: Request<RefundRequest>) -> Result<Response<Payment>, Status> {
        Err(Status::unimplemented(
            "the benchmark backend does not refund",
        ))
    }

    type ChargeStreamStream = BoxStream<ChargeResult>;

    /// One result per request, echoing its order id.
    async fn charge_stream(
        &self,
        request: Request<Streaming<ChargeRequest>>,
    ) -> Result<Response<Self::ChargeStreamStream>, Status> {
        let mut index = 0u64;
        let stream = request.into_inner().map(move |next| {
            let req = next?;
            let result = ChargeResult {
                index,
                result: Some(charge_result::Result::Payment(Payment {
                    id: req.order_id,
                    ..Default::default()
                })),
            };
            index += 1;
            Ok(result)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl OrderService for Echo {
    async fn create_order(
        &self,
        _: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        Err(Status::unimplemented("benchmark backend"))
    }
    async fn get_order(&self, _: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        Err(Status::unimplemented("benchmark backend"))
    }
    async fn list_orders(
        &self,
        _: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        Err(Status::unimplemented("benchmark backend"))
    }
    async fn cancel_order(
        &self,
        _: Request<CancelOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        Err(Status::unimplemented("benchmark backend"))
    }

    type WatchOrderStream = BoxStream<OrderEvent>;

    /// Streams events carrying the requested id (the payload) until the client goes away.
    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let id = request.into_inner().id;
        let stream = futures::stream::repeat_with(move || {
            Ok(OrderEvent {
                order_id: id.clone(),
                status: 2,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type TrackOrdersStream = BoxStream<OrderEvent>;

    async fn track_orders(
        &self,
        _: Request<Streaming<TrackRequest>>,
    ) -> Result<Response<Self::TrackOrdersStream>, Status> {
        Err(Status::unimplemented("benchmark backend"))
    }
}

/// Serves the echo backend on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener) -> Result<(), tonic::transport::Error> {
    const MAX: usize = 16 * 1024 * 1024;
    tonic::transport::Server::builder()
        .add_service(PaymentServiceServer::new(Echo).max_decoding_message_size(MAX))
        .add_service(OrderServiceServer::new(Echo).max_decoding_message_size(MAX))
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await
}
