"""WAN benchmark: snapshot and restore through a shaped link, as a fraction of the link rate.

    .venv/bin/python bench/bench_wan.py [--size 256M] [--conn-rate 6M] [--link-rate 48M] [--delay-ms 15]
                                        [--parallelism 4,16] [--tools ours,staged,pipe] [--no-docs]

SeaweedFS on loopback behind bench/wanproxy.py (per-connection cap, shared link cap, one-way delay),
an incompressible workspace (what the link must carry is then the workspace itself), and three ways
to move it, each snapshot then restore:

* ours: src/remote_scripts/snapshot.py / restore.py, run as bench_dataplane.py runs them, codec zstd,
  32 MiB parts, once per `--parallelism` value (parts in flight / read ahead);
* staged: bench/staged.py, the first design (tar to disk, 32 parts, `s5cmd --numworkers 32`);
* pipe: `tar | zstd -T0 | s5cmd pipe` and `s5cmd cat | zstd -d | tar -x`: one stream.

Reports wall time and (bytes the link carried / wall) / link rate. Restores are checked against the
workspace (bench/report.tree_signature). Writes JSON to bench/out/ and, unless --no-docs, a table into
docs/benchmarks.md between the wan markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from report import tree_signature  # noqa: E402
from wanproxy import parse_rate  # noqa: E402
from workspace import parse_size  # noqa: E402

from tests.support.s3_server import SeaweedS3Server, s5cmd_binary  # noqa: E402

SCRIPTS = os.path.join(ROOT, "src", "remote_scripts")


def incompressible_workspace(root: str, size: int) -> None:
    """3/4 in eight big files, 1/4 in 2000 small ones, all random bytes."""
    os.makedirs(os.path.join(root, "small"))
    big = size * 3 // 4 // 8
    for i in range(8):
        with open(os.path.join(root, "big-%d.bin" % i), "wb") as fh:
            for _ in range(0, big, 1 << 20):
                fh.write(os.urandom(min(1 << 20, big)))
    small = size // 4 // 2000
    for i in range(2000):
        with open(os.path.join(root, "small", "f%04d" % i), "wb") as fh:
            fh.write(os.urandom(small))
    open(os.path.join(root, ".complete"), "w").close()


def start_proxy(upstream: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "wanproxy.py"),
            "--upstream",
            upstream,
            "--conn-rate",
            args.conn_rate,
            "--link-rate",
            args.link_rate,
            "--delay-ms",
            str(args.delay_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "LISTEN":
        raise RuntimeError("wanproxy did not start")
    return proc, "http://" + line[1]


def cpu_of(pid: int) -> float:
    """CPU seconds a process has used (the proxy shares the CPUs with what it measures)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run(cmd: list[str], stdin: str, env: dict[str, str], shell: bool = False) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        env=env,
        text=True,
        shell=shell,
        executable="/bin/bash" if shell else None,
    )
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            "%s failed (%d): %s %s"
            % (cmd if shell else cmd[-1], proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
        )
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip().startswith("{")]
    return wall, (lines[-1] if lines else {})


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--conn-rate", default="6M")
    ap.add_argument("--link-rate", default="48M")
    ap.add_argument("--delay-ms", type=float, default=15.0, help="one way; RTT is twice this")
    ap.add_argument("--parallelism", default="4,16")
    ap.add_argument("--part-size", type=parse_size, default=parse_size("32M"))
    ap.add_argument("--codec", default="zstd", help="ours: zstd (as bench_dataplane), or auto (the default shipped)")
    ap.add_argument("--tools", default="ours,staged,pipe")
    ap.add_argument("--workdir", default="/tmp/gpusnap-wan")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    size, link = parse_size(args.size), parse_rate(args.link_rate)
    ws = os.path.join(args.workdir, "ws-%d" % size)
    if not os.path.exists(os.path.join(ws, ".complete")):
        shutil.rmtree(ws, ignore_errors=True)
        incompressible_workspace(ws, size)
    server = SeaweedS3Server(data_dir=os.path.join(args.workdir, "weed"))
    shutil.rmtree(server.root, ignore_errors=True)
    os.makedirs(server.root)
    s3 = server.start()
    proxy, endpoint = start_proxy(s3.endpoint.split("//", 1)[1], args)
    s5 = s5cmd_binary()
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key, AWS_REGION=s3.region)
    tag = "wan/%d" % int(time.time())
    want, coarse = tree_signature(ws), tree_signature(ws, 10**9)
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "size": size,
        "part_size": args.part_size,
        "conn_rate": args.conn_rate,
        "link_rate": args.link_rate,
        "delay_ms": args.delay_ms,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "rows": rows,
    }
    try:
        for tool in args.tools.split(","):
            for par in [int(p) for p in args.parallelism.split(",")] if tool == "ours" else [None]:
                label = (
                    "ours, %s, %d MiB parts, parallelism %d" % (args.codec, args.part_size >> 20, par)
                    if tool == "ours"
                    else "staged (32 parts, 32 workers)"
                    if tool == "staged"
                    else "tar \\| zstd -T0 \\| s5cmd pipe"
                )
                prefix = "%s/%s%s/" % (tag, tool, par or "")
                target = os.path.join(args.workdir, "restored", prefix.replace("/", "_"), "ws")
                shutil.rmtree(os.path.dirname(target), ignore_errors=True)
                os.makedirs(os.path.dirname(target))
                for op in ("snapshot", "restore"):
                    print("%s %s ..." % (label, op), file=sys.stderr, flush=True)
                    proxy_cpu, load = cpu_of(proxy.pid), os.getloadavg()[0]
                    if tool == "ours":
                        cfg = {
                            "workspace_path": target if op == "restore" else ws,
                            "prefix": prefix,
                            "codec": args.codec,
                            "zstd_level": 3,
                            "part_size": args.part_size,
                            "parallelism": par,
                            "s5cmd": s5,
                            "bootstrap": False,
                            "s3": s3.script_s3(endpoint=endpoint),
                        }
                        wall, res = run(
                            [sys.executable, os.path.join(SCRIPTS, op + ".py")], json.dumps(cfg), dict(os.environ)
                        )
                        moved = res["stored_bytes"]
                    elif tool == "staged":
                        cfg = {
                            "workspace": ws,
                            "spool": os.path.join(args.workdir, "spool"),
                            "target": target,
                            "endpoint": endpoint,
                            "url": "s3://%s/%s" % (s3.bucket, prefix),
                            "level": 3,
                            "threads": os.cpu_count() or 1,
                            "s5cmd": s5,
                        }
                        shutil.rmtree(cfg["spool"], ignore_errors=True)
                        wall, res = run([sys.executable, os.path.join(HERE, "staged.py"), op], json.dumps(cfg), env)
                        moved = res["stored_bytes"] if op == "snapshot" else rows[-1]["bytes"]
                    else:
                        url = "s3://%s/%sws.tar.zst" % (s3.bucket, prefix)
                        s5e = "%s --endpoint-url %s" % (s5, endpoint)
                        cmd = (
                            "set -o pipefail; tar -c -C %s --sparse --numeric-owner . | zstd -T0 -3 -q | %s pipe %s"
                            % (ws, s5e, url)
                            if op == "snapshot"
                            else "set -o pipefail; %s cat %s | zstd -d -q | tar -x -C %s --numeric-owner"
                            % (s5e, url, target)
                        )
                        if op == "restore":
                            os.makedirs(target, exist_ok=True)
                        wall, _ = run(cmd, "", env, shell=True)  # type: ignore[arg-type]
                        listing = subprocess.run(
                            [s5, "--endpoint-url", s3.endpoint, "ls", url],
                            env=env,
                            stdout=subprocess.PIPE,
                            text=True,
                            check=True,
                        ).stdout.split()
                        moved = int(listing[-2])
                    row = {
                        "tool": label,
                        "op": op,
                        "wall_s": round(wall, 2),
                        "bytes": moved,
                        "timings": res.get("timings") if tool != "pipe" else None,
                        "tuning": res.get("tuning") if tool == "ours" else None,  # gs_tuning's choices
                        "proxy_cpu_s": round(cpu_of(proxy.pid) - proxy_cpu, 2),
                        "load1": round(load, 1),
                        "mb_s": round(moved / wall / 1e6, 1),
                        "link_fraction": round(moved / wall / link, 3),
                    }
                    if op == "restore":
                        # staged and pipe write GNU-format tar: whole-second mtimes
                        res_ns = 1 if tool == "ours" else 10**9
                        row["identical"] = tree_signature(target, res_ns) == (want if tool == "ours" else coarse)
                    rows.append(row)
                    print("  %s" % json.dumps(row), file=sys.stderr, flush=True)
                shutil.rmtree(os.path.dirname(target), ignore_errors=True)
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.stop()
        shutil.rmtree(os.path.join(args.workdir, "weed"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.workdir, "restored"), ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "wan-%s.json" % time.strftime("%Y%m%d-%H%M%S")), "w") as fh:
        json.dump(report, fh, indent=1)
    table = [
        "| tool | op | wall s | MB/s | fraction of link | proxy CPU s | load | restore identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table += [
        "| %s | %s | %.1f | %.1f | **%.0f %%** | %.1f | %.1f | %s |"
        % (
            r["tool"],
            r["op"],
            r["wall_s"],
            r["mb_s"],
            100 * r["link_fraction"],
            r["proxy_cpu_s"],
            r["load1"],
            r.get("identical", ""),
        )
        for r in rows
    ]
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
