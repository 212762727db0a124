"""How many parts the scripts keep in flight and compress at once on this host, and the adaptive
limit on transfers (docs/data-plane.md, "Self-tuning").

plan() reads the host once: usable CPUs (scheduler affinity, then a cgroup v2 `cpu.max` or v1 CFS
quota) and available memory (MemAvailable, then a cgroup v2 `memory.max` or v1 limit, less what the
cgroup uses). The configured `parallelism` is a cap, never exceeded; below it memory decides:

    parallelism_max   = min(cap, budget // (copies x part_size)),  budget = min(available / 4, 768 MiB)
    compress_workers  = min(cpus, parallelism_max)
    parallelism_start = parallelism_max

`copies` is what one part in flight holds: 3 for a snapshot (the raw part, its compressed copy, the
in-memory file s5cmd reads), 2 for a restore (downloaded and decoded buffers; one more part is held
by the reader). 768 MiB of parts keeps the script's peak RSS under the 1 GiB goal.

Transfers start at the maximum: a store serves each connection far below the link, and the first
feedback comes only when a part is stored (5.6 s for 32 MiB at 6 MB/s), too late for a small run to
gain from starting low and growing (measured with bench/bench_wan.py: starting at 4 of 8 gave 33 % of
the link instead of 48 %). Memory is bounded either way.

Concurrency then moves between 1 and parallelism_max while the run goes (AIMD-like hill climbing;
growth matters below the maximum: after a backoff, or for a controller started lower):
a window closes once `limit` transfers finished and at least WINDOW_S passed; if its throughput beat
the best window so far by GAIN, the limit grows by half (at least 1), otherwise it stays where it is.
A throttled request (429, 503 SlowDown) halves it at once, at most once per WINDOW_S, and the level
that was throttled is not reached again until CEILING_HOLD_S pass without another throttle; then the
ceiling rises one level per window (a short burst of 503s must not cap a multi-hour run for good).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

MIB = 1 << 20
PARTS_BUDGET = 768 * MIB  # of the 1 GiB peak-RSS goal; the rest: interpreter, tar, s5cmd
MEM_FRACTION = 4  # parts may take at most 1/4 of the memory available when the run starts
WINDOW_S = 1.0
GAIN = 0.10  # a window must be 10% faster than the best one to earn more concurrency
CEILING_HOLD_S = 30.0  # after a throttle, the throttled level stays out of reach this long
_UNLIMITED = 1 << 60  # cgroup v1 writes ~2^63 for "no limit"
# Texts of a throttled request in s5cmd's error lines (AWS SDK: "<Code>: <Message>\n\tstatus code: <n>").
_THROTTLE_MARKERS = (
    "SlowDown",
    "TooManyRequests",
    "RequestLimitExceeded",
    "Throttl",
    "status code: 429",
    "status code: 503",
)


def is_throttle(text: str) -> bool:
    """True when an s5cmd error says the store asks us to slow down (429, 503 SlowDown)."""
    return any(m in text for m in _THROTTLE_MARKERS)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_dirs(root: str) -> List[str]:
    """The cgroup directories whose limits apply to this process: its own and every ancestor, in
    the v2 hierarchy and the v1 cpu and memory ones (a container sees its own cgroup as the root)."""
    dirs: List[str] = []
    base = os.path.join(root, "sys", "fs", "cgroup")
    for line in (_read(os.path.join(root, "proc", "self", "cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy = "" if parts[0] == "0" else parts[1]
        if hierarchy and not any(c in ("cpu", "memory") for c in hierarchy.split(",")):
            continue
        path = parts[2].strip("/")
        while True:
            dirs.append(os.path.join(base, hierarchy, path))
            if not path:
                break
            path = os.path.dirname(path)
    return dirs


def usable_cpus(root: str = "/", online: Optional[int] = None) -> int:
    """CPUs this process may run on: `online` (default: its affinity mask), lowered by a CPU quota
    (rounded up)."""
    if online is not None:
        cpus = online
    elif hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    for d in _cgroup_dirs(root):
        quota, period = None, None
        v2 = (_read(os.path.join(d, "cpu.max")) or "").split()
        if len(v2) == 2 and v2[0] != "max":
            quota, period = v2
        else:
            quota, period = _read(os.path.join(d, "cpu.cfs_quota_us")), _read(os.path.join(d, "cpu.cfs_period_us"))
        try:
            q, p = int(quota or -1), int(period or 0)
        except ValueError:
            continue
        if q > 0 and p > 0:
            cpus = min(cpus, -(-q // p))
    return max(1, cpus)


def available_memory(root: str = "/") -> Optional[int]:
    """Bytes this process may still allocate: MemAvailable, lowered by a cgroup memory limit less
    the cgroup's usage. None when nothing says (no /proc/meminfo)."""
    found: Optional[int] = None
    for line in (_read(os.path.join(root, "proc", "meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            found = int(line.split()[1]) * 1024
    for d in _cgroup_dirs(root):
        for limit_name, usage_name in (
            ("memory.max", "memory.current"),
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        ):
            try:
                limit = int(_read(os.path.join(d, limit_name)) or "max")
                usage = int(_read(os.path.join(d, usage_name)) or "0")
            except ValueError:
                continue  # "max", or absent
            # The usage counts the cgroup's page cache, which the kernel reclaims before it fails an
            # allocation: a training job that read its dataset sits near its limit yet has room.
            usage = max(0, usage - _inactive_file(d))
            if limit < _UNLIMITED:
                free = max(0, limit - usage)
                found = free if found is None else min(found, free)
    return found


def _inactive_file(cgroup_dir: str) -> int:
    """Reclaimable file cache in a cgroup's memory.stat: v2 `inactive_file`, v1 `total_inactive_file`
    (this cgroup and its children); 0 when absent."""
    found = {}
    for line in (_read(os.path.join(cgroup_dir, "memory.stat")) or "").splitlines():
        name, _, value = line.partition(" ")
        if name in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
            found[name] = int(value)
    return found.get("total_inactive_file", found.get("inactive_file", 0))


def plan(*, cap: int, part_size: int, copies: int, cpus: int, mem_available: Optional[int]) -> Dict[str, Any]:
    """The starting settings (see the module docstring); a plain dict that goes into the result."""
    budget = PARTS_BUDGET if mem_available is None else min(PARTS_BUDGET, mem_available // MEM_FRACTION)
    by_memory = max(1, budget // (copies * max(1, part_size)))
    most = max(1, min(cap, by_memory))
    workers = max(1, min(cpus, most))
    return {
        "cpus": cpus,
        "mem_available": mem_available,
        "part_size": part_size,
        "parallelism_cap": cap,
        "parallelism_max": most,
        "parallelism_start": most,
        "compress_workers": workers,
    }


def plan_here(*, cap: int, part_size: int, copies: int) -> Dict[str, Any]:
    return plan(cap=cap, part_size=part_size, copies=copies, cpus=usable_cpus(), mem_available=available_memory())


class Concurrency:
    """A limit on transfers in flight that adapts to their throughput (module docstring).

    acquire() before a transfer and release(moved_bytes) after it, from any thread; throttled() when
    the store answered 429/503 SlowDown. `clock` is for tests that feed synthetic time."""

    def __init__(self, start: int, maximum: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = max(1, maximum)
        self.limit = max(1, min(start, self.maximum))
        self.ceiling = self.maximum  # lowered to below a level that was throttled
        self.max_used = self.limit
        self.backoffs = self.throttles = 0
        self._clock = clock
        self._cond = threading.Condition()
        self._active = 0
        self._best: Optional[float] = None
        self._quiet_until = float("-inf")
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._start, self._bytes, self._done = now, 0, 0

    def acquire(self, check: Callable[[], None]) -> None:
        """Wait for a free place under the limit; `check` (raises to stop) runs while waiting."""
        with self._cond:
            while self._active >= self.limit:
                self._cond.wait(0.2)
                check()
            self._active += 1

    def release(self, moved: int = 0) -> None:
        """One transfer ended, having moved `moved` bytes (0 when it failed)."""
        with self._cond:
            self._active -= 1
            if moved:
                self._finished(moved)
            self._cond.notify_all()

    def _finished(self, moved: int) -> None:
        now = self._clock()
        self._bytes += moved
        self._done += 1
        elapsed = now - self._start
        if self._done < self.limit or elapsed < WINDOW_S:
            return
        if self.ceiling < self.maximum and now >= self._quiet_until - WINDOW_S + CEILING_HOLD_S:
            self.ceiling += 1  # quiet for a while: the store may take more again
        rate = self._bytes / elapsed
        if self._best is None or rate > self._best * (1 + GAIN):
            self._best = rate
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 2))
            self.max_used = max(self.max_used, self.limit)
        self._reset(now)

    def throttled(self) -> None:
        """The store asked us to slow down: halve the limit (once per window)."""
        with self._cond:
            self.throttles += 1
            now = self._clock()
            if now < self._quiet_until:
                return  # the same burst, seen by the other transfers in flight
            self.backoffs += 1
            self.ceiling = max(1, self.limit - 1)
            self.limit = max(1, self.limit // 2)
            self._best = None  # measured again at the new level
            self._quiet_until = now + WINDOW_S
            self._reset(now)

    def report(self) -> Dict[str, int]:
        with self._cond:
            return {
                "parallelism_end": self.limit,
                "parallelism_max_used": self.max_used,
                "backoffs": self.backoffs,
                "throttles": self.throttles,
            }
