"""The object store clients (boto3 in the control plane, s5cmd on hosts) against answers Cloudflare R2 gives
and SeaweedFS does not: `401 Unauthorized` for a bad key (R2's S3 error-code reference; the field report
`An error occurred (401) when calling the HeadObject operation: Unauthorized`), and a refusal of the CRC
checksum headers botocore >= 1.36 adds by default. A small stub server stands in for R2; the SeaweedFS
tests check the same clients against a real S3 server."""

from __future__ import annotations

import http.server
import os
import sys
import threading
from collections.abc import Iterator

import pytest

from src.adapters.object_store import ObjectStore, ObjectTooLarge, StorageError
from tests.support.s3_server import s5cmd_binary

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_common import Context, Events, ScriptError  # noqa: E402
from gs_s3 import S5, classify  # noqa: E402

UNAUTHORIZED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>Unauthorized</Code><Message>Unauthorized</Message></Error>'
)


class R2Stub:
    """Answers every request 401 `Unauthorized` as R2 does for a bad key (`deny=True`), or, with
    `deny=False`, 200 to PUTs and to GETs with `get_body` (announcing `get_length` when given); records
    each request's method and headers."""

    def __init__(self, *, deny: bool = True, get_body: bytes = b"", get_length: int | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                stub.requests.append((self.command, {k.lower(): v for k, v in self.headers.items()}))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if deny:
                    body = UNAUTHORIZED if self.command != "HEAD" else b""
                    self.send_response(401)
                    self.send_header("Content-Type", "application/xml")
                else:
                    body = get_body if self.command == "GET" else b""
                    self.send_response(200)
                    self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
                announced = get_length if (self.command == "GET" and get_length is not None) else len(body)
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, *args: object) -> None:
                """Quiet: the test asserts on `requests`."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def r2_denying() -> Iterator[R2Stub]:
    stub = R2Stub()
    yield stub
    stub.close()


def _store(endpoint: str) -> ObjectStore:
    return ObjectStore(
        endpoint=endpoint,
        bucket="b",
        access_key="AKIDEXAMPLE",
        secret_key="Zq9-bad-secret",
        connect_timeout_s=2,
        read_timeout_s=5,
    )


def test_boto3_reads_r2s_401_as_refused_credentials(r2_denying: R2Stub) -> None:
    store = _store(r2_denying.endpoint)
    for call in (
        lambda: store.head("k"),
        lambda: store.get_bytes("k"),
        lambda: store.put_bytes("k", b"x"),
        lambda: list(store.list("p/")),
        store.ping,
    ):
        with pytest.raises(StorageError) as caught:
            call()
        assert caught.value.code == "storage_auth_failed" and not caught.value.retryable, caught.value.message
        assert "Zq9-bad-secret" not in caught.value.message


def test_s5cmd_on_the_host_reads_r2s_401_as_refused_credentials(r2_denying: R2Stub, tmp_path) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        s5 = S5(
            Context(Events(fd=devnull)),
            {"endpoint": r2_denying.endpoint, "bucket": "b", "access_key": "a", "secret_key": "s"},
            s5cmd_binary(),
            work_dir=str(tmp_path),
        )
        for call in (
            lambda: s5.put("k", b"x", {}),
            lambda: s5.head("k"),
            lambda: s5.cat("k", 1),
            lambda: s5.list("p/"),
            lambda: s5.remove(["k"]),
        ):
            with pytest.raises(ScriptError) as caught:
                call()
            assert caught.value.code == "storage_auth_failed", caught.value
    finally:
        os.close(devnull)


@pytest.mark.parametrize(
    "stderr",
    [
        # What s5cmd 2.x prints (measured against this stub) for R2's bad key, and S3's forms of the same refusal.
        '{"operation":"cp","error":"Unauthorized: Unauthorized status code: 401, request id: , host id:"}',
        'ERROR "head s3://b/k": Unauthorized: Unauthorized\n\tstatus code: 401, request id: ',
        "AccessDenied: Access Denied\n\tstatus code: 403, request id: X",
        "InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records.",
        "SignatureDoesNotMatch: The request signature we calculated does not match",
    ],
)
def test_s5cmd_refusals_are_storage_auth_failed(stderr: str) -> None:
    assert classify(stderr, "upload_failed") == "storage_auth_failed"


def test_s5cmd_other_failures_keep_their_code() -> None:
    assert (
        classify("InternalError: We encountered an internal error\n\tstatus code: 500", "upload_failed")
        == "upload_failed"
    )
    assert classify("cp s3://b/Unauthorized-notes.txt: connection reset", "download_failed") == "download_failed"


def test_boto3_sends_no_checksum_headers_r2_may_refuse() -> None:
    stub = R2Stub(deny=False, get_body=b"manifest")
    try:
        store = _store(stub.endpoint)
        store.put_bytes("k", b"payload")
        assert store.get_bytes("k") == b"manifest"
    finally:
        stub.close()
    put_headers = next(h for method, h in stub.requests if method == "PUT")
    assert not [
        h
        for h in put_headers
        if h.startswith("x-amz-checksum-") or h in ("x-amz-sdk-checksum-algorithm", "x-amz-trailer")
    ], put_headers
    get_headers = next(h for method, h in stub.requests if method == "GET")
    assert "x-amz-checksum-mode" not in get_headers


def test_an_object_announced_larger_than_the_cap_is_refused_unread() -> None:
    stub = R2Stub(deny=False, get_body=b"{", get_length=300 << 20)  # says 300 MiB, sends one byte
    try:
        with pytest.raises(ObjectTooLarge) as caught:
            _store(stub.endpoint).get_bytes("manifest.json", max_bytes=256 << 20)
        assert caught.value.code == "object_too_large"
    finally:
        stub.close()


def test_get_bytes_cap_against_a_real_s3_server(s3_server, s3_prefix) -> None:  # type: ignore[no-untyped-def]
    store = ObjectStore(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )
    store.put_bytes(s3_prefix + "m", b"0123456789A")
    assert store.get_bytes(s3_prefix + "m", max_bytes=11) == b"0123456789A"
    with pytest.raises(ObjectTooLarge):
        store.get_bytes(s3_prefix + "m", max_bytes=10)
    assert store.get_bytes(s3_prefix + "absent", max_bytes=10) is None
