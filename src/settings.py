"""Settings, read once from the environment (and `.env`, through python-dotenv) when the app or worker
starts. Every name here is in `.env.example`; tests build a `Settings` directly or pass overrides."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from src.errors import GpusnapError


class SettingsError(GpusnapError):
    code = "bad_settings"


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "false").strip().lower()
    if raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    return raw in ("1", "true", "yes", "on")


def _price(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not 0 <= value < float("inf"):
        raise SettingsError(f"{name} must be a price of 0 or more, got {raw!r}")
    return value


def _non_negative(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    if not (raw.strip().isascii() and raw.strip().isdigit()):
        raise SettingsError(f"{name} must be a whole number of at least 0, got {raw!r}")
    return int(raw)


def _format(env: Mapping[str, str]) -> int:
    raw = env.get("SNAPSHOT_FORMAT", "2").strip()
    if raw not in ("1", "2"):
        raise SettingsError(f"SNAPSHOT_FORMAT must be 1 or 2, got {raw!r}")
    return int(raw)


def _grace(env: Mapping[str, str]) -> float:
    raw = env.get("GC_GRACE_S", "3600")
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"GC_GRACE_S must be a number of seconds, got {raw!r}") from None
    if not 0 <= value < float("inf"):
        raise SettingsError(f"GC_GRACE_S must be a number of seconds of at least 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    # Storage of metadata and the job queue.
    database_url: str = "sqlite:///instance/gpusnap.db"
    redis_url: str | None = None
    queue_path: str = "instance/queue.db"  # SQLite queue file when REDIS_URL is unset

    # Auth.
    api_tokens: tuple[str, ...] = ()

    # Object store (Cloudflare R2 or any S3 endpoint).
    r2_endpoint: str | None = None
    r2_bucket: str | None = None
    r2_access_key: str | None = field(default=None, repr=False)
    r2_secret_key: str | None = field(default=None, repr=False)
    r2_region: str = "auto"
    snapshot_prefix: str = "snapshots/"

    # Credentials GPU hosts receive: scoped per job when one of these is set (src/adapters/host_credentials.py).
    cloudflare_account_id: str | None = None
    cloudflare_api_token: str | None = field(default=None, repr=False)
    cloudflare_api_url: str = "https://api.cloudflare.com/client/v4"
    sts_role_arn: str | None = None
    sts_endpoint: str | None = None  # unset: R2_ENDPOINT (MinIO, Ceph serve STS beside S3)
    require_scoped_credentials: bool = False  # true: refuse to send the parent key to any host

    # SSH to GPU hosts.
    ssh_key_path: str = "~/.ssh/id_ed25519"
    ssh_user: str = "root"
    ssh_allowed_networks: tuple[str, ...] = ()
    ssh_connect_timeout_s: float = 10.0
    ssh_ready_deadline_s: float = 120.0
    remote_python: str = "python3"
    remote_s5cmd: str = "s5cmd"
    remote_idle_timeout_s: float = 600.0  # a remote script silent this long is presumed hung
    remote_tries: int = 3  # a snapshot/restore step is run this often when the SSH link drops
    remote_retry_backoff_s: float = 5.0  # wait before the 2nd try, doubled before each later one
    ssh_upload_timeout_s: float = 120.0  # copying the remote scripts by SFTP
    ssh_cleanup_timeout_s: float = 30.0  # a fresh connection to kill a script whose own link hung

    # vast.ai.
    vast_api_key: str | None = field(default=None, repr=False)
    vast_api_url: str = "https://console.vast.ai"
    vast_default_image: str = "pytorch/pytorch:latest"
    vast_ready_deadline_s: float = 900.0
    vast_destroy_deadline_s: float = 300.0
    vast_poll_interval_s: float = 5.0
    vast_max_offers: int = 3  # offers tried by one wake when hosts never become ready
    wake_disk_headroom: float = 1.5  # rented disk >= raw workspace size x this, plus vast_image_disk_gb
    vast_image_disk_gb: float = 20.0

    # Data plane tuning, passed to the remote scripts.
    snapshot_codec: str = "auto"
    snapshot_part_size_mb: int = 32
    # A cap: the host scripts choose fewer parts in flight to fit its memory and adapt how many
    # transfers run at once (src/remote_scripts/gs_tuning.py).
    snapshot_parallelism: int = 16
    # Format of new snapshots: 2 = content-addressed chunks shared by a machine's snapshots (only what
    # changed is uploaded), 1 = self-contained fixed parts. Both restore and verify forever.
    snapshot_format: int = 2
    # gc deletes an unreferenced chunk or pack only once it is this old: a snapshot that is uploading
    # right now, or one that decided to reuse a chunk, has no reference rows until it completes, and a
    # stale host (a frozen worker's script) may still be writing; see docs/data-plane.md.
    gc_grace_s: float = 3600.0

    # HTTP and jobs.
    max_request_bytes: int = 1_048_576
    worker_threads: int = 4
    job_heartbeat_s: float = 5.0
    job_stale_after_s: float = 60.0
    job_max_attempts: int = 3
    # Overall deadline of one attempt of a job, by kind: past it the job is stopped like a cancel
    # (remote scripts killed, rentals cleaned up) and fails `remote_timeout`.
    job_deadline_snapshot_s: float = 14400.0
    job_deadline_restore_s: float = 14400.0
    job_deadline_hibernate_s: float = 18000.0
    job_deadline_wake_s: float = 18000.0
    job_deadline_other_s: float = 7200.0
    # Policies (src/jobs/scheduler.py) and the wake queue (src/services/wake_queue.py).
    scheduler_enabled: bool = True  # false: this worker runs jobs but no policy tick
    wake_concurrency: int = 8  # wakes renting and restoring at once; the rest wait by priority (0: no cap)
    log_level: str = "INFO"
    log_format: str = "json"  # json | text

    # Dashboards: browser origins allowed by CORS, live events (GET /api/events), costs.
    cors_origins: tuple[str, ...] = ()
    events_max_streams: int = 8  # open event streams per API process; keep below GUNICORN_THREADS
    events_heartbeat_s: float = 15.0  # a comment line this often keeps proxies from closing a quiet stream
    events_poll_s: float = 0.5  # how often a stream asks the database for new events
    events_max_stream_s: float = 300.0  # a stream ends after this; EventSource reconnects with Last-Event-ID
    stream_token_ttl_s: float = 60.0
    events_progress_retention_s: float = 604800.0  # job.progress events older than this (7 days) are pruned
    storage_price_gb_month: float = 0.015  # USD per GB-month: Cloudflare R2's standard storage price

    @property
    def object_store_configured(self) -> bool:
        return bool(self.r2_endpoint and self.r2_bucket and self.r2_access_key and self.r2_secret_key)

    def job_deadline_s(self, kind: str) -> float:
        """The overall deadline (seconds, per attempt) of a job of `kind`."""
        return {
            "create_snapshot": self.job_deadline_snapshot_s,
            "restore_snapshot": self.job_deadline_restore_s,
            "hibernate": self.job_deadline_hibernate_s,
            "wake": self.job_deadline_wake_s,
        }.get(kind, self.job_deadline_other_s)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
        """Build settings from `environ` (default `os.environ`, after loading `.env` when `dotenv`)."""
        if environ is None:
            if dotenv:
                from dotenv import load_dotenv

                load_dotenv(override=False)
            environ = os.environ
        env = {k: v for k, v in environ.items() if v != ""}
        d = cls()

        def num(name: str, default: float, kind: type = float):  # type: ignore[no-untyped-def]
            raw = env.get(name)
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise SettingsError(f"{name} must be a number, got {raw!r}") from None

        def pos(name: str, default: float) -> float:
            value = num(name, default)
            if not 0 < value < float("inf"):  # also refuses NaN: a bound that bounds nothing is a typo
                raise SettingsError(f"{name} must be a number of seconds above 0, got {env.get(name)!r}")
            return value

        def count(name: str, default: int) -> int:
            value = num(name, default, int)
            if value < 1:  # zero worker threads, tries or attempts means nothing ever runs
                raise SettingsError(f"{name} must be a whole number of at least 1, got {env.get(name)!r}")
            return value

        return cls(
            database_url=env.get("DATABASE_URL", d.database_url),
            redis_url=env.get("REDIS_URL"),
            queue_path=env.get("QUEUE_PATH", d.queue_path),
            api_tokens=_csv(env.get("API_TOKENS")),
            r2_endpoint=env.get("R2_ENDPOINT"),
            r2_bucket=env.get("R2_BUCKET"),
            r2_access_key=env.get("R2_ACCESS_KEY"),
            r2_secret_key=env.get("R2_SECRET_KEY"),
            r2_region=env.get("R2_REGION", d.r2_region),
            snapshot_prefix=env.get("SNAPSHOT_PREFIX", d.snapshot_prefix),
            cloudflare_account_id=env.get("CLOUDFLARE_ACCOUNT_ID"),
            cloudflare_api_token=env.get("CLOUDFLARE_API_TOKEN"),
            cloudflare_api_url=env.get("CLOUDFLARE_API_URL", d.cloudflare_api_url),
            sts_role_arn=env.get("STS_ROLE_ARN"),
            sts_endpoint=env.get("STS_ENDPOINT"),
            require_scoped_credentials=_flag(env, "REQUIRE_SCOPED_CREDENTIALS"),
            ssh_key_path=env.get("SSH_KEY_PATH", d.ssh_key_path),
            ssh_user=env.get("SSH_USER", d.ssh_user),
            ssh_allowed_networks=_csv(env.get("SSH_ALLOWED_NETWORKS")),
            ssh_connect_timeout_s=num("SSH_CONNECT_TIMEOUT_S", d.ssh_connect_timeout_s),
            ssh_ready_deadline_s=num("SSH_READY_DEADLINE_S", d.ssh_ready_deadline_s),
            remote_python=env.get("REMOTE_PYTHON", d.remote_python),
            remote_s5cmd=env.get("REMOTE_S5CMD", d.remote_s5cmd),
            remote_idle_timeout_s=num("REMOTE_IDLE_TIMEOUT_S", d.remote_idle_timeout_s),
            remote_tries=count("REMOTE_TRIES", d.remote_tries),
            remote_retry_backoff_s=num("REMOTE_RETRY_BACKOFF_S", d.remote_retry_backoff_s),
            ssh_upload_timeout_s=pos("SSH_UPLOAD_TIMEOUT_S", d.ssh_upload_timeout_s),
            ssh_cleanup_timeout_s=pos("SSH_CLEANUP_TIMEOUT_S", d.ssh_cleanup_timeout_s),
            vast_api_key=env.get("VAST_API_KEY"),
            vast_api_url=env.get("VAST_API_URL", d.vast_api_url),
            vast_default_image=env.get("VAST_DEFAULT_IMAGE", d.vast_default_image),
            vast_ready_deadline_s=num("VAST_READY_DEADLINE_S", d.vast_ready_deadline_s),
            vast_destroy_deadline_s=num("VAST_DESTROY_DEADLINE_S", d.vast_destroy_deadline_s),
            vast_poll_interval_s=num("VAST_POLL_INTERVAL_S", d.vast_poll_interval_s),
            vast_max_offers=count("VAST_MAX_OFFERS", d.vast_max_offers),
            wake_disk_headroom=num("WAKE_DISK_HEADROOM", d.wake_disk_headroom),
            vast_image_disk_gb=num("VAST_IMAGE_DISK_GB", d.vast_image_disk_gb),
            snapshot_codec=env.get("SNAPSHOT_CODEC", d.snapshot_codec),
            snapshot_part_size_mb=num("SNAPSHOT_PART_SIZE_MB", d.snapshot_part_size_mb, int),
            snapshot_parallelism=count("SNAPSHOT_PARALLELISM", d.snapshot_parallelism),
            snapshot_format=_format(env),
            gc_grace_s=_grace(env),
            max_request_bytes=num("MAX_REQUEST_BYTES", d.max_request_bytes, int),
            worker_threads=count("WORKER_THREADS", d.worker_threads),
            job_heartbeat_s=num("JOB_HEARTBEAT_S", d.job_heartbeat_s),
            job_stale_after_s=num("JOB_STALE_AFTER_S", d.job_stale_after_s),
            job_max_attempts=count("JOB_MAX_ATTEMPTS", d.job_max_attempts),
            job_deadline_snapshot_s=pos("JOB_DEADLINE_SNAPSHOT_S", d.job_deadline_snapshot_s),
            job_deadline_restore_s=pos("JOB_DEADLINE_RESTORE_S", d.job_deadline_restore_s),
            job_deadline_hibernate_s=pos("JOB_DEADLINE_HIBERNATE_S", d.job_deadline_hibernate_s),
            job_deadline_wake_s=pos("JOB_DEADLINE_WAKE_S", d.job_deadline_wake_s),
            job_deadline_other_s=pos("JOB_DEADLINE_OTHER_S", d.job_deadline_other_s),
            scheduler_enabled=_flag(env, "SCHEDULER_ENABLED") if "SCHEDULER_ENABLED" in env else d.scheduler_enabled,
            wake_concurrency=_non_negative(env, "WAKE_CONCURRENCY", d.wake_concurrency),
            log_level=env.get("LOG_LEVEL", d.log_level).upper(),
            log_format=env.get("LOG_FORMAT", d.log_format),
            cors_origins=tuple(o.rstrip("/") for o in _csv(env.get("CORS_ORIGINS"))),
            events_max_streams=count("EVENTS_MAX_STREAMS", d.events_max_streams),
            events_heartbeat_s=pos("EVENTS_HEARTBEAT_S", d.events_heartbeat_s),
            events_poll_s=pos("EVENTS_POLL_S", d.events_poll_s),
            events_max_stream_s=pos("EVENTS_MAX_STREAM_S", d.events_max_stream_s),
            stream_token_ttl_s=pos("STREAM_TOKEN_TTL_S", d.stream_token_ttl_s),
            events_progress_retention_s=pos("EVENTS_PROGRESS_RETENTION_S", d.events_progress_retention_s),
            storage_price_gb_month=_price(env, "STORAGE_PRICE_GB_MONTH", d.storage_price_gb_month),
        )
