"""A JSON body nested thousands deep made the parser overflow its stack: a 500 with a traceback in the
log. It is a 400 `malformed_json`, nothing logged above INFO, on every endpoint that reads a body."""

from __future__ import annotations

import logging

import pytest

from tests.support.fixtures_app import AUTH

ENDPOINTS = [
    ("POST", "/api/gpu-snapshots"),
    ("POST", "/api/instances/m1/hibernate"),
    ("POST", "/api/gpu-snapshots/snap_x/restore"),
    ("POST", "/api/instances/m1/wake"),
]


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b'{"excludes": ' + b"[" * 40 + b"]" * 40 + b"}"],
    ids=["unclosed-arrays", "deep-objects", "deeper-than-32"],
)
@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_deeply_nested_json_is_400_malformed_json_without_a_traceback(client, caplog, method, path, body):
    caplog.set_level(logging.INFO)
    r = client.open(path, method=method, data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    assert r.get_json()["error"]["code"] == "malformed_json"
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING or rec.exc_info]


def test_ordinary_nesting_still_validates(client):
    """Depth is not the only rule: a shallow but wrong body is still a 422 with details."""
    r = client.post("/api/gpu-snapshots", headers=AUTH, json={"instance_id": "1", "excludes": [["a"]]})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "validation_error"
