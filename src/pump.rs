//! The frame pump: moves WebSocket frames between the browser and the gateway as they arrived.
//!
//! Neither hop negotiates an extension, browser frames are already masked and gateway frames are
//! not, so every frame is valid on the other hop unchanged. The pump reads only frame headers (to
//! count messages, enforce `max_message_size`, validate framing and notice close frames) and
//! copies bytes through a small fixed buffer per direction, so memory does not grow with message
//! size and a slow reader slows its writer (`write_all` is awaited before the next read).
//!
//! It is generic over `AsyncRead`/`AsyncWrite`, so unit tests drive it with in-memory pipes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::frame::{self, FrameError, OpCode};
use crate::outcome::{Ending, Side};

/// Bytes each direction reads at a time. Signalling messages are a few hundred bytes to a few
/// KiB; larger ones stream through.
pub const BUF_SIZE: usize = 4096;
/// How long the second half of a close handshake may take.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long the relay's own close frame and TLS close may take to write.
const FINAL_WRITE: Duration = Duration::from_secs(1);

/// Messages and bytes relayed so far, shared with whoever reports on the connection.
#[derive(Debug, Default)]
pub struct Counters {
    pub msgs_up: AtomicU64,
    pub msgs_down: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl Counters {
    fn add(&self, from: Side, msgs: u64, bytes: u64) {
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
        stop: CancellationToken::new(),
        first: Mutex::new(None),
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
        shared.decide(ending, None);
        shared.stop.cancel();
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = both => {}
        _ = watch => {}
    }
    let first = shared.first.lock().unwrap().take();
    let (ending, peer_close) = first.unwrap_or((Ending::Shutdown, None));
    let (close_code, close_reason) = match (ending, peer_close) {
        (Ending::Closed(_), Some((code, reason))) => (code, code.map(|_| reason)),
        _ => {
            let code = ending.close_code_for(Side::Client).or(ending.close_code_for(Side::Upstream));
            (code, code.map(|_| shared.reason(ending).to_string()))
        }
    };
    PumpEnd { ending, close_code, close_reason }
}

/// Resolves once no data message has passed either way for `timeout`; never when `None`.
async fn idle(shared: &Shared<'_>, timeout: Option<Duration>) {
    let Some(timeout) = timeout else { return std::future::pending().await };
    loop {
        let last = Duration::from_millis(shared.last_data.load(Ordering::Relaxed));
        let deadline = shared.start + last + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

type PeerClose = Option<(Option<u16>, String)>;

/// State the two directions of one connection share (they run in the same task).
struct Shared<'a> {
    /// Cancelled once the connection is ending; each direction then stops reading.
    stop: CancellationToken,
    /// The first ending decided wins, with the peer's close code and reason when it sent one.
    first: Mutex<Option<(Ending, PeerClose)>>,
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
    fn decide(&self, ending: Ending, peer_close: PeerClose) {
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            *first = Some((ending, peer_close));
        }
    }

    fn ending(&self) -> Ending {
        self.first.lock().unwrap().as_ref().map(|(e, _)| *e).unwrap_or(Ending::Shutdown)
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

/// Why one direction stopped.
#[derive(Debug)]
enum DirEnd {
    /// The reading side's close frame was forwarded.
    ForwardedClose(Option<u16>, String),
    /// The reading side's stream ended or failed without a close frame.
    ReadEnded,
    /// The writing side could not take more bytes.
    WriteFailed,
    TooBig,
    Protocol(FrameError),
    /// The writing side answered none of the relay's pings.
    Silent,
    /// The connection is ending for another reason.
    Stopped,
}

/// What the scanner found that ends the direction.
#[derive(Debug)]
enum Stop {
    Close(Option<u16>, String),
    TooBig,
    Protocol(FrameError),
}

/// Tracks framing across reads: where frames start, how far into a payload we are, and
/// message boundaries.
#[derive(Debug)]
struct Scanner {
    from: Side,
    max_message_size: u64,
    /// Payload bytes of the current data frame still to pass through.
    remaining: u64,
    /// Inside a fragmented message (a data frame without FIN was seen).
    in_message: bool,
    message_len: u64,
    /// The current frame ends a message.
    fin_pending: bool,
    msgs: u64,
}

impl Scanner {
    /// Walks `data`, returning how many bytes may be forwarded now and whether the direction
    /// must stop after them. Bytes not consumed are an incomplete header or control frame.
    fn scan(&mut self, data: &[u8]) -> (usize, Option<Stop>) {
        let mut pos = 0;
        while pos < data.len() {
            if self.remaining > 0 {
                let n = self.remaining.min((data.len() - pos) as u64);
                pos += n as usize;
                self.remaining -= n;
                if self.remaining == 0 {
                    self.end_frame();
                }
                continue;
            }
            let h = match frame::parse_header(&data[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return (pos, Some(Stop::Protocol(e))),
            };
            // RFC 6455 §5.1: browsers mask every frame, servers none.
            if (self.from == Side::Upstream) == h.mask.is_some() {
                return (pos, Some(Stop::Protocol(FrameError::Masking)));
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
                    if payload.len() == 1 {
                        return (start, Some(Stop::Protocol(FrameError::BadControlFrame)));
                    }
                    let (code, reason) = frame::parse_close_payload(&payload);
                    return (pos, Some(Stop::Close(code, reason)));
                }
                continue;
            }
            let continuation = h.opcode == OpCode::Continuation;
            if continuation != self.in_message {
                return (pos, Some(Stop::Protocol(FrameError::Sequence)));
            }
            self.message_len = if continuation { self.message_len + h.payload_len } else { h.payload_len };
            if self.message_len > self.max_message_size {
                return (pos, Some(Stop::TooBig));
            }
            self.in_message = !h.fin;
            self.fin_pending = h.fin;
            pos += h.header_len;
            self.remaining = h.payload_len;
            if self.remaining == 0 {
                self.end_frame();
            }
        }
        (pos, None)
    }

    fn end_frame(&mut self) {
        if self.fin_pending {
            self.msgs += 1;
            self.fin_pending = false;
        }
    }
}

/// One direction: reads frames from one side and writes them to the other.
struct Direction<R, W> {
    to: Side,
    reader: R,
    writer: W,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    scanner: Scanner,
    /// The last write stopped part-way through, so nothing more can be framed on this writer.
    write_torn: bool,
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
        let max_message_size = opts.max_message_size;
        let to = if from == Side::Client { Side::Upstream } else { Side::Client };
        Direction {
            to,
            reader,
            writer,
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            scanner: Scanner {
                from,
                max_message_size,
                remaining: 0,
                in_message: false,
                message_len: 0,
                fin_pending: false,
                msgs: 0,
            },
            write_torn: false,
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
        match end {
            DirEnd::ForwardedClose(code, reason) => {
                shared.decide(Ending::Closed(from), Some((code, reason)));
                // The other side now answers with its own close; give it time to arrive.
                if !second {
                    tokio::select! {
                        _ = tokio::time::sleep(CLOSE_GRACE) => {}
                        _ = shared.stop.cancelled() => {}
                    }
                }
            }
            DirEnd::ReadEnded => shared.decide(Ending::Gone(from), None),
            DirEnd::WriteFailed => shared.decide(Ending::Gone(self.to), None),
            DirEnd::TooBig => shared.decide(Ending::TooBig(from), None),
            DirEnd::Protocol(e) => {
                tracing::debug!(side = ?from, error = %e, "framing error");
                shared.decide(Ending::ProtocolError(from), None)
            }
            DirEnd::Silent => shared.decide(Ending::Silent(self.to), None),
            DirEnd::Stopped => {}
        }
        shared.stop.cancel();
        self.finish(shared).await;
    }

    /// Sends the relay's own close frame to this direction's writer, if the ending calls for one
    /// and the writer is at a frame boundary, then shuts the writer down. A writer torn mid-write
    /// is stuck behind a peer that does not read: it is dropped, not waited on.
    async fn finish(&mut self, shared: &Shared<'_>) {
        if self.write_torn {
            return;
        }
        let ending = shared.ending();
        if let Some(code) = ending.close_code_for(self.to) {
            if self.scanner.remaining == 0 {
                let mask = (self.to == Side::Upstream).then(rand::random::<[u8; 4]>);
                let frame = frame::close_frame(code, shared.reason(ending), mask);
                if tokio::time::timeout(FINAL_WRITE, self.writer.write_all(&frame)).await.is_err() {
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(FINAL_WRITE, self.writer.shutdown()).await;
    }

    async fn run(&mut self, initial: Vec<u8>, shared: &Shared<'_>) -> DirEnd {
        // One waiter on the stop token for the life of the direction, not one per read.
        let stopped = shared.stop.cancelled();
        tokio::pin!(stopped);
        if !initial.is_empty() {
            let (n, stop) = self.scanner.scan(&initial);
            if let Some(end) = self.forward(&initial, n, stop, shared, stopped.as_mut()).await {
                return end;
            }
            let rest = &initial[n..];
            self.buf[..rest.len()].copy_from_slice(rest);
            self.end = rest.len();
        }
        // Not held for the life of the connection.
        drop(initial);
        loop {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let read = tokio::select! {
                r = self.reader.read(&mut self.buf[self.end..]) => r,
                _ = &mut stopped => return DirEnd::Stopped,
                _ = tick(&mut self.ping_timer) => {
                    if let Some(end) = self.ping(shared, stopped.as_mut()).await {
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
            let (n, stop) = self.scanner.scan(&self.buf[self.start..self.end]);
            let chunk = std::mem::take(&mut self.buf);
            let result = self.forward(&chunk[self.start..self.end], n, stop, shared, stopped.as_mut()).await;
            self.buf = chunk;
            self.start += n;
            if let Some(end) = result {
                return end;
            }
        }
    }

    /// Pings the writing side; one that has sent nothing at all through two pings is silent
    /// (a slow pong is not a dead peer). Pongs come back through the other direction and are
    /// forwarded; an unsolicited pong is allowed (RFC 6455 §5.5.3), so the far side ignores it.
    async fn ping(&mut self, shared: &Shared<'_>, mut stopped: Stopped<'_, '_>) -> Option<DirEnd> {
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
        if self.scanner.remaining != 0 || self.write_torn {
            return None;
        }
        let mut frame = Vec::with_capacity(frame::MAX_HEADER_LEN + PING_PAYLOAD.len());
        let mask = (self.to == Side::Upstream).then(rand::random::<[u8; 4]>);
        frame::encode_frame(&mut frame, OpCode::Ping, PING_PAYLOAD, mask);
        self.pinged_at = Some(shared.now_ms());
        self.write(&frame, stopped.as_mut()).await.err()
    }

    /// Writes and flushes; a stop while blocked leaves the writer torn (mid-frame). A writer
    /// that stays blocked through two ping ticks has stopped reading: that side is silent
    /// (its pongs, if any, are stuck behind the same wall).
    async fn write(&mut self, data: &[u8], mut stopped: Stopped<'_, '_>) -> Result<(), DirEnd> {
        let writer = &mut self.writer;
        let timer = &mut self.ping_timer;
        let write = async {
            writer.write_all(data).await?;
            writer.flush().await
        };
        tokio::pin!(write);
        let mut stalled_ticks = 0;
        let result = loop {
            tokio::select! {
                // A write that can finish now is not torn, even if the stop fired meanwhile.
                biased;
                r = &mut write => break r,
                _ = stopped.as_mut() => {
                    self.write_torn = true;
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

    /// Writes the first `n` bytes of `data` to the other side and accounts for them.
    async fn forward(
        &mut self,
        data: &[u8],
        n: usize,
        stop: Option<Stop>,
        shared: &Shared<'_>,
        mut stopped: Stopped<'_, '_>,
    ) -> Option<DirEnd> {
        if n > 0 {
            if let Err(end) = self.write(&data[..n], stopped.as_mut()).await {
                return Some(end);
            }
            let msgs = std::mem::take(&mut self.scanner.msgs);
            shared.counters.add(self.scanner.from, msgs, n as u64);
            if msgs > 0 {
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
        stop.map(|s| match s {
            Stop::Close(code, reason) => DirEnd::ForwardedClose(code, reason),
            Stop::TooBig => DirEnd::TooBig,
            Stop::Protocol(e) => DirEnd::Protocol(e),
        })
    }
}

/// The direction's pinned wait on the stop token.
type Stopped<'p, 't> = std::pin::Pin<&'p mut tokio_util::sync::WaitForCancellationFuture<'t>>;

/// The timer's next tick, or never when there is no timer.
async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
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
        let (browser, relay_client) = duplex(64 * 1024);
        let (gateway, relay_up) = duplex(64 * 1024);
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            let counters = Counters::default();
            let opts = PumpOptions::new(max, "C1");
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

    #[tokio::test]
    async fn oversized_message_gets_1009_to_sender_and_1001_to_the_other() {
        let mut h = start(Vec::new(), 2048);
        let mut big = Vec::new();
        encode_frame(&mut big, OpCode::Binary, &[0u8; 4096], Some([1, 2, 3, 4]));
        h.browser.write_all(&big).await.unwrap();
        let to_browser = read_to_end(&mut h.browser).await;
        let to_gateway = read_to_end(&mut h.gateway).await;
        let (end, _) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::TooBig(Side::Client));
        let code = |f: &[u8]| {
            let hd = frame::parse_header(f).unwrap().unwrap();
            let mut p = f[hd.header_len..hd.frame_len() as usize].to_vec();
            if let Some(k) = hd.mask {
                frame::apply_mask(&mut p, k, 0);
            }
            frame::parse_close_payload(&p)
        };
        assert_eq!(code(&to_browser), (Some(1009), "message_too_big conn=C1".into()));
        assert_eq!(code(&to_gateway).0, Some(1001));
        assert!(frame::parse_header(&to_gateway).unwrap().unwrap().mask.is_some(), "relay masks toward the gateway");
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
        let to_browser = read_to_end(&mut h.browser).await;
        let (end, _) = h.task.await.unwrap();
        assert_eq!(end.ending, Ending::ProtocolError(Side::Client));
        assert_eq!(&to_browser[2..4], &1002u16.to_be_bytes());
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
