//! Backend pools: the backends of one service, how the next one is picked,
//! and the live-connection count each carries.
//!
//! Picking takes no lock and allocates nothing: a round-robin counter and
//! per-backend counts are atomics. Failover is a walk over the backends in
//! `try_order`, starting with the balancer's pick.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::TlsConnector;

use crate::config::{BackendUrl, Balance, PoolConfig};
use crate::tls::{self, TlsError};
use crate::upstream::{self, BackendIo, ConnectError, Target};

/// One backend instance.
#[derive(Debug)]
pub struct Backend {
    pub url: BackendUrl,
    /// `host:port` as sent in `Host` when the route does not preserve the client's.
    pub authority: Authority,
    /// Live upgraded sessions; `least_conn` reads it.
    active: AtomicUsize,
}

impl Backend {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts one live session on a backend for as long as it is held.
#[derive(Debug)]
pub struct BackendGuard(Arc<Backend>);

impl BackendGuard {
    pub fn new(b: Arc<Backend>) -> Self {
        b.active.fetch_add(1, Ordering::Relaxed);
        BackendGuard(b)
    }
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub type HttpClient = Client<PoolConnector, crate::error::Body>;

pub struct Pool {
    pub name: String,
    pub balance: Balance,
    pub connect_timeout: Duration,
    backends: Box<[Arc<Backend>]>,
    /// Round-robin position; also breaks `least_conn` ties.
    next: AtomicUsize,
    tls: Option<TlsConnector>,
    /// Plain-HTTP requests reuse connections through this client.
    pub http: HttpClient,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool `{pool}`: backend {backend}: {source}")]
    BadBackend {
        pool: String,
        backend: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("pool `{pool}`: {source}")]
    Tls {
        pool: String,
        #[source]
        source: TlsError,
    },
}

impl Pool {
    pub fn new(cfg: &PoolConfig) -> Result<Pool, PoolError> {
        let tls = if cfg.backends.iter().any(|b| b.tls) {
            let cc =
                tls::client_config(cfg.ca_file.as_deref()).map_err(|source| PoolError::Tls {
                    pool: cfg.name.clone(),
                    source,
                })?;
            Some(upstream::tls_connector(cc))
        } else {
            None
        };
        let backends = cfg
            .backends
            .iter()
            .map(|u| {
                let host = if u.host.contains(':') {
                    format!("[{}]", u.host)
                } else {
                    u.host.clone()
                };
                let authority =
                    Authority::try_from(format!("{host}:{}", u.port)).map_err(|source| {
                        PoolError::BadBackend {
                            pool: cfg.name.clone(),
                            backend: u.to_string(),
                            source,
                        }
                    })?;
                Ok(Arc::new(Backend {
                    url: u.clone(),
                    authority,
                    active: AtomicUsize::new(0),
                }))
            })
            .collect::<Result<Vec<_>, PoolError>>()?;
        let connector = PoolConnector {
            tls: tls.clone(),
            timeout: cfg.connect_timeout,
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Pool {
            name: cfg.name.clone(),
            balance: cfg.balance,
            connect_timeout: cfg.connect_timeout,
            backends: backends.into(),
            next: AtomicUsize::new(0),
            tls,
            http,
        })
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Index of the balancer's first choice.
    fn first(&self) -> usize {
        let n = self.backends.len();
        let rr = self.next.fetch_add(1, Ordering::Relaxed);
        match self.balance {
            Balance::RoundRobin => rr % n,
            Balance::LeastConn => {
                // Scan from a rotating start so ties spread evenly.
                let mut best = rr % n;
                let mut best_load = self.backends[best].active();
                for k in 1..n {
                    let i = (rr + k) % n;
                    let load = self.backends[i].active();
                    if load < best_load {
                        best = i;
                        best_load = load;
                    }
                }
                best
            }
        }
    }

    /// Every backend once, the balancer's pick first: the failover order for one request.
    pub fn try_order(&self) -> impl Iterator<Item = &Arc<Backend>> + '_ {
        let n = self.backends.len();
        let start = self.first();
        (0..n).map(move |k| &self.backends[(start + k) % n])
    }

    /// Opens a connection to one backend of this pool.
    pub async fn connect(&self, b: &Backend) -> Result<BackendIo, ConnectError> {
        let target = Target {
            host: &b.url.host,
            port: b.url.port,
            tls: if b.url.tls { self.tls.as_ref() } else { None },
        };
        upstream::connect(target, self.connect_timeout).await
    }
}

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
    tls: Option<TlsConnector>,
    timeout: Duration,
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
                port,
                tls: if https { this.tls.as_ref() } else { None },
            };
            upstream::connect(target, this.timeout)
                .await
                .map(TokioIo::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance, n: usize) -> Pool {
        let cfg = PoolConfig {
            name: "p".into(),
            balance,
            connect_timeout: Duration::from_secs(1),
            backends: (0..n)
                .map(|i| format!("ws://127.0.0.1:{}", 9000 + i).parse().unwrap())
                .collect(),
            ca_file: None,
        };
        Pool::new(&cfg).unwrap()
    }

    fn first_port(p: &Pool) -> u16 {
        p.try_order().next().unwrap().url.port
    }

    #[tokio::test]
    async fn round_robin_cycles_and_try_order_covers_all() {
        let p = pool(Balance::RoundRobin, 3);
        let firsts: Vec<u16> = (0..6).map(|_| first_port(&p)).collect();
        assert_eq!(firsts, [9000, 9001, 9002, 9000, 9001, 9002]);
        let order: Vec<u16> = p.try_order().map(|b| b.url.port).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, [9000, 9001, 9002]);
    }

    #[tokio::test]
    async fn least_conn_follows_live_guards() {
        let p = pool(Balance::LeastConn, 3);
        let b0 = p.backends()[0].clone();
        let b1 = p.backends()[1].clone();
        let _g: Vec<BackendGuard> = (0..2)
            .map(|_| BackendGuard::new(b0.clone()))
            .chain([BackendGuard::new(b1.clone())])
            .collect();
        for _ in 0..5 {
            assert_eq!(first_port(&p), 9002);
        }
        {
            let _more: Vec<BackendGuard> = (0..3)
                .map(|_| BackendGuard::new(p.backends()[2].clone()))
                .collect();
            assert_eq!(first_port(&p), 9001);
        }
        // Guards released on drop: back to the emptiest.
        assert_eq!(p.backends()[2].active(), 0);
        assert_eq!(first_port(&p), 9002);
    }
}
