//! The frame pump: moves WebSocket frames between the browser and the gateway as they arrived.
//!
//! Neither hop negotiates an extension, browser frames are already masked and gateway frames are
//! not, so every frame is valid on the other hop unchanged. The pump reads frame headers (to
//! count messages, enforce `max_message_size`, check framing and notice close frames), checks
//! that text messages are UTF-8 and close frames well-formed (RFC 6455 §5, §7.4, §8.1), and
//! copies bytes through a small fixed buffer per direction, so memory does not grow with message
//! size and a slow reader slows its writer (`write_all` is awaited before the next read). The
//! buffers belong to the thread ([`pool`]): a direction holds one only while it has bytes in
//! it, so an idle connection holds none.
//!
//! When one side breaks the protocol (bad framing, invalid UTF-8, a message over the limit), the
//! frames it sent before the bad one are forwarded, the other side gets the relay's close (1001;
//! 1014 to the browser when the gateway broke the framing), and what that side already sent still
//! reaches the sender until it answers the close; only then does the sender get its own close
//! (1002, 1007 or 1009). A byte pipe in front of a conforming endpoint behaves the same way.
//! After any close of the relay's own, each side gets a moment to answer it before its socket is
//! dropped, so a browser's reply does not meet a reset.
//!
//! It is generic over `AsyncRead`/`AsyncWrite`, so unit tests drive it with in-memory pipes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
// tokio's clock, the one its timers run on (and that paused tests move).
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::frame::{self, FrameError, OpCode};
use crate::outcome::{Ending, Side};
use crate::utf8::Utf8Stream;

/// Bytes each direction reads at a time. Signalling messages are a few hundred bytes to a few
/// KiB; larger ones stream through.
pub const BUF_SIZE: usize = 4096;
/// How long the second half of a close handshake may take.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long the relay's own close frame and TLS close may take to write.
const FINAL_WRITE: Duration = Duration::from_secs(1);
/// How long a side the relay closed gets to answer before its socket is dropped.
const LINGER: Duration = Duration::from_millis(500);

/// Messages and bytes relayed so far, shared with whoever reports on the connection.
#[derive(Debug, Default)]
pub struct Counters {
    pub msgs_up: AtomicU64,
    pub msgs_down: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl Counters {
    /// Counts `msgs` data messages and `bytes` bytes relayed from `from`.
    pub fn add(&self, from: Side, msgs: u64, bytes: u64) {
        let (m, b) = match from {
            Side::Upstream => (&self.msgs_down, &self.bytes_down),
            _ => (&self.msgs_up, &self.bytes_up),
        };
        if msgs > 0 {
            m.fetch_add(msgs, Ordering::Relaxed);
        }
        b.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PumpEnd {
    pub ending: Ending,
    /// The code of the close that ended it: the peer's own, or the one the relay sent.
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// What the side at fault did, when one broke the protocol.
    pub error: Option<String>,
}

/// Settings for one relayed connection.
pub struct PumpOptions<'a> {
    pub max_message_size: u64,
    /// Written into the close reasons the relay sends: `<outcome> conn=<id>`.
    pub conn_id: &'a str,
    /// Ping both sides this often; a side that sends nothing between two pings is closed.
    pub ping_interval: Option<Duration>,
    /// Close after this long without a data message either way.
    pub idle_timeout: Option<Duration>,
    /// After shutdown fires, wait a random time up to this before closing.
    pub drain_jitter: Duration,
    /// Fleet-wide message and byte counters.
    pub metrics: Option<&'a crate::metrics::Metrics>,
}

impl PumpOptions<'_> {
    /// Options with only a size limit, for tests.
    pub fn new(max_message_size: u64, conn_id: &str) -> PumpOptions<'_> {
        PumpOptions {
            max_message_size,
            conn_id,
            ping_interval: None,
            idle_timeout: None,
            drain_jitter: Duration::ZERO,
            metrics: None,
        }
    }
}

/// Payload of the relay's own pings.
const PING_PAYLOAD: &[u8] = b"sigrelay";

/// Bytes read from each side before the relay started, relayed first.
#[derive(Debug, Default)]
pub struct Initial {
    pub client: Vec<u8>,
    pub upstream: Vec<u8>,
}

/// Relays until both directions have ended, `shutdown` fires (then, after a random part of
/// `drain_jitter`, both sides get 1012), `operator` fires (1001 "closed by operator"), or the
/// connection idles out. `initial` holds bytes already read from each side: the browser's first
/// message, and whatever the gateway sent right behind its 101.
pub async fn run<CR, CW, UR, UW>(
    client: (CR, CW),
    upstream: (UR, UW),
    initial: Initial,
    opts: &PumpOptions<'_>,
    counters: &Counters,
    shutdown: &CancellationToken,
    operator: &CancellationToken,
) -> PumpEnd
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let shared = Shared {
        stop: StopFlag::default(),
        decided: Mutex::new(None),
        reason: OnceLock::new(),
        finished: AtomicUsize::new(0),
        conn_id: opts.conn_id,
        counters,
        metrics: opts.metrics,
        start: Instant::now(),
        last_seen: [AtomicU64::new(0), AtomicU64::new(0)],
        last_data: AtomicU64::new(0),
    };
    let mut up = Direction::new(Side::Client, client.0, upstream.1, opts);
    let mut down = Direction::new(Side::Upstream, upstream.0, client.1, opts);
    let both = async {
        tokio::join!(up.run_and_finish(initial.client, &shared), down.run_and_finish(initial.upstream, &shared));
    };
    let watch = async {
        let ending = tokio::select! {
            _ = async {
                shutdown.cancelled().await;
                let jitter = opts.drain_jitter.mul_f64(rand::random::<f64>());
                tokio::time::sleep(jitter).await;
            } => Ending::Shutdown,
            _ = operator.cancelled() => Ending::Operator,
            _ = idle(&shared, opts.idle_timeout) => Ending::Idle,
        };
        // Lost to a side's close, fault or end: that side's close is under way, and bounded
        // (CLOSE_GRACE, LINGER, FINAL_WRITE); stopping it now would cut the other side's answer.
        if shared.decide(Decided { ending, peer_close: None, error: None }) {
            shared.stop.set().await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = both => {}
        _ = watch => {}
    }
    let decided = shared.decided.lock().unwrap().take();
    let Decided { ending, peer_close, error } = decided.unwrap_or(Decided { ending: Ending::Shutdown, peer_close: None, error: None });
    let (close_code, close_reason) = match (ending, peer_close) {
        (Ending::Closed(_), Some((code, reason))) => (code, code.map(|_| reason)),
        _ => {
            let code = ending.close_code_for(Side::Client).or(ending.close_code_for(Side::Upstream));
            (code, code.map(|_| shared.reason(ending).to_string()))
        }
    };
    PumpEnd { ending, close_code, close_reason, error }
}

