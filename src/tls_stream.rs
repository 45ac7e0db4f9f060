//! TLS over rustls's unbuffered API, for both hops: [`accept`] for a browser's connection,
//! [`connect`] for a gateway's. The TLS bytes sit in buffers borrowed from the thread's pool
//! ([`pool`]) only while they hold some, so an idle connection holds none (rustls's buffered
//! API keeps a 4 KiB receive buffer per connection for its whole life).
//!
//! After the handshake a [`TlsStream`] is an ordinary `AsyncRead + AsyncWrite` stream.
//! Decrypted records are copied straight into the reader's buffer; only what does not fit is
//! kept aside.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ClientConfig, ProtocolVersion, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pump::pool;

/// The most plaintext put in one record.
const MAX_FRAGMENT: usize = 16 * 1024;
/// Room asked for beyond a record's plaintext: header, content type or explicit nonce, AEAD tag
/// (22 bytes for TLS 1.3, 29 for TLS 1.2's AES-GCM).
const RECORD_OVERHEAD: usize = 32;
/// The most plaintext encrypted per write: a pump read buffer's worth, so that what one read
/// brought goes in one record and one send.
const MAX_WRITE: usize = crate::pump::BUF_SIZE;
const _: () = assert!(MAX_WRITE + RECORD_OVERHEAD <= pool::TLS_OUT_SIZE);
/// The most TLS bytes held unprocessed: a handshake message may span records up to rustls's
/// 64 KiB limit, a record 18 KiB.
const MAX_HELD: usize = 96 * 1024;

/// One end of a TLS session, as rustls's unbuffered API has it.
pub trait Session: Unpin {
    /// rustls's per-side connection data.
    type Data;
    /// Who is at the other end, for error messages.
    const PEER: &'static str;
    /// Runs the state machine over `incoming` (rustls's `process_tls_records`).
    fn records<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// Whether the session speaks TLS 1.3.
    fn is_tls13(&self) -> bool;
}

impl Session for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    const PEER: &'static str = "the gateway";

    fn records<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }

    fn is_tls13(&self) -> bool {
        self.protocol_version() == Some(ProtocolVersion::TLSv1_3)
    }
}

/// The server end of a browser's TLS session, with the name its ClientHello asked for.
pub struct ServerSession {
    conn: UnbufferedServerConnection,
    sni: Option<Box<str>>,
}

impl Session for ServerSession {
    type Data = ServerConnectionData;
    const PEER: &'static str = "the client";

    fn records<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        // The resolver runs on the ClientHello only: once the handshake is over, each record
        // goes straight to rustls.
        if !self.conn.is_handshaking() {
            return self.conn.process_tls_records(incoming);
        }
        // Cleared before as well as taken after, so that a name left by anything else (a
        // panic inside rustls, a resolver call from elsewhere) is never taken for this one's.
        CLIENT_SNI.with(|s| s.borrow_mut().take());
        let status = self.conn.process_tls_records(incoming);
        if let Some(sni) = CLIENT_SNI.with(|s| s.borrow_mut().take()) {
            self.sni.get_or_insert(sni);
        }
        status
    }

    fn is_tls13(&self) -> bool {
        self.conn.protocol_version() == Some(ProtocolVersion::TLSv1_3)
    }
}

thread_local! {
    /// The name in the ClientHello being processed on this thread. rustls's unbuffered server
    /// connection does not tell it (the buffered one's `server_name` has no unbuffered twin in
    /// rustls 0.23), but the certificate resolver sees it, within the very
    /// `process_tls_records` call [`ServerSession::records`] makes, which takes it at once.
    static CLIENT_SNI: RefCell<Option<Box<str>>> = const { RefCell::new(None) };
}

/// Called by the listener's certificate resolver with the name a ClientHello asked for.
pub(crate) fn saw_client_sni(name: &str) {
    CLIENT_SNI.with(|s| *s.borrow_mut() = Some(name.into()));
}

/// A TLS stream over `IO`: to a gateway ([`GatewayTls`], from [`connect`]) or from a browser
/// (from [`accept`]).
///
/// Split, its halves must be polled by one task (as the pump and the TURN pipe do): a read
/// sends what the state machine queued, with the reader's waker, which replaces the waker of a
/// writer waiting on the same socket.
pub struct TlsStream<C, IO> {
    io: IO,
    conn: C,
    /// TLS bytes read from the peer and not yet processed.
    incoming: Bytes,
    /// TLS bytes to write to the peer.
    outgoing: Bytes,
    /// Decrypted bytes a read had no room for (or a write had to decrypt to reach the state
    /// that encrypts); read before anything else.
    plaintext: Vec<u8>,
    plaintext_at: usize,
    /// An error met after records were delivered in the same read: given to the next read, so
    /// that what came before it (a close frame, say) is forwarded first.
    pending_err: Option<io::Error>,
    /// The peer sent its close_notify or ended the stream.
    read_closed: bool,
    close_sent: bool,
    /// The TLS error met, final: every later call gets it again, and rustls is not asked again
    /// (it would process the broken bytes again, and queue a second fatal alert).
    failed: Option<Failure>,
    /// The received bytes rustls was done with when it failed: consumed before it is asked for
    /// its alert, as its unbuffered API requires of every call after one that returns a discard.
    failed_discard: usize,
    /// What is queued can wait for the next write (a TLS 1.3 server's session ticket, which the
    /// client does not wait for), so a read that blocks does not send it on its own.
    can_wait: bool,
}

