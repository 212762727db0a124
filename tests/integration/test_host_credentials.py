"""The brokers that mint each job's host credentials, against strict fakes of Cloudflare's R2
temporary-credentials API and of STS AssumeRole (both real HTTP servers on loopback)."""

from __future__ import annotations

import pytest

from src.adapters.host_credentials import (
    CloudflareR2Broker,
    CredentialsUnavailable,
    ParentKeyBroker,
    StsBroker,
    broker_from_settings,
    describe,
    session_policy,
)
from src.app import create_app
from src.container import NotConfigured
from src.settings import Settings
from tests.fakes.fake_cloudflare_api import FakeCloudflareApi
from tests.fakes.fake_sts import FakeSts
from tests.support.fixtures_app import make_settings

ACCOUNT, TOKEN, BUCKET, PARENT = "acc0123", "cf-token", "bucket-1", "PARENTKEY"
PREFIX = "snapshots/m-1/snap_1/"


@pytest.fixture
def cloudflare():  # type: ignore[no-untyped-def]
    with FakeCloudflareApi(account_id=ACCOUNT, api_token=TOKEN, bucket=BUCKET, parent_access_key=PARENT) as fake:
        yield fake


def _r2(fake: FakeCloudflareApi, **changes: str) -> CloudflareR2Broker:
    fields = dict(account_id=ACCOUNT, api_token=TOKEN, bucket=BUCKET, parent_access_key=PARENT, api_url=fake.base_url)
    return CloudflareR2Broker(**{**fields, **changes})  # type: ignore[arg-type]


def test_r2_broker_asks_for_exactly_the_prefix_and_the_access_the_job_needs(cloudflare):
    rw = _r2(cloudflare).for_prefix(PREFIX, write=True, ttl_s=7200)
    ro = _r2(cloudflare).for_prefix(PREFIX, write=False, ttl_s=7200)
    assert [m.body for m in cloudflare.minted] == [
        {
            "bucket": BUCKET,
            "parentAccessKeyId": PARENT,
            "permission": "object-read-write",
            "ttlSeconds": 7200,
            "prefixes": [PREFIX],
        },
        {
            "bucket": BUCKET,
            "parentAccessKeyId": PARENT,
            "permission": "object-read-only",
            "ttlSeconds": 7200,
            "prefixes": [PREFIX],
        },
    ]
    assert rw.scoped and rw.source == "cloudflare-r2" and rw.session_token == cloudflare.minted[0].session_token
    assert ro.s3_fields() == {
        "access_key": cloudflare.minted[1].access_key,
        "secret_key": cloudflare.minted[1].secret_key,
        "session_token": cloudflare.minted[1].session_token,
    }
    assert PARENT not in repr(rw) and rw.secret_key not in repr(rw)


def test_r2_ttl_is_clamped_to_cloudflares_maximum(cloudflare):
    _r2(cloudflare).for_prefix(PREFIX, write=False, ttl_s=10**9)
    assert cloudflare.minted[0].body["ttlSeconds"] == 604_800


@pytest.mark.parametrize(
    "prefix", ["", "snapshots", "/", "snapshots/m-1", "//", "snapshots//", "a/../", "snapshots/*/", "./"]
)
def test_no_credentials_for_a_prefix_that_is_not_one(cloudflare, prefix):
    with pytest.raises(CredentialsUnavailable, match="prefix"):
        _r2(cloudflare).for_prefix(prefix, write=True, ttl_s=900)
    assert cloudflare.minted == []


def test_r2_refusals_become_clear_errors(cloudflare):
    with pytest.raises(CredentialsUnavailable, match="10000: Authentication error") as refused:
        _r2(cloudflare, api_token="wrong").for_prefix(PREFIX, write=True, ttl_s=900)
    assert not refused.value.retryable and "CLOUDFLARE_API_TOKEN" in refused.value.message
    with pytest.raises(CredentialsUnavailable, match="bucket does not exist"):
        _r2(cloudflare, bucket="other").for_prefix(PREFIX, write=True, ttl_s=900)
    with pytest.raises(CredentialsUnavailable, match="parentAccessKeyId"):
        _r2(cloudflare, parent_access_key="NOTOURS").for_prefix(PREFIX, write=True, ttl_s=900)
    cloudflare.fail_next = 1
    with pytest.raises(CredentialsUnavailable) as outage:
        _r2(cloudflare).for_prefix(PREFIX, write=True, ttl_s=900)
    assert outage.value.retryable
    with pytest.raises(CredentialsUnavailable, match="unreachable") as down:
        _r2(cloudflare, api_url="http://127.0.0.1:9/client/v4").for_prefix(PREFIX, write=True, ttl_s=900)
    assert down.value.retryable


