"""The snapshot's pre-scan (gs_workspace.scan) run beside the stream, in a child process.

The scan walks the whole tree (one stat per file) to estimate the tar stream's size (the progress
total) and to count entries (what a hibernate compares the snapshot with: hollow_snapshot). On a tree
of many small files the walk costs as much as the stream (300,000 files: 5 s of a 14 s snapshot,
bench/bench_scale.py), so it no longer runs first: the stream starts at once and its progress carries
no total until the walk is done. A child process, not a thread: the walk is Python bytecode from
end to end and would take the GIL from the thread that reads tar's output.

Run as a script: reads {"root", "excludes"} on stdin, prints {"bytes", "entries", "seconds"}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Tuple

from gs_common import Context
from gs_workspace import scan


class BackgroundScan:
    """scan(root, excludes) in a child started now; total() polls, result() waits. The child is
    registered with the context (killed on cancel). Should it fail, result() walks in-process."""

    def __init__(self, ctx: Context, root: str, excludes: Any) -> None:
        self.root, self.excludes = root, excludes
        self._done = threading.Event()
        self._result: Optional[Tuple[int, int]] = None
        self.seconds = 0.0
        self._started = time.monotonic()
        try:
            proc = ctx.spawn(
                [sys.executable, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError:  # no child (no fork, no interpreter at that path): result() walks in-process
            self._done.set()
            return
        threading.Thread(target=self._wait, args=(proc,), name="scan", daemon=True).start()

    def _wait(self, proc: subprocess.Popen) -> None:
        try:
            out, _ = proc.communicate(json.dumps({"root": self.root, "excludes": self.excludes}).encode())
            if proc.returncode == 0:
                found = json.loads(out.decode("utf-8").strip().splitlines()[-1])
                self._result = (int(found["bytes"]), int(found["entries"]))
                self.seconds = float(found["seconds"])
        except (OSError, ValueError, KeyError, IndexError):
            pass  # result() walks in-process
        finally:
            self._done.set()

    def total(self) -> Optional[int]:
        """The estimated stream bytes once the walk is done, None until then."""
        return self._result[0] if self._done.is_set() and self._result is not None else None

    def result(self) -> Tuple[int, int]:
        """(estimated tar stream bytes, entries), waiting for the walk."""
        self._done.wait()
        if self._result is None:
            t0 = time.monotonic()
            self._result = scan(self.root, self.excludes)
            self.seconds = time.monotonic() - t0
        return self._result


def main() -> int:
    cfg = json.loads(sys.stdin.read())
    t0 = time.monotonic()
    total, entries = scan(cfg["root"], cfg["excludes"])
    print(json.dumps({"bytes": total, "entries": entries, "seconds": round(time.monotonic() - t0, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