/// The relay's TLS stream to a gateway.
pub type GatewayTls = TlsStream<UnbufferedClientConnection, TcpStream>;

impl<C, IO> TlsStream<C, IO> {
    fn new(conn: C, io: IO) -> TlsStream<C, IO> {
        TlsStream {
            io,
            conn,
            incoming: Bytes::new(crate::pump::BUF_SIZE),
            outgoing: Bytes::new(pool::TLS_OUT_SIZE),
            plaintext: Vec::new(),
            plaintext_at: 0,
            pending_err: None,
            read_closed: false,
            close_sent: false,
            failed: None,
            failed_discard: 0,
            can_wait: false,
        }
    }
}

impl<IO> TlsStream<ServerSession, IO> {
    /// The server name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.conn.sni.as_deref()
    }

    /// The application protocol agreed by ALPN, if the client offered any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.conn.alpn_protocol()
    }
}

/// Connects TLS over `tcp` to `name`, with `first` (if any) sent in the same flight as the
/// client's Finished. Errors are the `io::Error`s tokio-rustls gives (a `rustls::Error` inside
/// for a TLS failure), so callers can tell a refused certificate from a reset.
pub async fn connect(config: Arc<ClientConfig>, name: ServerName<'static>, tcp: TcpStream, first: &[u8]) -> io::Result<GatewayTls> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut s = TlsStream::new(conn, tcp);
    s.handshake(first, Last::Send).await?;
    Ok(s)
}

/// Accepts a client's TLS session over `io`; errors as [`connect`]'s. Bytes the client sent
/// after its Finished are kept for the first read. When they came with the Finished, a TLS 1.3
/// session ticket waits for the first write, so the ticket and the answer (the 101) go in one
/// send; otherwise it goes at once, as a TLS 1.2 server's last flight, which the client waits
/// for, always does.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(config: Arc<ServerConfig>, io: IO) -> io::Result<TlsStream<ServerSession, IO>> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut s = TlsStream::new(ServerSession { conn, sni: None }, io);
    s.handshake(&[], Last::Waits).await?;
    Ok(s)
}

impl<C: Session, IO: AsyncRead + AsyncWrite + Unpin> TlsStream<C, IO> {
    /// Runs the handshake to the point where application data flows, with `first` sent as soon
    /// as it may be; on a TLS error, the alert rustls has for the peer goes if it can.
    async fn handshake(&mut self, first: &[u8], last: Last) -> io::Result<()> {
        match self.handshake_steps(first, last).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queue_alert();
                poll_fn(|cx| {
                    let _ = self.poll_flush_outgoing(cx);
                    Poll::Ready(())
                })
                .await;
                Err(e)
            }
        }
    }

    async fn handshake_steps(&mut self, first: &[u8], last: Last) -> io::Result<()> {
        let mut first_sent = first.is_empty();
        loop {
            let TlsStream { conn, incoming, outgoing, plaintext, read_closed, failed_discard, .. } = &mut *self;
            let (mut discard, state) = next_state(conn, incoming, failed_discard)?;
            let next = match state {
                ConnectionState::EncodeTlsData(mut e) => {
                    fill(outgoing, RECORD_OVERHEAD, |out| e.encode(out).map_err(encode_error))?;
                    Next::Again
                }
                ConnectionState::TransmitTlsData(mut t) => {
                    if !first_sent {
                        if let Some(mut w) = t.may_encrypt_app_data() {
                            encrypt_all(outgoing, first, |data, out| w.encrypt(data, out))?;
                            first_sent = true;
                        }
                    }
                    // Sent before the next read, or at the end.
                    t.done();
                    Next::Again
                }
                ConnectionState::BlockedHandshake => Next::Read,
                ConnectionState::WriteTraffic(mut w) => {
                    // TLS 1.2, or a server that let the first bytes wait: they go now.
                    if !first_sent {
                        encrypt_all(outgoing, first, |data, out| w.encrypt(data, out))?;
                        first_sent = true;
                    }
                    Next::Done
                }
                // The peer's first bytes came in the same read as its Finished: set aside for the
                // reader, and on with the handshake (the first bytes may not have gone yet).
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(|e| {
                            *failed_discard = discard;
                            tls_error(e)
                        })?;
                        discard += record.discard;
                        plaintext.extend_from_slice(record.payload);
                    }
                    Next::Again
                }
                // A close_notify right after the peer's Finished (a health check does this): the
                // handshake goes on to its end, and reads then find the end of the stream. Said
                // once; before the Finished, the next read finds the end and fails the handshake.
                ConnectionState::PeerClosed => {
                    *read_closed = true;
                    Next::Again
                }
                ConnectionState::Closed => return Err(closed_in_handshake::<C>()),
                _ => return Err(io::Error::other("unexpected TLS state during the handshake")),
            };
            incoming.consume(discard);
            match next {
                Next::Again => {}
                Next::Done => {
                    // The ticket waits only when the peer's first bytes came with its Finished:
                    // a peer that wrote them after, with Nagle's algorithm on, holds them until
                    // its Finished is acknowledged, and the ticket is what acknowledges it now
                    // rather than after a delayed ACK.
                    match last {
                        Last::Waits if self.conn.is_tls13() && !self.plaintext.is_empty() => self.can_wait = true,
                        _ => poll_fn(|cx| self.poll_flush_outgoing(cx)).await?,
                    }
                    return Ok(());
                }
                Next::Read => {
                    poll_fn(|cx| self.poll_flush_outgoing(cx)).await?;
                    if poll_fn(|cx| self.poll_read_tls(cx)).await? == 0 {
                        return Err(closed_in_handshake::<C>());
                    }
                }
            }
        }
    }
}

