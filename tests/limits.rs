//! Oversized and malformed requests get clear statuses, and the server keeps serving.

mod common;

use bytes::{Buf, BufMut};
use common::*;
use minimesh_proto::user::v1::{CreateUserRequest, GetUserRequest};
use std::time::Duration;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A codec that sends raw bytes as the message, to put garbage on the wire.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_call(url: &str, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("garbage must be refused")
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() {
    let shop = start_shop(Duration::from_secs(3600)).await;
    // Field 1 claims 100 bytes of string but none follow; then a bad wire type.
    for garbage in [vec![0x0a, 0x64], vec![0x0f, 0xff, 0xff]] {
        let status = raw_call(
            &shop.user_url,
            "/shop.user.v1.UserService/CreateUser",
            garbage,
        )
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains("malformed"),
            "{}",
            status.message()
        );
    }
    let status = raw_call(
        &shop.order_url,
        "/shop.order.v1.OrderService/CreateOrder",
        vec![0x12, 0xff],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    // Still serving afterwards.
    let mut users = shop.users().await;
    new_user(&mut users).await;
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    let shop = start_shop(Duration::from_secs(3600)).await;
    let mut users = shop.users().await;
    let huge = "x".repeat(5 * 1024 * 1024);
    let err = users
        .create_user(CreateUserRequest {
            email: "big@example.com".into(),
            display_name: huge.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let err = users
        .get_user(GetUserRequest { id: huge })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Large but within the limit: validated, not crashed.
    let long_name = "y".repeat(100_000);
    let err = users
        .create_user(CreateUserRequest {
            email: "long@example.com".into(),
            display_name: long_name,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("display_name"));
}
