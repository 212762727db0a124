"""The OpenAPI 3 document, generated from the `@route` registry and the pydantic models, and the
Swagger UI page that renders it (its assets are served by this app: nothing is fetched from elsewhere)."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from src.api.routing import RouteSpec
from src.api.schemas import ErrorResponse

_ERRORS = {
    400: "Malformed request (invalid JSON, bad query parameter or header)",
    401: "Missing or invalid bearer token",
    404: "Not found",
    409: "Another operation holds this machine, or the Idempotency-Key was used for another request",
    413: "Request body too large",
    422: "Request body failed validation",
    503: "A dependency (database, job queue, a configured service) is not available",
}


def route_specs(app: Flask) -> list[tuple[str, RouteSpec]]:
    specs = []
    for rule in app.url_map.iter_rules():
        spec = getattr(app.view_functions.get(rule.endpoint), "gpusnap_route", None)
        if spec is not None:
            specs.append((re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), spec))
    return sorted(specs, key=lambda item: (item[0], item[1].method))


def build_openapi(app: Flask, *, version: str) -> dict[str, Any]:
    specs = route_specs(app)
    keyed: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorResponse, "serialization")]
    for _, spec in specs:
        if spec.body is not None:
            keyed.append((spec.body, "validation"))
        keyed += [(m, "serialization") for m in spec.responses.values() if m is not None]
    refs, defs = models_json_schema(list(dict.fromkeys(keyed)), ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for path, spec in specs:
        paths.setdefault(path, {})[spec.method.lower()] = _operation(path, spec, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpusnap",
            "version": version,
            "description": "Hibernate and wake vast.ai GPU machines; snapshot workspaces to S3/R2.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }


def _operation(path: str, spec: RouteSpec, refs: dict[Any, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": spec.summary,
        "tags": [spec.tag],
        "operationId": f"{spec.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_') or 'root'}",
    }
    if spec.description:
        op["description"] = spec.description
    params: list[dict[str, Any]] = []
    for name in re.findall(r"{([^}]+)}", path):
        schema = spec.path_params.get(name, {"type": "string", "minLength": 1, "maxLength": 128})
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    if spec.query is not None:
        qs = spec.query.model_json_schema()
        required = set(qs.get("required", []))
        for name, schema in qs.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": name in required, "schema": _not_null(schema)})
    if spec.idempotent_key:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Same key and body: the same job is returned instead of a new one",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
            }
        )
    if params:
        op["parameters"] = params
    if spec.body is not None:
        op["requestBody"] = {
            "required": not spec.body_optional,
            "content": {"application/json": {"schema": refs[(spec.body, "validation")]}},
        }
    responses: dict[str, Any] = {}
    for status, model in spec.responses.items():
        entry: dict[str, Any] = {"description": "OK" if status < 300 else _ERRORS.get(status, "")}
        if model is not None and status < 300 and spec.content_type == "text/event-stream":
            entry["content"] = {spec.content_type: {"schema": _sse_event(refs[(model, "serialization")])}}
        elif model is not None:
            media = spec.content_type if status < 300 else "application/json"
            entry["content"] = {media: {"schema": refs[(model, "serialization")]}}
        elif status < 300 and spec.content_type != "application/json":
            entry["content"] = {spec.content_type: {"schema": {"type": "string"}}}
        if status == 202:
            entry["headers"] = {"Location": {"schema": {"type": "string"}, "description": "The job to poll"}}
        responses[str(status)] = entry
    error_schema = {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}}
    wanted = [400]
    if not spec.public:
        wanted.append(401)
    if "{" in path:
        wanted.append(404)
    if spec.body is not None:
        wanted += [409, 413, 422] if spec.method != "GET" else []
    elif spec.method in ("POST", "DELETE"):
        wanted.append(409)
    for status in wanted:
        responses.setdefault(str(status), {"description": _ERRORS[status], "content": error_schema})
    op["responses"] = responses
    if spec.public:
        op["security"] = []
    return op


def _sse_event(data_schema: dict[str, Any]) -> dict[str, Any]:
    """One event of a `text/event-stream` answer, as its fields: `id`, `event` and `data`, the last a line of
    JSON whose schema is `data_schema`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "event": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data_schema},
        },
    }


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: drop pydantic's `null` branch of Optional fields."""
    if "anyOf" in schema:
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            merged = {k: v for k, v in schema.items() if k != "anyOf"}
            merged.update(branches[0])
            merged.pop("default", None) if merged.get("default") is None else None
            return merged
    return schema


def render_docs(doc: dict[str, Any], *, assets: str = "/api/docs/assets") -> str:
    """Swagger UI (its files ship in the `flask-swagger-ui` package and are served from `assets`: the page
    works offline, nothing is fetched from a CDN) reading /api/openapi.json. The bearer scheme of the
    document gives it an "Authorize" button; the token is kept only in the page. A `<noscript>` table of
    the endpoints, built on the server from the same document, is there for readers without JavaScript."""
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = ", ".join(sorted(op["responses"]))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op['summary'])}</td><td>{codes}</td></tr>"
            )
    # validatorUrl null: Swagger UI would otherwise send the document to validator.swagger.io.
    config = {
        "url": "/api/openapi.json",
        "dom_id": "#swagger-ui",
        "deepLinking": True,
        "validatorUrl": None,
        "persistAuthorization": False,
        "tryItOutEnabled": False,
        "displayRequestDuration": True,
    }
    title = f"gpusnap API {html.escape(doc['info']['version'])}"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title>"
        f"<link rel='stylesheet' href='{assets}/swagger-ui.css'>"
        f"<link rel='stylesheet' href='{assets}/index.css'>"
        f"<link rel='icon' type='image/png' href='{assets}/favicon-32x32.png' sizes='32x32'>"
        "</head><body><div id='swagger-ui'></div>"
        f"<noscript><h1>{title}</h1><p>Machine-readable: <a href='/api/openapi.json'>/api/openapi.json</a>. "
        "Send <code>Authorization: Bearer &lt;token&gt;</code> on every call but the public ones.</p>"
        f"<table><tr><th>method</th><th>path</th><th>what</th><th>answers</th></tr>{''.join(rows)}</table>"
        "</noscript>"
        f"<script src='{assets}/swagger-ui-bundle.js'></script>"
        f"<script src='{assets}/swagger-ui-standalone-preset.js'></script>"
        f"<script>window.ui = SwaggerUIBundle(Object.assign({json.dumps(config)}, "
        "{presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: 'StandaloneLayout'}));"
        "</script></body></html>"
    )
