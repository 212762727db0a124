"""Data-plane benchmark: our streaming snapshot/restore vs the old staged pipeline, side by side.

    .venv/bin/python bench/bench_dataplane.py [--size 2G] [--rounds 1] [--gpu]

Same synthetic workspace (bench/workspace.py), same SeaweedFS server, same zstd level and thread
count. Measures wall time, peak extra local disk (spool directories, sampled every 50 ms), peak
memory of the whole process tree (RSS + memfds), compression ratio; writes JSON to stdout and
bench/out/, and a markdown table into docs/benchmarks.md between the dataplane markers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from report import gpu_codecs, tree_signature, write_docs  # noqa: E402
from sampler import Sampler  # noqa: E402
from workspace import build, parse_size  # noqa: E402

from tests.support.s3_server import SeaweedS3Server, s5cmd_binary  # noqa: E402

SCRIPTS = os.path.join(ROOT, "src", "remote_scripts")


SERVER_PID = [0]


def server_cpu() -> float:
    """CPU seconds used so far by the S3 server (it shares the machine, so it is part of the cost)."""
    try:
        with open("/proc/%d/stat" % SERVER_PID[0]) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measured(cmd: list[str], stdin: str, env: dict[str, str], dirs: list[str]) -> dict[str, Any]:
    """Run one pipeline, sampling its process tree; returns wall time, peaks and its last JSON line."""
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server_cpu()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    with Sampler(proc.pid, dirs) as sampler:
        out, err = proc.communicate(stdin)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError("%s failed (%s): %s %s" % (cmd[-1], proc.returncode, out[-2000:], err[-2000:]))
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "server_cpu_s": round(server_cpu() - server_before, 2),
        "peak_mem_bytes": sampler.peak_mem,
        "peak_rss_bytes": sampler.peak_rss,
        "peak_disk_bytes": sampler.peak_disk,
        "samples": sampler.samples,
        "result": lines[-1],
    }


def run_round(n: int, args: argparse.Namespace, s3: Any, ws: str, work: str) -> dict[str, Any]:
    s5 = s5cmd_binary()
    creds = dict(os.environ, AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key, AWS_REGION=s3.region)
    tag = "bench/%d-r%d" % (int(time.time()), n)
    ours_cfg = {
        "workspace_path": ws,
        "prefix": tag + "/ours/",
        "codec": "zstd",
        "zstd_level": args.level,
        "part_size": args.part_size,
        "parallelism": args.parallelism,
        "s5cmd": s5,
        "work_dir": os.path.join(work, "spool-ours"),
        "s3": s3.script_s3(),
    }
    staged_cfg = {
        "workspace": ws,
        "endpoint": s3.endpoint,
        "url": "s3://%s/%s/staged/" % (s3.bucket, tag),
        "level": args.level,
        "threads": os.cpu_count() or 1,
        "s5cmd": s5,
    }
    out: dict[str, Any] = {}
    py = sys.executable
    steps = [("staged", "snapshot"), ("ours", "snapshot"), ("ours", "restore"), ("staged", "restore")]
    if n % 2:
        steps = [("ours", "snapshot"), ("staged", "snapshot"), ("staged", "restore"), ("ours", "restore")]
    for who, op in steps:
        # Restored trees are deleted only at the end of the run: on this host's ext4 (mounted with
        # `discard`) deleting 2 GB slows the filesystem for a while and would tax the next step.
        target = os.path.join(work, "restored", "%s-r%d" % (who, n), "ws")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        spool = os.path.join(work, "spool-" + who)
        shutil.rmtree(spool, ignore_errors=True)
        os.sync()  # each step starts with no dirty pages left by the previous one
        if who == "ours":
            cfg = dict(ours_cfg, workspace_path=target if op == "restore" else ws)
            cmd, env = [py, os.path.join(SCRIPTS, op + ".py")], dict(os.environ)
        else:
            cfg = dict(staged_cfg, spool=spool, target=target)
            cmd, env = [py, os.path.join(HERE, "staged.py"), op], creds
        print("round %d: %s %s ..." % (n, who, op), file=sys.stderr, flush=True)
        res = measured(cmd, json.dumps(cfg), env, [spool])
        if op == "restore":
            res["identical"] = tree_signature(target, 1 if who == "ours" else 10**9) == tree_signature(
                ws, 1 if who == "ours" else 10**9
            )
        out["%s_%s" % (who, op)] = res
        print(
            "  %.1f s (cpu %.1f s + server %.1f s), peak mem %.0f MiB, peak disk %.0f MiB"
            % (
                res["wall_s"],
                res["cpu_s"],
                res["server_cpu_s"],
                res["peak_mem_bytes"] / 2**20,
                res["peak_disk_bytes"] / 2**20,
            ),
            file=sys.stderr,
        )
    return out


def summarize(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in rounds)

    last = rounds[-1]
    ours_raw = last["ours_snapshot"]["result"]["raw_bytes"]
    summary: dict[str, Any] = {}
    for op in ("snapshot", "restore"):
        row = {}
        for who in ("ours", "staged"):
            key = "%s_%s" % (who, op)
            row[who] = {
                "wall_s": med(key, "wall_s"),
                "cpu_s": med(key, "cpu_s"),
                "server_cpu_s": med(key, "server_cpu_s"),
                "peak_mem_bytes": max(r[key]["peak_mem_bytes"] for r in rounds),
                "peak_disk_bytes": max(r[key]["peak_disk_bytes"] for r in rounds),
            }
        row["wall_ratio"] = round(row["ours"]["wall_s"] / row["staged"]["wall_s"], 3)
        summary[op] = row
    staged = last["staged_snapshot"]["result"]
    summary["ratio"] = {
        "ours": round(ours_raw / last["ours_snapshot"]["result"]["stored_bytes"], 3),
        "staged": round(staged["raw_bytes"] / staged["stored_bytes"], 3),
    }
    bound = args.parallelism * args.part_size
    summary["goals"] = {
        "snapshot_wall_ratio<=0.75": summary["snapshot"]["wall_ratio"] <= 0.75,
        "restore_wall_ratio<=0.75": summary["restore"]["wall_ratio"] <= 0.75,
        "extra_disk<=parts_in_flight*part_size": max(
            summary[o]["ours"]["peak_disk_bytes"] for o in ("snapshot", "restore")
        )
        <= bound,
        "peak_mem<=1GiB": max(summary[o]["ours"]["peak_mem_bytes"] for o in ("snapshot", "restore")) <= 1 << 30,
        "restores_identical": all(r[k]["identical"] for r in rounds for k in ("ours_restore", "staged_restore")),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G", help="workspace size (e.g. 512M, 2G)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat, alternating order; medians reported")
    ap.add_argument("--workdir", default=os.path.join("/tmp", "gpusnap-bench"))
    ap.add_argument("--part-size", type=parse_size, default=parse_size("32M"))
    ap.add_argument("--parallelism", type=int, default=4)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="also compare nvCOMP ANS with zstd on the same parts")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    ws = os.path.join(args.workdir, "workspace-%d" % size)
    if not os.path.exists(os.path.join(ws, ".complete")):
        shutil.rmtree(ws, ignore_errors=True)
        print("building %s workspace in %s ..." % (args.size, ws), file=sys.stderr)
        build(ws, size)
        open(os.path.join(ws, ".complete"), "w").close()
    report: dict[str, Any] = {
        "size": args.size,
        "workspace_bytes": size,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "params": {"part_size": args.part_size, "parallelism": args.parallelism, "zstd_level": args.level},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.gpu:
        report["gpu"] = gpu_codecs(ws, args.part_size, args.level)
    shutil.rmtree(os.path.join(args.workdir, "restored"), ignore_errors=True)
    server = SeaweedS3Server(data_dir=os.path.join(args.workdir, "weed"))
    shutil.rmtree(server.root, ignore_errors=True)
    os.makedirs(server.root)
    s3 = server.start()
    SERVER_PID[0] = server.proc.pid if server.proc else 0
    try:
        rounds = [run_round(n, args, s3, ws, args.workdir) for n in range(args.rounds)]
    finally:
        server.stop()
        shutil.rmtree(os.path.join(args.workdir, "weed"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.workdir, "restored"), ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    report["rounds"] = rounds
    report["summary"] = summarize(rounds, args)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    path = os.path.join(HERE, "out", "dataplane-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    if not args.no_docs:
        write_docs(os.path.join(ROOT, "docs", "benchmarks.md"), report)
    print(json.dumps(report["summary"], indent=1))
    return 0 if all(report["summary"]["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
