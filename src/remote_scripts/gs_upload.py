"""One long-lived `s5cmd run` that uploads every part of a snapshot.

Starting s5cmd costs tens of milliseconds of CPU (Go runtime, HTTP client, credential chain); with
one process per part that was 7.6 CPU-seconds for 1.4 GB against 3.7 with one process fed a command
per part (measured on 2 cores against SeaweedFS), a big share of a CPU-bound 2-core host's budget.

Each part is written whole into an in-memory file first, and the command names it by
/proc/<our pid>/fd/<n>. s5cmd opens it when a worker takes the command, so an upload is always of
complete content: if this script dies, a part s5cmd had opened is still complete and one it had not
opened fails to open. Either way no truncated object appears under a part's name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from typing import Any, Dict, List, Optional

from gs_common import ScriptError, tail_text
from gs_s3 import S5, classify, memfile, metadata_args
from gs_tuning import is_throttle

THROTTLE_TRIES = 3
THROTTLE_BACKOFF_S = 1.0  # times the try number: 1 s, 2 s
# What a command line may hold without quoting (s5cmd splits `run` lines on whitespace).
_PLAIN = re.compile(r"^[A-Za-z0-9._:/=@+,%-]+$")


class _Waiter:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Optional[str] = None


class BatchUploader:
    """`put(key, data, metadata)` from many threads; each call returns once that object is stored.
    Keys or metadata that would need quoting fall back to one `s5cmd cp` for that part."""

    def __init__(self, s5: S5, workers: int) -> None:
        self.s5 = s5
        self._lock = threading.Lock()
        self._pending: Dict[str, _Waiter] = {}
        self._stderr: List[bytes] = []
        self._dead: Optional[str] = None
        self._stderr_done = threading.Event()
        try:
            # --log debug adds only s5cmd's "retryable error: ..." lines to stdout (s5cmd 2.3.0)
            self._proc = s5.ctx.spawn(
                s5.base + ["--log", "debug", "--numworkers", str(workers), "run"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=s5.env,
            )
        except FileNotFoundError:
            raise ScriptError("missing_dependency", "s5cmd binary not found: %s" % s5.base[0]) from None
        self._readers = [
            threading.Thread(target=self._read_results, daemon=True),
            threading.Thread(target=self._read_errors, daemon=True),
        ]
        for thread in self._readers:
            thread.start()

    def __enter__(self) -> "BatchUploader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, key: str, data: Any, metadata: Dict[str, str]) -> None:
        """Upload `data` as `key`; raises ScriptError (upload_failed, storage_auth_failed, cancelled).
        A throttled upload (429, 503 SlowDown past s5cmd's own retries) halves the run's transfer
        limit (gs_tuning) and is sent again, up to THROTTLE_TRIES times in all: a PUT is whole or absent."""
        url = self.s5.url(key)
        meta = metadata_args(metadata)
        if not all(_PLAIN.match(arg) for arg in meta + [url]):
            self.s5.put(key, data, metadata)
            return
        fd = memfile(data, self.s5.work_dir)
        try:
            line = " ".join(["cp", "--raw"] + meta + ["/proc/%d/fd/%d" % (os.getpid(), fd), url]) + "\n"
            gate = self.s5.transfers
            for attempt in range(THROTTLE_TRIES):
                if attempt:
                    self.s5.ctx.cancelled.wait(THROTTLE_BACKOFF_S * attempt)
                    self.s5.ctx.check()
                if gate is not None:
                    gate.acquire(self.s5.ctx.check)
                error: Optional[str] = "not sent"
                try:
                    error = self._send(url, line)
                finally:
                    if gate is not None:
                        gate.release(memoryview(data).nbytes if error is None else 0)
                if error is None:
                    return
                if gate is None or not is_throttle(error):
                    break
                gate.throttled()
        finally:
            os.close(fd)  # s5cmd holds its own descriptor while it reads
        raise ScriptError(classify(str(error), "upload_failed"), "upload of %s failed: %s" % (key, error))

    def _send(self, url: str, line: str) -> Optional[str]:
        """Hand one command to s5cmd and wait for its answer: None when stored, else the error."""
        waiter = _Waiter()
        with self._lock:
            if self._dead is not None:
                raise ScriptError("upload_failed", "s5cmd stopped: %s" % self._dead)
            self._pending[url] = waiter
            try:
                self._proc.stdin.write(line.encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                self._pending.pop(url, None)
                self.s5.ctx.check()
                raise ScriptError("upload_failed", "s5cmd stopped: %s" % tail_text(b"".join(self._stderr))) from None
        while not waiter.done.wait(0.2):
            self.s5.ctx.check()
        return waiter.error

    def close(self) -> None:
        """Let s5cmd finish and exit; idempotent."""
        try:
            if self._proc.stdin and not self._proc.stdin.closed:
                self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for thread in self._readers:
            thread.join(5)

    def _resolve(self, url: str, error: Optional[str]) -> None:
        with self._lock:
            waiter = self._pending.pop(url, None)
        if waiter is not None:
            waiter.error = error
            waiter.done.set()

    def _read_results(self) -> None:
        for line in self._proc.stdout:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if "error" in item and "operation" not in item:
                # `--log debug`: a request s5cmd is about to retry. Throttling slows us down now,
                # while s5cmd retries, not only once it gives up.
                if self.s5.transfers is not None and is_throttle(str(item["error"])):
                    self.s5.transfers.throttled()
                continue
            if item.get("operation") == "cp" and item.get("destination"):
                self._resolve(item["destination"], None if item.get("success") else str(item))
        # stdout closed: s5cmd exited. Whatever is still pending will never be answered.
        self._proc.wait()
        self._stderr_done.wait(5)
        reason = "exit %s: %s" % (self._proc.returncode, tail_text(b"".join(self._stderr)) or "no message")
        with self._lock:
            self._dead = reason
            stranded, self._pending = list(self._pending.values()), {}
        for waiter in stranded:
            waiter.error = reason
            waiter.done.set()

    def _read_errors(self) -> None:
        try:
            for line in self._proc.stderr:
                self._stderr.append(line)
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                command = str(item.get("command") or "")
                if item.get("error") and command:
                    self._resolve(command.split()[-1], str(item["error"]))
        finally:
            self._stderr_done.set()
