"""A client that opens `GET /api/events` and stops reading (a frozen tab, a hostile script) must not hold
its stream slot and server thread for ever: once the socket buffers are full, gunicorn's blocking write
would wait as long as the peer keeps the TCP connection, and EVENTS_MAX_STREAM_S is only looked at
between writes."""

from __future__ import annotations

import socket
import time

import requests
import sqlalchemy as sa

from tests.support.fixtures_app import TOKEN
from tests.support.gunicorn_server import gunicorn_server


def test_a_reader_that_stops_reading_gives_its_stream_slot_back(tmp_path):
    with gunicorn_server(
        tmp_path,
        API_TOKENS=TOKEN,
        EVENTS_MAX_STREAMS="1",
        EVENTS_HEARTBEAT_S="1",
        EVENTS_MAX_STREAM_S="5",
        EVENTS_POLL_S="0.05",
    ) as server:
        host, port = server.url.removeprefix("http://").split(":")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        stalled.sendall(
            f"GET /api/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        assert b" 200 " in stalled.recv(64)  # open; from now on it reads nothing
        try:
            engine = sa.create_engine(server.database_url)
            payload = "x" * 65536
            with engine.begin() as conn:  # ~25 MB of events: more than every buffer between the two
                conn.execute(
                    sa.text(
                        "INSERT INTO events (kind, machine_id, data, created_at) "
                        "VALUES ('machine.event', 'm-1', :data, CURRENT_TIMESTAMP)"
                    ),
                    [{"data": f'{{"event": {{"message": "{payload}"}}}}'} for _ in range(400)],
                )
            engine.dispose()
            deadline = time.monotonic() + 60
            while True:
                r = requests.get(
                    f"{server.url}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}, stream=True, timeout=30
                )
                r.close()
                if r.status_code == 200:
                    break
                assert r.status_code == 503, r.text
                assert time.monotonic() < deadline, "the stalled reader still holds the only stream slot"
                time.sleep(1)
        finally:
            stalled.close()
