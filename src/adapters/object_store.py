"""The object store (Cloudflare R2 or any S3 endpoint) as the control plane sees it, through boto3: read
manifests, check parts, delete snapshots. Moving workspace bytes is the remote scripts' job (s5cmd)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from src.errors import ExternalError

logger = logging.getLogger(__name__)
T = TypeVar("T")
# botocore retries a failed request, but not a body cut short after the headers came (a reset mid-GET):
# that surfaces while reading, as IncompleteReadError / ResponseStreamingError. A whole GET is tried
# this many times, with backoff, before its failure is reported (as a retryable StorageError).
READ_TRIES = 4
READ_BACKOFF_S = 0.5


# What R2 / S3 answer for a key or signature they refuse. R2 says `Unauthorized` with HTTP 401 for a bad key
# (its S3 error-code reference; seen in the field as `An error occurred (401) ... Unauthorized`), S3 says 403.
AUTH_ERROR_CODES = frozenset(
    {
        "Unauthorized",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "Forbidden",
        "401",
        "403",
    }
)


class StorageError(ExternalError):
    code = "storage_error"


class ObjectTooLarge(StorageError):
    """An object is larger than the caller agreed to hold in memory (`get_bytes(max_bytes=)`)."""

    code = "object_too_large"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    last_modified: dt.datetime | None = None  # from a listing (gc's grace period); None when not known


class ObjectStore:
    """Operations on one bucket. Methods raise `StorageError` (code `storage_error`, or
    `storage_auth_failed` for rejected credentials); a missing object is a None/False answer, not an error."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "auto",
        connect_timeout_s: float = 10,
        read_timeout_s: float = 60,
    ) -> None:
        self.bucket = bucket
        self._s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"},
                **_checksum_options(),
            ),
        )

    def head(self, key: str) -> ObjectInfo | None:
        """Size and user metadata of `key`, or None when it does not exist."""
        try:
            r = self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _status(e) == 404:
                return None
            raise _wrap(e, f"HEAD {key}") from e
        except BotoCoreError as e:
            raise _wrap(e, f"HEAD {key}") from e
        return ObjectInfo(key=key, size=int(r["ContentLength"]), metadata=dict(r.get("Metadata") or {}))

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        """The whole object, or None when it does not exist. With `max_bytes`, an object announced
        (Content-Length) or found (at most max_bytes + 1 bytes are read) to be larger raises
        `ObjectTooLarge` and is never held in memory whole: the bucket is not ours to trust."""
        if max_bytes is None:
            return self._read(key, lambda body: body.read())

        def capped(response: dict[str, Any]) -> bytes:
            body = response["Body"]
            try:
                announced = int(response.get("ContentLength", -1))
                if announced > max_bytes:
                    raise ObjectTooLarge(f"{key} is {announced} bytes; at most {max_bytes} are read")
                data = body.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ObjectTooLarge(f"{key} is larger than {max_bytes} bytes")
                return data
            finally:
                body.close()

        return self._read_response(key, capped)

    def sha256(self, key: str, *, chunk_size: int = 8 << 20) -> tuple[int, str] | None:
        """Stream `key` and return (size, hex SHA-256), or None when it does not exist. Memory stays at
        one chunk whatever the object's size."""

        def digest_of(body: Any) -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            for chunk in body.iter_chunks(chunk_size):
                digest.update(chunk)
                size += len(chunk)
            return size, digest.hexdigest()

        return self._read(key, digest_of)

    def _read(self, key: str, consume: Callable[[Any], T]) -> T | None:
        """GET `key` and hand its body to `consume`; None when the object does not exist."""
        return self._read_response(key, lambda response: consume(response["Body"]))

    def _read_response(self, key: str, consume: Callable[[dict[str, Any]], T]) -> T | None:
        """GET `key` and hand the whole response to `consume`; None when the object does not exist. A body
        that breaks off (botocore checks it against Content-Length) or another retryable failure is read
        again from the start, READ_TRIES times in all."""
        for attempt in range(1, READ_TRIES + 1):
            try:
                return self._read_once(key, consume)
            except StorageError as e:
                if not e.retryable or attempt == READ_TRIES:
                    raise
                logger.warning(
                    "GET %s failed (try %d of %d), reading it again: %s", key, attempt, READ_TRIES, e.message
                )
                time.sleep(READ_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _read_once(self, key: str, consume: Callable[[dict[str, Any]], T]) -> T | None:
        try:
            return consume(self._s3.get_object(Bucket=self.bucket, Key=key))
        except ClientError as e:
            if _status(e) == 404 or e.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise _wrap(e, f"GET {key}") from e
        except BotoCoreError as e:
            raise _wrap(e, f"GET {key}") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` as `key`, replacing any object there. Idempotent."""
        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as e:
            raise _wrap(e, f"PUT {key}") from e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix` (all pages)."""
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=obj["Key"], size=int(obj["Size"]), last_modified=obj.get("LastModified"))
        except (ClientError, BotoCoreError) as e:
            raise _wrap(e, f"LIST {prefix}") from e

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many. Idempotent: nothing there is success."""
        if not prefix.endswith("/"):
            raise ValueError("delete_prefix needs a prefix ending in '/' so it cannot match a sibling")
        return self.delete_keys([o.key for o in self.list(prefix)])

    def delete_keys(self, keys: Sequence[str]) -> int:
        """Delete `keys`; absent ones count as deleted. Returns len(keys)."""
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                r = self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except (ClientError, BotoCoreError) as e:
                raise _wrap(e, f"DELETE {batch[0]['Key']}") from e
            if r.get("Errors"):
                first = r["Errors"][0]
                raise StorageError(f"could not delete {first.get('Key')}: {first.get('Message')}", retryable=True)
        return len(keys)

    def ping(self) -> None:
        """Raise StorageError when the bucket cannot be reached with these credentials."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise _wrap(e, f"HEAD bucket {self.bucket}") from e


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _checksum_options() -> dict[str, str]:
    """botocore >= 1.36 adds CRC checksums to every upload and validates them on download by default;
    R2 has refused those headers in the field. `when_required` sends and checks them only where the
    S3 API requires it. Older botocore (boto3 >= 1.34 is allowed) has neither option nor the new default."""
    if "request_checksum_calculation" not in getattr(Config, "OPTION_DEFAULTS", {}):
        return {}
    return {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}


def _wrap(e: Exception, what: str) -> StorageError:
    if isinstance(e, ClientError):
        status = _status(e)
        code = e.response.get("Error", {}).get("Code", "")
        if status in (401, 403) or code in AUTH_ERROR_CODES:
            return StorageError(
                f"{what}: the object store refused our credentials ({code})", code="storage_auth_failed"
            )
        return StorageError(
            f"{what}: the object store answered HTTP {status} ({code or 'no error code'})",
            retryable=status >= 500 or status == 429,
        )
    return StorageError(f"{what}: {type(e).__name__}: {e}", retryable=True)