def test_sts_broker_sends_a_session_policy_limited_to_the_prefix():
    role = "arn:aws:iam::123456789012:role/gpusnap-hosts"
    with FakeSts(caller_access_key=PARENT, role_arn=role) as sts:
        broker = StsBroker(endpoint=sts.url, role_arn=role, bucket=BUCKET, access_key=PARENT, secret_key="s")
        ro = broker.for_prefix(PREFIX, write=False, ttl_s=60)  # below STS's minimum: raised to 900
        rw = broker.for_prefix(PREFIX, write=True, ttl_s=10**6)  # above its maximum: lowered to 43200
        assert [a["DurationSeconds"] for a in sts.assumed] == ["900", "43200"]
        assert sts.assumed[0]["Policy"] == session_policy(BUCKET, PREFIX, write=False)
        read_only = sts.assumed[0]["Policy"]["Statement"]
        assert read_only[0]["Action"] == ["s3:GetObject"]
        assert read_only[0]["Resource"] == [f"arn:aws:s3:::{BUCKET}/{PREFIX}*"]
        assert read_only[1]["Condition"] == {"StringLike": {"s3:prefix": [f"{PREFIX}*"]}}
        assert "s3:PutObject" in sts.assumed[1]["Policy"]["Statement"][0]["Action"]
        assert ro.session_token == sts.assumed[0]["credentials"]["SessionToken"] and rw.scoped
        wrong = StsBroker(
            endpoint=sts.url, role_arn=role.replace("hosts", "admin"), bucket=BUCKET, access_key=PARENT, secret_key="s"
        )
        with pytest.raises(CredentialsUnavailable, match="AccessDenied"):
            wrong.for_prefix(PREFIX, write=True, ttl_s=900)


def test_broker_choice_and_the_loud_parent_key_fallback():
    base = Settings(r2_endpoint="http://s3", r2_bucket=BUCKET, r2_access_key=PARENT, r2_secret_key="secret")
    parent = broker_from_settings(base)
    assert isinstance(parent, ParentKeyBroker) and not parent.scoped
    assert parent.for_prefix(PREFIX, write=True, ttl_s=900).s3_fields() == {
        "access_key": PARENT,
        "secret_key": "secret",
    }
    assert describe(base).startswith("parent:") and "CLOUDFLARE_API_TOKEN" in describe(base)
    r2 = base.replace(cloudflare_account_id=ACCOUNT, cloudflare_api_token=TOKEN)
    assert isinstance(broker_from_settings(r2), CloudflareR2Broker) and describe(r2).startswith("scoped")
    sts = base.replace(sts_role_arn="arn:aws:iam::1:role/x")
    assert isinstance(broker_from_settings(sts), StsBroker) and broker_from_settings(sts).endpoint == "http://s3"


def test_required_scoped_credentials_refuse_the_parent_key(tmp_path):  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        r2_endpoint="http://s3",
        r2_bucket=BUCKET,
        r2_access_key=PARENT,
        r2_secret_key="secret",
        require_scoped_credentials=True,
    )
    container = create_app(settings, configure_logs=False).extensions["gpusnap"]
    with pytest.raises(NotConfigured, match="REQUIRE_SCOPED_CREDENTIALS"):
        container.host_credentials()
    scoped = create_app(
        settings.replace(cloudflare_account_id=ACCOUNT, cloudflare_api_token=TOKEN), configure_logs=False
    ).extensions["gpusnap"]
    assert isinstance(scoped.host_credentials(), CloudflareR2Broker)


def test_settings_read_the_credential_variables():
    s = Settings.from_env(
        {
            "CLOUDFLARE_ACCOUNT_ID": ACCOUNT,
            "CLOUDFLARE_API_TOKEN": TOKEN,
            "REQUIRE_SCOPED_CREDENTIALS": "true",
            "STS_ROLE_ARN": "arn:x",
        },
        dotenv=False,
    )
    assert (s.cloudflare_account_id, s.cloudflare_api_token, s.require_scoped_credentials) == (ACCOUNT, TOKEN, True)
    assert TOKEN not in repr(s)
