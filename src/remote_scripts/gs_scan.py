"""The snapshot's pre-scan (gs_workspace.scan) run beside the stream, in a child process.

The scan walks the whole tree (one stat per file) to estimate the tar stream's size (the progress
total) and to count entries (what a hibernate compares the snapshot with before it destroys a
machine: hollow_snapshot). On a tree of many small files the walk costs as much as the stream
(300,000 files: 5 s of a 14 s snapshot, bench/bench_scale.py), so it no longer runs first: the
stream starts at once and its progress carries no total until the walk is done. A child process,
not a thread: the walk is Python bytecode end to end and would take the GIL from the thread that
reads tar's output.

The answer must be the in-process walk's or none at all (a wrong one could let a hollow snapshot
destroy a machine), so the child is isolated from the host's Python environment (`-I -S`: no
PYTHON* variables, no site or sitecustomize), gets the root and excludes as the bytes the parent
would use (its filesystem encoding may differ), checks that the root it walks is the parent's
(device and inode), and answers with the parent's nonce on a line of its own. Anything else, and
result() walks in-process.

Run as a script: reads {"root", "excludes" (both as hex of the file system bytes), "dev", "ino",
"nonce"} on stdin, prints {"nonce", "bytes", "entries", "seconds"}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, List, Optional, Tuple

if __name__ == "__main__":  # run isolated (-I): our own folder is not on sys.path by itself
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gs_common import Context, ScriptError  # noqa: E402
from gs_workspace import TAR_HEADER, scan  # noqa: E402


class BackgroundScan:
    """scan(root, excludes) in a child started now; total() polls, result() waits. The child is
    registered with the context (killed on cancel). Without a trustworthy answer from it, result()
    walks in-process (unless the run was cancelled meanwhile)."""

    def __init__(self, ctx: Context, root: str, excludes: List[str]) -> None:
        self.ctx, self.root, self.excludes = ctx, root, excludes
        self._done = threading.Event()
        self._result: Optional[Tuple[int, int]] = None
        self.seconds = 0.0
        try:
            st = os.stat(root)
            request = {
                "root": os.fsencode(root).hex(),
                "excludes": [os.fsencode(e).hex() for e in excludes],
                "dev": st.st_dev,
                "ino": st.st_ino,
                "nonce": os.urandom(8).hex(),
            }
            if not sys.executable:
                raise OSError("no interpreter path")
            proc = ctx.spawn(
                [sys.executable, "-I", "-S", os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except (OSError, ValueError):  # no child: result() walks in-process
            self._done.set()
            return
        threading.Thread(target=self._wait, args=(proc, request), name="scan", daemon=True).start()

    def _wait(self, proc: subprocess.Popen, request: Any) -> None:
        try:
            out, _ = proc.communicate(json.dumps(request).encode())
            if proc.returncode == 0:
                for line in out.decode("utf-8", "replace").splitlines():
                    if request["nonce"] not in line:
                        continue
                    found = json.loads(line)
                    total, entries = int(found["bytes"]), int(found["entries"])
                    if found["nonce"] == request["nonce"] and entries >= 1 and total >= TAR_HEADER:
                        self._result, self.seconds = (total, entries), float(found["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            self._result = None  # result() walks in-process
        finally:
            self._done.set()

    def total(self) -> Optional[int]:
        """The estimated stream bytes once the walk is done, None until then."""
        return self._result[0] if self._done.is_set() and self._result is not None else None

    def result(self) -> Tuple[int, int]:
        """(estimated tar stream bytes, entries), waiting for the walk."""
        self._done.wait()
        if self._result is None:
            self.ctx.check()  # a cancel killed the child: do not walk the tree for nothing
            t0 = time.monotonic()
            self._result = scan(self.root, self.excludes)
            self.seconds = time.monotonic() - t0
        return self._result


def main() -> int:
    request = json.loads(sys.stdin.read())
    root = os.fsdecode(bytes.fromhex(request["root"]))
    excludes = [os.fsdecode(bytes.fromhex(e)) for e in request["excludes"]]
    st = os.stat(root)
    if (st.st_dev, st.st_ino) != (request["dev"], request["ino"]):
        raise ScriptError("internal", "the tree at the root is not the one the snapshot streams")
    os.scandir(root).close()  # a root it cannot list would count as empty: fail, and let the parent walk
    t0 = time.monotonic()
    total, entries = scan(root, excludes)
    answer = {"nonce": request["nonce"], "bytes": total, "entries": entries, "seconds": round(time.monotonic() - t0, 3)}
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
