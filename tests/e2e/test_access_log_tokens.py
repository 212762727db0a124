"""gunicorn's access log (`gunicorn.conf.py`, as `make run` and the Docker image serve the API) must not
keep tokens that travel in URLs: the stream token of `GET /api/events?token=`, or an API token that a
careless dashboard put there. The log goes to stdout, and from there to whoever reads the logs."""

from __future__ import annotations

import time

import requests

from tests.support.gunicorn_server import gunicorn_server


def test_tokens_in_urls_are_not_written_to_the_access_log(tmp_path):
    with gunicorn_server(tmp_path, EVENTS_MAX_STREAMS="1", GUNICORN_THREADS="2") as server:
        secrets = ["gst_Stre4mTokenSecretValue", "gpusnap_ApiTokenPutInTheUrl"]
        for secret in secrets:
            r = requests.get(f"{server.url}/api/events", params={"machine_id": "m-1", "token": secret}, timeout=30)
            assert r.status_code == 401
        deadline = time.monotonic() + 30
        while server.log().count("/api/events") < len(secrets):  # access lines follow the answer
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.1)
        text = server.log()
        assert not [s for s in secrets if s in text], text[-3000:]
        assert "machine_id=m-1" in text  # the rest of the request line stays