fn closed_in_handshake<C: Session>() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} closed during the TLS handshake", C::PEER))
}

/// Runs rustls's state machine over the bytes received: the state it reached, and how many of
/// those bytes to discard once the state is done with. On a TLS error (final: the stream asks
/// rustls only for its alert after it), the bytes to discard go to `failed`.
fn next_state<'c, 'i, C: Session>(
    conn: &'c mut C,
    incoming: &'i mut Bytes,
    failed: &mut usize,
) -> io::Result<(usize, ConnectionState<'c, 'i, C::Data>)> {
    let UnbufferedStatus { discard, state } = conn.records(incoming.filled());
    state.map(|state| (discard, state)).map_err(|e| {
        *failed = discard;
        tls_error(e)
    })
}

/// Whether the handshake's last flight is sent before it returns, or, where the peer does not
/// wait for it (a TLS 1.3 server's session ticket), left for the stream's first write.
enum Last {
    Send,
    Waits,
}

/// What the handshake does after a state.
enum Next {
    Again,
    Read,
    Done,
}

/// What processing the received records came to.
enum Processed {
    /// Plaintext was delivered (to the reader's buffer or set aside).
    Plaintext,
    /// No complete record is held: more bytes must be read.
    NeedRead,
    /// The write state was reached and `n` bytes of the caller's data were encrypted.
    Wrote(usize),
    /// The peer closed the TLS session.
    Closed,
}

impl<C: Session, IO: AsyncRead + AsyncWrite + Unpin> TlsStream<C, IO> {
    /// Runs the TLS state machine over what has been received, without I/O. With `write`,
    /// encrypts up to one record of it once the write state is reached; with `out`, delivers
    /// decrypted records there (what does not fit is set aside).
    fn process(&mut self, out: Option<&mut ReadBuf<'_>>, write: Option<&[u8]>, close: bool) -> io::Result<Processed> {
        if let Some(failed) = &self.failed {
            return Err(failed.error());
        }
        let mut delivered = false;
        let result = self.process_records(out, write, close, &mut delivered);
        if let Err(e) = &result {
            self.failed = Some(Failure::of(e));
            self.queue_alert();
        }
        match result {
            Err(e) if delivered => {
                self.pending_err = Some(e);
                Ok(Processed::Plaintext)
            }
            result => result,
        }
    }

    /// After a TLS error, queues the alert rustls has for the peer (if any), for
    /// [`TlsStream::last_gasp`] to send, as tokio-rustls's "last-gasp write" does. Called once
    /// per stream.
    fn queue_alert(&mut self) {
        // rustls hands out what it queued before it looks at the input again, and the bytes it
        // failed on are discarded first, as its API asks, so they are not processed twice.
        let TlsStream { conn, incoming, outgoing, failed_discard, .. } = self;
        incoming.consume(std::mem::take(failed_discard));
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = conn.records(incoming.filled()).state {
            let _ = fill(outgoing, RECORD_OVERHEAD, |buf| e.encode(buf).map_err(encode_error));
        }
    }

