"""Shared plumbing for the remote data-plane scripts (snapshot.py, restore.py).

Runs on the GPU host with python3 >= 3.8 and the standard library only. Contract (docs/architecture.md):
one JSON object on stdin, JSON lines on stdout (`started`, `progress`…, then exactly one `result` or
`error`), logs on stderr, exit status 0 only with a `result`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

logger = logging.getLogger("gpusnap.remote")

EXIT_FAILURE = 1
STDOUT_CLOSED = "stdout closed"  # the cancel reason when the reader is gone: nothing is reported
_F_SETPIPE_SZ = 1031  # Linux fcntl
MAX_PARALLELISM = 64  # parts in flight (snapshot) or read ahead (restore)


class ScriptError(Exception):
    """A failure with one of the script error codes of docs/architecture.md."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StdoutGone(Exception):
    """The control plane stopped reading our stdout: nobody is left to report to."""


class Events:
    """Thread-safe JSON-lines writer for stdout, with throttled progress and secret redaction.

    Writes go straight to fd 1 (one os.write per line) so a line is never interleaved and a broken
    pipe is noticed on the very write that hits it."""

    def __init__(self, fd: int = 1, min_interval: float = 0.25) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._min_interval = min_interval
        self._last_progress = 0.0
        self._progress: Dict[str, Any] = {}
        self._redact: List[str] = []
        self.gone = False
        self.final = False  # once `result`/`error` is out, nothing else may follow it
        self.on_gone: Optional[Callable[[], None]] = None  # set by Context: a dead reader cancels

    def redact(self, *secrets: str) -> None:
        """Never let these strings reach stdout (s5cmd errors may echo request details)."""
        self._redact.extend(s for s in secrets if s)

    def scrub(self, text: str) -> str:
        for secret in self._redact:
            text = text.replace(secret, "***")
        return text

    def emit(self, event: str, **fields: Any) -> None:
        line = self.scrub(json.dumps(dict(event=event, **fields), sort_keys=False)) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            if self.gone:
                raise StdoutGone()
            if self.final:
                return
            self.final = event in ("result", "error")
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except OSError as exc:  # EPIPE above all
                self.gone = True
                if self.on_gone is not None:
                    self.on_gone()
                raise StdoutGone() from exc

    def progress(self, force: bool = False, **fields: Any) -> None:
        """Record progress; write it at most every `min_interval` seconds unless forced."""
        now = time.monotonic()
        with self._lock:
            self._progress.update(fields)
            if not force and now - self._last_progress < self._min_interval:
                return
            self._last_progress = now
            snapshot = dict(self._progress)
        self.emit("progress", **snapshot)


