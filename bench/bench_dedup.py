"""Snapshot format 2 (deduplicated, incremental) benchmark: what a re-hibernate of a 1%-changed
workspace uploads and costs, against a first snapshot and against format 1.

    .venv/bin/python bench/bench_dedup.py [--size 2G] [--snapshots 7] [--no-docs]

Workspace: bench/workspace.py (bf16-like weight shards, an incompressible dataset blob, logs, a
source tree of many small files). Each "1% change": an in-place edit of a weight shard, an append to
the training log, a new checkpoint file, and a package upgrade (one package directory's files
rewritten, some removed, some added). Runs snapshot.py/restore.py directly against SeaweedFS on
this host, as bench_dataplane.py does, and computes known_chunks from the previous manifests itself
(what the control plane sends from its database). Writes JSON to bench/out/ and a section of
docs/benchmarks.md between the dedup markers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
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

import bench_dataplane  # noqa: E402
from report import replace_section  # noqa: E402
from workspace import build, parse_size, write_weights  # noqa: E402

from tests.support.s3_server import SeaweedS3Server, s5cmd_binary  # noqa: E402

SCRIPTS = os.path.join(ROOT, "src", "remote_scripts")
BEGIN, END = "<!-- dedup:begin -->", "<!-- dedup:end -->"


def content_signature(root: str) -> str:
    """Digest of every entry's path, type, mode, mtime, link target and content (byte-identical check)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else ""
            digest.update(
                ("%s|%o|%d|%s\n" % (os.path.relpath(path, root), st.st_mode, st.st_mtime_ns, link)).encode(
                    "utf-8", "surrogateescape"
                )
            )
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        digest.update(block)
    return digest.hexdigest()