    /// [`TlsStream::process`]'s loop; `delivered` says whether records went to `out` or aside.
    fn process_records(&mut self, mut out: Option<&mut ReadBuf<'_>>, write: Option<&[u8]>, close: bool, delivered: &mut bool) -> io::Result<Processed> {
        // rustls hands over one record per call: a read goes on while the reader has room, so
        // that what one TCP read brought is forwarded in one write, as tokio-rustls does.
        loop {
            let TlsStream { conn, incoming, outgoing, plaintext, close_sent, read_closed: peer_closed, failed_discard, .. } = self;
            let (mut discard, state) = next_state(conn, incoming, failed_discard)?;
            let done = match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(|e| {
                            *failed_discard = discard;
                            tls_error(e)
                        })?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Some(out) = out.as_deref_mut() {
                            let n = payload.len().min(out.remaining());
                            out.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        plaintext.extend_from_slice(payload);
                    }
                    *delivered = true;
                    match &out {
                        Some(out) if out.remaining() > 0 => None,
                        _ => Some(Processed::Plaintext),
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    fill(outgoing, RECORD_OVERHEAD, |buf| e.encode(buf).map_err(encode_error))?;
                    None
                }
                // Written by the caller's next flush.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::WriteTraffic(mut w) => match write {
                    Some(data) => {
                        let n = data.len().min(MAX_WRITE);
                        fill(outgoing, n + RECORD_OVERHEAD, |buf| w.encrypt(&data[..n], buf).map_err(encrypt_error))?;
                        Some(Processed::Wrote(n))
                    }
                    None if close => {
                        if !*close_sent {
                            fill(outgoing, RECORD_OVERHEAD, |buf| w.queue_close_notify(buf).map_err(encrypt_error))?;
                            *close_sent = true;
                        }
                        Some(Processed::Closed)
                    }
                    None if *delivered => Some(Processed::Plaintext),
                    None => Some(Processed::NeedRead),
                },
                ConnectionState::BlockedHandshake if *delivered => Some(Processed::Plaintext),
                ConnectionState::BlockedHandshake => Some(Processed::NeedRead),
                // Said once: the peer sent its close_notify. Writing may go on (the next
                // state is the write state until the relay sends its own close_notify).
                ConnectionState::PeerClosed => {
                    *peer_closed = true;
                    if write.is_none() && !close {
                        Some(Processed::Closed)
                    } else {
                        None
                    }
                }
                ConnectionState::Closed => {
                    *peer_closed = true;
                    Some(Processed::Closed)
                }
                _ => return Err(io::Error::other("unexpected TLS state")),
            };
            incoming.consume(discard);
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// Reads more TLS bytes from the peer into the receive buffer (borrowed from the pool
    /// for the read, and given back if nothing came). Returns the bytes read; 0 at the end.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = self.incoming.read_room(C::PEER)?;
        let spare = self.incoming.spare(want);
        let mut read = ReadBuf::new(spare);
        let polled = Pin::new(&mut self.io).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.incoming.commit(n);
        if n == 0 {
            self.incoming.release_if_empty();
        }
        ready!(polled)?;
        Poll::Ready(Ok(n))
    }

    /// Sends what is queued (the alert for the error `e`, if any) as far as the socket takes it
    /// now, and gives back `e`.
    fn last_gasp(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        let _ = self.poll_flush_outgoing(cx);
        e
    }

    /// Writes out every queued TLS byte.
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.outgoing.filled()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.consume(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<C: Session, IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<C, IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // No room, nothing to do (and no TCP read that could find the end of the stream).
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.plaintext_at < this.plaintext.len() {
            let rest = &this.plaintext[this.plaintext_at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.plaintext_at += n;
            if this.plaintext_at == this.plaintext.len() {
                this.plaintext = Vec::new();
                this.plaintext_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = this.pending_err.take() {
            return Poll::Ready(Err(this.last_gasp(cx, e)));
        }
        loop {
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            let processed = match this.process(Some(buf), None, false) {
                Ok(processed) => processed,
                Err(e) => return Poll::Ready(Err(this.last_gasp(cx, e))),
            };
            match processed {
                Processed::Plaintext if buf.filled().len() > before || !this.plaintext.is_empty() => {
                    return Poll::Ready(Ok(()));
                }
                // An empty record: look again.
                Processed::Plaintext => {}
                Processed::NeedRead => {
                    // Whatever the state machine queued (a key update's answer, a TLS 1.2
                    // Finished) goes when it can; it does not hold up reading. A failed send is
                    // the writer's to report: the peer's last data and close_notify may still
                    // be in the socket, readable after it has gone.
                    if !this.can_wait {
                        let _ = this.poll_flush_outgoing(cx);
                    }
                    if ready!(this.poll_read_tls(cx))? == 0 {
                        // As tokio-rustls says it: the end of the stream without a close_notify
                        // may be a truncation.
                        this.read_closed = true;
                        let why = format!("{} closed the connection without sending TLS close_notify", C::PEER);
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
                    }
                }
                Processed::Closed => this.read_closed = true,
                Processed::Wrote(_) => unreachable!("nothing to write on a read"),
            }
        }
    }
}

impl<C: Session, IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<C, IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What was encrypted before goes first (the backpressure a slow peer applies), unless it
        // and this write's record fit in one send buffer, for the next flush to send together.
        if this.outgoing.len() + data.len().min(MAX_WRITE) + RECORD_OVERHEAD > pool::TLS_OUT_SIZE {
            ready!(this.poll_flush_outgoing(cx))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, format!("the TLS session to {} was closed", C::PEER))));
        }
        // What waited goes with this write, at the caller's flush.
        this.can_wait = false;
        loop {
            let processed = match this.process(None, Some(data), false) {
                Ok(processed) => processed,
                Err(e) => return Poll::Ready(Err(this.last_gasp(cx, e))),
            };
            match processed {
                // Sent by the caller's flush (or shutdown), or by the next write that does not fit.
                Processed::Wrote(n) => return Poll::Ready(Ok(n)),
                // Records that were waiting for the reader were set aside; go on.
                Processed::Plaintext => {}
                Processed::NeedRead | Processed::Closed => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, format!("the TLS session to {} is closed", C::PEER))));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            // Records set aside come back as plaintext; anything else means the close_notify
            // is queued, or there is none to send (closed already, or broken).
            while let Ok(Processed::Plaintext) = this.process(None, None, true) {}
            this.close_sent = true;
        }
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Bytes at `buf[start..end]`, in a buffer of `size` borrowed from the pool while there are any.
struct Bytes {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    size: usize,
}

