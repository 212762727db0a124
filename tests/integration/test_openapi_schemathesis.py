"""The OpenAPI document against the app that serves it: schemathesis generates requests (valid and
invalid) for every operation and sends them to the app in-process (WSGI) on SQLite and PostgreSQL;
plain tests check the document's structure and that it lists every route of the public contract."""

from __future__ import annotations

import re
from typing import Any

import jsonschema_rs  # schemathesis's own JSON Schema engine (installed with it)
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from src.app import create_app
from tests.fakes.fake_object_store import FakeObjectStore
from tests.support.fixtures_app import AUTH, make_settings
from tests.support.snapshots import add_complete_snapshot

MAX_EXAMPLES = 30  # per operation and generation mode; both databases run in about 20 s
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]

# The REST table of the public contract (CONTRACT.md), method and path as the app spells them.
CONTRACT_ROUTES = [
    ("GET", "/api/gpu-snapshots"),
    ("POST", "/api/gpu-snapshots"),
    ("POST", "/api/gpu-snapshots/create"),
    ("GET", "/api/gpu-snapshots/{snapshot_id}"),
    ("POST", "/api/gpu-snapshots/{snapshot_id}/restore"),
    ("POST", "/api/gpu-snapshots/{snapshot_id}/verify"),
    ("DELETE", "/api/gpu-snapshots/{snapshot_id}"),
    ("POST", "/api/instances/{instance_id}/hibernate"),
    ("POST", "/api/instances/{instance_id}/wake"),
    ("GET", "/api/instances"),
    ("GET", "/api/instances/{instance_id}"),
    ("GET", "/api/jobs/{job_id}"),
    ("GET", "/api/jobs"),
    ("POST", "/api/jobs/{job_id}/cancel"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/docs"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/api/stream-tokens"),
    ("GET", "/api/events"),
    ("GET", "/api/summary"),
    ("GET", "/"),
]
PUBLIC = {"/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/docs", "/api/docs/assets/{name}", "/"}


class _AnyVast:
    """Stands in for a configured vast.ai client: jobs are queued, never run here, but without one
    wake/pause/resume answer 503 not_configured to everything. The one call a request makes itself,
    hibernate's endpoint check, gets what VastClient.show_instance returns for an id vast.ai does not know
    (its API answers `{"instances": null}` or 404): None."""

    def show_instance(self, instance_id: int) -> None:
        return None


def _seeded_app(tmp_path, database_url: str):  # type: ignore[no-untyped-def]
    """The app with some rows, so that lists return items whose shape the response schemas must match.
    SSH_ALLOWED_NETWORKS is `*` (everything): generated host names are not looked up in DNS, and valid
    requests get as far as the database instead of stopping at the allow-list."""
    store = FakeObjectStore()
    # Event streams end after 0.2 s here: a generated GET /api/events is then read to its end and each
    # event checked against the document.
    app = create_app(
        make_settings(tmp_path, database_url, ssh_allowed_networks=("*",), events_max_stream_s=0.2, events_poll_s=0.05),
        object_store=store,
        vast=_AnyVast(),
        configure_logs=False,
    )
    client = app.test_client()
    snap = add_complete_snapshot(app, store, machine_id="seed-machine")
    created = client.post(
        "/api/gpu-snapshots",
        headers=AUTH,
        json={"instance_id": "4242", "ssh_host": "10.1.2.3", "ssh_port": 22, "workspace_path": "/workspace"},
    ).get_json()
    verify = client.post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH).get_json()
    client.post(f"/api/jobs/{verify['job']['id']}/cancel", headers=AUTH)
    seeds = {"snapshot_id": snap["id"], "job_id": created["job"]["id"], "instance_id": "4242"}
    return app, seeds


@pytest.fixture
def api_schema(tmp_path, database_url):  # type: ignore[no-untyped-def]
    app, _ = _seeded_app(tmp_path, database_url)
    config = schemathesis.Config.from_dict(
        {
            "seed": 20240601,
            "headers": AUTH,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
        }
    )
    yield schemathesis.openapi.from_wsgi("/api/openapi.json", app, headers=AUTH, config=config)
    app.extensions["gpusnap"].engine.dispose()


