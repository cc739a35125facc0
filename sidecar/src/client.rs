//! One HTTP/2 connection per endpoint, carrying every call to it as a
//! stream; plaintext (h2c, to the local application) or mesh mTLS (to a
//! peer's inbound listener). The connection is made on first use and again
//! after it closes.

use crate::body::ProxyBody;
use crate::metrics::{Metrics, OUTBOUND};
use crate::tls::{Reloader, server_name};
use crate::window::Windows;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use minimesh_spiffe::SpiffeId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// How a connection to an endpoint is made.
#[derive(Clone)]
pub enum Transport {
    /// h2c, for the local application.
    Plain,
    /// mTLS to a mesh peer, which must present `expected`.
    Mesh {
        /// This proxy's current client configuration.
        tls: Arc<Reloader>,
        /// The identity the peer's certificate must carry.
        expected: SpiffeId,
    },
}

/// Why a call could not be sent, and whether it may be retried.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; the request was not sent.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// What the connect or handshake failed with.
        message: String,
    },
    /// The peer refused the stream before processing it.
    #[error("{addr} refused the stream")]
    Refused {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// The call failed after it may have reached the peer.
    #[error("call to {addr} failed: {message}")]
    Failed {
        /// The endpoint.
        addr: SocketAddr,
        /// What the call failed with.
        message: String,
    },
}

impl SendError {
    /// True when the peer certainly never processed the request.
    pub fn never_sent(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::Refused { .. })
    }
}

/// One HTTP/2 connection to one endpoint, made on first use and again after it fails.
pub struct Connection {
    addr: SocketAddr,
    transport: Transport,
    connect_timeout: Duration,
    windows: Windows,
    metrics: Arc<Metrics>,
    slot: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<ProxyBody>>>,
}

/// Whether an h2 error in `err`'s source chain is REFUSED_STREAM.
fn refused_stream(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

impl Connection {
    /// A connection to `addr`, not yet open.
    pub fn new(
        addr: SocketAddr,
        transport: Transport,
        connect_timeout: Duration,
        windows: Windows,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            addr,
            transport,
            connect_timeout,
            windows,
            metrics,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http2::SendRequest<ProxyBody>, SendError> {
        let fail = |message: String| SendError::Connect {
            addr: self.addr,
            message,
        };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| fail(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(self.windows.stream)
            .initial_connection_window_size(self.windows.connection);
        let guard = self.metrics.connection(OUTBOUND);
        let sender = match &self.transport {
            Transport::Plain => {
                let (sender, conn) = builder
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                tokio::spawn(async move {
                    let _guard = guard;
                    if let Err(err) = conn.await {
                        tracing::debug!(%err, "h2c connection ended");
                    }
                });
                sender
            }
            Transport::Mesh { tls, expected } => {
                let config = tls
                    .current()
                    .client_for(expected)
                    .map_err(|e| fail(e.to_string()))?;
                let name = server_name(expected)
                    .ok_or_else(|| fail(format!("{} is not a valid server name", expected.name)))?;
                let connector = tokio_rustls::TlsConnector::from(config);
                let stream =
                    match tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp))
                        .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            self.metrics.tls_failure(OUTBOUND);
                            return Err(fail(format!("TLS handshake: {e}")));
                        }
                        Err(_) => {
                            self.metrics.tls_failure(OUTBOUND);
                            return Err(fail("TLS handshake timed out".to_owned()));
                        }
                    };
                let (sender, conn) = builder
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                tokio::spawn(async move {
                    let _guard = guard;
                    if let Err(err) = conn.await {
                        tracing::debug!(%err, "mTLS connection ended");
                    }
                });
                sender
            }
        };
        Ok(sender)
    }

    async fn sender(
        &self,
        fresh: bool,
    ) -> Result<hyper::client::conn::http2::SendRequest<ProxyBody>, SendError> {
        let mut slot = self.slot.lock().await;
        if !fresh
            && let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        *slot = None;
        // Boxed: the connect future (TCP, TLS and h2 handshakes) is several
        // KiB, and inline it made every call's future that large, to be
        // moved (memcpy) on each call although connecting is rare.
        let sender = Box::pin(self.connect()).await?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Sends one call. When the request was certainly not sent, it comes
    /// back with the error so the caller may try elsewhere.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, (SendError, Option<Request<ProxyBody>>)> {
        let mut request = request;
        // A connection may close between our check and the send; then the
        // request comes back unsent and one fresh connection is tried.
        for fresh in [false, true] {
            let mut sender = match self.sender(fresh).await {
                Ok(sender) => sender,
                Err(err) => return Err((err, Some(request))),
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if !fresh => {
                        request = unsent;
                        continue;
                    }
                    unsent => {
                        let error = err.into_error();
                        let kind = if unsent.is_some() {
                            SendError::Connect {
                                addr: self.addr,
                                message: error.to_string(),
                            }
                        } else if refused_stream(&error) {
                            SendError::Refused { addr: self.addr }
                        } else {
                            SendError::Failed {
                                addr: self.addr,
                                message: error.to_string(),
                            }
                        };
                        return Err((kind, unsent));
                    }
                },
            }
        }
        let err = SendError::Connect {
            addr: self.addr,
            message: "connection closed before the call could be sent".into(),
        };
        Err((err, Some(request)))
    }
}
