"""The status page in a real headless Chromium, when its event stream cannot be had for a while: a job
that finished then must not stay `queued` on the page once the stream is back. A stream opened without a
resume point starts with the next event, so the page must read the state again when it opens one."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import requests
from werkzeug.serving import WSGIRequestHandler, make_server

from src.app import create_app
from src.db import transaction
from src.services import jobs as job_service
from tests.support.cdp import Browser
from tests.support.fixtures_app import AUTH, TOKEN, make_settings, run_jobs
from tests.support.test_kinds import make_kinds

pytestmark = pytest.mark.slow


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: object, **kwargs: object) -> None:
        pass


@pytest.fixture
def served(tmp_path, sqlite_url) -> Iterator[tuple[object, str]]:  # type: ignore[no-untyped-def]
    app = create_app(
        make_settings(tmp_path, sqlite_url, events_poll_s=0.05, events_heartbeat_s=0.3, events_max_streams=1),
        job_kinds=make_kinds(),
        configure_logs=False,
    )
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)
    app.extensions["gpusnap"].engine.dispose()


def test_a_job_that_finished_while_the_page_had_no_stream_shows_finished(served, tmp_path):
    app, url = served
    c = app.extensions["gpusnap"]  # type: ignore[attr-defined]
    with transaction(c.session_factory) as s:
        job_id = job_service.add_job(
            s, kind="sleep", params={"seconds": 0.1}, lock_key="machine:pg-1", machine_id="pg-1"
        ).id
    c.queue.enqueue(job_id)
    # Someone else holds the only stream: the page's tries get 503 and it keeps retrying.
    held = requests.get(f"{url}/api/events", headers=AUTH, stream=True, timeout=30)
    assert held.status_code == 200
    browser = Browser(tmp_path / "profile", tmp_path / "chromium.log")
    row = f"document.querySelector('#jobs tr[data-job-id=\"{job_id}\"]')"
    try:
        browser.navigate(url + "/")
        browser.wait_for("document.readyState === 'complete'")
        browser.evaluate(
            f"document.getElementById('token-input').value = {json.dumps(TOKEN)};"
            "document.getElementById('token-form').requestSubmit(); true"
        )
        browser.wait_for(f"{row} && {row}.dataset.status === 'queued'")
        assert browser.evaluate("document.getElementById('live').textContent") != "(live)"
        assert run_jobs(app) == 1  # the job runs and ends while the page has no stream
        held.close()
        browser.wait_for("document.getElementById('live').textContent === '(live)'", timeout=60)
        browser.wait_for(f"{row}.dataset.status === 'succeeded'", timeout=20)
    finally:
        browser.close()
        held.close()