@pytest.fixture(autouse=True)
def _schemathesis_pytest9_nodeid(request):  # type: ignore[no-untyped-def]
    # schemathesis 4.x's `from_fixture` reads and rewrites `request.node._nodeid`, which pytest 9 no
    # longer has; give it one so that the per-operation subtests run (and are reported under the test).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(suppress_health_check=list(HealthCheck), deadline=None, database=None)
def test_every_operation_conforms_to_the_document(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS)


# ---- the document itself -----------------------------------------------------------------------


@pytest.fixture
def document(tmp_path, sqlite_url) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    app, _ = _seeded_app(tmp_path, sqlite_url)
    doc = app.test_client().get("/api/openapi.json", headers=AUTH).get_json()
    app.extensions["gpusnap"].engine.dispose()
    return doc


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_document_is_well_formed_openapi_3(document):
    assert re.fullmatch(r"3\.[01]\.\d+", document["openapi"])
    assert document["info"]["title"] and document["info"]["version"]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert document["security"] == [{"bearerAuth": []}]
    schemas = document["components"]["schemas"]
    for component in schemas.values():
        jsonschema_rs.meta.validate(component)  # each is a valid JSON Schema (2020-12, as OpenAPI 3.1 uses)
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref

    operation_ids = []
    for path, operations in document["paths"].items():
        assert path.startswith("/")
        templated = re.findall(r"{([^}]+)}", path)
        for method, op in operations.items():
            assert method in ("get", "post", "put", "patch", "delete"), (path, method)
            operation_ids.append(op["operationId"])
            assert op["summary"] and op["tags"]
            assert op["responses"] and all(re.fullmatch(r"[1-5]\d\d", code) for code in op["responses"])
            for code, response in op["responses"].items():
                assert response["description"], (path, method, code)
            params = op.get("parameters", [])
            in_path = [p["name"] for p in params if p["in"] == "path"]
            assert sorted(in_path) == sorted(templated), (path, method)
            assert all(p["required"] for p in params if p["in"] == "path")
            assert all(p["in"] in ("path", "query", "header") and "schema" in p for p in params)
            if path in PUBLIC:
                assert op["security"] == [] and "401" not in op["responses"]
            else:
                assert "security" not in op and "401" in op["responses"]
            if "requestBody" in op:
                assert set(op["requestBody"]["content"]) == {"application/json"}
    assert len(operation_ids) == len(set(operation_ids)), "operationId must be unique"


def test_document_lists_every_contract_route_and_every_route_the_app_serves(tmp_path, sqlite_url, document):
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    app = create_app(make_settings(tmp_path, sqlite_url), configure_logs=False)
    served = {
        (method, re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    app.extensions["gpusnap"].engine.dispose()
    for route in CONTRACT_ROUTES:
        assert route in served, f"contract route {route} is not served"
        assert route in documented, f"contract route {route} is not in the OpenAPI document"
    assert served == documented  # nothing served undocumented, nothing documented unserved


def test_seeded_rows_validate_through_schemathesis_with_real_ids(tmp_path, sqlite_url):
    """Random ids only ever find 404s; these calls reach real rows (a snapshot, a job with progress, a
    machine with its event history) and check the 200 bodies against the document."""
    app, seeds = _seeded_app(tmp_path, sqlite_url)
    loaded = schemathesis.openapi.from_wsgi("/api/openapi.json", app, headers=AUTH)
    calls = [
        ("/api/gpu-snapshots/{snapshot_id}", "GET", {"snapshot_id": seeds["snapshot_id"]}, 200),
        ("/api/jobs/{job_id}", "GET", {"job_id": seeds["job_id"]}, 200),
        ("/api/instances/{instance_id}", "GET", {"instance_id": seeds["instance_id"]}, 200),
        ("/api/jobs/{job_id}/cancel", "POST", {"job_id": seeds["job_id"]}, 202),
        ("/api/jobs/{job_id}/cancel", "POST", {"job_id": seeds["job_id"]}, 202),
    ]
    for path, method, params, status in calls:
        case = loaded[path][method].Case(path_parameters=params)
        response = case.call_and_validate(headers=AUTH, checks=CHECKS[:-1])
        assert response.status_code == status, (path, response.text)
    machine = app.test_client().get(f"/api/instances/{seeds['instance_id']}", headers=AUTH).get_json()
    assert machine["events"], "the machine detail carries its history"
    app.extensions["gpusnap"].engine.dispose()
