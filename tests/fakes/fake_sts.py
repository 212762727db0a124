"""A fake STS `AssumeRole` endpoint (the AWS Query protocol), for `StsBroker`.

Follows the AWS STS API Reference, AssumeRole: a form-encoded POST with `Action=AssumeRole`,
`Version=2011-06-15`, `RoleArn` (20-2048 characters), `RoleSessionName` (2-64 of `[\\w+=,.@-]`),
`DurationSeconds` (900-43200), `Policy` (JSON, at most 2048 characters packed); a SigV4 `Authorization`
header whose credential names the caller's access key. Success is an `AssumeRoleResponse` XML document
with `Credentials` (AccessKeyId, SecretAccessKey, SessionToken, Expiration); a refusal is an
`ErrorResponse` with `Type` Sender and `Code` ValidationError (400) or AccessDenied (403), as STS answers.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

_SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        """Tests read `FakeSts.assumed`."""


@dataclass
class FakeSts:
    caller_access_key: str
    role_arn: str
    assumed: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeSts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()

    def _wsgi(self, environ: dict, start_response: Any) -> Any:
        return self._answer(Request(environ))(environ, start_response)

    def _answer(self, request: Request) -> Response:
        if request.method != "POST":
            return _error(400, "InvalidAction", "STS takes POST requests here")
        credential = re.search(r"Credential=([^/]+)/", request.headers.get("Authorization", ""))
        if not credential:
            return _error(403, "MissingAuthenticationToken", "Request is missing Authentication Token")
        if credential.group(1) != self.caller_access_key:
            return _error(403, "InvalidClientTokenId", "The security token included in the request is invalid.")
        form = {k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()}
        if form.get("Action") != "AssumeRole" or form.get("Version") != "2011-06-15":
            return _error(
                400,
                "InvalidAction",
                "Could not find operation %s for version %s" % (form.get("Action"), form.get("Version")),
            )
        problem = _invalid(form)
        if problem:
            return _error(400, "ValidationError", problem)
        if form["RoleArn"] != self.role_arn:
            return _error(
                403, "AccessDenied", "User is not authorized to perform: sts:AssumeRole on resource: " + form["RoleArn"]
            )
        creds = {
            "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
            "SecretAccessKey": secrets.token_hex(20),
            "SessionToken": secrets.token_urlsafe(64),
        }
        self.assumed.append(
            {**form, "Policy": json.loads(form["Policy"]) if "Policy" in form else None, "credentials": creds}
        )
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=int(form.get("DurationSeconds", 3600)))
        body = (
            f'<AssumeRoleResponse xmlns="{_NS}"><AssumeRoleResult><Credentials>'
            f"<AccessKeyId>{creds['AccessKeyId']}</AccessKeyId>"
            f"<SecretAccessKey>{creds['SecretAccessKey']}</SecretAccessKey>"
            f"<SessionToken>{creds['SessionToken']}</SessionToken>"
            f"<Expiration>{expires.strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration>"
            "</Credentials><AssumedRoleUser><AssumedRoleId>AROAFAKE:"
            f"{form['RoleSessionName']}</AssumedRoleId><Arn>{form['RoleArn']}</Arn></AssumedRoleUser>"
            "</AssumeRoleResult><ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata>"
            "</AssumeRoleResponse>"
        )
        return Response(body, status=200, mimetype="text/xml")


def _invalid(form: dict[str, str]) -> str | None:
    arn = form.get("RoleArn", "")
    if not 20 <= len(arn) <= 2048:
        return "1 validation error detected: Value at 'roleArn' failed to satisfy constraint"
    if not _SESSION_NAME.match(form.get("RoleSessionName", "")):
        return "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint"
    duration = form.get("DurationSeconds")
    if duration is not None and not (duration.isdigit() and 900 <= int(duration) <= 43200):
        return "1 validation error detected: Value at 'durationSeconds' failed to satisfy constraint"
    policy = form.get("Policy")
    if policy is not None:
        if len(policy) > 2048:
            return "1 validation error detected: Value at 'policy' failed to satisfy constraint"
        try:
            json.loads(policy)
        except ValueError:
            return "The policy is not in the valid JSON format."
    return None


def _error(status: int, code: str, message: str) -> Response:
    body = (
        f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>fake</RequestId></ErrorResponse>"
    )
    return Response(body, status=status, mimetype="text/xml")
