"""CORS for the CORS_ORIGINS allow-list: a preflight from an allowed origin passes (no token needed for
it), the real call then exposes `Location`, `Idempotency-Key` and the rate-limit headers; a preflight
from any other origin is refused, and other origins never get an Access-Control-Allow-Origin. With
CORS_ORIGINS unset (the default) no origin is allowed."""

from __future__ import annotations

import pytest

from src.app import create_app
from src.settings import Settings
from tests.fakes.fake_object_store import FakeObjectStore
from tests.support.fixtures_app import AUTH, make_settings

DASH = "https://dash.example.com"
EVIL = "https://dash.example.com.evil.test"


@pytest.fixture
def client(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    app = create_app(
        make_settings(tmp_path, sqlite_url, cors_origins=(DASH, "http://localhost:3000")),
        object_store=FakeObjectStore(),
        configure_logs=False,
    )
    yield app.test_client()
    app.extensions["gpusnap"].engine.dispose()


def _preflight(client, origin: str, method: str = "POST"):  # type: ignore[no-untyped-def]
    return client.options(
        "/api/gpu-snapshots",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )


def test_preflight_from_an_allowed_origin_passes_and_the_call_exposes_location(client):
    r = _preflight(client, DASH)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == DASH
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
    assert int(r.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in r.headers["Vary"]

    r = client.post(
        "/api/gpu-snapshots",
        headers={**AUTH, "Origin": DASH, "Idempotency-Key": "k-1"},
        json={"instance_id": "cors-1", "ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/workspace"},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    assert r.headers["Access-Control-Allow-Origin"] == DASH and r.headers["Location"].startswith("/api/jobs/")
    exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {
        "Location",
        "Idempotency-Key",
        "Retry-After",
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
    } <= exposed
    # Errors are readable cross-origin too (a 401 the page can show).
    r = client.get("/api/jobs", headers={"Origin": DASH})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == DASH


def test_preflight_from_another_origin_is_refused(client):
    for origin in (EVIL, "http://dash.example.com", "null", "https://localhost:3000"):
        r = _preflight(client, origin)
        assert r.status_code == 403, origin
        assert r.get_json()["error"]["code"] == "cors_origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in r.headers
        r = client.get("/api/jobs", headers={**AUTH, "Origin": origin})
        assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    # Without an Origin it is not a preflight: OPTIONS still needs a token like any other request.
    assert client.options("/api/jobs").status_code == 401


def test_no_origin_is_allowed_by_default(tmp_path, sqlite_url):
    assert Settings.from_env({}, dotenv=False).cors_origins == ()
    assert Settings.from_env(
        {"CORS_ORIGINS": "https://a.example, http://b.example:8080/"}, dotenv=False
    ).cors_origins == ("https://a.example", "http://b.example:8080")
    app = create_app(make_settings(tmp_path, sqlite_url), configure_logs=False)
    client = app.test_client()
    assert _preflight(client, DASH).status_code == 403
    assert "Access-Control-Allow-Origin" not in client.get("/api/jobs", headers={**AUTH, "Origin": DASH}).headers
    app.extensions["gpusnap"].engine.dispose()
