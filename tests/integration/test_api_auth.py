"""Bearer-token auth over a real database (SQLite and PostgreSQL): deny by default, tokens from
API_TOKENS and from `gpusnap tokens create`, revocation, and the few public endpoints."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from src.cli.admin import tokens
from src.services.tokens import digest
from tests.support.fixtures_app import AUTH

PUBLIC = ["/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/docs", "/api/docs/assets/swagger-ui.css"]
PROTECTED = ["/api/gpu-snapshots", "/api/jobs", "/api/instances", "/api/jobs/job_nope", "/api/instances/m-nope"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _cli(database_url: str, *args: str) -> Result:
    return CliRunner().invoke(tokens, list(args), env={"DATABASE_URL": database_url}, catch_exceptions=False)


def _assert_error_body(r, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.get_data(as_text=True)
    body = r.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in r.get_data(as_text=True)


@pytest.mark.parametrize("path", PROTECTED)
def test_no_header_is_401_with_bearer_challenge(client, path):
    r = client.get(path)
    _assert_error_body(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "test-token-0123456789"])
def test_malformed_authorization_header_is_401(client, header):
    _assert_error_body(client.get("/api/jobs", headers={"Authorization": header}), 401, "unauthorized")


@pytest.mark.parametrize("token", ["wrong-token", "test-token-012345678", "test-token-0123456789x", "x" * 600])
def test_wrong_token_is_401_invalid_token(client, token):
    r = client.get("/api/gpu-snapshots", headers=_bearer(token))
    _assert_error_body(r, 401, "invalid_token")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_from_api_tokens_works_and_scheme_is_case_insensitive(client):
    assert client.get("/api/gpu-snapshots", headers=AUTH).status_code == 200
    lower = {"Authorization": AUTH["Authorization"].replace("Bearer", "bearer")}
    assert client.get("/api/gpu-snapshots", headers=lower).status_code == 200


def test_cli_token_works_is_stored_only_as_sha256_and_revocation_takes_effect(client, app, database_url):
    created = _cli(database_url, "create", "ci-bot")
    assert created.exit_code == 0, created.output
    token = created.output.strip()
    assert token and "\n" not in token

    assert client.get("/api/gpu-snapshots", headers=_bearer(token)).status_code == 200

    engine = app.extensions["gpusnap"].engine
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM api_tokens")).mappings().all()
    assert len(rows) == 1 and rows[0]["name"] == "ci-bot"
    assert rows[0]["token_sha256"] == digest(token)
    stored = " ".join(str(v) for row in rows for v in row.values())
    assert token not in stored and token[4:] not in stored  # neither the token nor its random part

    listed = _cli(database_url, "ls")
    assert "ci-bot" in listed.output and token not in listed.output and "revoked" not in listed.output

    duplicate = _cli(database_url, "create", "ci-bot")
    assert duplicate.exit_code != 0 and "already exists" in duplicate.output

    revoked = _cli(database_url, "revoke", "ci-bot")
    assert revoked.exit_code == 0, revoked.output
    _assert_error_body(client.get("/api/gpu-snapshots", headers=_bearer(token)), 401, "invalid_token")
    assert "revoked" in _cli(database_url, "ls").output
    # The static token is untouched by revoking a database token.
    assert client.get("/api/gpu-snapshots", headers=AUTH).status_code == 200

    again = _cli(database_url, "revoke", "ci-bot")
    assert again.exit_code != 0 and "no active token" in again.output


@pytest.mark.parametrize("path", PUBLIC)
def test_probes_and_metrics_are_public(client, path):
    r = client.get(path)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert "WWW-Authenticate" not in r.headers


def test_openapi_and_docs_are_readable_without_a_token_but_the_api_is_not(client):
    doc = client.get("/api/openapi.json")
    assert doc.status_code == 200 and doc.get_json()["openapi"].startswith("3.")
    assert doc.get_json()["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"  # "Authorize"
    page = client.get("/api/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "SwaggerUIBundle(" in html and "/api/openapi.json" in html
    # Every script and stylesheet comes from this server (works offline, nothing from a CDN).
    import re

    for ref in re.findall(r"(?:src|href)='([^']+)'", html):
        assert ref.startswith("/"), ref
    assert '"validatorUrl": null' in html  # Swagger UI would post the document to validator.swagger.io
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]  # the browser refuses anything else
    assets = re.findall(r"(?:src|href)='(/api/docs/assets/[^']+)'", html)
    assert len(assets) >= 4
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.data) > 100, asset
    assert client.get("/api/gpu-snapshots").status_code == 401


@pytest.mark.parametrize(
    "name",
    [
        "../openapi.py",
        "..%2F..%2Fsrc%2Fapp.py",
        "index.template.html",
        "VERSION",
        "swagger-ui-bundle.js.map",
        "%00",
        "x" * 300,
    ],
)
def test_docs_assets_serve_only_swagger_ui_files(client, name):
    r = client.get(f"/api/docs/assets/{name}")
    assert r.status_code in (401, 404), r.status_code
    assert b"import " not in r.data


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_unknown_path_is_401_without_token_and_404_with_one(client, method):
    no_token = client.open("/api/nothing-here", method=method)
    _assert_error_body(no_token, 401, "unauthorized")
    with_token = client.open("/api/nothing-here", method=method, headers=AUTH)
    _assert_error_body(with_token, 404, "not_found")


def test_wrong_method_on_known_path_needs_a_token_first(client):
    _assert_error_body(client.put("/api/jobs"), 401, "unauthorized")
    _assert_error_body(client.put("/api/jobs", headers=AUTH), 405, "method_not_allowed")


def test_refused_requests_are_counted_in_metrics(client):
    client.get("/api/jobs")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'gpusnap_http_requests_total{method="GET",route="/api/jobs",status="401"} 1.0' in text
