"""`@route`: registers a Flask view with its request/response models. It parses and validates the body
and query string before the view runs, and records what the OpenAPI document needs."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, request
from pydantic import BaseModel, ValidationError

from src.errors import InvalidRequest, NotFound, Unprocessable


class ValidationFailed(Unprocessable):
    code = "validation_error"

    def __init__(self, error: ValidationError, model: type[BaseModel] | None = None) -> None:
        details = [{"loc": list(e["loc"]), "msg": _readable(e, model), "type": e["type"]} for e in error.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"]) or "body"
        super().__init__(f"{where}: {first['msg']}")
        self.details = details


@dataclass
class RouteSpec:
    method: str
    rule: str
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    body_optional: bool = False
    query: type[BaseModel] | None = None
    responses: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    public: bool = False
    idempotent_key: bool = False
    path_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    content_type: str = "application/json"  # of the 2xx answer (`text/event-stream`, `text/html`)
    stream_token: bool = False  # also accepts a stream token as `?token=` (GET /api/events only)


def route(
    bp: Blueprint,
    rule: str,
    method: str,
    *,
    summary: str,
    tag: str,
    body: type[BaseModel] | None = None,
    body_optional: bool = False,
    query: type[BaseModel] | None = None,
    responses: dict[int, type[BaseModel] | None],
    public: bool = False,
    idempotency: bool = False,
    path_params: dict[str, dict[str, Any]] | None = None,
    description: str = "",
    content_type: str = "application/json",
    stream_token: bool = False,
) -> Callable:
    """Register `view` on `bp`. The view receives path parameters plus `body=` / `query=` (validated
    models) and `idempotency_key=` when declared. Deny by default: only `public=True` skips auth."""

    spec = RouteSpec(
        method=method,
        rule=rule,
        summary=summary,
        tag=tag,
        body=body,
        body_optional=body_optional,
        query=query,
        responses=responses,
        public=public,
        idempotent_key=idempotency,
        path_params=path_params or {},
        description=description,
        content_type=content_type,
        stream_token=stream_token,
    )

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(**path: Any) -> Any:
            for name, value in path.items():
                check_path_param(name, value, spec.path_params.get(name))
            kwargs: dict[str, Any] = dict(path)
            if body is not None:
                kwargs["body"] = parse_body(body)
            if query is not None:
                kwargs["query"] = parse_query(query)
            if idempotency:
                kwargs["idempotency_key"] = request.headers.get("Idempotency-Key")
            return view(**kwargs)

        wrapper.gpusnap_route = spec  # type: ignore[attr-defined]
        bp.add_url_rule(rule, endpoint=view.__name__, view_func=wrapper, methods=[method])
        return wrapper

    return decorate


def check_path_param(name: str, value: str, schema: dict[str, Any] | None) -> None:
    """An id of a form no id has (too long, a control character) is not found, without asking the
    database: PostgreSQL answers a NUL in a string with an error, not with "no such row"."""
    if schema is None:
        return
    too_long = len(value) > schema.get("maxLength", len(value))
    if too_long or ("pattern" in schema and re.search(schema["pattern"], value) is None):
        raise NotFound(f"no {name.removesuffix('_id')} has an id of that form")


def request_json() -> Any:
    """The body as JSON; an empty body is `{}` (so POSTs whose fields are all optional need none)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # `[[[[...` a few thousand deep: the parser runs out of stack
        raise InvalidRequest(
            f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", code="malformed_json"
        ) from None
    if _depth_exceeds(data, MAX_JSON_DEPTH):  # no body we accept nests deeper; models must not recurse on it
        raise InvalidRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", code="malformed_json")
    return data


MAX_JSON_DEPTH = 32


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether `data` nests containers deeper than `limit` (iterative: never recurses itself)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def parse_body(model: type[BaseModel]) -> BaseModel:
    data = request_json()
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValidationFailed(e, model) from None


def parse_query(model: type[BaseModel]) -> BaseModel:
    args: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        if len(values) > 1:
            raise InvalidRequest(f"query parameter {key!r} given more than once", code="invalid_query")
        args[key] = values[0]
    try:
        # Query strings are text: let pydantic coerce "50" to 50 (lax mode), but never accept unknown keys.
        return model.model_validate(args)
    except ValidationError as e:
        failed = ValidationFailed(e, model)
        raise InvalidRequest(failed.message, code="invalid_query") from None


def _readable(error: Any, model: type[BaseModel] | None) -> str:
    """Pydantic's messages, except that a regex is no message for a person: say what the field wants."""
    if error["type"] != "string_pattern_mismatch":
        return error["msg"]
    field_info = model.model_fields.get(str(error["loc"][0])) if model and error["loc"] else None
    wanted = field_info.description if field_info and field_info.description else None
    return f"has an invalid form{': ' + wanted if wanted else ''}"
