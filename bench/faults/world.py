"""The service under fault injection, built from the real parts the tests use.

    SeaweedFS  <-  S3FaultProxy (resets mid-GET, 500, 503 SlowDown, stalls at `proxy.rate`)
    sshd       <-  FaultRelay (resets or black-holes live connections on demand)
    fake vast.ai (its instances' SSH endpoint is the relay), the API in this process, one worker process

Both the worker (remote scripts' s5cmd) and the API process (verify through boto3) reach the bucket
through the proxy, so every object-store call of a trial can meet a fault.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from src.adapters.vast import VastClient  # noqa: E402
from src.migrate import upgrade  # noqa: E402
from tests.fakes.fake_vast_api import FakeVastApi  # noqa: E402
from tests.support.fault_relay import FaultRelay  # noqa: E402
from tests.support.fixtures_e2e import TOKEN, Stack  # noqa: E402
from tests.support.s3_fault_proxy import S3FaultProxy  # noqa: E402
from tests.support.s3_server import SeaweedS3Server  # noqa: E402
from tests.support.sshd import LoopbackSshd, processes  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


class World:
    def __init__(self, *, seed: int) -> None:
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="gpusnap-faults-"))
        self.seed = seed
        self._s3 = SeaweedS3Server()
        self.s3 = self._s3.start()
        self.proxy = S3FaultProxy(self.s3.endpoint, stall_s=2.0, seed=seed).start()
        self.sshd = LoopbackSshd()
        self.sshd.start()
        self.relay = FaultRelay((self.sshd.host, self.sshd.port)).start()
        self.vast = FakeVastApi(ssh_endpoint=("127.0.0.1", self.relay.port)).start()
        self.vast_client = VastClient(self.vast.api_key, self.vast.base_url, backoff_base=0.001)
        db = self.tmp / "gpusnap.db"
        self.env = {
            "DATABASE_URL": f"sqlite:///{db}",
            "QUEUE_PATH": str(self.tmp / "queue.db"),
            "API_TOKENS": TOKEN,
            "R2_ENDPOINT": self.proxy.endpoint,
            "R2_BUCKET": self.s3.bucket,
            "R2_ACCESS_KEY": self.s3.access_key,
            "R2_SECRET_KEY": self.s3.secret_key,
            "R2_REGION": self.s3.region,
            "SNAPSHOT_PREFIX": "faults/",
            "SSH_KEY_PATH": str(self.sshd.client_key_path),
            "SSH_USER": self.sshd.user,
            "SSH_ALLOWED_NETWORKS": "127.0.0.1/32",
            "SSH_READY_DEADLINE_S": "20",
            "REMOTE_PYTHON": sys.executable,
            "REMOTE_S5CMD": str(pathlib.Path(sys.executable).with_name("s5cmd")),
            "REMOTE_IDLE_TIMEOUT_S": "20",
            "REMOTE_RETRY_BACKOFF_S": "1",
            "SNAPSHOT_PART_SIZE_MB": "1",
            "SNAPSHOT_PARALLELISM": "4",
            "SNAPSHOT_CODEC": "zstd",
            "VAST_API_KEY": self.vast.api_key,
            "VAST_API_URL": self.vast.base_url,
            "VAST_POLL_INTERVAL_S": "0.05",
            "VAST_READY_DEADLINE_S": "10",
            "VAST_DESTROY_DEADLINE_S": "10",
            "JOB_HEARTBEAT_S": "0.5",
            "JOB_STALE_AFTER_S": "10",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
        }
        upgrade(self.env["DATABASE_URL"])
        self.stack = Stack(env=self.env, tmp=self.tmp)
        self.stack.start_worker()
        self._n = 0

    def name(self, what: str) -> str:
        self._n += 1
        return f"{what}-{self._n}"

    def workspace(self, name: str, *, big_bytes: int = 3 << 20, random_mb: int = 0) -> pathlib.Path:
        """A tricky tree (links, modes, sparse file...) plus `random_mb` MiB of incompressible blobs, so
        that a transfer lasts long enough to be hit mid-way."""
        from tests.support.trees import make_tricky_tree

        root = make_tricky_tree(self.tmp / name, big_bytes=big_bytes, seed=self._n)
        for i in range(random_mb // 2):
            (root / f"blob{i}.bin").write_bytes(os.urandom(2 << 20))
        return root

    def old_workspace(self, name: str) -> pathlib.Path:
        """A target that already holds a workspace a failed restore must leave as it is."""
        target = self.tmp / name
        (target / "keep").mkdir(parents=True)
        (target / "keep" / "notes.txt").write_text("the live workspace " + name)
        return target

    # --- API ------------------------------------------------------------------------------------
    def create_snapshot(self, machine: str, workspace: pathlib.Path) -> dict[str, Any]:
        r = self.stack.post(
            "/api/gpu-snapshots",
            json={
                "instance_id": machine,
                "ssh_host": "127.0.0.1",
                "ssh_port": self.relay.port,
                "workspace_path": str(workspace),
            },
        )
        assert r.status_code == 202, r.text
        return r.json()

    def restore(self, snapshot_id: str, machine: str, target: pathlib.Path) -> dict[str, Any]:
        r = self.stack.post(
            f"/api/gpu-snapshots/{snapshot_id}/restore",
            json={
                "ssh_host": "127.0.0.1",
                "ssh_port": self.relay.port,
                "workspace_path": str(target),
                # the trials restore over an existing workspace on purpose
                "instance_id": machine,
                "overwrite": True,
            },
        )
        assert r.status_code == 202, r.text
        return r.json()["job"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.stack.get(f"/api/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        """The job once it ended, or with status `stuck` when it did not within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.job(job_id)
            except OSError:
                job = {"status": "unknown"}
            if job.get("status") in TERMINAL:
                return job
            if time.monotonic() > deadline:
                return {**job, "status": "stuck"}
            time.sleep(0.2)

    def wait_for(self, job_id: str, pred: Any, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if pred(job) or job["status"] in TERMINAL:
                return job
            time.sleep(0.05)
        return self.job(job_id)

    def restart_worker_after_kill(self) -> None:
        self.stack.kill_worker()
        self.stack.start_worker()

    # --- leak checks ----------------------------------------------------------------------------
    def remote_processes(self) -> list[str]:
        """Remote scripts (run from their mktemp dir gpusnap.*) and the s5cmd and tar they start."""
        found = []
        for _pid, argv in processes():
            line = " ".join(argv)
            if ("/gpusnap." in line and (line.endswith("snapshot.py") or line.endswith("restore.py"))) or (
                "s5cmd" in line and self.proxy.endpoint in line
            ):
                found.append(line)
        return found

    def orphans(self, settle_s: float = 20) -> int:
        """Remote processes still alive `settle_s` after the trial's jobs ended (0 when none)."""
        deadline = time.monotonic() + settle_s
        while self.remote_processes() and time.monotonic() < deadline:
            time.sleep(0.25)
        return len(self.remote_processes())

    def leaked_instances(self) -> int:
        """Live instances gpusnap rented that no machine is bound to."""
        machines = self.stack.get("/api/instances").json()
        items = machines.get("items", machines) if isinstance(machines, dict) else machines
        bound = {m.get("vast_instance_id") for m in items}
        ours = [i for i in self.vast.live_instances() if (i.get("label") or "").startswith("gpusnap:")]
        return sum(1 for i in ours if i["id"] not in bound)

    def keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3.endpoint,
            aws_access_key_id=self.s3.access_key,
            aws_secret_access_key=self.s3.secret_key,
            region_name=self.s3.region,
        )
        return [o["Key"] for o in s3.list_objects_v2(Bucket=self.s3.bucket, Prefix=prefix).get("Contents", [])]

    def mount_tmpfs(self, name: str, options: str) -> pathlib.Path | None:
        path = self.tmp / name
        path.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        return path if res.returncode == 0 else None

    def close(self) -> None:
        self.proxy.rate = 0
        self.relay.blackhole = False
        for step in (self.stack.close, self.vast.stop, self.relay.stop, self.proxy.stop, self.sshd.stop, self._s3.stop):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - teardown goes on; the figures are already taken
                print(f"teardown: {step.__qualname__}: {exc}", file=sys.stderr)
        for mount in self.tmp.glob("*"):
            if os.path.ismount(mount):
                subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
