//! The edge's TLS stream: rustls's unbuffered server connection driven over
//! a tokio `TcpStream`, holding buffers only while bytes are in flight.
//!
//! Why not tokio-rustls here: the buffered `ServerConnection` it drives
//! keeps a receive buffer of at least 4 KiB for the connection's whole life
//! (rustls's deframer never shrinks below one read), more than an idle
//! plain session costs altogether. With the unbuffered API the caller lends
//! the buffers, so an idle TLS connection holds none: ciphertext is read
//! into a buffer of the per-thread pool only once the socket is readable,
//! decrypted and handed over, and the buffer goes back. A record that
//! arrives in pieces keeps only its piece (a small one in an exact-size
//! copy, so a client that trickles bytes cannot pin a whole pooled buffer
//! per connection). Outgoing records are encrypted into a pooled buffer
//! that goes back once the socket has taken them.
//!
//! [`Core`] is the sans-IO part (what the fuzz target drives); [`TlsStream`]
//! adds the socket. The streams behave as tokio-rustls's do: a peer's
//! close_notify reads as the end of the stream, a TCP close without it as an
//! `UnexpectedEof` error, and shutting down sends close_notify, then FIN.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::buffers::{Buf, BUF_SIZE};

/// Plaintext encrypted per write: two full records and their overhead fit
/// one pooled buffer.
const MAX_PLAIN: usize = BUF_SIZE - 512;
/// Handshake messages may span records up to this size in all (rustls's own
/// limit for its buffered connection).
const MAX_INCOMING: usize = 0x1_0000 + 5;
/// A partial record at most this long waits in an exact-size copy; a longer
/// one keeps its pooled buffer (its sender has shown it sends).
const KEEP_SMALL: usize = 4096;

/// What processing the received ciphertext led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Everything received is processed: more ciphertext is needed.
    NeedInput,
    /// Plaintext was delivered (the reader's buffer is full, or it has some).
    Data,
    /// The peer sent close_notify: nothing more will arrive.
    PeerClosed,
}

/// What a caller of [`Core::drive`] wants once the connection may send.
#[derive(Clone, Copy)]
enum Want<'a> {
    /// Only to read: stop there, more input is needed.
    Read,
    /// To encrypt these bytes.
    Write(&'a [u8]),
    /// To queue close_notify.
    Close,
}

/// Ciphertext to send: a buffer (pooled while it is `BUF_SIZE`) and its
/// unsent range; none while nothing waits.
#[derive(Default)]
struct Outgoing(Option<(Buf, u32, u32)>);

impl Outgoing {
    /// Room for at least `need` more bytes.
    fn room(&mut self, need: usize) -> &mut [u8] {
        let (buf, start, end) = self.0.get_or_insert_with(|| (Buf::take(), 0, 0));
        let (s, e) = (*start as usize, *end as usize);
        if buf.len() < BUF_SIZE && buf.len() - e < need {
            // A small kept copy: back into a pooled buffer.
            let pooled = Buf::pooled_copy(&buf.bytes()[s..e]);
            (*buf, *start, *end) = (pooled, 0, u32_of(e - s));
        }
        let (s, e) = (*start as usize, *end as usize);
        if buf.len() - e < need && s > 0 {
            buf.bytes().copy_within(s..e, 0);
            (*start, *end) = (0, u32_of(e - s));
        }
        let e = *end as usize;
        if buf.len() - e < need {
            buf.grow(e + need, e);
        }
        &mut buf.bytes()[e..]
    }

    /// `n` bytes were written into [`Outgoing::room`].
    fn wrote(&mut self, n: usize) {
        if let Some((buf, _, end)) = &mut self.0 {
            *end = u32_of((*end as usize + n).min(buf.len()));
        }
    }

    /// Fills the room with `write` (which answers how much room it needs
    /// when it has too little).
    fn fill(
        &mut self,
        mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
    ) -> Result<(), rustls::Error> {
        let mut need = 0;
        loop {
            match write(self.room(need)) {
                Ok(n) => {
                    self.wrote(n);
                    return Ok(());
                }
                Err(Some(more)) if more > need => need = more,
                Err(_) => return Err(rustls::Error::General("cannot encode a TLS record".into())),
            }
        }
    }
}

