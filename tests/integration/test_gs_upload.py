"""The long-lived `s5cmd run` uploader of the snapshot script, against SeaweedFS."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_common import Context, Events, ScriptError  # noqa: E402
from gs_s3 import S5  # noqa: E402
from gs_upload import BatchUploader  # noqa: E402

from tests.support.s3_server import s5cmd_binary  # noqa: E402


@pytest.fixture
def s5(s3_server):  # type: ignore[no-untyped-def]
    devnull = os.open(os.devnull, os.O_WRONLY)
    yield S5(Context(Events(fd=devnull)), s3_server.script_s3(), s5cmd_binary())
    os.close(devnull)


def test_parts_arrive_complete_with_their_metadata(s5, s3_prefix):
    with BatchUploader(s5, workers=2) as batch:
        for i in range(5):
            batch.put(f"{s3_prefix}part-{i:05d}", os.urandom(100_000 + i), {"sha256": f"{i:064x}", "codec": "none"})
        batch.put(f"{s3_prefix}needs quoting", b"odd key", {"sha256": "0" * 64})  # falls back to one cp
    listed = s5.list(s3_prefix)
    assert listed[f"{s3_prefix}part-00003"] == 100_003
    assert s5.head(f"{s3_prefix}part-00002")["metadata"]["sha256"] == f"{2:064x}"
    assert listed[f"{s3_prefix}needs quoting"] == 7


def test_a_dead_s5cmd_fails_the_upload_instead_of_hanging(s5, s3_prefix):
    batch = BatchUploader(s5, workers=2)
    batch.put(f"{s3_prefix}part-00000", b"first", {"codec": "none"})
    batch._proc.kill()
    started = time.monotonic()
    with pytest.raises(ScriptError) as caught:
        batch.put(f"{s3_prefix}part-00001", b"second", {"codec": "none"})
    assert caught.value.code == "upload_failed"
    assert time.monotonic() - started < 10
    batch.close()
    assert f"{s3_prefix}part-00001" not in s5.list(s3_prefix)


def test_refused_credentials_are_reported_as_such(s3_server, s3_prefix):
    creds = s3_server.script_s3(secret_key="not-the-secret")
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with BatchUploader(S5(Context(Events(fd=devnull)), creds, s5cmd_binary()), workers=1) as batch:
            with pytest.raises(ScriptError) as caught:
                batch.put(f"{s3_prefix}part-00000", b"x", {"codec": "none"})
        assert caught.value.code == "storage_auth_failed"
    finally:
        os.close(devnull)
