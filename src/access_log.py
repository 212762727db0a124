"""gunicorn's access log without the tokens that travel in URLs (`gunicorn.conf.py` names this class).

`GET /api/events?token=` takes a stream token (an EventSource cannot send headers), and a careless
dashboard may put its API token in a URL too; the access log writes the whole request line to stdout,
from where log shippers take it anywhere. The value of every `token` parameter is replaced."""

from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import Logger

_TOKEN = re.compile(r"([?&]token=)[^&#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    return _TOKEN.sub(r"\1[redacted]", text)


class RedactingLogger(Logger):
    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key in ("r", "q", "f"):  # request line, query string, Referer
            if isinstance(atoms.get(key), str):
                atoms[key] = redact(atoms[key])
        return atoms
