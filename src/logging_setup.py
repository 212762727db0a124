"""Structured logs: one JSON object a line, carrying the job id of the job being run (if any)."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Any

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                entry[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(*, level: str = "INFO", fmt: str = "json") -> None:
    """Idempotent: replaces the handler it installed before, leaves others (pytest's caplog) alone."""
    import time

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gpusnap", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._gpusnap = True  # type: ignore[attr-defined]
    handler.addFilter(_JobIdFilter())
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s [job=%(job_id)s] %(message)s")
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("paramiko", "botocore", "boto3", "urllib3", "s3transfer", "huey"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level) if noisy != "huey" else logging.INFO)
