//! A WebSocket feed server the test drives: it publishes what the test
//! gives it to its connections (all, or those on one path), records what
//! the gateway sends it, and can drop its connections or die.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub struct Feed {
    pub addr: SocketAddr,
    /// (path filter, message): `None` goes to every connection.
    tx: broadcast::Sender<(Option<String>, Message)>,
    /// Open connections.
    open: watch::Receiver<usize>,
    /// Request targets of every connection accepted, in order.
    pub paths: Arc<Mutex<Vec<String>>>,
    /// Messages received from the gateway: (path, text or binary).
    pub received: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Message)>>,
    /// Cancelling drops every open connection (the listener stays).
    conns: Arc<Mutex<CancellationToken>>,
    /// Cancelling stops the listener and every connection.
    dead: CancellationToken,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.dead.cancel();
    }
}

impl Feed {
    pub async fn start() -> Feed {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind feed");
        let addr = l.local_addr().expect("addr");
        let (tx, _) = broadcast::channel::<(Option<String>, Message)>(4096);
        let (open_tx, open) = watch::channel(0usize);
        let open_tx = Arc::new(open_tx);
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (rec_tx, rec_rx) = mpsc::unbounded_channel();
        let conns = Arc::new(Mutex::new(CancellationToken::new()));
        let dead = CancellationToken::new();
        let (tx2, paths2, conns2, dead2) = (tx.clone(), paths.clone(), conns.clone(), dead.clone());
        tokio::spawn(async move {
            loop {
                let s = tokio::select! {
                    r = l.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                    _ = dead2.cancelled() => return,
                };
                let mut rx = tx2.subscribe();
                let (paths, open_tx, rec_tx) = (paths2.clone(), open_tx.clone(), rec_tx.clone());
                let drop_token = conns2.lock().expect("lock").clone();
                let dead = dead2.clone();
                tokio::spawn(async move {
                    let mut path = String::new();
                    #[allow(clippy::result_large_err)] // the callback type is tungstenite's
                    let cb = |req: &Request, resp: Response| {
                        path = req.uri().to_string();
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                        return;
                    };
                    paths.lock().expect("lock").push(path.clone());
                    open_tx.send_modify(|n| *n += 1);
                    loop {
                        tokio::select! {
                            m = rx.recv() => match m {
                                Ok((filter, m)) => {
                                    if filter.as_deref().is_none_or(|f| f == path)
                                        && ws.send(m).await.is_err()
                                    {
                                        break;
                                    }
                                }
                                Err(broadcast::error::RecvError::Lagged(_)) => panic!("feed lagged"),
                                Err(_) => break,
                            },
                            m = ws.next() => match m {
                                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                                    let _ = rec_tx.send((path.clone(), m));
                                }
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                            _ = drop_token.cancelled() => break,
                            _ = dead.cancelled() => break,
                        }
                    }
                    open_tx.send_modify(|n| *n -= 1);
                });
            }
        });
        Feed {
            addr,
            tx,
            open,
            paths,
            received: tokio::sync::Mutex::new(rec_rx),
            conns,
            dead,
        }
    }

    /// `ws://ADDR`
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn publish(&self, m: Message) {
        let _ = self.tx.send((None, m));
    }

    pub fn publish_to(&self, path: &str, m: Message) {
        let _ = self.tx.send((Some(path.to_string()), m));
    }

    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    pub fn accepted(&self) -> usize {
        self.paths.lock().expect("lock").len()
    }

    /// Waits until exactly `n` connections are open.
    pub async fn wait_open(&self, n: usize, limit: Duration) {
        let mut open = self.open.clone();
        tokio::time::timeout(limit, open.wait_for(|x| *x == n))
            .await
            .unwrap_or_else(|_| panic!("feed: {} open, waited for {n}", self.open()))
            .expect("feed alive");
    }

    /// Drops every open connection without a Close frame; keeps listening.
    pub fn drop_connections(&self) {
        let mut t = self.conns.lock().expect("lock");
        t.cancel();
        *t = CancellationToken::new();
    }

    /// Stops listening and drops every connection (a crash).
    pub fn kill(&self) {
        self.dead.cancel();
    }

    /// The next message the gateway sent this feed.
    pub async fn next_received(&self, limit: Duration) -> (String, Message) {
        tokio::time::timeout(limit, self.received.lock().await.recv())
            .await
            .expect("feed received nothing in time")
            .expect("feed alive")
    }
}

/// Raises the soft open-files limit to the hard one (tests with many sockets).
pub fn raise_nofile() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}
