"""gs_tuning: the host reading (cgroup and /proc files laid out under tmp_path as a host has them),
the starting plan, and the adaptive controller fed synthetic throughput and throttling sequences."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_tuning import CEILING_HOLD_S, WINDOW_S, Concurrency, available_memory, is_throttle, plan, usable_cpus  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30


def _host(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return str(root)


def test_a_cgroup_v2_cpu_quota_lowers_the_cpu_count_rounded_up(tmp_path: Path) -> None:
    root = _host(
        tmp_path,
        {
            "proc/self/cgroup": "0::/user.slice/job-7",
            "sys/fs/cgroup/user.slice/job-7/cpu.max": "150000 100000",  # 1.5 CPUs
            "sys/fs/cgroup/user.slice/cpu.max": "max 100000",  # no limit above it
        },
    )
    assert usable_cpus(root, online=64) == 2
    assert usable_cpus(root, online=1) == 1  # a quota never raises what the affinity allows


def test_a_quota_on_an_ancestor_cgroup_applies_too(tmp_path: Path) -> None:
    root = _host(
        tmp_path,
        {"proc/self/cgroup": "0::/a/b", "sys/fs/cgroup/a/cpu.max": "400000 100000", "sys/fs/cgroup/a/b/cpu.max": "max"},
    )
    assert usable_cpus(root, online=64) == 4


def test_a_cgroup_v1_cfs_quota_lowers_the_cpu_count_and_minus_one_means_none(tmp_path: Path) -> None:
    files = {
        "proc/self/cgroup": "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
    }
    assert usable_cpus(_host(tmp_path / "limited", files), online=32) == 3
    files["sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us"] = "-1"
    assert usable_cpus(_host(tmp_path / "free", files), online=32) == 32


def test_no_cgroup_files_means_the_affinity_count() -> None:
    assert usable_cpus("/nonexistent-root", online=12) == 12
    assert usable_cpus() >= 1  # this host, read for real


def test_available_memory_is_meminfo_lowered_by_a_cgroup_limit_less_its_usage(tmp_path: Path) -> None:
    meminfo = "MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:    8388608 kB"
    files = {"proc/meminfo": meminfo, "proc/self/cgroup": "0::/job"}
    assert available_memory(_host(tmp_path / "plain", files)) == 8 * GIB
    files.update({"sys/fs/cgroup/job/memory.max": str(2 * GIB), "sys/fs/cgroup/job/memory.current": str(512 * MIB)})
    assert available_memory(_host(tmp_path / "v2", files)) == 2 * GIB - 512 * MIB
    files["sys/fs/cgroup/job/memory.max"] = "max"
    assert available_memory(_host(tmp_path / "v2max", files)) == 8 * GIB


def test_a_cgroup_v1_memory_limit_counts_and_its_no_limit_value_does_not(tmp_path: Path) -> None:
    files = {
        "proc/meminfo": "MemAvailable:    8388608 kB",
        "proc/self/cgroup": "3:memory:/docker/abc",
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": str(GIB),
        "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": str(GIB + 5),  # over: nothing left
    }
    assert available_memory(_host(tmp_path / "limited", files)) == 0
    files["sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"] = "9223372036854771712"
    assert available_memory(_host(tmp_path / "unlimited", files)) == 8 * GIB
    assert available_memory("/nonexistent-root") is None


def test_the_plan_never_exceeds_the_configured_cap() -> None:
    big = plan(cap=2, part_size=32 * MIB, copies=3, cpus=128, mem_available=512 * GIB)
    assert (big["parallelism_max"], big["parallelism_start"], big["compress_workers"]) == (2, 2, 2)
    one = plan(cap=1, part_size=4096, copies=2, cpus=2, mem_available=None)
    assert (one["parallelism_max"], one["parallelism_start"]) == (1, 1)


def test_the_plan_keeps_parts_in_flight_within_the_memory_bound() -> None:
    # 768 MiB of parts at most (the 1 GiB peak-RSS goal): 3 copies of 32 MiB per part -> 8 parts.
    roomy = plan(cap=64, part_size=32 * MIB, copies=3, cpus=64, mem_available=512 * GIB)
    assert roomy["parallelism_max"] == 8 and roomy["compress_workers"] == 8 and roomy["parallelism_start"] == 8
    assert roomy["parallelism_max"] * 3 * 32 * MIB <= 768 * MIB
    # A quarter of what is available: 1 GiB free -> 256 MiB -> 2 parts of 3 x 32 MiB.
    tight = plan(cap=64, part_size=32 * MIB, copies=3, cpus=64, mem_available=GIB)
    assert tight["parallelism_max"] == 2
    # Even with no memory at all, one part moves (the run cannot do with less).
    assert plan(cap=16, part_size=32 * MIB, copies=3, cpus=4, mem_available=0)["parallelism_max"] == 1


def test_transfers_start_at_the_maximum_and_compression_at_one_per_usable_cpu() -> None:
    small = plan(cap=16, part_size=32 * MIB, copies=2, cpus=2, mem_available=64 * GIB)
    assert (small["compress_workers"], small["parallelism_start"], small["parallelism_max"]) == (2, 12, 12)
    wide = plan(cap=16, part_size=8 * MIB, copies=2, cpus=10, mem_available=64 * GIB)
    assert (wide["compress_workers"], wide["parallelism_start"], wide["parallelism_max"]) == (10, 16, 16)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _window(c: Concurrency, clock: Clock, *, seconds: float, part: int = 32 * MIB) -> None:
    """One window: `limit` transfers of `part` bytes finishing over `seconds`."""
    n = c.limit
    for _ in range(n):
        c.acquire(lambda: None)
    for _ in range(n):
        clock.now += seconds / n
        c.release(part)


def test_concurrency_grows_while_throughput_improves_and_stops_when_it_does_not() -> None:
    clock = Clock()
    c = Concurrency(4, 16, clock=clock)
    _window(c, clock, seconds=4.0)  # first window: measured, and more is tried
    assert c.limit == 6
    _window(c, clock, seconds=4.0)  # 6 parts in the time of 4: 50% faster -> grow
    assert c.limit == 9
    _window(c, clock, seconds=6.0)  # 9 parts in 6 s: no faster than 6 in 4 s -> stay
    assert c.limit == 9
    _window(c, clock, seconds=6.3)  # slower still: stay, never shrink on speed alone
    assert c.limit == 9
    assert c.report() == {"parallelism_end": 9, "parallelism_max_used": 9, "backoffs": 0, "throttles": 0}


def test_concurrency_never_grows_past_its_maximum() -> None:
    clock = Clock()
    c = Concurrency(4, 7, clock=clock)
    for seconds in (8.0, 4.0, 2.0, 1.0):  # ever faster
        _window(c, clock, seconds=seconds)
    assert c.limit == 7 and c.max_used == 7


def test_a_window_needs_both_limit_transfers_and_enough_time() -> None:
    clock = Clock()
    c = Concurrency(4, 16, clock=clock)
    for _ in range(3):  # fewer transfers than the limit, however long they take
        c.acquire(lambda: None)
        clock.now += 5.0
        c.release(MIB)
    assert c.limit == 4
    fast = Concurrency(4, 16, clock=clock)
    _window(fast, clock, seconds=WINDOW_S / 2)  # enough transfers, too little time: not judged yet
    assert fast.limit == 4
    clock.now += WINDOW_S
    fast.acquire(lambda: None)
    fast.release(MIB)
    assert fast.limit == 6


def test_failed_transfers_are_not_counted_as_throughput() -> None:
    clock = Clock()
    c = Concurrency(2, 16, clock=clock)
    for _ in range(10):
        c.acquire(lambda: None)
        clock.now += 1.0
        c.release(0)
    assert c.limit == 2


def test_throttling_halves_once_per_burst_and_the_throttled_level_is_not_reached_again() -> None:
    clock = Clock()
    c = Concurrency(8, 32, clock=clock)
    c.throttled()
    c.throttled()  # the other transfers of the same burst: counted, not halved again
    c.throttled()
    assert (c.limit, c.backoffs, c.throttles) == (4, 1, 3)
    for seconds in (4.0, 2.0, 1.0, 0.5):  # ever faster afterwards: grows back, but below 8
        _window(c, clock, seconds=seconds)
    assert c.limit == 7
    clock.now += WINDOW_S  # a later burst halves again
    c.throttled()
    assert (c.limit, c.backoffs) == (3, 2)
    assert c.report()["parallelism_max_used"] == 8


def test_throttling_at_one_transfer_stays_at_one() -> None:
    c = Concurrency(1, 4, clock=Clock())
    c.throttled()
    assert c.limit == 1 and c.backoffs == 1


def test_acquire_waits_at_the_limit_and_its_check_can_stop_the_wait() -> None:
    c = Concurrency(2, 8, clock=Clock())
    c.acquire(lambda: None)
    c.acquire(lambda: None)

    def cancelled() -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        c.acquire(cancelled)  # full: waits, and the check (a cancel) ends the wait
    c.release()
    c.acquire(cancelled)  # a place is free again: no wait, no check


def test_throttle_texts_are_recognised_and_other_errors_are_not() -> None:
    assert is_throttle('{"error":"SlowDown: Please reduce your request rate.\\n\\tstatus code: 503, request id: x"}')
    assert is_throttle("TooManyRequests: slow down\n\tstatus code: 429")
    assert not is_throttle("AccessDenied: Access Denied\n\tstatus code: 403")
    assert not is_throttle("InternalError: We encountered an internal error.\n\tstatus code: 500")


def test_a_cgroup_near_its_limit_with_page_cache_still_has_room(tmp_path: Path) -> None:
    """A training job that read its dataset: the cgroup's usage counts the page cache, which the
    kernel reclaims before failing an allocation; parts in flight must not collapse to one."""
    v2 = {
        "proc/meminfo": "MemAvailable:    8388608 kB",
        "proc/self/cgroup": "0::/job",
        "sys/fs/cgroup/job/memory.max": str(4 * GIB),
        "sys/fs/cgroup/job/memory.current": str(4 * GIB - MIB),
        "sys/fs/cgroup/job/memory.stat": "anon %d\nfile %d\ninactive_file %d\nactive_file 0" % (GIB, 3 * GIB, 3 * GIB),
    }
    assert available_memory(_host(tmp_path / "v2", v2)) == 3 * GIB + MIB  # 4 GiB - (4 GiB - 1 MiB - 3 GiB)
    v1 = {
        "proc/meminfo": "MemAvailable:    8388608 kB",
        "proc/self/cgroup": "3:memory:/docker/abc",
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": str(2 * GIB),
        "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": str(2 * GIB),
        "sys/fs/cgroup/memory/docker/abc/memory.stat": "cache 5\ninactive_file 7\ntotal_inactive_file %d" % GIB,
    }
    assert available_memory(_host(tmp_path / "v1", v1)) == GIB


def test_the_throttled_level_comes_back_in_reach_after_a_quiet_while() -> None:
    """A short burst of 503s early in a multi-hour run must not cap the rest of it."""
    clock = Clock()
    c = Concurrency(8, 8, clock=clock)
    c.throttled()
    assert (c.limit, c.ceiling) == (4, 7)
    _window(c, clock, seconds=WINDOW_S)  # soon after: grows, but the ceiling holds
    assert (c.limit, c.ceiling) == (6, 7)
    _window(c, clock, seconds=CEILING_HOLD_S)  # a slow, quiet while: no growth, the ceiling rises
    assert (c.limit, c.ceiling) == (6, 8)
    _window(c, clock, seconds=WINDOW_S * 1.01)  # faster again: the throttled level is in reach
    assert (c.limit, c.ceiling) == (8, 8)