/// The sans-IO state of one server connection: rustls's state and the
/// bytes in flight either way.
pub(crate) struct Core {
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet processed: the buffer and how much of it is used.
    incoming: Option<(Buf, u32)>,
    outgoing: Outgoing,
    /// Decrypted plaintext the reader had no room for, and how much of it was read.
    plain: Vec<u8>,
    plain_read: usize,
    peer_closed: bool,
    close_queued: bool,
}

/// The room an encoding needs, when it had too little (for [`Outgoing::fill`]).
fn encode_room(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn u32_of(n: usize) -> u32 {
    // Buffer lengths are bounded by MAX_INCOMING or by an encoded record.
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Core {
    pub(crate) fn new(config: Arc<rustls::ServerConfig>) -> Result<Core, rustls::Error> {
        Ok(Core {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: None,
            outgoing: Outgoing::default(),
            plain: Vec::new(),
            plain_read: 0,
            peer_closed: false,
            close_queued: false,
        })
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Whether received ciphertext waits to be processed.
    pub(crate) fn has_input(&self) -> bool {
        self.incoming.is_some()
    }

    pub(crate) fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Room to receive ciphertext into (a pooled buffer is taken, or a
    /// kept partial record moved into one). Fails when a handshake message
    /// outgrows `MAX_INCOMING`.
    pub(crate) fn room(&mut self) -> io::Result<&mut [u8]> {
        let (buf, used) = self.incoming.get_or_insert_with(|| (Buf::take(), 0));
        let used_n = *used as usize;
        if buf.len() < BUF_SIZE {
            // A kept partial record: back into a pooled buffer.
            *buf = Buf::pooled_copy(&buf.bytes()[..used_n]);
        }
        if used_n == buf.len() {
            if buf.len() >= MAX_INCOMING {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS handshake message too large",
                ));
            }
            buf.grow(MAX_INCOMING, used_n);
        }
        Ok(&mut buf.bytes()[used_n..])
    }

    /// `n` bytes were received into [`Core::room`].
    pub(crate) fn received(&mut self, n: usize) {
        if let Some((buf, used)) = &mut self.incoming {
            *used = u32_of((*used as usize + n).min(buf.len()));
        }
    }

    /// The socket has nothing more for now: give the receive buffer back,
    /// or keep a small partial record in an exact-size copy.
    pub(crate) fn rest(&mut self) {
        let Some((buf, used)) = &mut self.incoming else {
            return;
        };
        let used_n = *used as usize;
        if used_n == 0 {
            self.incoming = None;
        } else if used_n <= KEEP_SMALL && buf.len() == BUF_SIZE {
            *buf = Buf::exact(&buf.bytes()[..used_n]);
        }
    }

    fn discard(&mut self, n: usize) {
        if let Some((buf, used)) = &mut self.incoming {
            let used_n = *used as usize;
            let n = n.min(used_n);
            if n == used_n {
                // All processed: the buffer goes back to the pool.
                self.incoming = None;
            } else if n > 0 {
                buf.bytes().copy_within(n..used_n, 0);
                *used = u32_of(used_n - n);
            }
        }
    }

    pub(crate) fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Bytes of ciphertext waiting to be sent.
    pub(crate) fn pending_len(&self) -> usize {
        self.outgoing
            .0
            .as_ref()
            .map_or(0, |(_, start, end)| end.saturating_sub(*start) as usize)
    }

    /// Ciphertext waiting to be sent (empty when there is none).
    pub(crate) fn pending(&mut self) -> &[u8] {
        match &mut self.outgoing.0 {
            Some((buf, start, end)) => &buf.bytes()[*start as usize..*end as usize],
            None => &[],
        }
    }

    /// Moves ciphertext waiting in a pooled buffer into an exact-size copy.
    pub(crate) fn keep_pending_small(&mut self) {
        if let Some((buf, start, end)) = &mut self.outgoing.0 {
            if buf.len() == BUF_SIZE && start < end {
                let kept = Buf::exact(&buf.bytes()[*start as usize..*end as usize]);
                (*buf, *start, *end) = (kept, 0, end.saturating_sub(*start));
            }
        }
    }

    /// `n` bytes of [`Core::pending`] were sent; an emptied buffer goes back.
    pub(crate) fn sent(&mut self, n: usize) {
        if let Some((_, start, end)) = &mut self.outgoing.0 {
            *start = u32_of((*start as usize + n).min(*end as usize));
            if start == end {
                self.outgoing.0 = None;
            }
        }
    }

    /// Copies plaintext the reader had no room for; whether it copied any.
    pub(crate) fn take_plain(&mut self, dst: &mut ReadBuf<'_>) -> bool {
        if self.plain_read == self.plain.len() || dst.remaining() == 0 {
            return false;
        }
        let rest = &self.plain[self.plain_read..];
        let n = rest.len().min(dst.remaining());
        dst.put_slice(&rest[..n]);
        self.plain_read += n;
        if self.plain_read == self.plain.len() {
            // Freed: a long-lived connection does not keep its largest record.
            (self.plain, self.plain_read) = (Vec::new(), 0);
        }
        true
    }

    /// Processes the ciphertext received so far: handshake records are
    /// answered (into the outgoing buffer), application data goes to
    /// `dst` and, past its room, into `plain`. Stops when `dst` is full or
    /// more input is needed.
    pub(crate) fn process(&mut self, dst: &mut ReadBuf<'_>) -> Result<Step, rustls::Error> {
        self.drive(dst, Want::Read).map(|(step, _)| step)
    }

    /// Encrypts up to `MAX_PLAIN` bytes of `data` into the outgoing buffer;
    /// how many it took. Records received meanwhile are decrypted into `plain`.
    pub(crate) fn encrypt(&mut self, data: &[u8]) -> Result<usize, rustls::Error> {
        if self.close_queued {
            return Err(rustls::Error::General("write after close_notify".into()));
        }
        // Within one buffer, with what already waits to be sent.
        let room = MAX_PLAIN.saturating_sub(self.pending_len()).max(1);
        let data = &data[..data.len().min(room)];
        match self.drive(&mut ReadBuf::new(&mut []), Want::Write(data))? {
            (_, true) => Ok(data.len()),
            (_, false) => Err(rustls::Error::General(
                "write on a closed connection".into(),
            )),
        }
    }

    /// Queues close_notify (once). Records received meanwhile are decrypted into `plain`.
    pub(crate) fn close(&mut self) -> Result<(), rustls::Error> {
        if !self.close_queued {
            self.drive(&mut ReadBuf::new(&mut []), Want::Close)?;
            self.close_queued = true;
        }
        Ok(())
    }

    /// Runs rustls's state machine over what was received until it needs
    /// input (`Want::Read`) or has done what was wanted once it may send.
    /// Also returns whether that was done (a closed connection cannot).
    fn drive(
        &mut self,
        dst: &mut ReadBuf<'_>,
        want: Want<'_>,
    ) -> Result<(Step, bool), rustls::Error> {
        let mut delivered = false;
        loop {
            let Core {
                conn,
                incoming,
                outgoing,
                plain,
                peer_closed,
                ..
            } = self;
            let input: &mut [u8] = match incoming {
                Some((buf, used)) => &mut buf.bytes()[..*used as usize],
                None => &mut [],
            };
            let input_len = input.len();
            let status = conn.process_tls_records(input);
            let discard = status.discard;
            let done = match status.state? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let payload = record?.payload;
                        // In order: behind plaintext not yet read, nothing goes to `dst`.
                        let room = if plain.is_empty() { dst.remaining() } else { 0 };
                        let n = payload.len().min(room);
                        dst.put_slice(&payload[..n]);
                        plain.extend_from_slice(&payload[n..]);
                        delivered |= n > 0;
                    }
                    match want {
                        // Full, or everything received is read: the reader
                        // goes on (anything rustls queued meanwhile is
                        // answered on the next call, before any new input).
                        Want::Read if dst.remaining() == 0 || discard >= input_len => {
                            Some((Step::Data, false))
                        }
                        _ => None,
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    outgoing.fill(|room| encode.encode(room).map_err(encode_room))?;
                    None
                }
                // Encoded records stay in the outgoing buffer, in order,
                // until the socket takes them.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    *peer_closed = true;
                    match want {
                        Want::Read => Some((Step::PeerClosed, false)),
                        _ => None,
                    }
                }
                ConnectionState::Closed => {
                    *peer_closed = true;
                    Some((Step::PeerClosed, false))
                }
                ConnectionState::WriteTraffic(mut write) => {
                    let too_small = |e: EncryptError| match e {
                        EncryptError::InsufficientSize(s) => Some(s.required_size),
                        _ => None,
                    };
                    match want {
                        Want::Read => Some((Step::NeedInput, false)),
                        Want::Write(data) => {
                            outgoing.fill(|room| write.encrypt(data, room).map_err(too_small))?;
                            Some((Step::NeedInput, true))
                        }
                        Want::Close => {
                            outgoing
                                .fill(|room| write.queue_close_notify(room).map_err(too_small))?;
                            Some((Step::NeedInput, true))
                        }
                    }
                }
                ConnectionState::BlockedHandshake => match want {
                    Want::Read => Some((Step::NeedInput, false)),
                    _ => {
                        return Err(rustls::Error::General(
                            "TLS connection not ready to send".into(),
                        ))
                    }
                },
                // Early data is never enabled; any other state is new to us.
                _ => {
                    return Err(rustls::Error::General(
                        "unexpected TLS connection state".into(),
                    ))
                }
            };
            self.discard(discard);
            match done {
                // The reader gets its data first; a close is seen on the next call.
                Some((_, false)) if delivered => return Ok((Step::Data, false)),
                Some(done) => return Ok(done),
                None => {}
            }
        }
    }

    /// The buffers' bounds (for the fuzz target): what is received stays
    /// within the largest handshake message, what waits to be read within
    /// what could have been received.
    pub(crate) fn check_bounds(&self) {
        if let Some((buf, used)) = &self.incoming {
            assert!(buf.len() <= MAX_INCOMING && *used as usize <= buf.len());
        }
        assert!(self.plain.len() <= 2 * MAX_INCOMING, "plaintext piles up");
        if let Some((buf, start, end)) = &self.outgoing.0 {
            assert!(start <= end && *end as usize <= buf.len());
        }
    }

    /// After a failure: whatever alert rustls queued, encoded for a last send.
    pub(crate) fn queue_alert(&mut self) {
        for _ in 0..4 {
            let status = self.conn.process_tls_records(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state else {
                return;
            };
            let encoded = self
                .outgoing
                .fill(|room| encode.encode(room).map_err(encode_room));
            if encoded.is_err() {
                return;
            }
        }
    }
}

