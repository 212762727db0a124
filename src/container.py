"""Everything a request handler or a job needs, built once by `create_app` (API and worker alike).
Adapters are created on first use so that an unconfigured one (no vast.ai key, say) only fails the
operations that need it, with a clear error; tests pass fakes in instead."""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from src.errors import GpusnapError
from src.metrics import Metrics
from src.settings import Settings

if TYPE_CHECKING:
    from src.adapters.object_store import ObjectStore

logger = logging.getLogger(__name__)


class NotConfigured(GpusnapError):
    code = "not_configured"
    http_status = 503


class JobQueuePort(Protocol):
    """What the rest of the app uses of the job queue (`src.jobs.queue.JobQueue`, set by `create_app`).
    Described here rather than imported: the job engine reads the container, and the container must not
    import the job engine back."""

    huey: Any

    def enqueue(self, job_id: str) -> bool: ...

    def ping(self) -> None: ...

    def recover_stale_jobs(self, *, local_dead_workers: bool = False) -> list[str]: ...


@dataclass
class Container:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    metrics: Metrics
    job_kinds: Mapping[str, Any]  # name -> src.jobs.kinds.JobKind (not imported here, as JobQueuePort says)
    queue: JobQueuePort = field(init=False)
    # Overrides (tests); None means "build the real one from settings on first use".
    object_store_override: Any = None
    ssh_override: Any = None
    vast_override: Any = None
    credentials_override: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    def object_store(self) -> ObjectStore:
        if self.object_store_override is not None:
            return self.object_store_override
        s = self.settings
        if not s.object_store_configured:
            raise NotConfigured(
                "the object store is not configured: set R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY and R2_SECRET_KEY"
            )
        return self._once("object_store", lambda: _object_store(s))

    def host_credentials(self) -> Any:
        """The broker (`src.adapters.host_credentials.CredentialBroker`) that mints each job's scoped
        credentials for the GPU host. Raises NotConfigured without an object store, and when
        REQUIRE_SCOPED_CREDENTIALS is set but no scoped broker is configured."""
        if self.credentials_override is not None:
            return self.credentials_override
        from src.adapters.host_credentials import PARENT_KEY_WARNING, broker_from_settings

        self.object_store()  # the same clear error when the bucket itself is not configured
        broker = self._once("host_credentials", lambda: broker_from_settings(self.settings))
        if not broker.scoped and self.settings.require_scoped_credentials:
            raise NotConfigured(
                "REQUIRE_SCOPED_CREDENTIALS is set but no scoped credentials are configured: " + PARENT_KEY_WARNING
            )
        return broker

    def ssh_policy(self) -> Any:
        """The SSH_ALLOWED_NETWORKS policy (`src.adapters.ssh_policy.SshPolicy`), checked before any job
        that would connect is even created."""
        from src.adapters.ssh_policy import SshPolicy

        return self._once("ssh_policy", lambda: SshPolicy.from_setting(",".join(self.settings.ssh_allowed_networks)))

    def ssh(self) -> Any:
        """The SSH client (`src.adapters.remote_host.SshClient`) for reaching GPU hosts."""
        if self.ssh_override is not None:
            return self.ssh_override
        return self._once("ssh", lambda: _ssh_client(self.settings))

    def vast(self) -> Any:
        """The vast.ai client (`src.adapters.vast.VastClient`)."""
        if self.vast_override is not None:
            return self.vast_override
        s = self.settings
        if not s.vast_api_key:
            raise NotConfigured("vast.ai is not configured: set VAST_API_KEY")
        return self._once("vast", lambda: _vast_client(s))

    def _once(self, name: str, build: Any) -> Any:
        with self._lock:
            if name not in self._built:
                self._built[name] = build()
            return self._built[name]


def _object_store(s: Settings) -> ObjectStore:
    from src.adapters.object_store import ObjectStore

    # Only called once `object_store_configured` said all four are set.
    assert s.r2_endpoint and s.r2_bucket and s.r2_access_key and s.r2_secret_key
    return ObjectStore(
        endpoint=s.r2_endpoint,
        bucket=s.r2_bucket,
        access_key=s.r2_access_key,
        secret_key=s.r2_secret_key,
        region=s.r2_region,
    )


def _ssh_client(s: Settings) -> Any:
    from src.adapters.remote_host import SshClient
    from src.adapters.ssh_policy import SshPolicy

    return SshClient(
        os.path.expanduser(s.ssh_key_path),
        policy=SshPolicy.from_setting(",".join(s.ssh_allowed_networks)),
        connect_timeout=s.ssh_connect_timeout_s,
        ready_deadline=s.ssh_ready_deadline_s,
        remote_python=s.remote_python,
        upload_timeout=s.ssh_upload_timeout_s,
        cleanup_timeout=s.ssh_cleanup_timeout_s,
        scripts_dir=pathlib.Path(__file__).resolve().parent / "remote_scripts",
    )


def _vast_client(s: Settings) -> Any:
    from src.adapters.vast import VastClient

    return VastClient(s.vast_api_key or "", s.vast_api_url)  # only called once the key is known set
