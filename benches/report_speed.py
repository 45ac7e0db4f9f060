#!/usr/bin/env python3
"""Speed of `sigrelay report` on a million records (half handshakes, half closes, some
failures and malformed lines), median of 3 runs of the release binary.

    python3 benches/report_speed.py [--records 1000000]
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from common import ROOT, SIGRELAY


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    args = ap.parse_args()
    path = os.path.join(ROOT, "target", "report-bench.jsonl")
    rnd = random.Random(7)
    regions = ["gll", "au1", "de1", "us1"]
    with open(path, "w") as f:
        for i in range(args.records // 2):
            route = "signaling" if i % 3 else "insights"
            region = rnd.choice(regions)
            ok = rnd.random() > 0.02
            hs = {"ts": "2026-11-24T03:%02d:%02d.%03dZ" % (i // 60000 % 60, i // 1000 % 60, i % 1000),
                  "event": "handshake", "conn_id": "01M85T%020d" % i, "client_addr": "203.0.113.%d:%d" % (i % 250, 40000 + i % 20000),
                  "sni": "relay.example.com", "path": "/" + route, "origin": "https://app.example.com",
                  "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0", "route": route, "region": region,
                  "region_source": "token", "token_present": True, "token_region": region, "token_exp": 4102444800,
                  "token_expired": False, "region_mismatch": False,
                  "upstream_url": "wss://%s.vss.twilio.com/signaling" % region, "upstream_addr": "10.0.0.1:443",
                  "upstream_status": 101 if ok else None, "outcome": "ok" if ok else "upstream_connect_error",
                  "error": None if ok else "connect: 10.0.0.1:443: Connection refused (os error 111)",
                  "tls_ms": rnd.uniform(0.5, 3), "upstream_dns_ms": rnd.uniform(0, 1), "upstream_proxy_ms": None,
                  "upstream_connect_ms": rnd.uniform(0.2, 2), "upstream_tls_ms": rnd.uniform(0.5, 4),
                  "upstream_ws_ms": rnd.uniform(0.3, 2), "total_ms": rnd.uniform(2, 40)}
            f.write(json.dumps(hs) + "\n")
            close = {"ts": hs["ts"], "event": "close", "conn_id": hs["conn_id"], "client_addr": hs["client_addr"],
                     "route": route, "region": region, "upstream_url": hs["upstream_url"],
                     "outcome": "client_closed" if rnd.random() > 0.01 else "upstream_gone", "duration_ms": rnd.uniform(1e3, 3e6),
                     "closed_by": "client", "close_code": 1000, "close_reason": "", "msgs_up": 40, "msgs_down": 90,
                     "bytes_up": 20000, "bytes_down": 60000}
            f.write(json.dumps(close) + "\n")
            if i % 10000 == 0:
                f.write("not a record\n")
    size = os.path.getsize(path)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([SIGRELAY, "report", path], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    print(f"sigrelay report: {args.records:,} records ({size / 1e6:.0f} MB) in {median:.2f} s "
          f"(median of 3): {args.records / median:,.0f} records/s, {size / 1e6 / median:.0f} MB/s")


if __name__ == "__main__":
    sys.exit(main())
