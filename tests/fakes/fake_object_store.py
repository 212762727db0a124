"""An in-memory object store with the same interface as `src.adapters.object_store.ObjectStore`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from src.adapters.object_store import ObjectInfo, ObjectTooLarge, StorageError


class FakeObjectStore:
    def __init__(self, bucket: str = "fake-bucket") -> None:
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.unreachable = False  # every call raises a retryable StorageError while True
        self.fail_calls = 0  # the next this many calls raise a retryable StorageError (a 503 burst)
        self.calls: list[tuple[str, str]] = []

    def _call(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        if self.unreachable:
            raise StorageError(f"{op} {key}: connection refused", retryable=True)
        if self.fail_calls > 0:
            self.fail_calls -= 1
            raise StorageError(f"{op} {key}: the object store answered HTTP 503 (SlowDown)", retryable=True)

    def head(self, key: str) -> ObjectInfo | None:
        self._call("head", key)
        data = self.objects.get(key)
        return None if data is None else ObjectInfo(key=key, size=len(data), metadata=self.metadata.get(key, {}))

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        """As `ObjectStore.get_bytes`: an object over `max_bytes` raises `ObjectTooLarge`."""
        self._call("get", key)
        data = self.objects.get(key)
        if data is not None and max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"{key} is {len(data)} bytes; at most {max_bytes} are read")
        return data

    def sha256(self, key: str) -> tuple[int, str] | None:
        self._call("get", key)
        data = self.objects.get(key)
        return None if data is None else (len(data), hashlib.sha256(data).hexdigest())

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("put", key)
        self.objects[key] = data

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._call("list", prefix)
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key=key, size=len(self.objects[key]))

    def delete_keys(self, keys: list[str]) -> int:
        for key in keys:
            self._call("delete", key)
            self.objects.pop(key, None)
        return len(keys)

    def delete_prefix(self, prefix: str) -> int:
        return self.delete_keys([o.key for o in self.list(prefix)])

    def ping(self) -> None:
        self._call("ping", "")