/// Resolves once no data (a message, or part of one) has passed either way for `timeout`;
/// never when `None`.
async fn idle(shared: &Shared<'_>, timeout: Option<Duration>) {
    let Some(timeout) = timeout else { return std::future::pending().await };
    loop {
        let last = Duration::from_millis(shared.last_data.load(Ordering::Relaxed));
        let deadline = shared.start + last + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A peer's close frame: its code and reason.
type PeerClose = (Option<u16>, String);

/// How the connection ends, as first decided.
#[derive(Debug)]
struct Decided {
    ending: Ending,
    /// The peer's close, when a peer's close frame ended it.
    peer_close: Option<PeerClose>,
    error: Option<String>,
}

/// State the two directions of one connection share (they run in the same task).
struct Shared<'a> {
    /// Set once the connection is ending; each direction then stops reading.
    stop: StopFlag,
    /// The first ending decided wins.
    decided: Mutex<Option<Decided>>,
    reason: OnceLock<String>,
    finished: AtomicUsize,
    conn_id: &'a str,
    counters: &'a Counters,
    metrics: Option<&'a crate::metrics::Metrics>,
    start: Instant,
    /// Milliseconds after `start` when each side (client, upstream) last sent anything.
    last_seen: [AtomicU64; 2],
    /// Milliseconds after `start` of the last data message either way.
    last_data: AtomicU64,
}

impl Shared<'_> {
    /// Records how the connection ends unless that is already decided; whether this decided it.
    fn decide(&self, decided: Decided) -> bool {
        let mut first = self.decided.lock().unwrap();
        if first.is_none() {
            *first = Some(decided);
            true
        } else {
            false
        }
    }

    fn ending(&self) -> Ending {
        self.decided.lock().unwrap().as_ref().map(|d| d.ending).unwrap_or(Ending::Shutdown)
    }

    /// The code of the close that started the ending, when a peer's close did.
    fn peer_close_code(&self) -> Option<u16> {
        self.decided.lock().unwrap().as_ref().and_then(|d| d.peer_close.as_ref()).and_then(|(code, _)| *code)
    }

    /// Whether the relay is failing the connection because of `side`.
    fn failing_because_of(&self, side: Side) -> bool {
        self.decided.lock().unwrap().as_ref().and_then(|d| d.ending.at_fault()) == Some(side)
    }

    fn reason(&self, ending: Ending) -> &str {
        self.reason.get_or_init(|| match ending {
            Ending::Operator => "closed by operator".to_string(),
            _ => format!("{} conn={}", ending.outcome(), self.conn_id),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn seen(&self, side: Side) -> &AtomicU64 {
        &self.last_seen[(side == Side::Upstream) as usize]
    }
}

/// What a side did that makes the relay fail the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    TooBig,
    Protocol(FrameError),
    InvalidUtf8,
}

impl Fault {
    fn ending(&self, side: Side) -> Ending {
        match self {
            Fault::TooBig => Ending::TooBig(side),
            Fault::Protocol(_) => Ending::ProtocolError(side),
            Fault::InvalidUtf8 => Ending::InvalidData(side),
        }
    }

    fn describe(&self) -> String {
        match self {
            Fault::TooBig => "a message over max_message_size".into(),
            Fault::Protocol(e) => e.to_string(),
            Fault::InvalidUtf8 => "invalid UTF-8 in a text message".into(),
        }
    }
}

/// Why one direction stopped.
#[derive(Debug)]
enum DirEnd {
    /// The reading side's close frame was forwarded.
    ForwardedClose(Option<u16>, String),
    /// The reading side answered the relay's close (the connection was failing because of the
    /// other side); its close was not forwarded.
    AnsweredClose,
    /// The reading side's stream ended or failed without a close frame.
    ReadEnded,
    /// The writing side could not take more bytes.
    WriteFailed,
    /// The reading side broke the protocol.
    Fault(Fault),
    /// The writing side answered none of the relay's pings.
    Silent,
    /// The connection is ending for another reason.
    Stopped,
}

/// What the scanner found that ends the direction.
#[derive(Debug)]
enum Stop {
    /// A valid close frame starting at `start` in the scanned bytes.
    Close { start: usize, code: Option<u16>, reason: String },
    Fault(Fault),
}

/// Tracks framing across reads: where frames start, how far into a payload we are, message
/// boundaries, and the UTF-8 state of a text message.
#[derive(Debug)]
struct Scanner {
    from: Side,
    max_message_size: u64,
    /// Payload bytes of the current data frame still to pass through.
    remaining: u64,
    /// The current data frame's masking key, and how far into its payload the scan is.
    mask: Option<[u8; 4]>,
    payload_at: u64,
    /// Inside a fragmented message (a data frame without FIN was seen).
    in_message: bool,
    /// The current message is text, and its UTF-8 so far.
    text: bool,
    utf8: Utf8Stream,
    message_len: u64,
    /// The current frame ends a message.
    fin_pending: bool,
    msgs: u64,
    /// Data (a data frame's header or payload) was scanned since the pump last took this:
    /// a long message streaming in is not idle time.
    data_seen: bool,
    /// The bytes forwarded so far stop inside a frame: nothing more can be framed on the writer.
    torn: bool,
}

/// Text payload is unmasked into a stack buffer this big to be validated, never into the pump's
/// own buffer (the bytes are forwarded masked, as they came).
const UNMASK_CHUNK: usize = 1024;

impl Scanner {
    fn new(from: Side, max_message_size: u64) -> Scanner {
        Scanner {
            from,
            max_message_size,
            remaining: 0,
            mask: None,
            payload_at: 0,
            in_message: false,
            text: false,
            utf8: Utf8Stream::default(),
            message_len: 0,
            fin_pending: false,
            msgs: 0,
            data_seen: false,
            torn: false,
        }
    }

    /// Whether the writer is at a frame boundary, so the relay may send it a frame of its own.
    fn at_boundary(&self) -> bool {
        self.remaining == 0 && !self.torn
    }

    /// Walks `data`, returning how many bytes may be forwarded now and whether the direction
    /// must stop after them. Bytes not consumed are an incomplete header or control frame.
    fn scan(&mut self, data: &[u8]) -> (usize, Option<Stop>) {
        let mut pos = 0;
        // Where the current data frame's header starts in `data`, if it does.
        let mut frame_start: Option<usize> = None;
        while pos < data.len() {
            if self.remaining > 0 {
                self.data_seen = true;
                let n = self.remaining.min((data.len() - pos) as u64) as usize;
                if self.text && !self.validate(&data[pos..pos + n]) {
                    return self.fail_in_frame(frame_start, Fault::InvalidUtf8);
                }
                pos += n;
                self.remaining -= n as u64;
                self.payload_at += n as u64;
                if self.remaining == 0 {
                    if let Err(fault) = self.end_frame() {
                        return self.fail_in_frame(frame_start, fault);
                    }
                }
                continue;
            }
            let h = match frame::parse_header(&data[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return (pos, Some(Stop::Fault(Fault::Protocol(e)))),
            };
            // RFC 6455 §5.1: browsers mask every frame, servers none.
            if (self.from == Side::Upstream) == h.mask.is_some() {
                return (pos, Some(Stop::Fault(Fault::Protocol(FrameError::Masking))));
            }
            if h.opcode.is_control() {
                let total = h.frame_len() as usize;
                if data.len() - pos < total {
                    break;
                }
                let start = pos;
                pos += total;
                if h.opcode == OpCode::Close {
                    let mut payload = data[start + h.header_len..pos].to_vec();
                    if let Some(key) = h.mask {
                        frame::apply_mask(&mut payload, key, 0);
                    }
                    if let Err(e) = frame::check_close_payload(&payload) {
                        return (start, Some(Stop::Fault(Fault::Protocol(e))));
                    }
                    let (code, reason) = frame::parse_close_payload(&payload);
                    return (pos, Some(Stop::Close { start, code, reason }));
                }
                continue;
            }
            let continuation = h.opcode == OpCode::Continuation;
            if continuation != self.in_message {
                return (pos, Some(Stop::Fault(Fault::Protocol(FrameError::Sequence))));
            }
            self.message_len = if continuation { self.message_len + h.payload_len } else { h.payload_len };
            if self.message_len > self.max_message_size {
                return (pos, Some(Stop::Fault(Fault::TooBig)));
            }
            if !continuation {
                self.text = h.opcode == OpCode::Text;
                self.utf8 = Utf8Stream::default();
            }
            frame_start = Some(pos);
            self.data_seen = true;
            self.in_message = !h.fin;
            self.fin_pending = h.fin;
            self.mask = h.mask;
            self.payload_at = 0;
            pos += h.header_len;
            self.remaining = h.payload_len;
            if self.remaining == 0 {
                if let Err(fault) = self.end_frame() {
                    return self.fail_in_frame(frame_start, fault);
                }
            }
        }
        (pos, None)
    }

    /// Fails the direction inside the current data frame: when the frame started in these bytes
    /// none of it is forwarded, so the writer stays at a boundary; otherwise its start is already
    /// out and the writer is torn.
    fn fail_in_frame(&mut self, frame_start: Option<usize>, fault: Fault) -> (usize, Option<Stop>) {
        self.remaining = 0;
        let forward = match frame_start {
            Some(start) => start,
            None => {
                self.torn = true;
                0
            }
        };
        (forward, Some(Stop::Fault(fault)))
    }

    /// Validates the next payload bytes of a text message.
    fn validate(&mut self, payload: &[u8]) -> bool {
        let Some(key) = self.mask else { return self.utf8.feed(payload) };
        let mut tmp = [0u8; UNMASK_CHUNK];
        let mut at = self.payload_at as usize;
        for chunk in payload.chunks(UNMASK_CHUNK) {
            let tmp = &mut tmp[..chunk.len()];
            tmp.copy_from_slice(chunk);
            frame::apply_mask(tmp, key, at);
            if !self.utf8.feed(tmp) {
                return false;
            }
            at += chunk.len();
        }
        true
    }

    fn end_frame(&mut self) -> Result<(), Fault> {
        if self.fin_pending {
            self.fin_pending = false;
            if self.text && !self.utf8.complete() {
                return Err(Fault::InvalidUtf8);
            }
            self.msgs += 1;
        }
        Ok(())
    }
}

/// One direction: reads frames from one side and writes them to the other.
struct Direction<R, W> {
    to: Side,
    reader: R,
    writer: W,
    /// Bytes read and not yet forwarded are `buf[start..end]`; no buffer while there are none.
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    scanner: Scanner,
    /// The last write stopped part-way through, so nothing more can be framed on this writer.
    write_torn: bool,
    /// The writer got a close frame (forwarded or the relay's own): it gets no other.
    close_sent: bool,
    /// Fixed-period ping ticks (not reset by traffic from the reading side, which says nothing
    /// about whether the writing side is still there).
    ping_timer: Option<tokio::time::Interval>,
    /// When this direction last pinged its writing side (ms after the connection's start).
    pinged_at: Option<u64>,
    /// Pings in a row the writing side has not answered with anything.
    unanswered: u32,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Direction<R, W> {
    fn new(from: Side, reader: R, writer: W, opts: &PumpOptions<'_>) -> Self {
        let to = if from == Side::Client { Side::Upstream } else { Side::Client };
        Direction {
            to,
            reader,
            writer,
            buf: None,
            start: 0,
            end: 0,
            scanner: Scanner::new(from, opts.max_message_size),
            write_torn: false,
            close_sent: false,
            ping_timer: opts.ping_interval.map(|p| {
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            }),
            pinged_at: None,
            unanswered: 0,
        }
    }

    async fn run_and_finish(&mut self, initial: Vec<u8>, shared: &Shared<'_>) {
        let end = self.run(initial, shared).await;
        let from = self.scanner.from;
        let second = shared.finished.fetch_add(1, Ordering::SeqCst) == 1;
        let decide = |ending, peer_close, error| shared.decide(Decided { ending, peer_close, error });
        // Whether the reading side is still there to answer a close of the relay's own.
        let reader_open = matches!(end, DirEnd::Stopped | DirEnd::Fault(_));
        // After a fault the reading side's bytes no longer parse as frames.
        let framed = !matches!(end, DirEnd::Fault(_));
        match end {
            DirEnd::ForwardedClose(code, reason) => {
                self.close_sent = true;
                decide(Ending::Closed(from), Some((code, reason)), None);
                // The other side now answers with its own close; give it time to arrive.
                if !second {
                    await_other(shared).await;
                }
            }
            DirEnd::Fault(fault) => {
                tracing::debug!(side = ?from, error = %fault.describe(), "protocol error");
                let ending = fault.ending(from);
                // The other side hears first, and what it already sent still reaches the sender
                // (through the other direction) until it answers; then the sender gets its close.
                if decide(ending, None, Some(fault.describe())) && !second && self.send_own_close(shared, ending).await {
                    await_other(shared).await;
                }
            }
            DirEnd::AnsweredClose | DirEnd::Stopped => {}
            DirEnd::ReadEnded => {
                decide(Ending::Gone(from), None, None);
            }
            DirEnd::WriteFailed => {
                decide(Ending::Gone(self.to), None, None);
            }
            DirEnd::Silent => {
                decide(Ending::Silent(self.to), None, None);
            }
        }
        shared.stop.set().await;
        self.finish(shared).await;
        // The relay closed this direction's reading side itself: let it answer before its socket
        // is dropped (RFC 6455 §7.1.1), so its answer does not meet a reset.
        let ending = shared.ending();
        if reader_open && ending.close_code_for(from).is_some() {
            self.linger(framed).await;
        }
    }

    /// Reads what the reading side still sends, for at most [`LINGER`], until its close (when
    /// its bytes are `framed`, still parseable as frames) or the end of its stream; nothing of
    /// it is forwarded.
    async fn linger(&mut self, framed: bool) {
        if !framed {
            // Re-scanning the bytes that failed would stop at once, and the peer's answer
            // would then meet a closed socket and a reset.
            (self.start, self.end) = (0, 0);
        }
        let _ = tokio::time::timeout(LINGER, async {
            loop {
                let buf = self.buf.get_or_insert_with(pool::take);
                if framed {
                    let (n, stop) = self.scanner.scan(&buf[self.start..self.end]);
                    if stop.is_some() {
                        return;
                    }
                    self.start += n;
                    buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                } else {
                    self.end = 0;
                }
                self.start = 0;
                match self.reader.read(&mut buf[self.end..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.end += n,
                }
            }
        })
        .await;
    }

    /// Sends the relay's close for `ending` to this direction's writer, if the writer can take a
    /// frame; whether it did.
    async fn send_own_close(&mut self, shared: &Shared<'_>, ending: Ending) -> bool {
        if self.write_torn || self.close_sent || !self.scanner.at_boundary() {
            return false;
        }
        let frame = match ending {
            // The side that closed never heard back from the other: answer as it would have.
            Ending::Closed(side) if side == self.to => {
                let reason = format!("{} did not answer the close conn={}", side.other().word(), shared.conn_id);
                match shared.peer_close_code() {
                    Some(code) => frame::close_frame(code, &reason, self.mask()),
                    None => frame::empty_close_frame(self.mask()),
                }
            }
            _ => match ending.close_code_for(self.to) {
                Some(code) => frame::close_frame(code, shared.reason(ending), self.mask()),
                None => return false,
            },
        };
        self.close_sent = true;
        let written = tokio::time::timeout(FINAL_WRITE, async {
            self.writer.write_all(&frame).await?;
            self.writer.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            self.write_torn = true;
            return false;
        }
        true
    }

    /// The masking key for a frame the relay writes: the gateway's side wants masked frames.
    fn mask(&self) -> Option<[u8; 4]> {
        (self.to == Side::Upstream).then(rand::random::<[u8; 4]>)
    }

    /// Sends the relay's own close frame to this direction's writer, if the ending calls for one
    /// and the writer can take it, then shuts the writer down. A writer torn mid-write is stuck
    /// behind a peer that does not read: it is dropped, not waited on.
    async fn finish(&mut self, shared: &Shared<'_>) {
        if self.write_torn {
            return;
        }
        let ending = shared.ending();
        self.send_own_close(shared, ending).await;
        if !self.write_torn {
            let _ = tokio::time::timeout(FINAL_WRITE, self.writer.shutdown()).await;
        }
    }

    async fn run(&mut self, initial: Vec<u8>, shared: &Shared<'_>) -> DirEnd {
        // One waiter on the stop token for the life of the direction, not one per read.
        let stopped = shared.stop.wait();
        tokio::pin!(stopped);
        if !initial.is_empty() {
            let (n, stop) = self.scanner.scan(&initial);
            if let Some(end) = Box::pin(self.forward(&initial, n, stop, shared, stopped.as_mut())).await {
                return end;
            }
            let rest = &initial[n..];
            if !rest.is_empty() {
                self.buf.get_or_insert_with(pool::take)[..rest.len()].copy_from_slice(rest);
                self.end = rest.len();
            }
        }
        // Not held for the life of the connection.
        drop(initial);
        loop {
            if let Some(buf) = self.buf.as_mut().filter(|_| self.start > 0) {
                buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            // In this order, so that a ready read polls nothing else: the stop is a flag, and a
            // tick can wait while data flows (it is forwarded to the side a ping would go to,
            // and a dead side stops taking writes, which `write` notices).
            let read = tokio::select! {
                biased;
                _ = &mut stopped => return DirEnd::Stopped,
                r = pool::read(&mut self.reader, &mut self.buf, self.end) => r,
                _ = tick(&mut self.ping_timer) => {
                    if let Some(end) = Box::pin(self.ping(shared, stopped.as_mut())).await {
                        return end;
                    }
                    continue;
                }
            };
            match read {
                Ok(0) | Err(_) => return DirEnd::ReadEnded,
                Ok(n) => self.end += n,
            }
            shared.seen(self.scanner.from).store(shared.now_ms(), Ordering::Relaxed);
            let chunk = self.buf.take().expect("a read that returned bytes holds a buffer");
            let (n, stop) = self.scanner.scan(&chunk[self.start..self.end]);
            // Boxed: a write that waits is the exception, and sizing the connection's future for
            // one would cost every idle connection its state (a few hundred bytes a direction);
            // the box costs one small allocation per forwarded read.
            let result = Box::pin(self.forward(&chunk[self.start..self.end], n, stop, shared, stopped.as_mut())).await;
            self.start += n;
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
                pool::give(chunk);
            } else {
                self.buf = Some(chunk);
            }
            if let Some(end) = result {
                return end;
            }
        }
    }

    /// Pings the writing side; one that has sent nothing at all through two pings is silent
    /// (a slow pong is not a dead peer). Pongs come back through the other direction and are
    /// forwarded; an unsolicited pong is allowed (RFC 6455 §5.5.3), so the far side ignores it.
    async fn ping(&mut self, shared: &Shared<'_>, mut stopped: Stopped<'_, '_>) -> Option<DirEnd> {
        // Once the other direction has ended, nothing reads this writer's side, so its pongs
        // would go unseen; what is left of the connection is bounded by the close grace.
        if shared.finished.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if let Some(pinged) = self.pinged_at {
            if shared.seen(self.to).load(Ordering::Relaxed) < pinged {
                self.unanswered += 1;
                if self.unanswered >= 2 {
                    return Some(DirEnd::Silent);
                }
            } else {
                self.unanswered = 0;
            }
        }
        if !self.scanner.at_boundary() || self.write_torn || self.close_sent {
            return None;
        }
        let mut frame = Vec::with_capacity(frame::MAX_HEADER_LEN + PING_PAYLOAD.len());
        frame::encode_frame(&mut frame, OpCode::Ping, PING_PAYLOAD, self.mask());
        self.pinged_at = Some(shared.now_ms());
        self.write(&frame, true, stopped.as_mut()).await.err()
    }

    /// Writes, and flushes when told to. A stop while the write is blocked leaves the writer
    /// torn (mid-frame); a stop while only the flush is, does not: the writer took all of
    /// `data`, and the relay's close can follow it. A writer that stays blocked through two ping
    /// ticks has stopped reading: that side is silent (its pongs, if any, are stuck behind the
    /// same wall).
    async fn write(&mut self, data: &[u8], flush: bool, mut stopped: Stopped<'_, '_>) -> Result<(), DirEnd> {
        let writer = &mut self.writer;
        let timer = &mut self.ping_timer;
        // An atomic only because the future must be Send; one task reads and writes it.
        let taken = AtomicBool::new(false);
        let write = async {
            writer.write_all(data).await?;
            taken.store(true, Ordering::Relaxed);
            if flush {
                writer.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        tokio::pin!(write);
        let mut stalled_ticks = 0;
        let result = loop {
            tokio::select! {
                // A write that can finish now is not torn, even if the stop fired meanwhile.
                biased;
                r = &mut write => break r,
                _ = stopped.as_mut() => {
                    // Over TLS a write only encrypts and the flush sends: a peer slow to read
                    // holds the flush, with whole frames waiting in the writer.
                    self.write_torn = !taken.load(Ordering::Relaxed);
                    return Err(DirEnd::Stopped);
                }
                _ = tick(timer) => {
                    stalled_ticks += 1;
                    if stalled_ticks >= 2 {
                        self.write_torn = true;
                        return Err(DirEnd::Silent);
                    }
                }
            }
        };
        result.map_err(|_| {
            self.write_torn = true;
            DirEnd::WriteFailed
        })
    }

    /// Writes the first `n` bytes of `data` to the other side and accounts for them. A close
    /// that answers the relay's own (the connection is failing because of the other side) is
    /// not forwarded.
    async fn forward(
        &mut self,
        data: &[u8],
        n: usize,
        stop: Option<Stop>,
        shared: &Shared<'_>,
        mut stopped: Stopped<'_, '_>,
    ) -> Option<DirEnd> {
        let (n, end) = match stop {
            None => (n, None),
            Some(Stop::Close { start, .. }) if shared.failing_because_of(self.to) => (start, Some(DirEnd::AnsweredClose)),
            Some(Stop::Close { code, reason, .. }) => (n, Some(DirEnd::ForwardedClose(code, reason))),
            Some(Stop::Fault(fault)) => (n, Some(DirEnd::Fault(fault))),
        };
        // A close forwarded once the other direction has ended (its close answered, mostly) is
        // the last thing this one writes, and the shutdown that follows at once flushes it
        // (within FINAL_WRITE): over TLS, in one send with the close_notify.
        let last = matches!(end, Some(DirEnd::ForwardedClose(..))) && shared.finished.load(Ordering::SeqCst) == 1;
        if n > 0 {
            if let Err(end) = self.write(&data[..n], !last, stopped.as_mut()).await {
                return Some(end);
            }
            let msgs = std::mem::take(&mut self.scanner.msgs);
            shared.counters.add(self.scanner.from, msgs, n as u64);
            if std::mem::take(&mut self.scanner.data_seen) {
                shared.last_data.store(shared.now_ms(), Ordering::Relaxed);
            }
            if let Some(m) = shared.metrics {
                let (mc, bc) = match self.scanner.from {
                    Side::Upstream => (&m.msgs_down, &m.bytes_down),
                    _ => (&m.msgs_up, &m.bytes_up),
                };
                mc.inc_by(msgs);
                bc.inc_by(n as u64);
            }
        }
        end
    }
}

/// Waits, for at most the close grace, until the other direction ends.
async fn await_other(shared: &Shared<'_>) {
    tokio::select! {
        _ = tokio::time::sleep(CLOSE_GRACE) => {}
        _ = shared.stop.wait() => {}
    }
}

/// The connection's stop. Both directions and the watcher run in one task and are polled
/// together whenever it wakes, so a flag is enough: setting it wakes that task, and every wait
/// on it is polled again then. (A `CancellationToken` takes two locks per poll, and each read
/// of a pump polls it.)
#[derive(Default)]
struct StopFlag(AtomicBool);

impl StopFlag {
    /// Sets the flag and wakes the connection's task (the caller's own).
    async fn set(&self) {
        std::future::poll_fn(|cx| {
            self.0.store(true, Ordering::Release);
            cx.waker().wake_by_ref();
            Poll::Ready(())
        })
        .await
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Resolves once the flag is set; only for waits inside the connection's task.
    fn wait(&self) -> StopWait<'_> {
        StopWait(self)
    }
}

/// A wait on the connection's [`StopFlag`]. It registers no waker of its own: whoever sets the
/// flag runs in the same task and wakes it.
struct StopWait<'a>(&'a StopFlag);

impl Future for StopWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.0.is_set() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The direction's pinned wait on the stop flag.
type Stopped<'p, 't> = Pin<&'p mut StopWait<'t>>;

/// Runs the pump's frame scanner alone over `bytes`, for the UTF-8 cost benchmark
/// (`benches/utf8_cost.rs`); returns the messages seen.
#[doc(hidden)]
pub fn scan_for_bench(bytes: &[u8], from_browser: bool) -> u64 {
    let mut scanner = Scanner::new(if from_browser { Side::Client } else { Side::Upstream }, u64::MAX);
    let (n, stop) = scanner.scan(bytes);
    assert!(n == bytes.len() && stop.is_none(), "the benchmark's frames are valid");
    scanner.msgs
}

/// The timer's next tick, or never when there is no timer.
async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The pump's read buffers, [`BUF_SIZE`] bytes each, kept per thread (a connection lives on the
/// thread that accepted it). A direction takes one for each read that finds its buffer empty and
/// gives it back once everything in it is forwarded.
pub(crate) mod pool {
    use std::cell::RefCell;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use tokio::io::{AsyncRead, ReadBuf};

    use super::BUF_SIZE;

    /// Free buffers kept per thread and size; more are freed (about 512 KiB a thread at most).
    const KEPT: usize = 64;

    /// The size of the TLS streams' send buffers: a read buffer's worth of plaintext
    /// encrypted as one record, with room to spare for its header and tag.
    pub const TLS_OUT_SIZE: usize = BUF_SIZE + 64;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
        static FREE_TLS_OUT: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    type FreeList = std::thread::LocalKey<RefCell<Vec<Box<[u8]>>>>;

    /// This thread's free buffers of `size`, if it pools that size.
    fn free_list(size: usize) -> Option<&'static FreeList> {
        match size {
            BUF_SIZE => Some(&FREE),
            TLS_OUT_SIZE => Some(&FREE_TLS_OUT),
            _ => None,
        }
    }

    /// A free buffer of this thread's, or a new one.
    pub fn take() -> Box<[u8]> {
        take_of(BUF_SIZE)
    }

    /// A free buffer of `size` ([`BUF_SIZE`] or [`TLS_OUT_SIZE`]), or a new one.
    pub fn take_of(size: usize) -> Box<[u8]> {
        free_list(size).and_then(|free| free.with(|f| f.borrow_mut().pop())).unwrap_or_else(|| vec![0; size].into_boxed_slice())
    }

    /// Gives a buffer back to this thread's pool of its size (one of another size is freed).
    pub fn give(buf: Box<[u8]>) {
        let Some(free) = free_list(buf.len()) else { return };
        free.with(|f| {
            let mut free = f.borrow_mut();
            if free.len() < KEPT {
                free.push(buf);
            }
        });
    }

    /// Reads into `slot[end..]`. With nothing held (`end == 0`), each poll borrows a buffer from
    /// the pool and gives it back if no bytes came (a pending read leaves the buffer untouched),
    /// so waiting on an idle peer holds no buffer; bytes that came stay in `slot`.
    pub fn read<'a, R: AsyncRead + Unpin>(
        reader: &'a mut R,
        slot: &'a mut Option<Box<[u8]>>,
        end: usize,
    ) -> impl Future<Output = std::io::Result<usize>> + 'a {
        std::future::poll_fn(move |cx| {
            let mut buf = slot.take().unwrap_or_else(take);
            let mut read = ReadBuf::new(&mut buf[end..]);
            let polled = Pin::new(&mut *reader).poll_read(cx, &mut read);
            let n = read.filled().len();
            match polled {
                Poll::Ready(Ok(())) if n > 0 || end > 0 => *slot = Some(buf),
                _ if end > 0 => *slot = Some(buf),
                _ => give(buf),
            }
            polled.map_ok(|()| n)
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use tokio::io::AsyncWriteExt;

        #[tokio::test]
        async fn a_read_waiting_on_an_idle_peer_holds_no_buffer() {
            let (mut peer, mut reader) = tokio::io::duplex(64);
            let mut slot = None;
            {
                let read = read(&mut reader, &mut slot, 0);
                tokio::pin!(read);
                assert!(futures_util::poll!(read.as_mut()).is_pending());
            }
            assert!(slot.is_none(), "a pending read gave its buffer back");
            peer.write_all(b"abc").await.unwrap();
            assert_eq!(read(&mut reader, &mut slot, 0).await.unwrap(), 3);
            assert_eq!(&slot.as_deref().expect("bytes keep their buffer")[..3], b"abc");
            // Bytes of a partial frame held at the front stay put while the read waits.
            {
                let read = read(&mut reader, &mut slot, 3);
                tokio::pin!(read);
                assert!(futures_util::poll!(read.as_mut()).is_pending());
            }
            assert_eq!(&slot.as_deref().expect("held bytes keep their buffer")[..3], b"abc");
            peer.write_all(b"de").await.unwrap();
            assert_eq!(read(&mut reader, &mut slot, 3).await.unwrap(), 2);
            assert_eq!(&slot.as_deref().unwrap()[..5], b"abcde");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{close_frame, encode_frame};
    use tokio::io::{duplex, split, DuplexStream};

    struct Harness {
        browser: DuplexStream,
        gateway: DuplexStream,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<(PumpEnd, [u64; 4])>,
    }

    fn start(initial: Vec<u8>, max: u64) -> Harness {
        start_with(initial, max, |_| {})
    }

    fn start_with(initial: Vec<u8>, max: u64, set: fn(&mut PumpOptions)) -> Harness {
        let (browser, relay_client) = duplex(64 * 1024);
        let (gateway, relay_up) = duplex(64 * 1024);
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            let counters = Counters::default();
            let mut opts = PumpOptions::new(max, "C1");
            set(&mut opts);
            let end = run(split(relay_client), split(relay_up), Initial { client: initial, upstream: Vec::new() }, &opts, &counters, &sd, &CancellationToken::new()).await;
            let c = [&counters.msgs_up, &counters.msgs_down, &counters.bytes_up, &counters.bytes_down]
                .map(|a| a.load(Ordering::Relaxed));
            (end, c)
        });
        Harness { browser, gateway, shutdown, task }
    }

    fn text(payload: &str, mask: bool) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(&mut v, OpCode::Text, payload.as_bytes(), mask.then_some([9, 8, 7, 6]));
        v
    }

    async fn read_exact(s: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        s.read_exact(&mut v).await.unwrap();
        v
    }

    async fn read_to_end(s: &mut DuplexStream) -> Vec<u8> {
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        v
    }

    #[tokio::test]
    async fn forwards_frames_unchanged_and_propagates_close() {
        let first = text("hello", true);
        let mut h = start(first.clone(), 1 << 20);
        assert_eq!(read_exact(&mut h.gateway, first.len()).await, first);
        let reply = text("welcome", false);
        h.gateway.write_all(&reply).await.unwrap();
        assert_eq!(read_exact(&mut h.browser, reply.len()).await, reply);
        // A fragmented message with a ping in the middle, split across writes at odd places.
        let mut frag = Vec::new();
        let mut f1 = Vec::new();
        encode_frame(&mut f1, OpCode::Text, b"ab", Some([1, 1, 1, 1]));
        f1[0] &= 0x7F; // no FIN
        frag.extend_from_slice(&f1);
        encode_frame(&mut frag, OpCode::Ping, b"p", Some([2, 2, 2, 2]));
        encode_frame(&mut frag, OpCode::Continuation, b"cd", Some([3, 3, 3, 3]));
        for b in frag.chunks(3) {
            h.browser.write_all(b).await.unwrap();
        }
        assert_eq!(read_exact(&mut h.gateway, frag.len()).await, frag);
        let close = close_frame(1000, "bye", Some([4, 4, 4, 4]));
        h.browser.write_all(&close).await.unwrap();
        assert_eq!(read_exact(&mut h.gateway, close.len()).await, close);
        let answer = close_frame(1000, "bye", None);
        h.gateway.write_all(&answer).await.unwrap();
        assert_eq!(read_exact(&mut h.browser, answer.len()).await, answer);
        let (end, c) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::Closed(Side::Client));
        assert_eq!(end.close_code, Some(1000));
        assert_eq!(end.close_reason.as_deref(), Some("bye"));
        assert_eq!(c[0], 2, "hello and the fragmented message");
        assert_eq!(c[1], 1);
        assert_eq!(c[2], (first.len() + frag.len() + close.len()) as u64);
    }

    /// The code and reason of the close frame at the start of `f`.
    fn close_of(f: &[u8]) -> (Option<u16>, String) {
        let hd = frame::parse_header(f).unwrap().unwrap();
        assert_eq!(hd.opcode, OpCode::Close, "{f:?}");
        let mut p = f[hd.header_len..hd.frame_len() as usize].to_vec();
        if let Some(k) = hd.mask {
            frame::apply_mask(&mut p, k, 0);
        }
        frame::parse_close_payload(&p)
    }

    /// Reads one whole frame.
    async fn read_frame(s: &mut DuplexStream) -> Vec<u8> {
        let mut f = read_exact(s, 2).await;
        let extra = match f[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        } + if f[1] & 0x80 != 0 { 4 } else { 0 };
        f.extend(read_exact(s, extra).await);
        let len = frame::parse_header(&f).unwrap().unwrap().payload_len as usize;
        f.extend(read_exact(s, len).await);
        f
    }

    fn frame_of(op: OpCode, payload: &[u8], fin: bool, mask: bool) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(&mut v, op, payload, mask.then_some([9, 8, 7, 6]));
        if !fin {
            v[0] &= 0x7F;
        }
        v
    }

    #[tokio::test]
    async fn oversized_message_gets_1009_to_sender_after_the_other_answers_its_1001() {
        let mut h = start(Vec::new(), 2048);
        let mut big = Vec::new();
        encode_frame(&mut big, OpCode::Binary, &[0u8; 4096], Some([1, 2, 3, 4]));
        h.browser.write_all(&big).await.unwrap();
        let to_gateway = read_frame(&mut h.gateway).await;
        assert_eq!(close_of(&to_gateway).0, Some(1001));
        assert!(frame::parse_header(&to_gateway).unwrap().unwrap().mask.is_some(), "relay masks toward the gateway");
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        let to_browser = read_to_end(&mut h.browser).await;
        assert_eq!(close_of(&to_browser), (Some(1009), "message_too_big conn=C1".into()));
        assert_eq!(to_browser.len(), close_frame(1009, "message_too_big conn=C1", None).len(), "the gateway's answer is not forwarded");
        let (end, _) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::TooBig(Side::Client));
    }

    #[tokio::test]
    async fn frames_before_a_bad_one_are_relayed_and_answered_before_the_sender_is_failed() {
        // Autobahn 3.2: a text message, then a frame with a reserved bit, then a ping, in one write.
        let mut h = start(Vec::new(), 1 << 20);
        let mut batch = text("hello", true);
        let mut bad = text("bad", true);
        bad[0] |= 0x20;
        batch.extend_from_slice(&bad);
        batch.extend(frame_of(OpCode::Ping, b"p", true, true));
        h.browser.write_all(&batch).await.unwrap();
        assert_eq!(read_frame(&mut h.gateway).await, text("hello", true));
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001), "nothing after the bad frame, then 1001");
        // The gateway's echo still reaches the browser, ahead of the browser's own close.
        h.gateway.write_all(&text("hello", false)).await.unwrap();
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        assert_eq!(read_frame(&mut h.browser).await, text("hello", false));
        let close = read_to_end(&mut h.browser).await;
        assert_eq!(close_of(&close), (Some(1002), "client_protocol_error conn=C1".into()));
        let (end, c) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::ProtocolError(Side::Client));
        assert_eq!(end.error.as_deref(), Some("reserved bits set without a negotiated extension"));
        assert_eq!((c[0], c[1]), (1, 1));
    }

    #[tokio::test]
    async fn a_failed_sender_is_read_until_it_hangs_up_so_its_close_answer_meets_no_reset() {
        let mut h = start(Vec::new(), 1 << 20);
        let mut bad = text("bad", true);
        bad[0] |= 0x20;
        h.browser.write_all(&bad).await.unwrap();
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001));
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        assert_eq!(close_of(&read_frame(&mut h.browser).await).0, Some(1002));
        // A browser answers after a round trip; the relay is still reading then (a closed
        // DuplexStream end refuses the write, as a closed socket answers with a reset).
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.browser.write_all(&close_frame(1002, "", Some([1, 1, 1, 1]))).await.expect("the relay still reads");
        h.browser.write_all(&text("after the close", true)).await.expect("and drains what follows");
        drop(h.browser);
        let (end, _) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::ProtocolError(Side::Client));
    }

    #[tokio::test]
    async fn invalid_utf8_gets_1007_and_is_never_forwarded() {
        let mut h = start(Vec::new(), 1 << 20);
        let mut bad = Vec::new();
        encode_frame(&mut bad, OpCode::Text, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", Some([1, 2, 3, 4]));
        h.browser.write_all(&bad).await.unwrap();
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001), "the gateway gets the close, not the text");
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        let close = read_to_end(&mut h.browser).await;
        assert_eq!(close_of(&close), (Some(1007), "client_protocol_error conn=C1".into()));
        let (end, c) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::InvalidData(Side::Client));
        assert_eq!(end.ending.outcome(), crate::outcome::Outcome::ClientProtocolError);
        assert_eq!(end.error.as_deref(), Some("invalid UTF-8 in a text message"));
        assert_eq!(end.close_code, Some(1007));
        assert_eq!(c[0], 0);
    }

    #[tokio::test]
    async fn invalid_utf8_from_the_gateway_gets_it_1007_and_the_browser_1001() {
        let mut h = start(Vec::new(), 1 << 20);
        h.gateway.write_all(&frame_of(OpCode::Text, b"ok \xff", true, false)).await.unwrap();
        assert_eq!(close_of(&read_frame(&mut h.browser).await).0, Some(1001));
        h.browser.write_all(&close_frame(1001, "", Some([1, 1, 1, 1]))).await.unwrap();
        assert_eq!(close_of(&read_to_end(&mut h.gateway).await), (Some(1007), "upstream_protocol_error conn=C1".into()));
        assert_eq!(h.task.await.unwrap().0.ending, Ending::InvalidData(Side::Upstream));
    }

    #[tokio::test]
    async fn fragmented_invalid_utf8_fails_at_the_bad_fragment_not_the_message_end() {
        // Autobahn 6.4.1: a valid first fragment, then one that makes the text invalid; no FIN yet.
        let mut h = start(Vec::new(), 1 << 20);
        let first = frame_of(OpCode::Text, "κόσμε".as_bytes(), false, true);
        h.browser.write_all(&first).await.unwrap();
        assert_eq!(read_frame(&mut h.gateway).await, first, "a valid fragment passes");
        h.browser.write_all(&frame_of(OpCode::Continuation, b"\xf4\x90\x80\x80", false, true)).await.unwrap();
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001), "a close between fragments, not the bad one");
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        assert_eq!(close_of(&read_to_end(&mut h.browser).await).0, Some(1007));
    }

    #[tokio::test]
    async fn invalid_utf8_is_found_byte_by_byte_and_valid_text_split_anywhere_passes() {
        let mut h = start(Vec::new(), 1 << 20);
        let good = frame_of(OpCode::Text, "Hello-µ@ßöäüàá-UTF-8!!".as_bytes(), true, true);
        for b in good.chunks(1) {
            h.browser.write_all(b).await.unwrap();
        }
        assert_eq!(read_exact(&mut h.gateway, good.len()).await, good);
        // Autobahn 6.4.3: the bad byte arrives in the middle of a frame whose start is already out.
        let bad = frame_of(OpCode::Text, b"\xce\xba\xf4\x90\x80\x80-more", true, true);
        h.browser.write_all(&bad[..8]).await.unwrap();
        assert_eq!(read_exact(&mut h.gateway, 8).await, bad[..8], "the valid start streams through");
        // F4 may still start a valid sequence, so it passes; 90 after it cannot (past U+10FFFF).
        h.browser.write_all(&bad[8..9]).await.unwrap();
        assert_eq!(read_exact(&mut h.gateway, 1).await, bad[8..9]);
        h.browser.write_all(&bad[9..10]).await.unwrap();
        // The gateway's writer is torn mid-frame: it gets no close, its stream just ends.
        assert_eq!(read_to_end(&mut h.gateway).await, Vec::<u8>::new());
        assert_eq!(close_of(&read_to_end(&mut h.browser).await).0, Some(1007));
    }

    #[tokio::test]
    async fn bad_close_codes_and_reasons_are_protocol_errors() {
        for (payload, error) in [
            (999u16.to_be_bytes().to_vec(), "close code 999 is not one an endpoint may send"),
            (1005u16.to_be_bytes().to_vec(), "close code 1005 is not one an endpoint may send"),
            (5000u16.to_be_bytes().to_vec(), "close code 5000 is not one an endpoint may send"),
            (b"\x03\xe8\xff".to_vec(), "close reason is not valid UTF-8"),
        ] {
            let mut h = start(Vec::new(), 1 << 20);
            h.browser.write_all(&frame_of(OpCode::Close, &payload, true, true)).await.unwrap();
            assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001));
            h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
            assert_eq!(close_of(&read_to_end(&mut h.browser).await).0, Some(1002));
            let (end, _) = h.task.await.unwrap();
            assert_eq!((end.ending, end.error.as_deref()), (Ending::ProtocolError(Side::Client), Some(error)));
        }
    }

    #[tokio::test]
    async fn a_message_cut_short_inside_a_sequence_is_not_counted() {
        let mut h = start(Vec::new(), 1 << 20);
        let mut batch = text("hello", true);
        batch.extend(frame_of(OpCode::Text, b"\xce", true, true));
        h.browser.write_all(&batch).await.unwrap();
        assert_eq!(read_frame(&mut h.gateway).await, text("hello", true));
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001));
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        assert_eq!(close_of(&read_to_end(&mut h.browser).await).0, Some(1007));
        let (_, c) = h.task.await.unwrap();
        assert_eq!(c[0], 1, "only the message that reached the gateway");
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_the_relay_closes_may_answer_before_its_socket_is_dropped() {
        let mut h = start(Vec::new(), 1 << 20);
        h.shutdown.cancel();
        assert_eq!(close_of(&read_frame(&mut h.browser).await).0, Some(1012));
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1012));
        let started = tokio::time::Instant::now();
        h.browser.write_all(&close_frame(1012, "", Some([1, 2, 3, 4]))).await.unwrap();
        h.gateway.write_all(&close_frame(1012, "", None)).await.unwrap();
        h.task.await.unwrap();
        assert!(started.elapsed() < LINGER, "the answers end the wait: {:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_the_far_side_never_answers_is_answered_when_the_grace_runs_out() {
        let mut h = start(Vec::new(), 1 << 20);
        let close = close_frame(4001, "bye", Some([4, 4, 4, 4]));
        h.browser.write_all(&close).await.unwrap();
        assert_eq!(read_exact(&mut h.gateway, close.len()).await, close);
        // The gateway says nothing; after the grace the browser still gets its close answered.
        let answer = read_to_end(&mut h.browser).await;
        assert_eq!(close_of(&answer), (Some(4001), "upstream did not answer the close conn=C1".into()));
        let (end, _) = h.task.await.unwrap();
        assert_eq!((end.ending, end.close_code), (Ending::Closed(Side::Client), Some(4001)));
    }

    #[tokio::test]
    async fn gateway_vanishing_gives_the_browser_1014() {
        let h = start(Vec::new(), 1 << 20);
        let Harness { mut browser, gateway, task, .. } = h;
        drop(gateway);
        let to_browser = read_to_end(&mut browser).await;
        let (end, _) = task.await.unwrap();
        assert_eq!(end.ending, Ending::Gone(Side::Upstream));
        assert_eq!(end.close_code, Some(1014));
        assert_eq!(&to_browser[2..4], &1014u16.to_be_bytes());
        assert_eq!(&to_browser[4..], b"upstream_gone conn=C1");
    }

    #[tokio::test]
    async fn unmasked_browser_frame_is_a_protocol_error() {
        let mut h = start(text("x", false), 1 << 20);
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001));
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        let to_browser = read_to_end(&mut h.browser).await;
        let (end, _) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::ProtocolError(Side::Client));
        assert_eq!(&to_browser[2..4], &1002u16.to_be_bytes());
    }

    /// A writer whose flush waits until the test opens it, as a TLS stream's does while its
    /// peer is slow to read (its writes only encrypt; the flush sends).
    struct FlushGate<W> {
        inner: W,
        open: std::sync::Arc<(AtomicBool, std::sync::Mutex<Option<std::task::Waker>>)>,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for FlushGate<W> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            if !self.open.0.load(Ordering::SeqCst) {
                *self.open.1.lock().unwrap() = Some(cx.waker().clone());
                if !self.open.0.load(Ordering::SeqCst) {
                    return Poll::Pending;
                }
            }
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_while_the_browser_is_slow_to_read_still_sends_it_the_close_after_whole_frames() {
        let (mut browser, relay_client) = duplex(64 * 1024);
        let (mut gateway, relay_up) = duplex(64 * 1024);
        let shutdown = CancellationToken::new();
        let open = std::sync::Arc::new((AtomicBool::new(false), std::sync::Mutex::new(None)));
        let (client_r, client_w) = split(relay_client);
        let client_w = FlushGate { inner: client_w, open: open.clone() };
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            let counters = Counters::default();
            let opts = PumpOptions::new(1 << 20, "C1");
            run((client_r, client_w), split(relay_up), Initial { client: Vec::new(), upstream: Vec::new() }, &opts, &counters, &sd, &CancellationToken::new()).await
        });
        let message = text("for the browser", false);
        gateway.write_all(&message).await.unwrap();
        // The relay wrote the whole frame, and its flush is held.
        assert_eq!(read_exact(&mut browser, message.len()).await, message);
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        open.0.store(true, Ordering::SeqCst);
        if let Some(waker) = open.1.lock().unwrap().take() {
            waker.wake();
        }
        assert_eq!(close_of(&read_frame(&mut browser).await).0, Some(1012), "the close follows the frame it waited behind");
        assert_eq!(close_of(&read_frame(&mut gateway).await).0, Some(1012));
        browser.write_all(&close_frame(1012, "", Some([1, 2, 3, 4]))).await.unwrap();
        gateway.write_all(&close_frame(1012, "", None)).await.unwrap();
        assert_eq!(task.await.unwrap().ending, Ending::Shutdown);
    }

    #[tokio::test]
    async fn a_length_not_in_the_fewest_bytes_is_a_protocol_error_and_not_forwarded() {
        // A 5-byte masked text frame with its length in the 16-bit field.
        let mut frame = vec![0x81, 0x80 | 126, 0, 5, 1, 2, 3, 4];
        frame.extend(b"hello".iter().zip([1u8, 2, 3, 4].iter().cycle()).map(|(b, k)| b ^ k));
        let mut h = start(frame, 1 << 20);
        assert_eq!(close_of(&read_frame(&mut h.gateway).await).0, Some(1001), "nothing of the frame reaches the gateway");
        h.gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        let to_browser = read_to_end(&mut h.browser).await;
        let (end, c) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::ProtocolError(Side::Client));
        assert_eq!(close_of(&to_browser).0, Some(1002));
        assert_eq!(c[0], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_still_streaming_in_is_not_idle_time() {
        let Harness { mut browser, mut gateway, task, .. } = start_with(Vec::new(), 1 << 20, |o| o.idle_timeout = Some(Duration::from_secs(10)));
        let message = frame_of(OpCode::Binary, &[7u8; 1000], true, true);
        let started = tokio::time::Instant::now();
        // Its header and then a tenth of its payload every 3 s: 30 s for one message.
        browser.write_all(&message[..8]).await.unwrap();
        for chunk in message[8..].chunks(100) {
            tokio::time::sleep(Duration::from_secs(3)).await;
            browser.write_all(chunk).await.unwrap();
        }
        assert_eq!(read_exact(&mut gateway, message.len()).await, message, "the whole message is relayed");
        assert_eq!(close_of(&read_frame(&mut gateway).await).0, Some(1001));
        assert!(started.elapsed() >= Duration::from_secs(40), "idle counts from the message's last byte: {:?}", started.elapsed());
        assert_eq!(close_of(&read_frame(&mut browser).await).0, Some(1001));
        browser.write_all(&close_frame(1001, "", Some([1, 2, 3, 4]))).await.unwrap();
        gateway.write_all(&close_frame(1001, "", None)).await.unwrap();
        assert_eq!(task.await.unwrap().0.ending, Ending::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_during_a_close_handshake_lets_the_answer_through() {
        let mut h = start(Vec::new(), 1 << 20);
        let close = close_frame(1000, "done", Some([4, 4, 4, 4]));
        h.browser.write_all(&close).await.unwrap();
        assert_eq!(read_exact(&mut h.gateway, close.len()).await, close);
        h.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = close_frame(1000, "done too", None);
        h.gateway.write_all(&answer).await.unwrap();
        assert_eq!(read_frame(&mut h.browser).await, answer, "the gateway's own answer, not one the relay made up");
        let (end, _) = h.task.await.unwrap();
        assert_eq!((end.ending, end.close_code, end.close_reason.as_deref()), (Ending::Closed(Side::Client), Some(1000), Some("done")));
    }

    #[tokio::test(start_paused = true)]
    async fn pings_unanswered_after_a_side_closed_do_not_cut_its_close_short() {
        let Harness { mut browser, mut gateway, task, .. } = start_with(Vec::new(), 1 << 20, |o| o.ping_interval = Some(Duration::from_secs(1)));
        let close = close_frame(1000, "done", Some([4, 4, 4, 4]));
        browser.write_all(&close).await.unwrap();
        assert_eq!(read_exact(&mut gateway, close.len()).await, close);
        // The browser reads nothing more from here: its pongs could not be seen anyway.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let answer = close_frame(1000, "done too", None);
        gateway.write_all(&answer).await.unwrap();
        assert_eq!(read_frame(&mut browser).await, answer);
        assert_eq!(task.await.unwrap().0.ending, Ending::Closed(Side::Client));
    }

    #[tokio::test]
    async fn shutdown_sends_1012_both_ways() {
        let mut h = start(Vec::new(), 1 << 20);
        h.shutdown.cancel();
        let to_browser = read_to_end(&mut h.browser).await;
        let to_gateway = read_to_end(&mut h.gateway).await;
        let (end, _) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::Shutdown);
        assert_eq!(&to_browser[2..4], &1012u16.to_be_bytes());
        assert_eq!(to_gateway[1] & 0x80, 0x80);
    }
}
