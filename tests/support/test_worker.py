"""`python -m tests.support.test_worker`: the real job worker (`src.cli.admin.run_worker`, a Huey
consumer) with the job kinds of `tests.support.test_kinds`, configured from the environment like
`gpusnap worker`. With TEST_WORKER_READY_FILE set, that file is created once the app is built, just
before the worker recovers stale jobs and starts consuming (tests wait for it instead of sleeping).

`WorkerProcess` starts one as a subprocess (its own process group) for the tests. With
TEST_WORKER_KINDS=all the worker also runs every production job kind (hibernate, wake...), for tests
that freeze or kill a worker in the middle of a real job.

(Named for the brief; pytest collects this module but finds no tests in it.)"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

from flask import Flask

from src.app import create_app
from src.cli.admin import run_worker
from src.jobs.kinds import default_kinds
from src.migrate import upgrade
from src.settings import Settings
from tests.support.test_kinds import make_kinds

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Settings the parent's environment must not leak into a worker the test configures itself.
_OWN = (
    "DATABASE_URL",
    "REDIS_URL",
    "QUEUE_PATH",
    "API_TOKENS",
    "WORKER_THREADS",
    "JOB_HEARTBEAT_S",
    "JOB_STALE_AFTER_S",
    "JOB_MAX_ATTEMPTS",
)


def worker_env(tmp: pathlib.Path, **settings: str) -> dict[str, str]:
    """The environment for workers sharing a freshly migrated SQLite database in `tmp`: text logs, a
    heartbeat every 0.5 s, two threads each, and `settings` (REDIS_URL or QUEUE_PATH, say) on top."""
    database_url = f"sqlite:///{tmp / 'gpusnap.db'}"
    upgrade(database_url)
    return {
        "DATABASE_URL": database_url,
        "LOG_FORMAT": "text",
        "JOB_HEARTBEAT_S": "0.5",
        "TEST_WORKER_THREADS": "2",
        **settings,
    }


def control_app(env: dict[str, str]) -> Flask:
    """The app a test adds, enqueues and reads jobs through, configured like the workers of `env`."""
    return create_app(Settings.from_env(env, dotenv=False), job_kinds=make_kinds(), configure_logs=False)


class WorkerProcess:
    """A worker subprocess logging to `<tmp>/<name>.log`."""

    def __init__(self, env: dict[str, str], tmp: pathlib.Path, name: str) -> None:
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.ready_path = tmp / f"{name}.ready"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in _OWN},
            **env,
            "TEST_WORKER_READY_FILE": str(self.ready_path),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> WorkerProcess:
        self.ready_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.test_worker"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_path.exists():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: no clean-up code runs, as in a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP the whole process group: the worker stops mid-step, its heartbeat with it (a stalled VM,
        a long GC pause, a laptop lid closed), and carries on where it was after `thaw`."""
        assert self.proc is not None and self.proc.poll() is None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (Huey stops at once), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGCONT)  # a frozen worker cannot act on SIGTERM
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def main() -> None:
    settings = Settings.from_env(dotenv=False)
    kinds = make_kinds()
    if os.environ.get("TEST_WORKER_KINDS") == "all":
        kinds = {**default_kinds(), **kinds}
    app = create_app(settings, job_kinds=kinds)
    ready = os.environ.get("TEST_WORKER_READY_FILE")
    if ready:
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
    run_worker(app.extensions["gpusnap"], threads=int(os.environ.get("TEST_WORKER_THREADS", "2")))


if __name__ == "__main__":
    main()
