"""s5cmd wrapper: every call to the object store made by the remote scripts goes through here.

Credentials travel only in the child's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN for per-job credentials, AWS_REGION), never in argv, never on disk. Uploads read an
in-memory file (memfd) whose content is complete before s5cmd starts, so a killed script can never leave a half-written object behind under
a finished-looking name: S3 PUTs are all-or-nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from gs_common import Context, ScriptError, read_full, tail_text, widen_pipe
from gs_tuning import Concurrency, is_throttle

# s5cmd prints the AWS SDK's error as "<Code>: <Message>\n\tstatus code: <n>, request id: ..." (inside its
# --json error line). R2 answers a bad key with code `Unauthorized` and HTTP 401 (a HEAD has no body, so
# only the status text: "Unauthorized: Unauthorized"); S3 with 403 AccessDenied / InvalidAccessKeyId /
# SignatureDoesNotMatch. All of them mean the credentials, not the upload, are wrong.
_AUTH_MARKERS = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "Forbidden",
    "status code: 403",
    "status code: 401",
    "Unauthorized:",
    "InvalidToken",
    "ExpiredToken",
    "NoCredentialProviders",
)
_NOT_FOUND_MARKERS = ("not found", "NoSuchKey", "no object found", "status code: 404")
# A download is tried this many times. s5cmd's own --retry-count covers failed requests, but s5cmd
# 2.3.0 `cat` can retry after a connection reset mid-body and still exit 0 with a SHORT body (issue
# 14: 65,084 of 786,808 bytes), so every read is checked against the length we expect and read again.
FETCH_TRIES = 4
FETCH_BACKOFF_S = 0.5  # doubled after each failed try: 0.5, 1, 2 s


class NotFound(Exception):
    """The key does not exist (head, cat, cat_into; list answers {} instead)."""


def classify(stderr: str, fallback: str) -> str:
    """Map an s5cmd error text to a script error code."""
    if any(m in stderr for m in _AUTH_MARKERS):
        return "storage_auth_failed"
    if "NoSuchBucket" in stderr:
        return "bad_config"
    return fallback


def _is_not_found(stderr: str, markers: Tuple[str, ...] = _NOT_FOUND_MARKERS) -> bool:
    """The object (or, with list's marker, any object under the prefix) is absent; a refused
    request or a missing bucket is not "not found"."""
    return classify(stderr, "") == "" and any(m in stderr for m in markers)


class S5:
    """One object store (endpoint + bucket + credentials) reached through the s5cmd binary."""

    def __init__(self, ctx: Context, s3: Dict[str, Any], s5cmd: str = "s5cmd", work_dir: Optional[str] = None) -> None:
        for key in ("endpoint", "bucket", "access_key", "secret_key"):
            if not isinstance(s3.get(key), str) or not s3.get(key):
                raise ScriptError("bad_config", "s3.%s must be a non-empty string" % key)
        self.ctx = ctx
        self.bucket = s3["bucket"]
        self.work_dir = work_dir
        # The run's adaptive limit on transfers in flight (gs_tuning); downloads and batch uploads
        # take a place in it and report their bytes and throttled answers. None: no limit.
        self.transfers: Optional[Concurrency] = None
        self.base = [s5cmd, "--json", "--retry-count", "5", "--endpoint-url", s3["endpoint"]]
        env = dict(os.environ)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            env.pop(name, None)
        env.update(
            AWS_ACCESS_KEY_ID=s3["access_key"],
            AWS_SECRET_ACCESS_KEY=s3["secret_key"],
            AWS_REGION=str(s3.get("region") or "auto"),
        )
        # Per-job credentials (R2 temporary credentials, STS) come with a session token; s5cmd reads it
        # from AWS_SESSION_TOKEN like every AWS SDK client.
        token = s3.get("session_token")
        if token is not None:
            if not isinstance(token, str) or not token:
                raise ScriptError("bad_config", "s3.session_token must be a non-empty string when given")
            env["AWS_SESSION_TOKEN"] = token
        self.env = env

    def url(self, key: str) -> str:
        return "s3://%s/%s" % (self.bucket, key)

    def _spawn(self, args: List[str], **kwargs: Any) -> subprocess.Popen:
        try:
            return self.ctx.spawn(
                self.base + args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                **kwargs,
            )
        except FileNotFoundError:
            raise ScriptError("missing_dependency", "s5cmd binary not found: %s" % self.base[0]) from None

    def _run(self, args: List[str], pass_fds: tuple = ()) -> subprocess.CompletedProcess:
        proc = self._spawn(args, pass_fds=pass_fds)
        out, err = proc.communicate()
        self.ctx.check()
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def _fail(self, returncode: int, text: str, fallback: str, what: str) -> ScriptError:
        code = classify(text, fallback)
        if code == "bad_config":
            return ScriptError(code, "bucket %r does not exist (%s)" % (self.bucket, text))
        return ScriptError(code, "%s failed (s5cmd exit %d): %s" % (what, returncode, text))

    def _failed(self, res: subprocess.CompletedProcess, fallback: str, what: str) -> ScriptError:
        return self._fail(res.returncode, tail_text(res.stderr) or tail_text(res.stdout), fallback, what)

    def put(self, key: str, data: Any, metadata: Dict[str, str]) -> None:
        """Upload `data` (bytes-like) as `key` with user metadata; raises ScriptError(upload_failed…)."""
        fd = memfile(data, self.work_dir)
        try:
            res = self._run(
                ["cp", "--raw"] + metadata_args(metadata) + ["/dev/fd/%d" % fd, self.url(key)], pass_fds=(fd,)
            )
        finally:
            os.close(fd)
        if res.returncode != 0:
            raise self._failed(res, "upload_failed", "upload of %s" % key)

    def head(self, key: str, fallback: str = "upload_failed") -> Dict[str, Any]:
        """Size and metadata of one object; NotFound when absent."""
        res = self._run(["head", "--raw", self.url(key)])
        if res.returncode != 0:
            if _is_not_found(tail_text(res.stderr)):
                raise NotFound(key)
            raise self._failed(res, fallback, "head of %s" % key)
        info = json.loads(res.stdout.decode("utf-8").strip().splitlines()[-1])
        return {"size": int(info.get("size", -1)), "metadata": info.get("metadata") or {}}

    def list(self, prefix: str, fallback: str = "upload_failed") -> Dict[str, int]:
        """Every key directly under `prefix` (a folder ending in '/') mapped to its size."""
        res = self._run(["ls", self.url(prefix) + "*"])
        if res.returncode != 0:
            if _is_not_found(tail_text(res.stderr), ("no object found",)):
                return {}
            raise self._failed(res, fallback, "listing of %s" % prefix)
        found: Dict[str, int] = {}
        for line in res.stdout.decode("utf-8", "replace").splitlines():
            if line.strip():
                item = json.loads(line)
                if item.get("type") == "file":
                    name = item["key"][len("s3://%s/" % self.bucket) :]
                    found[name] = int(item.get("size", -1))
        return found

    def cat(self, key: str, expected: int, fallback: str = "download_failed") -> bytearray:
        """Read one object into a new buffer (see cat_into); the result has the object's length."""
        buf = bytearray(expected + 1)
        got = self.cat_into(key, buf, expected, fallback)
        del buf[got:]
        return buf

    def cat_into(self, key: str, buf: bytearray, expected: int, fallback: str = "download_failed") -> int:
        """Read one object into `buf` (len >= expected + 1), at most expected + 1 bytes, so an
        over-long object is seen without buffering it. Returns the byte count; the caller compares
        it with `expected`. Raises NotFound when the key is absent.

        A short read or a failed s5cmd is tried again (FETCH_TRIES in all, with backoff). When every
        try came back short, the object's own size decides: if the bucket says it IS that short, the
        short count is returned (the caller reports a truncated object: data that arrived whole and is
        wrong); otherwise ScriptError(`fallback`, retryable download failure). Refused credentials or
        a missing bucket are never retried."""
        problem = ""
        shorts = set()
        for attempt in range(FETCH_TRIES):
            if attempt:
                self._backoff(attempt)
            gate, got, said = self.transfers, -1, ""  # -1: the try failed
            if gate is not None:
                gate.acquire(self.ctx.check)
            try:
                got = self._cat_once(key, buf, expected, fallback)
            except ScriptError as exc:
                if exc.code != fallback:
                    raise  # storage_auth_failed, bad_config: the same request will fail the same way
                problem, said = exc.message, getattr(exc, "s5cmd_said", exc.message)
            finally:
                if gate is not None:
                    gate.release(got if got >= expected else 0)
            if got >= expected:
                return got  # whole (or too long: the caller reports a size mismatch)
            if gate is not None and got < 0 and (is_throttle(said) or not said.strip()):
                # s5cmd 2.3.0 `cat` exits 1 without a word when the store keeps answering 503
                # SlowDown: a silent failure is taken as the store pushing back. A reset, a 500 or a
                # short body is a fault of this request, not a reason to slow the whole run.
                gate.throttled()
            if got >= 0:
                shorts.add(got)
                problem = "got %d of %d bytes" % (got, expected)
        if shorts:
            try:
                size = self.head(key, fallback)["size"]
            except ScriptError:
                size = -1  # unknown: report the download as failed, not the object as bad
            if size in shorts:
                return size  # the stored object really is that short
        raise ScriptError(fallback, "download of %s failed after %d tries: %s" % (key, FETCH_TRIES, problem))

    def _backoff(self, attempt: int) -> None:
        """Sleep before try `attempt` (1-based count of failures so far); a cancel cuts it short."""
        self.ctx.cancelled.wait(FETCH_BACKOFF_S * (2 ** (attempt - 1)))
        self.ctx.check()

    def _cat_once(self, key: str, buf: bytearray, expected: int, fallback: str) -> int:
        proc = self._spawn(["cat", "--raw", self.url(key)], bufsize=0)
        widen_pipe(proc.stdout.fileno())
        view, got = memoryview(buf)[: expected + 1], 0
        try:
            got = read_full(proc.stdout, view)
        finally:
            view.release()
            if got > expected:
                proc.kill()
            err = proc.stderr.read()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        self.ctx.check()
        if got > expected:
            return got  # too long: the caller reports a size mismatch
        if proc.returncode != 0:
            text = tail_text(err)
            if _is_not_found(text):
                raise NotFound(key)
            failure = self._fail(proc.returncode, text, fallback, "download of %s" % key)
            failure.s5cmd_said = text  # type: ignore[attr-defined]  # cat_into: throttled, or silent?
            raise failure
        return got

    def remove(self, keys: List[str]) -> None:
        """Delete these keys (none: nothing to do); raises ScriptError(upload_failed…)."""
        if keys:
            res = self._run(["rm"] + [self.url(k) for k in keys])
            if res.returncode != 0:
                what = keys[0] if len(keys) == 1 else "%d objects (%s, ...)" % (len(keys), keys[0])
                raise self._failed(res, "upload_failed", "removal of %s" % what)


def metadata_args(metadata: Dict[str, str]) -> List[str]:
    """`--metadata name=value` for each item, in a stable order."""
    args: List[str] = []
    for name, value in sorted(metadata.items()):
        args += ["--metadata", "%s=%s" % (name, value)]
    return args


def memfile(data: Any, work_dir: Optional[str]) -> int:
    """A descriptor of an anonymous in-memory file (memfd) holding all of `data` (bytes-like), or of
    an unlinked spool file in `work_dir` where memfd is missing. Either way it disappears with the
    last descriptor; the caller closes it."""
    fd = -1
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("gpusnap-part")
        except OSError:
            pass
    if fd < 0:
        fd, path = tempfile.mkstemp(prefix="gpusnap-part-", dir=work_dir)
        os.unlink(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 24]) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
