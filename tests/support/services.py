"""Start PostgreSQL and Redis for the tests when they are installed but not running (a fresh CI
machine), using the same commands the machine image uses at boot."""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import time


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.2)
    return False


def ensure_postgres(host: str = "127.0.0.1", port: int = 5432) -> str | None:
    """None when Postgres answers (started here if needed), else the reason it cannot."""
    if port_open(host, port):
        return None
    versions = sorted(glob.glob("/etc/postgresql/*"))
    if not versions or not shutil.which("pg_ctlcluster"):
        return "PostgreSQL is not installed on this machine (no /etc/postgresql cluster, no pg_ctlcluster)"
    version = versions[-1].rsplit("/", 1)[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
        check=False,
        capture_output=True,
        timeout=60,
    )
    return None if _wait(host, port, 30) else f"PostgreSQL {version} did not start on {host}:{port}"


def ensure_redis(host: str = "127.0.0.1", port: int = 6379) -> str | None:
    """None when Redis answers (started here if needed), else the reason it cannot."""
    if port_open(host, port):
        return None
    if not shutil.which("redis-server"):
        return "redis-server is not installed on this machine"
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=False,
        capture_output=True,
        timeout=30,
    )
    return None if _wait(host, port, 15) else f"Redis did not start on {host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
