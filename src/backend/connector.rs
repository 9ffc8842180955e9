//! The pooled HTTP client's connector: plain-HTTP requests to a pool's
//! backends reuse connections made by [`crate::backend::upstream::connect`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Scheme, Uri};
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;

use super::pool::Backend;
use crate::backend::upstream::{self, BackendIo, ConnectError, Target};

/// The scheme a plain-HTTP request to this backend uses.
pub fn http_scheme(b: &Backend) -> Scheme {
    if b.url.tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    }
}

/// hyper-util's client calls this to open pooled connections for plain HTTP.
#[derive(Clone)]
pub struct PoolConnector {
    pub(super) tls: Option<TlsConnector>,
    pub(super) timeout: Duration,
}

impl PoolConnector {
    /// A connector for any URL (`https` through `tls`), for clients outside
    /// a pool (JWKS, forward auth).
    pub fn new(tls: Option<TlsConnector>, timeout: Duration) -> PoolConnector {
        PoolConnector { tls, timeout }
    }
}

impl tower::Service<Uri> for PoolConnector {
    type Response = TokioIo<BackendIo>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let https = uri.scheme() == Some(&Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let target = Target {
                host: &host,
                sni: &host,
                port,
                tls: if https { this.tls.as_ref() } else { None },
            };
            upstream::connect(target, this.timeout)
                .await
                .map(TokioIo::new)
        })
    }
}
