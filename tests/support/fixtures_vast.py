"""The fake vast.ai API for tests: a fresh server and state per test (it starts in milliseconds).
Running instances report the loopback `sshd` as their SSH endpoint when the test also asks for `sshd`,
else ("127.0.0.1", 22); any test can repoint them with `fake_vast.set_ssh_endpoint(host, port)`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from src.adapters.vast import VastClient
from tests.fakes.fake_vast_api import FakeVastApi


@pytest.fixture
def fake_vast(request: pytest.FixtureRequest) -> Iterator[FakeVastApi]:
    endpoint = ("127.0.0.1", 22)
    if "sshd" in request.fixturenames:  # only then: starting sshd costs time tests without it should not pay
        server = request.getfixturevalue("sshd")
        endpoint = (server.host, server.port)
    with FakeVastApi(ssh_endpoint=endpoint) as fake:
        yield fake


@pytest.fixture
def vast_client(fake_vast: FakeVastApi) -> VastClient:
    """A real `VastClient` against the fake, with backoff that outlasts the fake's scaled-down minimum
    intervals (the longest, renting, is 45 ms; five retries wait at least 155 ms) in milliseconds."""
    return VastClient(fake_vast.api_key, fake_vast.base_url, timeout=(2, 5), max_retries=5, backoff_base=0.01)