/// A server-side TLS connection over TCP (see the module's notes).
pub struct TlsStream {
    tcp: TcpStream,
    core: Core,
    /// The socket reached its end (or failed).
    tcp_eof: bool,
    /// Only the session tickets wait: they go with the first write (or the
    /// close), not on a flush.
    hold: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Runs the server side of a TLS handshake on `tcp`.
    pub async fn accept(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<TlsStream> {
        let core = Core::new(config).map_err(tls_error)?;
        let mut s = TlsStream {
            tcp,
            core,
            tcp_eof: false,
            hold: false,
        };
        poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    /// The protocol the client and upgate agreed on by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.core.alpn_protocol()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut none = ReadBuf::new(&mut []);
            let step = self.core.process(&mut none).map_err(|e| self.failed(e))?;
            // TLS 1.3 ends with the client's Finished: what is left to send
            // then (the session tickets) goes with the first write (one
            // system call and one packet less per connection). A TLS 1.2
            // server sends its Finished last, and the client waits for it.
            if !self.core.is_handshaking()
                && self.core.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
            {
                // Kept small: a client that never sends a request must not
                // pin a pooled buffer.
                self.core.keep_pending_small();
                self.hold = self.core.pending_len() > 0;
                return Poll::Ready(Ok(()));
            }
            // The flight goes out before waiting for the client's answer.
            ready!(self.poll_send(cx))?;
            if !self.core.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match step {
                Step::NeedInput => ready!(self.poll_fill(cx))?,
                Step::Data => {}
                Step::PeerClosed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls handshake eof",
                    )))
                }
            }
        }
    }

    /// A failed connection: its alert is sent if the socket takes it now.
    fn failed(&mut self, e: rustls::Error) -> io::Error {
        self.core.queue_alert();
        let pending = self.core.pending();
        if !pending.is_empty() {
            if let Ok(n) = self.tcp.try_write(pending) {
                self.core.sent(n);
            }
        }
        tls_error(e)
    }

    /// Receives ciphertext: waits for the socket to be readable without
    /// holding a buffer, then reads what is there.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tcp_eof {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if self.core.is_handshaking() {
                    "tls handshake eof"
                } else {
                    "peer closed connection without sending TLS close_notify"
                },
            )));
        }
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let room = self.core.room()?;
            match self.tcp.try_read(room) {
                Ok(0) => {
                    self.tcp_eof = true;
                    self.core.rest();
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    self.core.received(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: wait again, holding no buffer.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.core.rest(),
                Err(e) => {
                    self.core.rest();
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    /// Sends the outgoing ciphertext until none is left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let pending = self.core.pending();
            if pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.core.sent(n);
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.core.take_plain(buf) || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.core.peer_closed() {
                return Poll::Ready(Ok(()));
            }
            if !this.core.has_input() {
                // Nothing received to process (everything before was read).
                ready!(this.poll_fill(cx))?;
            }
            let before = buf.filled().len();
            let step = this.core.process(buf).map_err(|e| this.failed(e))?;
            // Answers to the peer's handshake records (a key update) go out
            // now if the socket takes them, else with the next write.
            if !this.hold {
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if buf.filled().len() > before || step == Step::PeerClosed {
                return Poll::Ready(Ok(()));
            }
            if this.core.has_input() {
                ready!(this.poll_fill(cx))?;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Records still waiting are sent first once they fill half a
        // buffer; fewer go out with this one, in one write.
        if this.core.pending_len() > BUF_SIZE / 2 {
            ready!(this.poll_send(cx))?;
        }
        let n = this.core.encrypt(data).map_err(|e| this.failed(e))?;
        this.hold = false;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hold {
            // Nothing the caller wrote is waiting.
            return Poll::Ready(Ok(()));
        }
        this.poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.hold = false;
        this.core.close().map_err(|e| this.failed(e))?;
        ready!(this.poll_send(cx))?;
        match ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// A server [`Core`] and a rustls client in memory, with a self-signed
/// certificate made once per process: for the unit tests and the fuzz
/// target, which move the bytes between them themselves.
pub(crate) mod memory {
    use std::sync::{Arc, OnceLock};

    use rustls::{ClientConfig, ClientConnection, ServerConfig};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    use super::Core;

    pub(crate) fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        static CONFIGS: OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> = OnceLock::new();
        CONFIGS
            .get_or_init(|| {
                let (c, k) = super::super::self_signed(&["localhost"]).expect("a certificate");
                let cert = CertificateDer::from_pem_slice(c.as_bytes()).expect("its PEM");
                let key = PrivateKeyDer::from_pem_slice(k.as_bytes()).expect("its key");
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut server = ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .expect("TLS versions")
                    .with_no_client_auth()
                    .with_single_cert(vec![cert.clone()], key)
                    .expect("the certificate");
                server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let mut roots = rustls::RootCertStore::empty();
                roots.add(cert).expect("the root");
                let mut client = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("TLS versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                client.alpn_protocols = vec![b"http/1.1".to_vec()];
                (Arc::new(server), Arc::new(client))
            })
            .clone()
    }

    pub(crate) fn pair() -> (Core, ClientConnection) {
        let (server, client) = configs();
        let core = Core::new(server).expect("a server connection");
        let name = "localhost".try_into().expect("a server name");
        let client = ClientConnection::new(client, name).expect("a client connection");
        (core, client)
    }

    /// Moves everything the client has to send into the server, in pieces of
    /// `step` bytes, letting the server rest between pieces.
    pub(crate) fn to_server(client: &mut ClientConnection, core: &mut Core, step: usize) {
        let mut wire = Vec::new();
        while client.wants_write() {
            if client.write_tls(&mut wire).is_err() {
                break;
            }
        }
        for piece in wire.chunks(step.max(1)) {
            let Ok(room) = core.room() else { return };
            let n = piece.len().min(room.len());
            room[..n].copy_from_slice(&piece[..n]);
            core.received(n);
            core.rest();
        }
    }

    /// Moves what the server has to send into the client.
    pub(crate) fn to_client(core: &mut Core, client: &mut ClientConnection) {
        let wire = core.pending().to_vec();
        core.sent(wire.len());
        let mut rd = &wire[..];
        while !rd.is_empty() {
            if client.read_tls(&mut rd).is_err() || client.process_new_packets().is_err() {
                return;
            }
        }
    }

    /// Runs the handshake to its end; whether it completed.
    pub(crate) fn handshake(core: &mut Core, client: &mut ClientConnection) -> bool {
        for _ in 0..8 {
            to_server(client, core, usize::MAX);
            let mut none = tokio::io::ReadBuf::new(&mut []);
            if core.process(&mut none).is_err() {
                return false;
            }
            to_client(core, client);
            if !core.is_handshaking() && !client.is_handshaking() {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_record_that_trickles_in_waits_in_a_small_copy_and_arrives_whole() {
        let (mut core, mut client) = memory::pair();
        assert!(memory::handshake(&mut core, &mut client));
        let sent = pattern(3000);
        client.writer().write_all(&sent).unwrap();
        // One byte at a time: between bytes the partial record must not
        // hold a pooled buffer.
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut got = Vec::new();
        let mut space = [0u8; 700];
        for &b in &wire {
            core.room().unwrap()[0] = b;
            core.received(1);
            loop {
                let mut dst = ReadBuf::new(&mut space);
                if !core.take_plain(&mut dst) {
                    core.process(&mut dst).unwrap();
                }
                if dst.filled().is_empty() {
                    break;
                }
                got.extend_from_slice(dst.filled());
            }
            core.rest();
            if let Some((buf, used)) = &core.incoming {
                assert!(*used > 0, "an empty buffer is given back");
                assert_eq!(
                    buf.len(),
                    *used as usize,
                    "a partial record waits in an exact copy"
                );
            }
        }
        assert!(got == sent, "the plaintext arrived whole and in order");
        assert!(
            core.incoming.is_none(),
            "nothing left once the record is read"
        );
    }

    #[test]
    fn a_handshake_message_over_64_kib_fails_the_connection() {
        let (mut core, _) = memory::pair();
        // A ClientHello announcing 65,520 bytes, in full-size records.
        let mut body = vec![0x01, 0x00, 0xff, 0xf0];
        body.resize(4 + 65_520, 0x42);
        let mut wire = Vec::new();
        for record in body.chunks(16_384) {
            let len = u16::try_from(record.len()).unwrap().to_be_bytes();
            wire.extend_from_slice(&[0x16, 0x03, 0x01, len[0], len[1]]);
            wire.extend_from_slice(record);
        }
        let mut failed = false;
        let mut at = 0;
        while at < wire.len() {
            let room = match core.room() {
                Ok(room) => room,
                Err(_) => {
                    failed = true;
                    break;
                }
            };
            let n = room.len().min(wire.len() - at).min(4096);
            room[..n].copy_from_slice(&wire[at..at + n]);
            core.received(n);
            at += n;
            core.check_bounds();
            let mut none = ReadBuf::new(&mut []);
            if core.process(&mut none).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a handshake message over 64 KiB is refused");
        core.check_bounds();
    }

    #[test]
    fn writes_larger_than_a_buffer_are_taken_in_parts_and_read_back_whole() {
        let (mut core, mut client) = memory::pair();
        assert!(memory::handshake(&mut core, &mut client));
        let sent = pattern(100_000);
        let mut at = 0;
        let mut got = Vec::new();
        while at < sent.len() {
            let n = core.encrypt(&sent[at..]).unwrap();
            assert!(n > 0 && n <= MAX_PLAIN);
            at += n;
            memory::to_client(&mut core, &mut client);
            client.reader().read_to_end(&mut got).ok();
        }
        assert!(got == sent, "the plaintext arrived whole and in order");
        assert!(core.outgoing.0.is_none(), "the sent buffer went back");
    }

    #[test]
    fn close_notify_reads_as_the_end_and_is_sent_on_close() {
        let (mut core, mut client) = memory::pair();
        assert!(memory::handshake(&mut core, &mut client));
        client.writer().write_all(b"last words").unwrap();
        client.send_close_notify();
        memory::to_server(&mut client, &mut core, 7);
        let mut space = [0u8; 64];
        let mut dst = ReadBuf::new(&mut space);
        assert_eq!(core.process(&mut dst).unwrap(), Step::Data);
        assert_eq!(dst.filled(), b"last words");
        // The data first; the close is kept for the next read (the stream's end).
        assert!(core.peer_closed());
        // Still allowed to answer, then close.
        core.encrypt(b"bye").unwrap();
        core.close().unwrap();
        memory::to_client(&mut core, &mut client);
        let mut got = Vec::new();
        client.reader().read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        assert!(core.encrypt(b"more").is_err(), "nothing after close_notify");
    }

    #[test]
    fn a_key_update_from_the_client_is_followed() {
        let (mut core, mut client) = memory::pair();
        assert!(memory::handshake(&mut core, &mut client));
        client.writer().write_all(b"before").unwrap();
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(b"after").unwrap();
        memory::to_server(&mut client, &mut core, 5);
        let mut got = Vec::new();
        let mut space = [0u8; 64];
        loop {
            let mut dst = ReadBuf::new(&mut space);
            let step = core.process(&mut dst).unwrap();
            got.extend_from_slice(dst.filled());
            if step == Step::NeedInput {
                break;
            }
        }
        assert_eq!(got, b"beforeafter");
        // The server still writes to the client (its own keys are its own).
        core.encrypt(b"ok").unwrap();
        memory::to_client(&mut core, &mut client);
        let mut back = [0u8; 2];
        client.reader().read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ok");
    }

    /// A real loopback pair: the server's `TlsStream` and a tokio-rustls client.
    async fn tcp_pair(
        client_cfg: Arc<rustls::ClientConfig>,
    ) -> (
        io::Result<TlsStream>,
        io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    ) {
        let (server_cfg, _) = memory::configs();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = async {
            let (tcp, _) = l.accept().await?;
            TlsStream::accept(tcp, server_cfg).await
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = "localhost".try_into().unwrap();
            tokio_rustls::TlsConnector::from(client_cfg)
                .connect(name, tcp)
                .await
        };
        tokio::join!(server, client)
    }

    #[tokio::test]
    async fn a_megabyte_each_way_at_once_through_small_reads() {
        let (s, c) = tcp_pair(memory::configs().1).await;
        let (mut s, c) = (s.unwrap(), c.unwrap());
        assert_eq!(s.alpn_protocol(), Some(&b"http/1.1"[..]));
        let sent = pattern(1 << 20);
        let (mut cr, mut cw) = tokio::io::split(c);
        let send = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for piece in sent.chunks(40_000) {
                    cw.write_all(piece).await.unwrap();
                }
                cw.shutdown().await.unwrap();
            })
        };
        let receive = tokio::spawn(async move {
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.map(|_| got)
        });
        // The server echoes through a 100-byte buffer, then closes.
        let mut buf = [0u8; 100];
        let mut echoed = 0;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.unwrap();
            echoed += n;
        }
        s.shutdown().await.unwrap();
        send.await.unwrap();
        assert_eq!(echoed, sent.len());
        let got = receive.await.unwrap().unwrap();
        assert!(
            got == sent,
            "echoed whole, in order, to a clean close_notify end"
        );
        // At rest (closed): no buffer held.
        assert!(s.core.incoming.is_none() && s.core.outgoing.0.is_none());
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (s, c) = tcp_pair(memory::configs().1).await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        // Waiting for more: nothing to read, nothing held.
        let mut buf = [0u8; 16];
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut rb = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut s).poll_read(&mut cx, &mut rb).is_pending());
        assert!(s.core.incoming.is_none(), "no receive buffer while idle");
        assert!(s.core.outgoing.0.is_none(), "no send buffer while idle");
        assert_eq!(s.core.plain.capacity(), 0);
    }

    #[tokio::test]
    async fn tickets_wait_small_and_leave_with_the_first_write() {
        let (s, c) = tcp_pair(memory::configs().1).await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        // TLS 1.3: the session ticket waits, in an exact-size copy, and a
        // flush leaves it (nothing the caller wrote waits).
        s.flush().await.unwrap();
        let (buf, start, end) = s.core.outgoing.0.as_ref().expect("the ticket waits");
        assert!(*start == 0 && *end > 0 && buf.len() == *end as usize);
        s.write_all(b"hello").await.unwrap();
        assert!(s.core.outgoing.0.is_none(), "sent with the first write");
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn a_close_without_close_notify_is_an_unexpected_eof() {
        let (s, c) = tcp_pair(memory::configs().1).await;
        let (mut s, c) = (s.unwrap(), c.unwrap());
        // A FIN without close_notify (the client keeps its socket open).
        let (mut tcp, _) = c.into_inner();
        tcp.shutdown().await.unwrap();
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_refused_handshake_sends_its_alert() {
        // A client that speaks only a protocol upgate does not.
        let mut cfg = (*memory::configs().1).clone();
        cfg.alpn_protocols = vec![b"spdy/1".to_vec()];
        let (s, c) = tcp_pair(Arc::new(cfg)).await;
        assert_eq!(s.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let e = c.unwrap_err().to_string();
        assert!(
            e.contains("NoApplicationProtocol"),
            "the client was told why: {e}"
        );
    }
}
