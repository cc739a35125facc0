//! `acme.echo.v1.Echo`, served by a plain tonic server: an application the
//! mesh was not written for.

use std::net::SocketAddr;
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub mod v1 {
    tonic::include_proto!("acme.echo.v1");
}

use v1::echo_server::{Echo, EchoServer};
use v1::{SayReply, SayRequest};

/// Answers with the text it was sent and its own name.
pub struct EchoService {
    name: String,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, request: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        let request = request.into_inner();
        Ok(Response::new(SayReply {
            text: request.text,
            seq: request.seq,
            served_by: self.name.clone(),
        }))
    }

    type ChatStream = Pin<Box<dyn Stream<Item = Result<SayReply, Status>> + Send>>;

    async fn chat(
        &self,
        request: Request<Streaming<SayRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let name = self.name.clone();
        let replies = request.into_inner().map(move |message| {
            message.map(|m| SayReply {
                text: m.text,
                seq: m.seq,
                served_by: name.clone(),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// Serves Echo on a fresh loopback port until the returned sender is dropped
/// or used; returns the address.
pub async fn serve(name: &str) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a loopback port");
    let addr = listener.local_addr().expect("local address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = EchoServer::new(EchoService {
        name: name.to_owned(),
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    (addr, stop)
}