impl Bytes {
    fn new(size: usize) -> Bytes {
        Bytes { buf: None, start: 0, end: 0, size }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn filled(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(buf) => &mut buf[self.start..self.end],
            None => &mut [],
        }
    }

    /// How much room to read into next: what is left of the buffer, or as much again as it
    /// holds when that is little (a record or handshake message longer than a buffer).
    fn read_room(&self, peer: &str) -> io::Result<usize> {
        let held = self.len();
        if held >= MAX_HELD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a TLS message from {peer} is too long")));
        }
        let cap = self.buf.as_ref().map_or(self.size, |b| b.len());
        let left = cap - held;
        Ok(if left >= 1024 { left } else { cap })
    }

    /// Room for at least `more` bytes after what is held (moved to the front first).
    fn spare(&mut self, more: usize) -> &mut [u8] {
        let held = self.len();
        let size = self.size;
        let buf = self.buf.get_or_insert_with(|| pool::take_of(size));
        if self.start > 0 {
            buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, held);
        }
        if buf.len() < held + more {
            // A record longer than a pool buffer: rare, and given up once empty.
            let mut bigger = vec![0; held + more].into_boxed_slice();
            bigger[..held].copy_from_slice(&buf[..held]);
            pool::give(std::mem::replace(buf, bigger));
        }
        &mut buf[self.end..]
    }

    fn commit(&mut self, n: usize) {
        self.end += n;
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        self.release_if_empty();
    }

    fn release_if_empty(&mut self) {
        if self.is_empty() {
            (self.start, self.end) = (0, 0);
            if let Some(buf) = self.buf.take() {
                pool::give(buf);
            }
        }
    }
}

/// Writes into the room after `out`'s bytes with `f`, making more room when `f` says it needs
/// it (rustls names the size).
fn fill(out: &mut Bytes, room: usize, mut f: impl FnMut(&mut [u8]) -> Result<usize, NoRoom>) -> io::Result<()> {
    let written = match f(out.spare(room)) {
        Ok(n) => n,
        Err(NoRoom::Needs(required)) => f(out.spare(required)).map_err(NoRoom::into_io)?,
        Err(e) => return Err(e.into_io()),
    };
    out.commit(written);
    Ok(())
}

/// Encrypts all of `data` into `out`, a record at most at a time.
fn encrypt_all(out: &mut Bytes, data: &[u8], mut f: impl FnMut(&[u8], &mut [u8]) -> Result<usize, EncryptError>) -> io::Result<()> {
    for chunk in data.chunks(MAX_FRAGMENT) {
        fill(out, chunk.len() + RECORD_OVERHEAD, |buf| f(chunk, buf).map_err(encrypt_error))?;
    }
    Ok(())
}

/// Why rustls could not write into a buffer.
enum NoRoom {
    Needs(usize),
    Other(String),
}

impl NoRoom {
    fn into_io(self) -> io::Error {
        match self {
            NoRoom::Needs(n) => io::Error::other(format!("TLS buffer still too small for {n} bytes")),
            NoRoom::Other(why) => io::Error::other(why),
        }
    }
}

fn encode_error(e: EncodeError) -> NoRoom {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => NoRoom::Needs(required_size),
        e => NoRoom::Other(e.to_string()),
    }
}

fn encrypt_error(e: EncryptError) -> NoRoom {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => NoRoom::Needs(required_size),
        e => NoRoom::Other(e.to_string()),
    }
}

/// A TLS failure as tokio-rustls reports it: `InvalidData` with the `rustls::Error` inside.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A stream's first error, kept so that whichever of the reader and the writer meets it second
/// reports what failed (a rustls error stays one, for [`crate::upstream`]'s classification)
/// rather than only that something did.
enum Failure {
    Tls(rustls::Error),
    Other(io::ErrorKind, String),
}

