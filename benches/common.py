"""Helpers shared by the benchmark and the soak: loopback ports and the release binary."""
import os
import socket
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SIGRELAY_BIN runs another build (an A/B of two commits); the default is this checkout's.
SIGRELAY = os.environ.get("SIGRELAY_BIN") or os.path.join(ROOT, "target", "release", "sigrelay")


def free_port():
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    """Waits until something accepts on 127.0.0.1:port."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")
