"""The boto3 object-store adapter against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib

import pytest

from src.adapters.object_store import ObjectStore, StorageError


@pytest.fixture
def store(s3_server) -> ObjectStore:  # type: ignore[no-untyped-def]
    return ObjectStore(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )


def test_put_head_get_digest_and_missing(store, s3_prefix):
    data = b"x" * 100_000
    store.put_bytes(s3_prefix + "a", data)
    assert store.head(s3_prefix + "a").size == 100_000
    assert store.get_bytes(s3_prefix + "a") == data
    assert store.sha256(s3_prefix + "a") == (100_000, hashlib.sha256(data).hexdigest())
    assert store.head(s3_prefix + "nope") is None
    assert store.get_bytes(s3_prefix + "nope") is None
    assert store.sha256(s3_prefix + "nope") is None


def test_delete_prefix_takes_everything_under_it_and_nothing_beside(store, s3_prefix):
    for i in range(1003):  # more than one DeleteObjects batch
        store.put_bytes(f"{s3_prefix}snap/part-{i:05d}", b"p")
    store.put_bytes(f"{s3_prefix}snapshot-sibling", b"keep")
    assert store.delete_prefix(f"{s3_prefix}snap/") == 1003
    assert list(store.list(f"{s3_prefix}snap/")) == []
    assert store.get_bytes(f"{s3_prefix}snapshot-sibling") == b"keep"
    assert store.delete_prefix(f"{s3_prefix}snap/") == 0  # already gone is fine
    with pytest.raises(ValueError):
        store.delete_prefix(f"{s3_prefix}snap")  # would also match "snapshot-sibling"


def test_wrong_credentials_are_a_clear_error(s3_server, s3_prefix):
    bad = ObjectStore(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        access_key=s3_server.access_key,
        secret_key="Zq9-not-the-secret",
        region=s3_server.region,
    )
    with pytest.raises(StorageError) as caught:
        bad.head(s3_prefix + "a")
    assert caught.value.code == "storage_auth_failed"
    assert "Zq9-not-the-secret" not in caught.value.message
