"""Sample a process tree's memory and some directories' disk use every ~50 ms (Linux /proc).

Memory = sum of VmRSS over the root process and all its descendants, plus the size of any memfd
they hold open (snapshot.py keeps compressed parts in memfds, which RSS does not show; counting
them keeps the comparison honest). Disk = allocated bytes under the watched directories.
"""

from __future__ import annotations

import os
import threading
import time


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int) -> set[int]:
    kids, out, stack = _children_map(), set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in out:
            out.add(pid)
            stack.extend(kids.get(pid, ()))
    return out


def _rss(pid: int) -> int:
    try:
        with open("/proc/%d/status" % pid, "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _memfd_bytes(pid: int, seen: set[int]) -> int:
    """Sizes of memfds open in `pid` not already counted (a memfd passed to s5cmd is open in both)."""
    total = 0
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return 0
    for fd in fds:
        path = "/proc/%d/fd/%s" % (pid, fd)
        try:
            if "memfd:" in os.readlink(path):
                st = os.stat(path)
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_size
        except OSError:
            continue
    return total


def du(path: str) -> int:
    total, stack = 0, [path]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total


class Sampler:
    """with Sampler(pid, [dirs]) as s: ... ; then s.peak_mem, s.peak_disk, s.samples."""

    def __init__(self, pid: int, dirs: list[str], interval: float = 0.05) -> None:
        self.pid, self.dirs, self.interval = pid, dirs, interval
        self.peak_mem = self.peak_rss = self.peak_disk = self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.pid)
            rss = sum(_rss(p) for p in pids)
            seen: set[int] = set()
            mem = rss + sum(_memfd_bytes(p, seen) for p in pids)
            disk = sum(du(d) for d in self.dirs)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_mem = max(self.peak_mem, mem)
            self.peak_disk = max(self.peak_disk, disk)
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
