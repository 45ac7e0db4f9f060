//! TLS to gateways over rustls's unbuffered API, with the TLS bytes in buffers borrowed from the
//! thread's pool ([`pool`]) only while they hold some: an idle gateway connection holds none.
//! (rustls's buffered API keeps a 4 KiB receive buffer per connection for its whole life.)
//!
//! [`connect`] runs the handshake, sending the caller's first bytes with the client's Finished;
//! [`GatewayTls`] is then an ordinary `AsyncRead + AsyncWrite` stream. Records are decrypted in
//! place in the receive buffer and copied straight into the reader's buffer; only what does not
//! fit is kept aside.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::UnbufferedClientConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pump::pool;

/// A TLS record's header: type, version, length.
const RECORD_HEADER: usize = 5;
/// The most plaintext put in one record.
const MAX_FRAGMENT: usize = 16 * 1024;
/// Room asked for beyond a record's plaintext: header, content type, AEAD tag, with margin.
const RECORD_OVERHEAD: usize = 64;

/// A client TLS stream to a gateway.
pub struct GatewayTls {
    tcp: TcpStream,
    conn: UnbufferedClientConnection,
    /// TLS bytes read from the gateway and not yet processed.
    incoming: Bytes,
    /// TLS bytes to write to the gateway.
    outgoing: Bytes,
    /// Decrypted bytes a read had no room for (or a write had to decrypt to reach the state
    /// that encrypts); read before anything else.
    plaintext: Vec<u8>,
    plaintext_at: usize,
    /// The gateway sent its close_notify or ended the stream.
    read_closed: bool,
    close_sent: bool,
}

/// Connects TLS over `tcp` to `name`, with `first` (if any) sent in the same flight as the
/// client's Finished. Errors are the `io::Error`s tokio-rustls gives (a `rustls::Error` inside
/// for a TLS failure), so callers can tell a refused certificate from a reset.
pub async fn connect(config: Arc<ClientConfig>, name: ServerName<'static>, tcp: TcpStream, first: &[u8]) -> io::Result<GatewayTls> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut s = GatewayTls {
        tcp,
        conn,
        incoming: Bytes::default(),
        outgoing: Bytes::default(),
        plaintext: Vec::new(),
        plaintext_at: 0,
        read_closed: false,
        close_sent: false,
    };
    let mut first_sent = first.is_empty();
    loop {
        let GatewayTls { conn, incoming, outgoing, .. } = &mut s;
        let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming.filled());
        let next = match state.map_err(tls_error)? {
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
                t.done();
                Next::Flush
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
            // The gateway has already sent application data; the reader gets it.
            ConnectionState::ReadTraffic(_) => Next::Done,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the gateway closed during the TLS handshake"));
            }
            _ => return Err(io::Error::other("unexpected TLS state during the handshake")),
        };
        incoming.consume(discard);
        match next {
            Next::Again => {}
            Next::Flush => poll_fn(|cx| s.poll_flush_outgoing(cx)).await?,
            Next::Done => {
                poll_fn(|cx| s.poll_flush_outgoing(cx)).await?;
                return Ok(s);
            }
            Next::Read => {
                if poll_fn(|cx| s.poll_read_tls(cx)).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the gateway closed during the TLS handshake"));
                }
            }
        }
    }
}

/// What the handshake does after a state.
enum Next {
    Again,
    Flush,
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
    /// The gateway closed the TLS session.
    Closed,
}

