"""The Dockerfile, docker/entrypoint.sh and compose.yaml without a Docker engine: the files are parsed and
checked for what a deployment depends on (every gpusnap container shares one database and one queue, the
schema is migrated before the API and the worker start, healthchecks are `python -c`, Redis has a
password, the image installs the app without test extras), and the entrypoint's roles are run here for
real, with the compose healthchecks run against them."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
GPUSNAP = ("api", "worker", "migrate")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_compose_runs_api_worker_postgres_and_redis_with_shared_settings(compose):
    services = compose["services"]
    assert {"api", "worker", "postgres", "redis", "migrate"} <= set(services)
    envs = [services[name]["environment"] for name in GPUSNAP]
    assert envs[0] == envs[1] == envs[2], "every gpusnap container must see the same settings"
    env = envs[0]
    db, queue = urlsplit(env["DATABASE_URL"]), urlsplit(env["REDIS_URL"])
    assert db.scheme.startswith("postgresql") and db.hostname == "postgres"
    assert queue.scheme in ("redis", "rediss") and queue.hostname == "redis" and queue.password, (
        "Redis must be authenticated: Huey pickles task payloads"
    )
    assert "--requirepass" in services["redis"]["command"]
    assert "ports" not in services["redis"] and "ports" not in services["postgres"]  # private
    assert all(services[name]["image"] == services["api"]["image"] for name in GPUSNAP)  # one image
    # The key is mounted where SSH_KEY_PATH points.
    assert env["SSH_KEY_PATH"] == "/run/secrets/gpusnap_ssh_key"
    assert all("gpusnap_ssh_key" in services[name]["secrets"] for name in ("api", "worker"))
    assert "gpusnap_ssh_key" in compose["secrets"]
    # Data survives a restart.
    assert "pgdata" in compose["volumes"] and any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    # Migrations run once, before the API and the worker (which would race each other otherwise).
    assert services["migrate"]["command"] == ["migrate"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["api"]["command"] == ["api"] and services["worker"]["command"] == ["worker"]
    for name in ("api", "worker", "postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("api", "worker"):
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], test
        compile(test[3], f"{name} healthcheck", "exec")
    documented = (ROOT / ".env.example").read_text()
    for key in env:
        assert re.search(rf"^#? ?{key}=", documented, re.M), f"{key} is not in .env.example"


def test_dockerfile_installs_the_app_only_and_starts_through_the_entrypoint():
    steps = dockerfile()
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        if instruction == "RUN" and "pip install" in args:
            assert "[test]" not in args and "'.[" not in args, "the image must not install test extras"
    entry = [args for instruction, args in steps if instruction == "ENTRYPOINT"]
    copied = [args for instruction, args in steps if instruction == "COPY" and "docker/entrypoint.sh" in args]
    assert entry and copied and shlex.split(copied[0])[-1].endswith(eval(entry[-1])[0])  # noqa: S307 (a JSON list)
    cmd = eval([args for instruction, args in steps if instruction == "CMD"][-1])  # noqa: S307
    assert cmd == ["api"] and re.search(r"^\s+api\)", ENTRYPOINT.read_text(), re.M)
    users = [args for instruction, args in steps if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(args for instruction, args in steps if instruction == "ENV")
    assert "DATABASE_URL=sqlite:////data/" in env and "QUEUE_PATH=/data/" in env
    assert ("VOLUME", "/data") in steps and ("EXPOSE", "5000") in steps and "GUNICORN_BIND=0.0.0.0:5000" in env
    # The build context never carries local secrets or state to the daemon.
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", "gpusnap_ssh_key", ".venv", "instance"} <= set(ignored)


# ---- the entrypoint, run here -----------------------------------------------------------------


@pytest.fixture
def role_env(tmp_path):  # type: ignore[no-untyped-def]
    """What the image provides (gpusnap and gunicorn on PATH, GPUSNAP_HOME) with one SQLite database and
    queue shared by the roles, as a /data volume would be."""
    bin_dir = Path(sys.executable).parent
    return {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "GPUSNAP_HOME": str(ROOT),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'gpusnap.db'}",
        "QUEUE_PATH": str(tmp_path / "data" / "queue.db"),
        "GUNICORN_BIND": f"127.0.0.1:{free_port()}",
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "2",
        "LOG_FORMAT": "text",
        "SSH_ALLOWED_NETWORKS": "10.0.0.0/8",
    }


def _start(role: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["sh", str(ENTRYPOINT), role],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _healthcheck(compose: dict, service: str, env: dict) -> subprocess.CompletedProcess:
    test = compose["services"][service]["healthcheck"]["test"]
    return subprocess.run([sys.executable, *test[2:]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_entrypoint_roles_share_one_database_and_pass_their_healthchecks(compose, role_env, tmp_path):
    migrated = subprocess.run(
        ["sh", str(ENTRYPOINT), "migrate"], env=role_env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0 and "database at revision" in migrated.stdout, migrated.stderr
    assert _healthcheck(compose, "api", role_env).returncode != 0  # nothing listens yet: unhealthy

    api = _start("api", role_env, tmp_path / "api.log")
    worker = _start("worker", role_env, tmp_path / "worker.log")
    try:
        url = f"http://{role_env['GUNICORN_BIND']}"
        deadline = time.monotonic() + 90
        while True:
            assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-3000:]
            time.sleep(0.3)
        checked = _healthcheck(compose, "api", role_env)
        assert checked.returncode == 0, checked.stderr
        # Any other command runs as given: a token made through the image reaches the API's database.
        made = subprocess.run(
            ["sh", str(ENTRYPOINT), "gpusnap", "tokens", "create", "me", "--replace"],
            env=role_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        r = requests.get(f"{url}/api/gpu-snapshots", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200 and r.json()["items"] == []
        time.sleep(1)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        checked = _healthcheck(compose, "worker", role_env)
        assert checked.returncode == 0, checked.stderr
    finally:
        _stop(api)
        _stop(worker)
    assert api.returncode == 0, (tmp_path / "api.log").read_text()[-3000:]  # SIGTERM: a clean stop
