"""The application factory. The API process and the worker both build their world here; nothing
connects to anything at import time."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from src.container import Container
from src.db import make_engine, make_session_factory
from src.logging_setup import configure_logging
from src.metrics import Metrics
from src.services import events
from src.services.tokens import TokenVerifier
from src.settings import Settings

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    job_kinds: dict[str, Any] | None = None,
    object_store: Any = None,
    ssh: Any = None,
    vast: Any = None,
    huey: Any = None,
    configure_logs: bool = True,
) -> Flask:
    """Build the Flask app and its `Container` (at `app.extensions["gpusnap"]`).

    `job_kinds` replaces the registry of job kinds (tests add kinds of their own); `object_store`, `ssh`,
    `vast` and `huey` replace the adapters and queue that `settings` would build."""
    from src.api import register_api
    from src.jobs.kinds import default_kinds
    from src.jobs.queue import JobQueue, make_huey

    settings = settings or Settings.from_env()
    if configure_logs:
        configure_logging(level=settings.log_level, fmt=settings.log_format)
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    events.install(session_factory)  # job and machine changes feed GET /api/events
    container = Container(
        settings=settings,
        engine=engine,
        session_factory=session_factory,
        metrics=Metrics(session_factory),
        job_kinds=job_kinds if job_kinds is not None else default_kinds(),
        object_store_override=object_store,
        ssh_override=ssh,
        vast_override=vast,
    )
    container.queue = JobQueue(container, huey if huey is not None else make_huey(settings))
    if settings.ssh_allowed_networks == ("*",):
        logger.warning(
            "SSH_ALLOWED_NETWORKS is '*': jobs may SSH to any host a request names, "
            "loopback, private networks and cloud metadata addresses included"
        )
    elif not settings.ssh_allowed_networks:
        logger.info("SSH_ALLOWED_NETWORKS is unset: jobs may SSH to public unicast addresses only")

    if settings.object_store_configured:
        from src.adapters.host_credentials import describe

        hosts_get = describe(settings)
        (logger.info if hosts_get.startswith("scoped") else logger.warning)("host credentials: %s", hosts_get)

    app = Flask("gpusnap", static_folder=None)  # no /static route: the API serves only what it documents
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["gpusnap"] = container
    app.extensions["gpusnap.tokens"] = TokenVerifier(session_factory, settings.api_tokens)
    register_api(app)
    return app