impl Failure {
    fn of(e: &io::Error) -> Failure {
        match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => Failure::Tls(tls.clone()),
            None => Failure::Other(e.kind(), e.to_string()),
        }
    }

    fn error(&self) -> io::Error {
        match self {
            Failure::Tls(e) => tls_error(e.clone()),
            Failure::Other(kind, text) => io::Error::new(*kind, text.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener on loopback, a server config for it and a client config that trusts it.
    async fn server_and_client(versions: &[&'static rustls::SupportedProtocolVersion], ca: &str) -> (tokio::net::TcpListener, Arc<ServerConfig>, Arc<ClientConfig>) {
        let ca = crate::tools::pki::TestCa::new(ca).unwrap();
        let leaf = ca.leaf(&["gw.test".to_string()]).unwrap();
        let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (listener, Arc::new(server), Arc::new(client))
    }

    /// Longer than a pool buffer and than a TLS record.
    fn big() -> Vec<u8> {
        (0..40_000u32).map(|i| (i % 251) as u8).collect()
    }

    /// The accepting side of a round trip: "hello" and [`big`] in and echoed, its close_notify,
    /// then what the other side wrote after it.
    async fn server_side<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Vec<u8> {
        let big = big();
        let mut got = vec![0; 5 + big.len()];
        s.read_exact(&mut got).await.unwrap();
        assert!(&got[..5] == b"hello" && got[5..] == big[..], "the server got the client's bytes unchanged");
        s.write_all(&got[5..]).await.unwrap();
        // close_notify, then wait for the client's bytes after it, then its close_notify.
        s.shutdown().await.unwrap();
        let mut after = Vec::new();
        s.read_to_end(&mut after).await.unwrap();
        after
    }

    /// The connecting side, "hello" sent: [`big`] out and its echo back, the server's
    /// close_notify, then "late" (TLS half-close) and its own close_notify.
    async fn client_side<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
        let big = big();
        s.write_all(&big).await.unwrap();
        s.flush().await.unwrap();
        let mut echoed = vec![0; big.len()];
        s.read_exact(&mut echoed).await.unwrap();
        assert!(echoed == big, "the echo came back unchanged");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the server's close_notify ends the stream");
        s.write_all(b"late").await.unwrap();
        s.shutdown().await.unwrap();
    }

    /// The gateway's side: [`connect`] to a tokio-rustls server.
    async fn roundtrip(versions: &[&'static rustls::SupportedProtocolVersion]) {
        let (listener, acceptor, client) = server_and_client(versions, "test CA").await;
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(acceptor).accept(tcp).await.unwrap();
            server_side(&mut tls).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut gw = connect(client, ServerName::try_from("gw.test").unwrap(), tcp, b"hello").await.unwrap();
        client_side(&mut gw).await;
        // Done, the stream holds no TLS buffer.
        assert!(gw.incoming.buf.is_none() && gw.outgoing.buf.is_none() && gw.plaintext.capacity() == 0);
        assert!(gw.write(b"x").await.is_err(), "nothing is written after the relay's close_notify");
        assert_eq!(server.await.unwrap(), b"late", "writing after the gateway's close_notify still works");
    }

    #[tokio::test]
    async fn relays_both_ways_over_tls13_and_closes_cleanly() {
        roundtrip(&[&rustls::version::TLS13]).await;
    }

    #[tokio::test]
    async fn relays_both_ways_over_tls12_and_closes_cleanly() {
        roundtrip(&[&rustls::version::TLS12]).await;
    }

    /// Waits (bounded) until at least `min` bytes are waiting in `gw`'s socket and no more are
    /// coming, so that the next read finds all the server sent.
    async fn settled(gw: &GatewayTls, min: usize) {
        let mut peeked = vec![0; 8192];
        let mut last = 0;
        for _ in 0..200 {
            let n = gw.io.peek(&mut peeked).await.unwrap();
            if n >= min && n == last {
                return;
            }
            last = n;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// A record that came in the same read as a broken one is delivered before the error.
    #[tokio::test]
    async fn records_before_a_broken_one_are_read_before_its_error() {
        let (listener, acceptor, client) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let addr = listener.local_addr().unwrap();
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(acceptor).accept(tcp).await.unwrap();
            std::io::Write::write_all(&mut tls.get_mut().1.writer(), b"close frame").unwrap();
            tls.flush().await.unwrap();
            // An application-data record that cannot decrypt.
            tls.get_mut().0.write_all(b"\x17\x03\x03\x00\x20xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").await.unwrap();
            sent_tx.send(()).unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut gw = connect(client, ServerName::try_from("gw.test").unwrap(), tcp, b"").await.unwrap();
        sent_rx.await.unwrap();
        settled(&gw, 33 + 37).await;
        let mut buf = vec![0; crate::pump::BUF_SIZE];
        let n = gw.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"close frame");
        let err = gw.read(&mut buf).await.expect_err("then the broken record's error");
        assert!(err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some(), "{err}");
        // After the error rustls is not asked again: it would process the broken record again
        // (and, in a debug build, panic on its second fatal alert). A later read or write gets
        // the same error, not only word that there was one.
        let again = gw.read(&mut buf).await.expect_err("the error is final");
        assert_eq!(again.to_string(), err.to_string());
        let written = gw.write(b"x").await.expect_err("a write meets it too");
        assert!(written.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some(), "{written}");
        let _ = gw.shutdown().await;
    }

    /// rustls's unbuffered API hands over one record per call; a read must still return all
    /// that came (else each message goes on in a write of its own), and a pump buffer's worth
    /// is taken in one write (one record, one send).
    #[tokio::test]
    async fn a_read_returns_every_record_that_came_and_a_write_takes_a_pump_buffer() {
        let (listener, acceptor, client) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let addr = listener.local_addr().unwrap();
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // Without it, Nagle would hold records 2 to 10 until the first is acknowledged.
            tcp.set_nodelay(true).unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(acceptor).accept(tcp).await.unwrap();
            for i in 0..10u8 {
                // A record each, all sent by the one flush below.
                std::io::Write::write_all(&mut tls.get_mut().1.writer(), &[i; 100]).unwrap();
            }
            tls.flush().await.unwrap();
            sent_tx.send(()).unwrap();
            let mut got = vec![0; crate::pump::BUF_SIZE];
            tls.read_exact(&mut got).await.unwrap();
            got
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut gw = connect(client, ServerName::try_from("gw.test").unwrap(), tcp, b"").await.unwrap();
        sent_rx.await.unwrap();
        // All ten records are 122 bytes each in TLS 1.3.
        settled(&gw, 10 * 122).await;
        let mut buf = vec![0; crate::pump::BUF_SIZE];
        let n = gw.read(&mut buf).await.unwrap();
        assert_eq!(n, 1000, "one read returned all ten records");
        assert!(buf[..n].chunks(100).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
        let data = vec![7u8; crate::pump::BUF_SIZE];
        assert_eq!(gw.write(&data).await.unwrap(), data.len(), "a pump buffer's worth in one write");
        gw.flush().await.unwrap();
        assert_eq!(server.await.unwrap(), data);
    }

    #[tokio::test]
    async fn a_refused_certificate_is_a_rustls_error() {
        let (listener, acceptor, _) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let (_, _, other_ca_client) = server_and_client(&[&rustls::version::TLS13], "another CA").await;
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = tokio_rustls::TlsAcceptor::from(acceptor).accept(tcp).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = connect(other_ca_client, ServerName::try_from("gw.test").unwrap(), tcp, b"").await.err().expect("an untrusted certificate fails");
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(matches!(inner, Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))), "{err}");
    }

    /// The browser's side: a tokio-rustls client to [`accept`], both ways, then TLS half-close.
    async fn serve_roundtrip(versions: &[&'static rustls::SupportedProtocolVersion]) {
        let (listener, server, client) = server_and_client(versions, "test CA").await;
        let addr = listener.local_addr().unwrap();
        let browser = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(client);
            let mut tls = connector.connect(ServerName::try_from("gw.test").unwrap(), tcp).await.unwrap();
            tls.write_all(b"hello").await.unwrap();
            client_side(&mut tls).await;
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = accept(server, tcp).await.unwrap();
        assert_eq!(server_side(&mut s).await, b"late", "reading goes on after the relay's close_notify");
        assert!(s.incoming.buf.is_none() && s.outgoing.buf.is_none() && s.plaintext.capacity() == 0, "done, the stream holds no TLS buffer");
        browser.await.unwrap();
    }

    #[tokio::test]
    async fn accepts_a_browser_over_tls13_and_closes_cleanly() {
        serve_roundtrip(&[&rustls::version::TLS13]).await;
    }

    #[tokio::test]
    async fn accepts_a_browser_over_tls12_and_closes_cleanly() {
        serve_roundtrip(&[&rustls::version::TLS12]).await;
    }

    /// A client that does not speak TLS is told why with an alert before the connection ends,
    /// as rustls's buffered server does.
    #[tokio::test]
    async fn a_client_that_is_not_speaking_tls_gets_an_alert() {
        let (listener, server, _) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let addr = listener.local_addr().unwrap();
        let browser = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            answer
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let err = accept(server, tcp).await.err().expect("not TLS");
        assert!(err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some(), "{err}");
        let answer = browser.await.unwrap();
        // A plaintext alert record: type 21, a version, length 2, fatal (2), a description.
        assert!(answer.len() == 7 && answer[0] == 21 && answer[3..6] == [0, 2, 2], "{answer:?}");
    }

    /// A write is sent by the flush (or the shutdown) that follows it, so that a last message
    /// and the close_notify after it leave in one send.
    #[tokio::test]
    async fn a_write_waits_for_the_flush_and_goes_with_the_close_notify() {
        let (listener, server, client) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.unwrap();
            // From here on, the raw TLS records as they come.
            let mut buf = vec![0; 4096];
            loop {
                let n = tls.get_mut().0.read(&mut buf).await.unwrap();
                tx.send(buf[..n].to_vec()).unwrap();
                if n == 0 {
                    return;
                }
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut gw = connect(client, ServerName::try_from("gw.test").unwrap(), tcp, b"").await.unwrap();
        gw.write_all(b"last message").await.unwrap();
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await;
        assert!(early.is_err(), "nothing is sent before the flush: {early:?}");
        gw.shutdown().await.unwrap();
        let sent = rx.recv().await.unwrap();
        // Two TLS 1.3 records in the one read: the message (12 bytes, 5 of header, 1 of
        // content type, 16 of tag) and the close_notify (2 bytes of alert).
        assert_eq!(sent.len(), (5 + 12 + 1 + 16) + (5 + 2 + 1 + 16), "{sent:?}");
    }

    /// A blocking client's handshake to `addr`, up to its Finished, which is queued, not
    /// written, so what the test sends next joins it in one write.
    fn handshake_but_finished(client: Arc<ClientConfig>, addr: std::net::SocketAddr) -> (std::net::TcpStream, rustls::ClientConnection) {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let mut conn = rustls::ClientConnection::new(client, ServerName::try_from("gw.test").unwrap()).unwrap();
        while conn.is_handshaking() {
            if conn.wants_write() {
                conn.write_tls(&mut tcp).unwrap();
                continue;
            }
            conn.read_tls(&mut tcp).unwrap();
            conn.process_new_packets().unwrap();
        }
        (tcp, conn)
    }

    /// A socket that counts its writes (each is one send).
    struct CountingWrites {
        tcp: TcpStream,
        writes: usize,
    }

    impl AsyncRead for CountingWrites {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingWrites {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, data));
            self.writes += 1;
            Poll::Ready(written)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    /// When the request came with the client's Finished, a TLS 1.3 server's session ticket
    /// waits for its first write (the 101) and both go in one send, even when the reader looked
    /// for more before answering; the client still gets the ticket.
    #[tokio::test]
    async fn the_session_ticket_goes_with_the_first_answer() {
        let (listener, server, client) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(rustls::client::ClientSessionMemoryCache::new(4));
        let mut client = (*client).clone();
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);
        let browser = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let (mut tcp, mut conn) = handshake_but_finished(client, addr);
            // The Finished and the request in one write.
            conn.writer().write_all(b"request").unwrap();
            let mut all = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut all).unwrap();
            }
            tcp.write_all(&all).unwrap();
            let mut answer = Vec::new();
            while answer.len() < b"answer".len() {
                // A server that fails its assertions closes the socket: end, don't spin.
                if conn.read_tls(&mut tcp).unwrap() == 0 {
                    break;
                }
                let state = conn.process_new_packets().unwrap();
                let mut plain = vec![0; state.plaintext_bytes_to_read()];
                conn.reader().read_exact(&mut plain).unwrap();
                answer.extend_from_slice(&plain);
            }
            answer
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = accept(server, CountingWrites { tcp, writes: 0 }).await.unwrap();
        assert_eq!(s.io.writes, 1, "the server's flight; the ticket waits");
        let mut got = vec![0; 64];
        let n = s.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"request");
        // Nothing more comes: a reader that looks again does not send the ticket by itself.
        let more = tokio::time::timeout(std::time::Duration::from_millis(100), s.read(&mut got)).await;
        assert!(more.is_err(), "nothing more was sent: {more:?}");
        s.write_all(b"answer").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.io.writes, 2, "the ticket and the answer went in one send");
        assert_eq!(browser.await.unwrap(), b"answer");
        assert!(rustls::client::ClientSessionStore::take_tls13_ticket(&*store, &ServerName::try_from("gw.test").unwrap()).is_some(), "the client got its ticket");
    }

    /// A client that wrote its Finished alone gets the ticket at once: with Nagle's algorithm
    /// on, its request waits in its kernel until the Finished is acknowledged, and the ticket
    /// acknowledges it without the relay's delayed ACK.
    #[tokio::test]
    async fn the_session_ticket_goes_at_once_after_a_finished_alone() {
        let (listener, server, client) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let addr = listener.local_addr().unwrap();
        let (ticket_seen, ticket) = tokio::sync::oneshot::channel::<bool>();
        let browser = tokio::task::spawn_blocking(move || {
            let (mut tcp, mut conn) = handshake_but_finished(client, addr);
            while conn.wants_write() {
                conn.write_tls(&mut tcp).unwrap();
            }
            // The ticket comes without anything written after the Finished.
            tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            let mut record = [0; 5];
            let got = std::io::Read::read_exact(&mut tcp, &mut record).is_ok();
            let _ = ticket_seen.send(got && record[0] == 23);
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let s = accept(server, CountingWrites { tcp, writes: 0 }).await.unwrap();
        assert_eq!(s.io.writes, 2, "the server's flight, then the ticket");
        assert!(ticket.await.unwrap(), "the client got a record without writing again");
        browser.await.unwrap();
    }

    /// A client whose close_notify comes in the same segment as its Finished (a health check,
    /// a scanner) has finished its handshake: what it sent is read, then the end of the stream.
    #[tokio::test]
    async fn a_close_notify_with_the_finished_ends_the_stream_not_the_handshake() {
        let (listener, server, client) = server_and_client(&[&rustls::version::TLS13], "test CA").await;
        let addr = listener.local_addr().unwrap();
        let browser = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let (mut tcp, mut conn) = handshake_but_finished(client, addr);
            // The rest joins the Finished in one write.
            conn.writer().write_all(b"bye").unwrap();
            conn.send_close_notify();
            let mut all = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut all).unwrap();
            }
            tcp.write_all(&all).unwrap();
            tcp
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = accept(server, tcp).await.expect("the handshake finished");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        drop(browser.await.unwrap());
    }

    /// The peer sent its last data and close_notify and went (reset, since it left bytes of ours
    /// unread) while the relay held a record for it not yet sent: the read still gets the data.
    #[tokio::test]
    async fn a_failed_send_does_not_lose_what_the_gone_peer_sent() {
        let (listener, server, client) = server_and_client(&[&rustls::version::TLS13], "gone CA").await;
        let addr = listener.local_addr().unwrap();
        let (said_bye, bye) = tokio::sync::oneshot::channel::<()>();
        let peer = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(ServerName::try_from("gw.test").unwrap(), tcp).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            tls.write_all(b"bye").await.unwrap();
            tls.shutdown().await.unwrap();
            let _ = said_bye.send(());
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = accept(server, tcp).await.unwrap();
        s.write_all(&[1u8; 100]).await.unwrap();
        s.flush().await.unwrap();
        bye.await.unwrap();
        peer.await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        s.write_all(b"unsent").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.expect("the peer's data, not the failed send's error");
        assert_eq!(&buf[..n], b"bye");
    }
}