impl GatewayTls {
    /// Runs the TLS state machine over what has been received, without I/O. With `write`,
    /// encrypts up to one record of it once the write state is reached; with `out`, delivers
    /// decrypted records there (what does not fit is set aside).
    fn process(&mut self, mut out: Option<&mut ReadBuf<'_>>, write: Option<&[u8]>, close: bool) -> io::Result<Processed> {
        loop {
            let GatewayTls { conn, incoming, outgoing, plaintext, close_sent, .. } = self;
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(incoming.filled());
            let done = match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Some(out) = out.as_deref_mut() {
                            let n = payload.len().min(out.remaining());
                            out.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        plaintext.extend_from_slice(payload);
                    }
                    Some(Processed::Plaintext)
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
                        let n = data.len().min(MAX_FRAGMENT);
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
                    None => Some(Processed::NeedRead),
                },
                ConnectionState::BlockedHandshake => Some(Processed::NeedRead),
                ConnectionState::PeerClosed | ConnectionState::Closed => Some(Processed::Closed),
                _ => return Err(io::Error::other("unexpected TLS state")),
            };
            incoming.consume(discard);
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// Reads more TLS bytes from the gateway into the receive buffer (borrowed from the pool
    /// for the read, and given back if nothing came). Returns the bytes read; 0 at the end.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = self.incoming.record_room();
        let spare = self.incoming.spare(want);
        let mut read = ReadBuf::new(spare);
        let polled = Pin::new(&mut self.tcp).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.incoming.commit(n);
        if n == 0 {
            self.incoming.release_if_empty();
        }
        ready!(polled)?;
        Poll::Ready(Ok(n))
    }

    /// Writes out every queued TLS byte.
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, self.outgoing.filled()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.consume(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for GatewayTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
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
        loop {
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            match this.process(Some(buf), None, false)? {
                Processed::Plaintext if buf.filled().len() > before || !this.plaintext.is_empty() => {
                    return Poll::Ready(Ok(()));
                }
                // An empty record: look again.
                Processed::Plaintext => {}
                Processed::NeedRead => {
                    // Whatever the state machine queued (a key update's answer) goes when it can;
                    // it does not hold up reading.
                    if let Poll::Ready(Err(e)) = this.poll_flush_outgoing(cx) {
                        return Poll::Ready(Err(e));
                    }
                    if ready!(this.poll_read_tls(cx))? == 0 {
                        this.read_closed = true;
                    }
                }
                Processed::Closed => this.read_closed = true,
                Processed::Wrote(_) => unreachable!("nothing to write on a read"),
            }
        }
    }
}

impl AsyncWrite for GatewayTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What was encrypted before goes first: the backpressure a slow gateway applies.
        ready!(this.poll_flush_outgoing(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            match this.process(None, Some(data), false)? {
                Processed::Wrote(n) => {
                    if let Poll::Ready(Err(e)) = this.poll_flush_outgoing(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(n));
                }
                // Records that were waiting for the reader were set aside; go on.
                Processed::Plaintext => {}
                Processed::NeedRead | Processed::Closed => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS session to the gateway is closed")));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            loop {
                match this.process(None, None, true) {
                    Ok(Processed::Plaintext) => {}
                    // Closed already, or broken: there is no close_notify to send.
                    Ok(_) | Err(_) => break,
                }
            }
            this.close_sent = true;
        }
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Bytes at `buf[start..end]`, in a buffer borrowed from the pool while there are any.
#[derive(Default)]
struct Bytes {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl Bytes {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn filled(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(buf) => &mut buf[self.start..self.end],
            None => &mut [],
        }
    }

    /// How much to read next: the rest of a record whose header is held, else a buffer's worth.
    fn record_room(&mut self) -> usize {
        let held = self.end - self.start;
        let filled = self.filled();
        if filled.len() >= RECORD_HEADER {
            let len = RECORD_HEADER + u16::from_be_bytes([filled[3], filled[4]]) as usize;
            if len > held {
                return len - held;
            }
        }
        crate::pump::BUF_SIZE.saturating_sub(held).max(RECORD_HEADER)
    }

    /// Room for at least `more` bytes after what is held (moved to the front first).
    fn spare(&mut self, more: usize) -> &mut [u8] {
        let held = self.end - self.start;
        let buf = self.buf.get_or_insert_with(pool::take);
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
fn fill(out: &mut Bytes, room: usize, mut f: impl FnMut(&mut [u8]) -> Result<usize, Sized>) -> io::Result<()> {
    let written = match f(out.spare(room)) {
        Ok(n) => n,
        Err(Sized::Needs(required)) => f(out.spare(required)).map_err(Sized::into_io)?,
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
enum Sized {
    Needs(usize),
    Other(String),
}

impl Sized {
    fn into_io(self) -> io::Error {
        match self {
            Sized::Needs(n) => io::Error::other(format!("TLS buffer still too small for {n} bytes")),
            Sized::Other(why) => io::Error::other(why),
        }
    }
}

fn encode_error(e: EncodeError) -> Sized {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Sized::Needs(required_size),
        e => Sized::Other(e.to_string()),
    }
}

fn encrypt_error(e: EncryptError) -> Sized {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Sized::Needs(required_size),
        e => Sized::Other(e.to_string()),
    }
}

/// A TLS failure as tokio-rustls reports it: `InvalidData` with the `rustls::Error` inside.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
