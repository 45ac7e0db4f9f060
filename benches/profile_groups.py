#!/usr/bin/env python3
"""Groups a perf profile's self time by what does the work (kernel, tokio, rustls, crypto, the
pump...), from `perf report --sort dso,symbol`. With two files, prints them side by side.

    python3 benches/profile_groups.py BEFORE.data [AFTER.data]
"""
import collections
import re
import subprocess
import sys

# First match wins; the order matters (rustls before the syscall wrappers, say).
GROUPS = [
    ("crypto (AEAD, key exchange, signatures)",
     lambda dso, sym: re.search(r"gcm|aes|chacha|x25519|ecdsa|sha|p256|ring_core|ring::|digest|aws_lc|bn_|fiat|gfp|"
                                r"Tls13Message(En|De)crypter|hkdf|hmac|sign|verify", sym, re.I)),
    ("rustls (records, buffers, handshake state)", lambda dso, sym: "rustls" in sym),
    ("libc: allocation and copying",
     lambda dso, sym: re.search(r"malloc|free|realloc|memcpy|memmove|memset|memcmp|__libc_|_int_|cfree|alloc::|"
                                r"unlink_chunk|__rdl_alloc", sym)),
    ("hyper (HTTP upgrade)", lambda dso, sym: re.search(r"hyper|httparse|http::", sym)),
    ("future glue (select!, poll_fn, join)", lambda dso, sym: re.search(r"PollFn|poll_fn|Pin<P>|MaybeDone|LocalKey", sym)),
    ("kernel (TCP, syscalls, scheduling)",
     lambda dso, sym: re.search(r"writev|recv|send|read|write|pthread|clock_gettime|Instant", sym)
     and (dso.startswith("libc") or sym.startswith(("std::", "<std::", "<&std::")))),
    ("tokio runtime and I/O driver", lambda dso, sym: re.search(r"tokio|mio|futures|parking_lot|epoll", sym)),
    ("sigrelay pump (frames, UTF-8)", lambda dso, sym: re.search(r"sigrelay::(pump|frame|utf8)", sym)),
    ("sigrelay other (relay, session, records)", lambda dso, sym: "sigrelay" in sym or "serde_json" in sym),
]


def groups(path):
    out = subprocess.run(["perf", "report", "-i", path, "--stdio", "--no-children", "--sort", "dso,symbol", "-g", "none"],
                         capture_output=True, text=True, check=True).stdout
    total = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if not m:
            continue
        pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        if kind == "k" or dso.startswith("[kernel") or dso == "[vdso]":
            name = "kernel (TCP, syscalls, scheduling)"
        else:
            name = next((g for g, match in GROUPS if match(dso, sym)), "other")
        total[name] += pct
    return total


def main():
    runs = [groups(p) for p in sys.argv[1:]]
    names = sorted({k for r in runs for k in r}, key=lambda k: -sum(r[k] for r in runs))
    print("| where the time goes | " + " | ".join(sys.argv[1:]) + " |")
    print("|---|" + "---|" * len(runs))
    for k in names:
        print(f"| {k} | " + " | ".join(f"{r[k]:.0f} %" for r in runs) + " |")


if __name__ == "__main__":
    main()
