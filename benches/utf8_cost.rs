//! What checking text messages' UTF-8 adds to the frame pump, per message: the same frames are
//! scanned as text (unmasked into a stack buffer and validated) and as binary (headers only),
//! by the pump's own scanner. `cargo bench --bench utf8_cost` prints nanoseconds per message.

use std::hint::black_box;
use std::time::Instant;

use sigrelay::frame::{encode_frame, OpCode};
use sigrelay::pump::scan_for_bench;

/// Frames in one batch.
const FRAMES: usize = 1000;

fn batch(payload: &[u8], op: OpCode, masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..FRAMES {
        let key = masked.then_some([i as u8, 0x5a, 0xc3, 0x17]);
        encode_frame(&mut out, op, payload, key);
    }
    out
}

/// Nanoseconds per message, the best of five timings.
fn per_message(bytes: &[u8], from_browser: bool, rounds: usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..rounds {
            black_box(scan_for_bench(black_box(bytes), from_browser));
        }
        best = best.min(started.elapsed().as_nanos() as f64 / (rounds * FRAMES) as f64);
    }
    best
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this only checks that it runs.
    let rounds = if std::env::args().any(|a| a == "--bench") { 200 } else { 1 };
    let json = |n: usize| {
        let head = r#"{"type":"msg","body":{"type":"update","participant":{"sid":"PA0000","identity":"alice"},"pad":""#;
        let mut s = head.to_string();
        while s.len() < n - 3 {
            s.push('x');
        }
        s + "\"}}"
    };
    let multibyte = "Grüße, κόσμε, 你好, 🙂 ".repeat(12);
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("256 B JSON".into(), json(256).into_bytes()),
        ("1 KiB JSON".into(), json(1024).into_bytes()),
        ("4 KiB JSON".into(), json(4096).into_bytes()),
        (format!("{} B non-ASCII", multibyte.len()), multibyte.into_bytes()),
    ];
    println!("{:<18} {:>9} {:>14} {:>14} {:>12}", "message", "from", "text ns/msg", "binary ns/msg", "UTF-8 adds");
    for (name, payload) in &cases {
        for (from_browser, side) in [(true, "browser"), (false, "gateway")] {
            let text = per_message(&batch(payload, OpCode::Text, from_browser), from_browser, rounds);
            let binary = per_message(&batch(payload, OpCode::Binary, from_browser), from_browser, rounds);
            println!("{name:<18} {side:>9} {text:>14.1} {binary:>14.1} {:>9.1} ns", text - binary);
        }
    }
}
