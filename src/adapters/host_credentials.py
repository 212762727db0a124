"""Credentials handed to a GPU host for one job: scoped to that job's prefix, read-only where the job only
reads, and expiring after the job's deadline. A rented host is run by someone else; with the bucket's
own key pair it could read, overwrite or delete every machine's snapshots, including the only copy of a
hibernated workspace. The control plane keeps the parent key and never sends it to a host that a broker
below can serve.

Three brokers, chosen from settings by `broker_from_settings`:
- `CloudflareR2Broker`: Cloudflare's R2 temporary-access-credentials API
  (POST /accounts/{account_id}/r2/temp-access-credentials; developers.cloudflare.com/api/resources/r2/
  subresources/temporary_credentials/methods/create/): parent access key, bucket, prefixes, permission
  `object-read-only` or `object-read-write`, ttlSeconds (at most 604800); it answers
  `{"result": {"accessKeyId", "secretAccessKey", "sessionToken"}, "success", "errors", "messages"}`.
- `StsBroker`: STS `AssumeRole` with an inline session policy (AWS STS API reference, AssumeRole:
  DurationSeconds 900..43200, Policy at most 2048 packed characters), for S3 stores that serve STS.
- `ParentKeyBroker`: neither configured. The parent keys go to the host, as before this module existed;
  the app says so loudly at start and in `/readyz`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests

from src.errors import ExternalError

logger = logging.getLogger(__name__)

R2_MAX_TTL_S = 604_800
STS_MIN_TTL_S, STS_MAX_TTL_S = 900, 43_200
STS_MAX_POLICY_CHARS = 2048


class CredentialsUnavailable(ExternalError):
    """Scoped credentials could not be minted. No job falls back to the parent key on its own: that
    would quietly undo the protection, so the job fails with this code instead."""

    code = "credentials_unavailable"


@dataclass(frozen=True)
class HostCredentials:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    scoped: bool = True
    source: str = "parent"  # cloudflare-r2 | sts | parent

    def s3_fields(self) -> dict[str, str]:
        """The credential fields of a remote script's `s3` object."""
        fields = {"access_key": self.access_key, "secret_key": self.secret_key}
        if self.session_token:
            fields["session_token"] = self.session_token
        return fields


class CredentialBroker(Protocol):
    source: str
    scoped: bool

    def for_prefix(self, prefix: str, *, write: bool, ttl_s: int) -> HostCredentials:
        """Credentials that reach only keys under `prefix` of the bucket, read-only unless `write`, valid
        for at least `ttl_s` seconds (clamped to what the provider allows). Raises CredentialsUnavailable."""
        ...


def _require_prefix(prefix: str) -> None:
    # An empty or root-like prefix would scope the credentials to the whole bucket, and a wildcard or
    # `..` could widen it: never what a job means.
    segments = prefix.split("/")[:-1]
    if (
        not prefix.endswith("/")
        or not segments
        or any(seg in ("", ".", "..") for seg in segments)
        or any(c in prefix for c in "*?[]")
    ):
        raise CredentialsUnavailable(
            f"refusing to mint credentials for prefix {prefix!r}: it must be a "
            "key prefix of plain segments ending in '/'"
        )


@dataclass
class ParentKeyBroker:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    source: str = "parent"
    scoped: bool = False

    def for_prefix(self, prefix: str, *, write: bool, ttl_s: int) -> HostCredentials:
        return HostCredentials(self.access_key, self.secret_key, None, scoped=False, source="parent")


@dataclass
class CloudflareR2Broker:
    account_id: str
    api_token: str = field(repr=False)
    bucket: str
    parent_access_key: str = field(repr=False)
    api_url: str = "https://api.cloudflare.com/client/v4"
    timeout_s: float = 15.0
    source: str = "cloudflare-r2"
    scoped: bool = True

    def for_prefix(self, prefix: str, *, write: bool, ttl_s: int) -> HostCredentials:
        _require_prefix(prefix)
        body = {
            "bucket": self.bucket,
            "parentAccessKeyId": self.parent_access_key,
            "permission": "object-read-write" if write else "object-read-only",
            "ttlSeconds": max(1, min(int(ttl_s), R2_MAX_TTL_S)),
            "prefixes": [prefix],
        }
        url = f"{self.api_url.rstrip('/')}/accounts/{self.account_id}/r2/temp-access-credentials"
        try:
            r = requests.post(
                url, json=body, timeout=self.timeout_s, headers={"Authorization": f"Bearer {self.api_token}"}
            )
        except requests.RequestException as e:
            raise CredentialsUnavailable(f"Cloudflare API unreachable: {type(e).__name__}", retryable=True) from e
        try:
            payload: Any = r.json()
        except ValueError:
            payload = None
        if r.status_code != 200 or not isinstance(payload, dict) or not payload.get("success"):
            raise CredentialsUnavailable(
                f"Cloudflare refused temporary credentials: HTTP {r.status_code} "
                f"{_cloudflare_errors(payload)} (check CLOUDFLARE_ACCOUNT_ID, "
                "CLOUDFLARE_API_TOKEN and R2_ACCESS_KEY)",
                retryable=r.status_code == 429 or r.status_code >= 500,
            )
        result = payload.get("result") or {}
        creds = [result.get(k) for k in ("accessKeyId", "secretAccessKey", "sessionToken")]
        access_key, secret_key, session_token = creds
        if not (
            isinstance(access_key, str)
            and isinstance(secret_key, str)
            and isinstance(session_token, str)
            and access_key
            and secret_key
            and session_token
        ):
            raise CredentialsUnavailable("Cloudflare answered success without a full credential set")
        return HostCredentials(access_key, secret_key, session_token, scoped=True, source=self.source)