def change_one_percent(ws: str, step: int, size: int) -> dict[str, int]:
    """About 1% of `size` changed: edit, append, new checkpoint, package upgrade."""
    rng = random.Random(1000 + step)
    shards = sorted(os.listdir(os.path.join(ws, "models", "llama-mini")))
    shard = os.path.join(ws, "models", "llama-mini", shards[step % len(shards)])
    edit = max(4096, size // 1000)  # 0.1%: a fine-tuned slice, rewritten in place
    with open(shard, "r+b") as fh:
        fh.seek(rng.randrange(max(1, os.path.getsize(shard) - edit)))
        fh.write(os.urandom(edit))
    append = size // 500  # 0.2% of log lines
    with open(os.path.join(ws, "logs", "train.log"), "a") as fh:
        line = "step=%d loss=%.4f lr=3e-4 tokens/s=41234\n"
        fh.write("".join(line % (i, rng.random()) for i in range(append // 40)))
    ckpt = size // 200  # 0.5%: a new checkpoint
    write_weights(os.path.join(ws, "models", "ckpt-step-%05d.safetensors" % (1000 * (step + 1))), ckpt)
    pkgs = sorted(os.listdir(os.path.join(ws, "src")))
    pkg = os.path.join(ws, "src", pkgs[step % len(pkgs)])
    upgraded = 0
    for dirpath, _dirs, files in os.walk(pkg):  # the upgrade: every file rewritten, a few removed/added
        for i, name in enumerate(sorted(files)):
            path = os.path.join(dirpath, name)
            if i % 10 == 0:
                os.unlink(path)
                continue
            with open(path, "a") as fh:
                fh.write("# upgraded to %d.%d\n" % (step + 2, rng.randrange(100)))
            upgraded += os.path.getsize(path)
        with open(os.path.join(dirpath, "new_in_v%d.py" % (step + 2)), "w") as fh:
            fh.write("VERSION = %d\n" % (step + 2) * 50)
    return {"edit": edit, "append": append, "checkpoint": ckpt, "package_bytes": upgraded}


def known_from(manifests: list[dict[str, Any]]) -> list[list[Any]]:
    rows: dict[str, list[Any]] = {}
    for m in manifests:
        for c in m["chunks"]:
            o = m["objects"][c["object"]]
            rows[c["raw_sha256"]] = [
                c["raw_sha256"],
                o["key"],
                c["offset"],
                c["stored_size"],
                c["raw_size"],
                c["codec"],
                c["sha256"],
                o["size"],
                o["sha256"],
            ]
    return list(rows.values())


class Bench:
    def __init__(self, s3: Any, args: argparse.Namespace) -> None:
        self.s3, self.args = s3, args
        self.tag = "bench/dedup-%d/" % int(time.time())
        self.store = self.tag + "m1/"
        self.manifests: list[dict[str, Any]] = []

    def cfg(self, ws: str, prefix: str, **extra: Any) -> dict[str, Any]:
        cfg = {
            "workspace_path": ws,
            "prefix": prefix,
            "codec": "zstd",
            "zstd_level": 3,
            "parallelism": self.args.parallelism,
            "s5cmd": s5cmd_binary(),
            "s3": self.s3.script_s3(),
            "bootstrap": False,
            "allow_external_symlinks": True,
        }
        cfg.update(extra)
        return cfg

    def run(self, op: str, cfg: dict[str, Any]) -> dict[str, Any]:
        os.sync()
        print("  %s %s ..." % (op, cfg["prefix"]), file=sys.stderr, flush=True)
        res = bench_dataplane.measured(
            [sys.executable, os.path.join(SCRIPTS, op + ".py")], json.dumps(cfg), dict(os.environ), []
        )
        print("    %.1f s, peak mem %.0f MiB" % (res["wall_s"], res["peak_mem_bytes"] / 2**20), file=sys.stderr)
        return res

    def snapshot_v2(self, ws: str, n: int) -> dict[str, Any]:
        cfg = self.cfg(
            ws, "%ss%d/" % (self.store, n), format=2, store_prefix=self.store, known_chunks=known_from(self.manifests)
        )
        res = self.run("snapshot", cfg)
        out = subprocess.run(
            [
                s5cmd_binary(),
                "--endpoint-url",
                self.s3.endpoint,
                "cat",
                "s3://%s/%s" % (self.s3.bucket, res["result"]["manifest_key"]),
            ],
            stdout=subprocess.PIPE,
            check=True,
            env=dict(
                os.environ,
                AWS_ACCESS_KEY_ID=self.s3.access_key,
                AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
                AWS_REGION=self.s3.region,
            ),
        )
        self.manifests.append(json.loads(out.stdout))
        res["prefix"] = cfg["prefix"]
        return res


def summary_row(res: dict[str, Any]) -> dict[str, Any]:
    r = res["result"]
    return {
        "wall_s": res["wall_s"],
        "cpu_s": res["cpu_s"],
        "server_cpu_s": res["server_cpu_s"],
        "peak_mem_bytes": res["peak_mem_bytes"],
        "raw_bytes": r["raw_bytes"],
        "stored_bytes": r["stored_bytes"],
        "bytes_uploaded": r.get("bytes_uploaded"),
        "chunks": r.get("chunks"),
        "chunks_new": r.get("chunks_new"),
    }


def restore_pair(b: Bench, work: str, v2_prefix: str, signature: str, rounds: int) -> dict[str, Any]:
    """v2 restore of the 2nd snapshot vs a full v1 restore, interleaved ABBA (the box is shared: a
    single pair measures the neighbours' load as much as ours); medians."""
    times: dict[str, list[float]] = {"v2": [], "v1": []}
    cpu: dict[str, list[float]] = {"v2": [], "v1": []}
    identical = True
    peak = 0
    order = []
    for r in range(rounds):
        order += ["v2", "v1"] if r % 2 == 0 else ["v1", "v2"]
    for n, who in enumerate(order):
        # Restored trees are removed only at the end of the run: deleting 2 GB (ext4 with discard)
        # slows the filesystem for a while and would tax the next restore (bench_dataplane.py too).
        target = os.path.join(work, "restored", "%s-%d" % (who, n), "ws")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if who == "v2":
            res = b.run("restore", b.cfg(target, v2_prefix, store_prefix=b.store))
            identical = identical and content_signature(target) == signature
        else:
            res = b.run("restore", b.cfg(target, b.tag + "v1/"))
        times[who].append(res["wall_s"])
        cpu[who].append(res["cpu_s"] + res["server_cpu_s"])
        peak = max(peak, res["peak_mem_bytes"]) if who == "v2" else peak
    return {
        "v2_wall_s": statistics.median(times["v2"]),
        "v1_wall_s": statistics.median(times["v1"]),
        "v2_runs": times["v2"],
        "v1_runs": times["v1"],
        "identical": identical,
        "peak_mem_bytes": peak,
        "v2_cpu_s": statistics.median(cpu["v2"]),
        "v1_cpu_s": statistics.median(cpu["v1"]),
    }


def measure(args: argparse.Namespace, s3: Any, ws: str, work: str) -> dict[str, Any]:
    b = Bench(s3, args)
    size = parse_size(args.size)
    out: dict[str, Any] = {}
    print("v1 snapshot (full, today's format) ...", file=sys.stderr)
    v1_runs = [b.run("snapshot", b.cfg(ws, b.tag + "v1/", part_size=32 << 20))]
    print("v2 snapshot 1 (nothing known) ...", file=sys.stderr)
    snaps = [b.snapshot_v2(ws, 1)]
    first_runs = [snaps[0]["wall_s"]]
    first_cpu = [snaps[0]["cpu_s"] + snaps[0]["server_cpu_s"]]
    if args.rounds > 1:  # the other order too: a fresh store (nothing known), then v1 again
        fresh = Bench(s3, args)
        fresh.store = b.tag + "m-fresh/"
        again = fresh.snapshot_v2(ws, 1)
        first_runs.append(again["wall_s"])
        first_cpu.append(again["cpu_s"] + again["server_cpu_s"])
        v1_runs.append(b.run("snapshot", b.cfg(ws, b.tag + "v1b/", part_size=32 << 20)))
    out["v1_snapshot"] = summary_row(v1_runs[0])
    out["v1_snapshot"]["runs"] = [r["wall_s"] for r in v1_runs]
    out["v1_snapshot"]["wall_s"] = statistics.median(out["v1_snapshot"]["runs"])
    out["v1_snapshot"]["cpu_runs"] = [r["cpu_s"] + r["server_cpu_s"] for r in v1_runs]
    changes = []
    for n in range(2, args.snapshots + 1):
        changes.append(change_one_percent(ws, n - 2, size))
        snaps.append(b.snapshot_v2(ws, n))
        if n == 2:
            out["restore"] = restore_pair(b, work, snaps[1]["prefix"], content_signature(ws), args.rounds)
    out["v2_snapshots"] = [summary_row(s) for s in snaps]
    out["v2_first_runs"] = first_runs
    out["v2_first_cpu_runs"] = first_cpu
    out["changes"] = changes
    held: dict[str, int] = {}
    for m in b.manifests:  # what gc leaves: every object some snapshot references, once
        for o in m["objects"]:
            held[o["key"]] = o["size"]
    first, second = out["v2_snapshots"][0], out["v2_snapshots"][1]
    out["summary"] = {
        "second_uploaded_pct_of_stored": round(100.0 * second["bytes_uploaded"] / first["stored_bytes"], 2),
        "second_vs_first_wall": round(second["wall_s"] / statistics.median(first_runs), 3),
        "second_vs_first_cpu": round((second["cpu_s"] + second["server_cpu_s"]) / statistics.median(first_cpu), 3),
        "restore_cpu_v2_vs_v1": round(out["restore"]["v2_cpu_s"] / out["restore"]["v1_cpu_s"], 3),
        "first_v2_vs_v1_cpu": round(
            statistics.median(first_cpu) / statistics.median(out["v1_snapshot"]["cpu_runs"]), 3
        ),
        "restore_2nd_vs_v1_restore": round(out["restore"]["v2_wall_s"] / out["restore"]["v1_wall_s"], 3),
        "restore_identical": out["restore"]["identical"],
        "held_after_%d_vs_one_full" % args.snapshots: round(sum(held.values()) / first["stored_bytes"], 3),
        "first_v2_vs_v1_wall": round(statistics.median(first_runs) / out["v1_snapshot"]["wall_s"], 3),
        "peak_mem_bytes": max([s["peak_mem_bytes"] for s in out["v2_snapshots"]] + [out["restore"]["peak_mem_bytes"]]),
    }
    out["held_bytes"] = sum(held.values())
    return out


def report_md(rep: dict[str, Any]) -> str:
    s, v1, snaps = rep["summary"], rep["v1_snapshot"], rep["v2_snapshots"]
    mib = lambda n: "%.0f MiB" % (n / 2**20)  # noqa: E731
    n = len(snaps)
    rows = [
        "| metric | measured | goal |",
        "|---|---|---|",
        "| 2nd snapshot uploads (%% of stored size) | **%.2f%%** (%s of %s) | <= 3%% |"
        % (s["second_uploaded_pct_of_stored"], mib(snaps[1]["bytes_uploaded"]), mib(snaps[0]["stored_bytes"])),
        "| 2nd / 1st snapshot wall time | **%.3f** (%.1f s / median %.1f s) | <= 0.25 |"
        % (s["second_vs_first_wall"], snaps[1]["wall_s"], statistics.median(rep["v2_first_runs"])),
        "| 2nd / 1st snapshot CPU seconds (pipeline + S3 server) | %.3f | (load-independent view) |"
        % (s["second_vs_first_cpu"]),
        "| restore of the 2nd / full v1 restore | **%.3f** (median %.1f s / %.1f s; runs %s / %s), "
        "byte-identical: %s | <= 1.1 |"
        % (
            s["restore_2nd_vs_v1_restore"],
            rep["restore"]["v2_wall_s"],
            rep["restore"]["v1_wall_s"],
            rep["restore"]["v2_runs"],
            rep["restore"]["v1_runs"],
            "yes" if s["restore_identical"] else "NO",
        ),
        "| restore CPU seconds, v2 / v1 (pipeline + S3 server) | %.3f (%.1f s / %.1f s) | |"
        % (s["restore_cpu_v2_vs_v1"], rep["restore"]["v2_cpu_s"], rep["restore"]["v1_cpu_s"]),
        "| bytes held by %d snapshots / one full | **%.3f** (%s) | <= 1.15 |"
        % (n, s["held_after_%d_vs_one_full" % n], mib(rep["held_bytes"])),
        "| 1st v2 / v1 snapshot wall time | **%.3f** (median %.1f s / %.1f s; runs %s / %s) | <= 1.05 |"
        % (
            s["first_v2_vs_v1_wall"],
            statistics.median(rep["v2_first_runs"]),
            v1["wall_s"],
            rep["v2_first_runs"],
            v1["runs"],
        ),
        "| 1st v2 / v1 snapshot CPU seconds (pipeline + S3 server) | %.3f | |" % s["first_v2_vs_v1_cpu"],
        "| peak memory (process tree) | %s | <= 1 GiB |" % mib(s["peak_mem_bytes"]),
    ]
    per = [
        "- snapshot %d: %.1f s, %d chunks, %d new, uploaded %s"
        % (i + 1, r["wall_s"], r["chunks"], r["chunks_new"], mib(r["bytes_uploaded"]))
        for i, r in enumerate(snaps)
    ]
    return (
        "%s\n## Incremental deduplicated snapshots, format 2 (bench/bench_dedup.py)\n\n"
        "Measured %s, %s synthetic workspace (`bench/workspace.py`), SeaweedFS on the same host, on "
        "a %d-core box (load average %.1f at start, %.1f at end, the benchmark's own load included). "
        "Each change is ~1%%: an in-place edit of a weight shard, a log append, a new checkpoint and a package "
        "upgrade. known_chunks is computed from the previous manifests, as the control plane does.\n\n%s\n\n"
        "Every v2 snapshot:\n\n%s\n%s"
        % (
            BEGIN,
            rep["date"],
            rep["size"],
            rep["cpus"],
            rep["loadavg_start"][0],
            rep["loadavg_end"][0],
            "\n".join(rows),
            "\n".join(per),
            END,
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--snapshots", type=int, default=7)
    ap.add_argument("--parallelism", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="first-snapshot and restore comparisons, interleaved")
    ap.add_argument("--workdir", default=os.path.join("/tmp", "gpusnap-bench-dedup"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    base = os.path.join(args.workdir, "workspace-%d" % size)
    if not os.path.exists(base + ".complete"):
        shutil.rmtree(base, ignore_errors=True)
        print("building %s workspace ..." % args.size, file=sys.stderr)
        build(base, size)
        open(base + ".complete", "w").close()
    ws = os.path.join(args.workdir, "ws")
    shutil.rmtree(ws, ignore_errors=True)
    subprocess.run(["cp", "-a", base, ws], check=True)  # changed in place by the run
    rep: dict[str, Any] = {
        "size": args.size,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    server = SeaweedS3Server(data_dir=os.path.join(args.workdir, "weed"))
    shutil.rmtree(server.root, ignore_errors=True)
    os.makedirs(server.root)
    s3 = server.start()
    bench_dataplane.SERVER_PID[0] = server.proc.pid if server.proc else 0
    try:
        rep.update(measure(args, s3, ws, args.workdir))
    finally:
        server.stop()
        shutil.rmtree(os.path.join(args.workdir, "weed"), ignore_errors=True)
        shutil.rmtree(os.path.join(args.workdir, "restored"), ignore_errors=True)
        shutil.rmtree(ws, ignore_errors=True)
    rep["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "dedup-%s.json" % time.strftime("%Y%m%d-%H%M%S")), "w") as fh:
        json.dump(rep, fh, indent=1)
    if not args.no_docs:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), BEGIN, END, report_md(rep))
    print(json.dumps(rep["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
