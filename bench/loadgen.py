"""HTTP load for the API benchmark: an open-loop generator at a constant arrival rate, and a closed-loop
saturation run with `wrk`.

The open-loop generator works as wrk2 does: request i is due at start + i/rate whatever happened to the
ones before it, and its latency is measured from that due time, not from when a connection became free,
so a slow server cannot hide its queueing delay (no coordinated omission). It runs in the calling process
(threads over keep-alive connections to 127.0.0.1).
"""

from __future__ import annotations

import http.client
import itertools
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any


def get_once(port: int, path: str, token: str) -> tuple[int, bytes]:
    """One GET with the bearer token on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def open_loop(*, port: int, path: str, token: str, rate: float, duration: float, connections: int) -> dict[str, Any]:
    """Send `rate` requests a second for `duration` seconds; latency counts from each request's due time."""
    total = int(rate * duration)
    slots = itertools.count()  # next() on a count is atomic under the GIL: each slot goes to one thread
    results: list[tuple[float, float, int]] = []  # (due, done, status)
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {token}"}
    start = time.perf_counter() + 0.2

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[tuple[float, float, int]] = []
        while True:
            i = next(slots)
            if i >= total:
                break
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                status = 0
            mine.append((due, time.perf_counter(), status))
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = sorted((done - due) * 1000 for due, done, _ in results)
    elapsed = max(done for _, done, _ in results) - start
    errors = sum(1 for *_, status in results if status != 200)
    return {
        "requests": len(results),
        "errors": errors,
        "target_rate": rate,
        "achieved_rate": round(len(results) / elapsed, 1),
        "duration_s": round(elapsed, 2),
        "latency_ms": {
            name: round(percentile(latencies, q), 2)
            for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9), ("max", 100))
        }
        | {"mean": round(sum(latencies) / len(latencies), 2)},
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def wrk_capacity(*, port: int, path: str, token: str, seconds: int, connections: int) -> dict[str, Any] | None:
    """Closed-loop saturation throughput with wrk, when installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not installed (apt-get install -y wrk): no capacity figure", file=sys.stderr)
        return None
    out = subprocess.run(
        [
            wrk,
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|90|99)%\s+(\S+)", out, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "connections": connections,
        "seconds": seconds,
        "requests_per_s": float(rps.group(1)) if rps else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "latency_ms": {f"p{k}": v for k, v in found.items()},
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 2)
