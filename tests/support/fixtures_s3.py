"""pytest fixtures for a real S3 server (SeaweedFS), registered by tests/conftest.py.

`s3_server` (session): an object with endpoint, access_key, secret_key, region, bucket.
`s3_prefix` (function): a unique key prefix ending in '/', so tests never see each other's objects.
"""
from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from tests.support.s3_server import S3Endpoint, SeaweedS3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    server = SeaweedS3Server()
    try:
        info = server.start()
    except (OSError, RuntimeError) as exc:
        pytest.fail("could not start SeaweedFS for the S3 tests: %s" % exc)
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return "tests/%s-%s/" % (name, uuid.uuid4().hex[:10])
