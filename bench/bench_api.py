"""API latency benchmark: `GET /api/gpu-snapshots` (default page of 50, with a bearer token) served by
gunicorn with the production config (`gunicorn.conf.py`, `app:app`, a real process), over a database
holding 1,000 snapshots of 20 machines, driven at a constant arrival rate.

    .venv/bin/python bench/bench_api.py                       # SQLite in a temporary directory
    .venv/bin/python bench/bench_api.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/bench_api.py --update-docs         # also rewrite the api section of docs/benchmarks.md

With `--database-url`, the URL names a PostgreSQL server: a scratch database is created there and dropped
at the end (nothing else is touched).

The load generator (bench/loadgen.py) is open-loop, as wrk2 is: latency counts from each request's due
time, so a slow server cannot hide its queueing delay (no coordinated omission). It runs in this process
(threads over keep-alive connections), on the same machine as the server.

`--capacity` adds a closed-loop run with `wrk` (apt-get install -y wrk) to find the saturation
throughput; plain wrk has no constant-rate mode, so it is not used for the latency figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import pathlib
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import get_once, open_loop, wrk_capacity  # noqa: E402
from report import replace_section  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- api:begin -->", "<!-- api:end -->"
STATIC_TOKEN = "bench-" + uuid.uuid4().hex


# ---- data ----------------------------------------------------------------------------------------


def seed(database_url: str, *, rows: int, machines: int) -> None:
    """Migrate, then insert `machines` machines and `rows` complete snapshots spread over them."""
    from src.db import make_engine, make_session_factory, transaction
    from src.migrate import upgrade
    from src.models import Machine, Snapshot, new_id, utcnow

    upgrade(database_url)
    engine = make_engine(database_url)
    rng = random.Random(7)
    try:
        with transaction(make_session_factory(engine)) as s:
            ids = [f"bench-{i:03d}" for i in range(machines)]
            s.add_all(
                Machine(
                    id=m,
                    status="running",
                    ssh_host=f"10.0.{i // 250}.{i % 250 + 1}",
                    ssh_port=22,
                    ssh_user="root",
                    workspace_path="/workspace",
                    vast_instance_id=1_000_000 + i,
                )
                for i, m in enumerate(ids)
            )
            s.flush()
            for _ in range(rows):
                machine = rng.choice(ids)
                snap_id = new_id("snap")
                parts = rng.randint(1, 400)
                raw = parts * 64 * 2**20
                stored = int(raw / rng.uniform(1.5, 4))
                s.add(
                    Snapshot(
                        id=snap_id,
                        name=f"nightly {rng.randint(1, 999)}",
                        machine_id=machine,
                        status="complete",
                        storage_prefix=f"snapshots/{machine}/{snap_id}/",
                        workspace_path="/workspace",
                        source_host="10.0.0.1",
                        codec="zstd",
                        requested_codec="auto",
                        excludes=["*.tmp", ".cache"],
                        part_count=parts,
                        part_size=64 * 2**20,
                        raw_bytes=raw,
                        stored_bytes=stored,
                        file_count=rng.randint(100, 200_000),
                        manifest_sha256=hashlib.sha256(snap_id.encode()).hexdigest(),
                        timings={"tar_s": 12.5, "upload_s": 40.1, "total_s": 55.0},
                        duration_s=55.0,
                        completed_at=utcnow(),
                    )
                )
    finally:
        engine.dispose()


class PostgresScratch:
    """A database of our own on the server `admin_url` names, dropped on exit."""

    def __init__(self, admin_url: str) -> None:
        import sqlalchemy as sa

        self.name = f"gpusnap_bench_{uuid.uuid4().hex[:10]}"
        self._admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        self.url = admin_url.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        import sqlalchemy as sa

        with self._admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()


# ---- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    def __init__(
        self,
        *,
        database_url: str,
        queue_path: str,
        port: int,
        log_path: pathlib.Path,
        workers: int | None,
        threads: int | None,
        token: str,
    ) -> None:
        self.token = token
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "QUEUE_PATH": queue_path,
            "API_TOKENS": STATIC_TOKEN,
            "LOG_LEVEL": "WARNING",
            "SSH_ALLOWED_NETWORKS": "10.0.0.0/8",
        }
        env.pop("REDIS_URL", None)
        if workers:
            env["GUNICORN_WORKERS"] = str(workers)
        if threads:
            env["GUNICORN_THREADS"] = str(threads)
        self.port = port
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                str(ROOT / "gunicorn.conf.py"),
                "--chdir",
                str(ROOT),
                "--bind",
                f"127.0.0.1:{port}",
                "app:app",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, path: str, timeout: float = 60) -> None:
        """Until every worker answers: one request per second of patience, each on a new connection."""
        deadline = time.monotonic() + timeout
        ok = 0
        while ok < 20:
            if self.proc.poll() is not None:
                raise SystemExit(f"gunicorn exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("gunicorn did not answer in time")
            try:
                status, _ = get_once(self.port, path, self.token)
                ok = ok + 1 if status == 200 else 0
            except OSError:
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# ---- report --------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "## API: `GET /api/gpu-snapshots`",
        "",
        f"Measured {report['when']} on {report['machine']['cpus']} CPUs ({report['machine']['cpu']}), "
        f"Python {report['machine']['python']}; gunicorn `gunicorn.conf.py` "
        f"({report['server']['workers']} workers x {report['server']['threads']} threads, gthread); "
        f"{report['data']['snapshots']:,} snapshots of {report['data']['machines']} machines; page of "
        f"{report['request']['limit']} ({report['request']['response_bytes']:,} bytes of JSON). Open-loop load "
        f"at a constant arrival rate over {report['load']['connections']} keep-alive connections from the same "
        "machine; latency counts from each request's due time (no coordinated omission). Token `static`: "
        "from API_TOKENS (hashed at start); `db`: made with `gpusnap tokens create`, looked up per request. "
        "The last column is the 1-minute load average when the run started and ended: the machine is shared, "
        "and anything else running shows in the tail.",
        "",
        "| database | token | target rate | achieved | requests | errors | p50 | p90 | p99 | p99.9 | max | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lat = run["latency_ms"]
        lines.append(
            f"| {run['database']} | {run['token']} | {run['target_rate']:g}/s | {run['achieved_rate']:g}/s "
            f"| {run['requests']} "
            f"| {run['errors']} | {lat['p50']} ms | {lat['p90']} ms | {lat['p99']} ms | {lat['p99.9']} ms "
            f"| {lat['max']} ms | {run['loadavg_1m'][0]:g} → {run['loadavg_1m'][1]:g} |"
        )
    caps = [(f"{run['database']} | {run['token']}", run["capacity"]) for run in report["runs"] if run.get("capacity")]
    if caps:
        lines += [
            "",
            f"Saturation (closed loop, `wrk`, {caps[0][1]['connections']} connections, {caps[0][1]['seconds']} s):",
            "",
            "| database | token | requests/s | p50 | p90 | p99 |",
            "|---|---|---|---|---|---|",
        ]
        for database, cap in caps:
            lat = cap["latency_ms"]
            lines.append(
                f"| {database} | {cap['requests_per_s']:g} | {lat.get('p50')} ms | {lat.get('p90')} ms "
                f"| {lat.get('p99')} ms |"
            )
    lines += ["", f"Reproduce: `{report['command']}`", END]
    return "\n".join(lines)


def update_docs(section: str) -> None:
    """Replace only the api section of docs/benchmarks.md (other sections belong to other benchmarks)."""
    replace_section(DOCS, BEGIN, END, section)


# ---- main ----------------------------------------------------------------------------------------


def _db_token(database_url: str) -> str:
    from src.db import make_engine, make_session_factory
    from src.services.tokens import create_token

    engine = make_engine(database_url)
    try:
        return create_token(make_session_factory(engine), f"bench-{uuid.uuid4().hex[:8]}")
    finally:
        engine.dispose()


@contextlib.contextmanager
def serving(
    database_url: str, token: str, args: argparse.Namespace, tmp: pathlib.Path, label: str
) -> Iterator[tuple[int, str, bytes]]:
    """gunicorn on a free port, ready; yields (port, path, one response body)."""
    port = free_port()
    server = Gunicorn(
        database_url=database_url,
        queue_path=str(tmp / "queue.db"),
        port=port,
        log_path=tmp / f"gunicorn-{label.replace('/', '-')}.log",
        workers=args.workers,
        threads=args.threads,
        token=token,
    )
    path = f"/api/gpu-snapshots?limit={args.limit}"
    try:
        server.wait_ready(path)
        status, body = get_once(port, path, token)
        assert status == 200 and len(json.loads(body)["items"]) == min(args.limit, args.rows), body[:200]
        yield port, path, body
    finally:
        server.stop()


def measure_latency(target: dict[str, Any], args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    label = f"{target['database']}/{target['token']}"
    with serving(target["url"], target["secret"], args, tmp, label) as (port, path, body):
        print(f"[{label}] warm-up {args.warmup:g}s at {args.rate:g}/s ...", file=sys.stderr)
        open_loop(
            port=port,
            path=path,
            token=target["secret"],
            rate=args.rate,
            duration=args.warmup,
            connections=args.connections,
        )
        print(f"[{label}] measuring {args.duration:g}s at {args.rate:g}/s ...", file=sys.stderr)
        load_before = os.getloadavg()[0]
        run = open_loop(
            port=port,
            path=path,
            token=target["secret"],
            rate=args.rate,
            duration=args.duration,
            connections=args.connections,
        )
    run["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return {"database": target["database"], "token": target["token"], "response_bytes": len(body), **run}


def measure_capacity(target: dict[str, Any], args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any] | None:
    label = f"{target['database']}/{target['token']}"
    with serving(target["url"], target["secret"], args, tmp, label + "-capacity") as (port, path, _):
        print(f"[{label}] saturating for {args.capacity}s (wrk) ...", file=sys.stderr)
        return wrk_capacity(port=port, path=path, token=target["secret"], seconds=args.capacity, connections=16)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--database-url",
        help="a PostgreSQL server (a scratch database is created there); "
        "SQLite in a temporary directory is always measured too",
    )
    p.add_argument("--no-sqlite", action="store_true", help="with --database-url: measure PostgreSQL only")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured (default 30)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds at the same rate before measuring")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections of the load generator")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--machines", type=int, default=20)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--workers", type=int, help="GUNICORN_WORKERS (default: gunicorn.conf.py's)")
    p.add_argument("--threads", type=int, help="GUNICORN_THREADS (default: gunicorn.conf.py's)")
    p.add_argument(
        "--capacity",
        type=int,
        default=0,
        metavar="SECONDS",
        help="also measure saturation throughput with wrk for this many seconds",
    )
    p.add_argument(
        "--token",
        choices=("static", "db", "both"),
        default="both",
        help="static: from API_TOKENS (hashed once at start); db: made like `gpusnap tokens create`, "
        "looked up in the database on every request",
    )
    p.add_argument("--pause", type=float, default=5.0, help="seconds of rest between latency runs")
    p.add_argument("--json-out", type=pathlib.Path)
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the api section of {DOCS.relative_to(ROOT)}")
    args = p.parse_args(argv)

    import multiprocessing

    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(
            f"warning: load average {load_before:.2f} before starting: other work on this machine will show "
            "in the latency tail",
            file=sys.stderr,
        )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpusnap-bench-") as tmpdir, contextlib.ExitStack() as cleanup:
        tmp = pathlib.Path(tmpdir)
        databases = []
        if not (args.database_url and args.no_sqlite):
            databases.append(("sqlite", f"sqlite:///{tmp / 'gpusnap.db'}"))
        if args.database_url:
            scratch = PostgresScratch(args.database_url)
            cleanup.callback(scratch.drop)
            databases.append(("postgres", scratch.url))
        targets = []
        for database, url in databases:
            print(f"[{database}] seeding {args.rows} snapshots ...", file=sys.stderr)
            seed(url, rows=args.rows, machines=args.machines)
            for source in ("static", "db") if args.token == "both" else (args.token,):
                targets.append(
                    {
                        "database": database,
                        "url": url,
                        "token": source,
                        "secret": STATIC_TOKEN if source == "static" else _db_token(url),
                    }
                )
        # Every latency run first: a saturation run leaves the machine busy (and its load average high)
        # for a while after it ends.
        for target in targets:
            runs.append(measure_latency(target, args, tmp))
            time.sleep(args.pause)
        if args.capacity:
            for run, target in zip(runs, targets):
                run["capacity"] = measure_capacity(target, args, tmp)

    report = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": multiprocessing.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "server": gunicorn_settings(workers=args.workers, threads=args.threads),
        "data": {"snapshots": args.rows, "machines": args.machines},
        "request": {
            "path": f"/api/gpu-snapshots?limit={args.limit}",
            "limit": args.limit,
            "token": args.token,
            "response_bytes": runs[0]["response_bytes"],
        },
        "load": {"generator": "open loop, python threads", "connections": args.connections, "warmup_s": args.warmup},
        "runs": runs,
        "command": " ".join(["python bench/bench_api.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if args.update_docs:
        update_docs(markdown(report))
        print(f"updated {DOCS}", file=sys.stderr)
    return report


def gunicorn_settings(*, workers: int | None, threads: int | None) -> dict[str, Any]:
    """What gunicorn.conf.py resolves to here, with the same overrides the server got."""
    import runpy

    saved = dict(os.environ)
    try:
        if workers:
            os.environ["GUNICORN_WORKERS"] = str(workers)
        if threads:
            os.environ["GUNICORN_THREADS"] = str(threads)
        conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"workers": conf["workers"], "threads": conf["threads"], "worker_class": conf["worker_class"]}


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