class Context:
    """Cancellation flag plus the registry of child processes, shared by every thread of a script."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self._children: List[subprocess.Popen] = []
        self._lock = threading.Lock()
        events.on_gone = lambda: self.cancel(STDOUT_CLOSED)

    def spawn(self, args: List[str], **kwargs: Any) -> subprocess.Popen:
        """Start a child we will kill on cancel.

        No PR_SET_PDEATHSIG (preexec_fn is unsafe with threads): an orphan is harmless here, since
        uploads read complete in-memory files (never a half-fed pipe) and tar dies on a dead pipe."""
        with self._lock:
            if self.cancelled.is_set():
                raise ScriptError("cancelled", "cancelled before %s started" % os.path.basename(args[0]))
            proc = subprocess.Popen(args, **kwargs)
            self._children.append(proc)
            self._children = [p for p in self._children if p.poll() is None or p is proc]
        return proc

    def kill_children(self) -> None:
        with self._lock:
            children = list(self._children)
        for proc in children:
            if proc.poll() is None:
                try:
                    proc.kill()
                except OSError:
                    pass

    def cancel(self, reason: str) -> None:
        """Idempotent: flag, then kill every child so blocked reads and writes return promptly."""
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()
        self.kill_children()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise ScriptError("cancelled", self.cancel_reason or "cancelled")


def read_config() -> Dict[str, Any]:
    try:
        cfg = json.loads(sys.stdin.read() or "null")
    except ValueError as exc:
        raise ScriptError("bad_config", "stdin is not JSON: %s" % exc) from None
    if not isinstance(cfg, dict):
        raise ScriptError("bad_config", "stdin must hold one JSON object")
    return cfg


def run_script(main: Callable[[Dict[str, Any], Context], Dict[str, Any]]) -> None:
    """Run `main(config, ctx)` under the event contract and exit with the right status.

    SIGTERM/SIGHUP/SIGINT cancel (children killed, `error` code `cancelled`); a broken stdout stops
    the work without trying to report. Never returns."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    events = Events()
    ctx = Context(events)
    try:
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)  # own process group, so `kill -TERM -<pgid>` reaches exactly our tree
    except OSError:
        pass

    def on_signal(signum: int, _frame: Any) -> None:
        ctx.cancel("cancelled by signal %d" % signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    code = EXIT_FAILURE
    try:
        events.emit("started", pid=os.getpid(), pgid=os.getpgrp())
        cfg = read_config()
        s3 = cfg.get("s3") if isinstance(cfg.get("s3"), dict) else {}
        events.redact(
            str(s3.get("secret_key") or ""), str(s3.get("access_key") or ""), str(s3.get("session_token") or "")
        )
        # No ctx.check() here: once main returns, its work is done (a swapped workspace, an uploaded
        # manifest) and reporting `cancelled` for a signal that came too late would be a lie.
        result = main(cfg, ctx)
        events.emit("result", **result)
        code = 0
    except StdoutGone:
        ctx.cancel(STDOUT_CLOSED)
        logger.error("stdout closed by the reader; stopping")
    except ScriptError as exc:
        ctx.kill_children()
        err_code = "cancelled" if ctx.cancelled.is_set() and ctx.cancel_reason != STDOUT_CLOSED else exc.code
        message = ctx.cancel_reason if err_code == "cancelled" and exc.code != "cancelled" else exc.message
        _report_error(events, err_code, message)
    except Exception as exc:  # noqa: BLE001 - last line of defence: report, never hide
        ctx.kill_children()
        logger.exception("internal error")
        code_name = "cancelled" if ctx.cancelled.is_set() else "internal"
        _report_error(events, code_name, "%s: %s" % (type(exc).__name__, exc))
    finally:
        ctx.kill_children()
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        logger.info(
            "cpu: script %.2fs user %.2fs sys; children %.2fs user %.2fs sys",
            own.ru_utime,
            own.ru_stime,
            kids.ru_utime,
            kids.ru_stime,
        )
    sys.stdout.flush()
    os._exit(code)  # worker threads may still be blocked on dead children; do not wait for them


def _report_error(events: Events, code: str, message: str) -> None:
    logger.error("%s: %s", code, events.scrub(message))
    try:
        events.emit("error", code=code, message=message)
    except StdoutGone:
        pass


def heartbeat(events: Events, ctx: Context, every: float = 2.0) -> threading.Thread:
    """Re-send the latest progress periodically: keeps the job alive and detects a dead stdout."""

    def loop() -> None:
        while not ctx.cancelled.wait(every):
            try:
                events.progress(force=True)
            except StdoutGone:
                ctx.cancel(STDOUT_CLOSED)
                return

    thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
    thread.start()
    return thread


def require(
    cfg: Dict[str, Any],
    key: str,
    kind: type,
    default: Any = None,
    required: bool = True,
    within: Optional[Tuple[int, int]] = None,
) -> Any:
    """Fetch and type-check one config value (an int also against the inclusive bounds `within`);
    `bad_config` on a wrong type, a value out of bounds or a missing key."""
    value = cfg.get(key, default)
    if value is None and not required:
        return None
    if value is None:
        raise ScriptError("bad_config", "missing config key %r" % key)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ScriptError("bad_config", "config key %r must be %s" % (key, kind.__name__))
    if within is not None and not within[0] <= value <= within[1]:
        raise ScriptError("bad_config", "%s must be %d..%d" % (key, within[0], within[1]))
    return value


def key_prefix(value: str) -> str:
    """A config `prefix` as a folder of the bucket: relative, no `..`, not empty; `/`-terminated."""
    if value.startswith("/") or ".." in value.split("/") or not value.strip("/"):
        raise ScriptError("bad_config", "prefix must be a relative key prefix such as snapshots/i/s/")
    return value if value.endswith("/") else value + "/"


def widen_pipe(fd: int, size: int = 1 << 20) -> None:
    """Give a pipe a 1 MiB buffer where Linux allows it: fewer, larger reads and writes, so the two
    ends wake each other up 16x less often than with the default 64 KiB (less GIL churn)."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError:
        pass


def read_full(stream: Any, buf: Any) -> int:
    """Fill the writable buffer `buf` from `stream` (anything with readinto); returns the byte count,
    short only at the end of the stream."""
    view, got = memoryview(buf), 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def tail_text(data: bytes, limit: int = 2000) -> str:
    return data[-limit:].decode("utf-8", "replace").strip()


class TarCreate:
    """`tar --create` writing its stream to `proc.stdout`, with the member index it writes to a pipe
    counted (`files`, after `finish`) and its stderr drained (so it never blocks on a full pipe). Both
    snapshot formats read the stream this way; `make_tar(index_fd)` builds the command line."""

    def __init__(self, ctx: Context, make_tar: Callable[[int], List[str]]) -> None:
        index_r, index_w = os.pipe()
        try:
            self.proc = ctx.spawn(
                make_tar(index_w),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                pass_fds=(index_w,),
                bufsize=0,
                env=dict(os.environ, LC_ALL="C"),
            )
        except FileNotFoundError:
            os.close(index_r)
            raise ScriptError("missing_dependency", "GNU tar is not installed") from None
        finally:
            os.close(index_w)
        widen_pipe(self.proc.stdout.fileno())
        self.files = 0
        self._errors: List[bytes] = []
        self._counter = threading.Thread(target=self._count_members, args=(index_r,), daemon=True)
        self._drain = threading.Thread(target=lambda: self._errors.append(self.proc.stderr.read()), daemon=True)
        self._counter.start()
        self._drain.start()

    def _count_members(self, fd: int) -> None:
        count = 0  # tar --verbose --index-file: one (escaped) line per member; "./" is the root itself
        with os.fdopen(fd, "rb") as index:
            for _line in index:
                count += 1
        self.files = max(0, count - 1)

    def finish(self) -> int:
        """Wait for tar and its two readers; returns tar's exit status."""
        rc = self.proc.wait()
        self._drain.join()
        self._counter.join(5)
        return rc

    def failure(self, rc: int) -> ScriptError:
        return ScriptError("tar_failed", "tar exited %d: %s" % (rc, tail_text(b"".join(self._errors))))