def _cloudflare_errors(payload: Any) -> str:
    if not isinstance(payload, dict):
        return "(no JSON body)"
    errors = payload.get("errors") or []
    return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)) or "(no error)"


@dataclass
class StsBroker:
    endpoint: str | None
    role_arn: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    source: str = "sts"
    scoped: bool = True

    def for_prefix(self, prefix: str, *, write: bool, ttl_s: int) -> HostCredentials:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        _require_prefix(prefix)
        policy = json.dumps(session_policy(self.bucket, prefix, write=write), separators=(",", ":"))
        if len(policy) > STS_MAX_POLICY_CHARS:
            raise CredentialsUnavailable(
                f"the session policy for {prefix!r} exceeds STS's {STS_MAX_POLICY_CHARS} characters"
            )
        sts = boto3.client(
            "sts",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=30),
        )
        try:
            r = sts.assume_role(
                RoleArn=self.role_arn,
                RoleSessionName="gpusnap-job",
                Policy=policy,
                DurationSeconds=max(STS_MIN_TTL_S, min(int(ttl_s), STS_MAX_TTL_S)),
            )
        except ClientError as e:
            err = e.response.get("Error", {})
            raise CredentialsUnavailable(
                f"STS AssumeRole refused: {err.get('Code')}: {err.get('Message')} (check STS_ROLE_ARN and STS_ENDPOINT)"
            ) from e
        except BotoCoreError as e:
            raise CredentialsUnavailable(f"STS unreachable: {type(e).__name__}", retryable=True) from e
        c = r["Credentials"]
        return HostCredentials(
            c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], scoped=True, source=self.source
        )


def session_policy(bucket: str, prefix: str, *, write: bool) -> dict[str, Any]:
    """An IAM session policy that reaches only `prefix` of `bucket` (listing included, restricted to the
    prefix). The session's rights are the intersection of the role's and these."""
    actions = ["s3:GetObject"]
    if write:
        actions += ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": actions, "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"]},
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
            },
        ],
    }


def broker_from_settings(s: Any) -> CredentialBroker:
    """Cloudflare R2 when its account and API token are set, else STS when a role is set, else the parent
    key (loudly: see `describe`)."""
    if s.cloudflare_account_id and s.cloudflare_api_token:
        return CloudflareR2Broker(
            account_id=s.cloudflare_account_id,
            api_token=s.cloudflare_api_token,
            bucket=s.r2_bucket,
            parent_access_key=s.r2_access_key,
            api_url=s.cloudflare_api_url,
        )
    if s.sts_role_arn:
        return StsBroker(
            endpoint=s.sts_endpoint or s.r2_endpoint,
            role_arn=s.sts_role_arn,
            bucket=s.r2_bucket,
            access_key=s.r2_access_key,
            secret_key=s.r2_secret_key,
            region=s.r2_region if s.r2_region != "auto" else "us-east-1",
        )
    return ParentKeyBroker(access_key=s.r2_access_key, secret_key=s.r2_secret_key)


PARENT_KEY_WARNING = (
    "GPU hosts receive the bucket's own key pair: any host operator could read, overwrite "
    "or delete every snapshot. Set CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN (R2) or "
    "STS_ROLE_ARN (S3 stores with STS) so that each job gets credentials scoped to its prefix."
)


def describe(s: Any) -> str:
    """One line for `/readyz` and the start-up log: which credentials GPU hosts receive."""
    if s.cloudflare_account_id and s.cloudflare_api_token:
        return "scoped: Cloudflare R2 temporary credentials per job"
    if s.sts_role_arn:
        return "scoped: STS AssumeRole with a per-job session policy"
    return "parent: " + PARENT_KEY_WARNING
