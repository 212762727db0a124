"""Domain errors. Services and adapters raise these; `src/api/errors.py` maps them to HTTP in one place,
and the job runner records `code` and `message` on a failed job."""

from __future__ import annotations


def storable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates: a host's non-UTF-8 file name, decoded with
    surrogateescape) written as backslash escapes, so that the database and JSON can always hold it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text: str) -> str:
    """`text` on one line (runs of whitespace, newlines included, as one space): CLI errors are one line
    even when they carry an HTML error page or a remote script's stderr."""
    return " ".join(text.split())


class GpusnapError(Exception):
    """Base of every error we raise on purpose. `code` is a stable snake_case identifier for clients."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        message = storable(message)
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(GpusnapError):
    code = "invalid_request"
    http_status = 400


class Unprocessable(GpusnapError):
    """Well-formed input that names something we refuse (a host outside SSH_ALLOWED_NETWORKS, say)."""

    code = "unprocessable"
    http_status = 422


class Unauthorized(GpusnapError):
    code = "unauthorized"
    http_status = 401


class NotFound(GpusnapError):
    code = "not_found"
    http_status = 404


class Conflict(GpusnapError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(GpusnapError):
    code = "payload_too_large"
    http_status = 413


class ExternalError(GpusnapError):
    """A system we talk to (SSH host, object store, vast.ai) failed. `retryable` says whether the same
    call may succeed later (timeouts, 5xx, 429) or never will (bad credentials, 4xx)."""

    code = "external_error"
    http_status = 502

    def __init__(self, message: str, *, code: str | None = None, retryable: bool = False) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable


class JobFailed(GpusnapError):
    """Raised inside a job handler to end the job as `failed` with this code and message."""

    code = "job_failed"


class JobCancelled(GpusnapError):
    """Raised inside a job handler when the job's cancel was requested."""

    code = "cancelled"
