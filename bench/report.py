"""Helpers for bench_dataplane.py: restored-tree check, the markdown report, the GPU codec comparison;
and replace_section(), with which every benchmark rewrites only its own part of docs/benchmarks.md."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- dataplane:begin -->", "<!-- dataplane:end -->"


def tree_signature(root: str, mtime_resolution_ns: int = 1) -> str:
    """Digest of (path, type, mode, size, mtime, link target) for every entry; content is trusted to
    the per-part SHA-256 checks and the integration tests' byte-for-byte comparison. The staged
    baseline writes GNU-format tar (whole-second mtimes), hence the resolution parameter."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            if name == ".complete":
                continue
            st = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else ""
            digest.update(
                (
                    "%s|%o|%d|%d|%s\n"
                    % (
                        os.path.relpath(path, root),
                        st.st_mode,
                        st.st_size if not os.path.isdir(path) else 0,
                        st.st_mtime_ns // mtime_resolution_ns,
                        link,
                    )
                ).encode("utf-8", "surrogateescape")
            )
    return digest.hexdigest()


def _mib(n: float) -> str:
    return "%.0f MiB" % (n / 2**20)


def table(report: dict[str, Any]) -> str:
    s = report["summary"]
    p = report["params"]
    rows: list[str] = [
        "| metric | ours | staged (old design) | ours / staged |",
        "|---|---|---|---|",
    ]
    for op in ("snapshot", "restore"):
        o, st = s[op]["ours"], s[op]["staged"]
        rows.append(
            "| %s wall time | %.1f s | %.1f s | **%.2f** |" % (op, o["wall_s"], st["wall_s"], s[op]["wall_ratio"])
        )
        rows.append(
            "| %s peak extra local disk | %s | %s | %s |"
            % (
                op,
                _mib(o["peak_disk_bytes"]),
                _mib(st["peak_disk_bytes"]),
                "%.3f" % (o["peak_disk_bytes"] / st["peak_disk_bytes"]) if st["peak_disk_bytes"] else "n/a",
            )
        )
        rows.append(
            "| %s peak memory (process tree RSS + memfd) | %s | %s | %.2f |"
            % (
                op,
                _mib(o["peak_mem_bytes"]),
                _mib(st["peak_mem_bytes"]),
                o["peak_mem_bytes"] / max(1, st["peak_mem_bytes"]),
            )
        )
    for op in ("snapshot", "restore"):
        o, st = s[op]["ours"], s[op]["staged"]
        rows.append(
            "| %s CPU seconds: pipeline + S3 server | %.1f + %.1f s | %.1f + %.1f s | %.2f |"
            % (
                op,
                o["cpu_s"],
                o["server_cpu_s"],
                st["cpu_s"],
                st["server_cpu_s"],
                (o["cpu_s"] + o["server_cpu_s"]) / max(0.01, st["cpu_s"] + st["server_cpu_s"]),
            )
        )
    rows.append("| compression ratio (raw / stored) | %.3f | %.3f | |" % (s["ratio"]["ours"], s["ratio"]["staged"]))
    cpus = max(1, report["cpus"])
    floors = [
        "",
        "CPU floor = (pipeline + server CPU seconds) / %d CPUs, the best wall time a fully "
        "overlapped pipeline can reach here:" % cpus,
        "",
    ]
    for op in ("snapshot", "restore"):
        o, st = s[op]["ours"], s[op]["staged"]
        floors.append(
            "- %s: ours %.1f s (measured %.1f s), staged %.1f s (measured %.1f s)"
            % (
                op,
                (o["cpu_s"] + o["server_cpu_s"]) / cpus,
                o["wall_s"],
                (st["cpu_s"] + st["server_cpu_s"]) / cpus,
                st["wall_s"],
            )
        )
    rows += floors
    per_round = ["", "Every round (wall seconds, ours / staged = ratio):", ""]
    for i, r in enumerate(report["rounds"]):
        per_round.append(
            "- round %d: snapshot %.1f / %.1f = %.2f; restore %.1f / %.1f = %.2f"
            % (
                i,
                r["ours_snapshot"]["wall_s"],
                r["staged_snapshot"]["wall_s"],
                r["ours_snapshot"]["wall_s"] / r["staged_snapshot"]["wall_s"],
                r["ours_restore"]["wall_s"],
                r["staged_restore"]["wall_s"],
                r["ours_restore"]["wall_s"] / r["staged_restore"]["wall_s"],
            )
        )
    rows += per_round
    goals = "\n".join("- %s: %s" % (k, "met" if v else "**NOT met**") for k, v in s["goals"].items())
    head = (
        "Measured %s on a %d-CPU machine (load average %.1f at start, %.1f at end; other work may share "
        "the CPUs), %s synthetic workspace (`bench/workspace.py`), SeaweedFS on the same host, "
        "%d round(s), medians. Ours: part_size %s, parallelism %d, zstd level %d; staged: 32 parts, "
        "same level, %d compression threads, `s5cmd --numworkers 32`.\n"
        % (
            report["date"],
            report["cpus"],
            report["loadavg_start"][0],
            report["loadavg_end"][0],
            report["size"],
            len(report["rounds"]),
            _mib(p["part_size"]),
            p["parallelism"],
            p["zstd_level"],
            report["cpus"],
        )
    )
    gpu = report.get("gpu")
    extra = ""
    if gpu:
        extra = "\nGPU codecs: %s\n" % (
            gpu.get("skipped")
            or ", ".join(
                "%s ratio %.3f, compress %.0f MB/s, decompress %.0f MB/s"
                % (name, v["ratio"], v["compress_MBps"], v["decompress_MBps"])
                for name, v in gpu["codecs"].items()
            )
        )
    return "%s\n%s\n\nGoals:\n%s\n%s" % (head, "\n".join(rows), goals, extra)


def replace_section(path: Any, begin: str, end: str, section: str) -> None:
    """Put `section` (from the `begin` marker to the `end` marker) in place of the text between those
    markers in the markdown file `path`, or append it; the rest of the file is left as it is."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as fh:
        fh.write(text)


def write_docs(path: str, report: dict[str, Any]) -> None:
    """Replace the dataplane section of docs/benchmarks.md (other sections are left alone)."""
    section = "%s\n## Data plane: streaming snapshot/restore vs staged baseline\n\n%s\n%s" % (BEGIN, table(report), END)
    replace_section(path, BEGIN, END, section)


def gpu_codecs(ws: str, part_size: int, level: int, max_parts: int = 16) -> dict[str, Any]:
    """nvCOMP ANS vs zstd on the same raw parts (the first `max_parts` of the workspace's tar stream)."""
    sys.path.insert(0, os.path.join(ROOT, "src", "remote_scripts"))
    from gs_codecs import NvcompAnsCodec, ZstdCodec, cuda_driver_version
    from gs_common import ScriptError
    from gs_planes import PlanesCodec

    if cuda_driver_version() is None:
        print("--gpu: skipped, no CUDA GPU visible", file=sys.stderr)
        return {"skipped": "no CUDA GPU visible"}
    try:
        zstd = ZstdCodec(level=level, bootstrap=False)
        codecs = {"nvcomp-ans": NvcompAnsCodec(bootstrap=False), "zstd": zstd, "zstd-planes": PlanesCodec(zstd.zstd)}
    except ScriptError as exc:
        print("--gpu: skipped, %s" % exc.message, file=sys.stderr)
        return {"skipped": exc.message}
    tar = subprocess.Popen(["tar", "-cf", "-", "-C", ws, "."], stdout=subprocess.PIPE)
    parts = []
    while len(parts) < max_parts:
        chunk = tar.stdout.read(part_size)
        if not chunk:
            break
        parts.append(chunk)
    tar.kill()
    tar.wait()
    raw = sum(len(p) for p in parts)
    out: dict[str, Any] = {"parts": len(parts), "raw_bytes": raw, "codecs": {}}
    for name, codec in codecs.items():
        codec.compress(parts[0])  # warm-up: CUDA context, allocations
        t0 = time.monotonic()
        stored = [codec.compress(p) for p in parts]
        t1 = time.monotonic()
        back = []
        for s, p in zip(stored, parts):  # the restore path: a buffer one byte longer than the part
            buf = bytearray(len(p) + 1)
            assert codec.decompress_into(s, memoryview(buf)) == len(p), name
            back.append(buf[: len(p)])
        t2 = time.monotonic()
        assert all(bytes(b) == p for b, p in zip(back, parts)), name
        out["codecs"][name] = {
            "ratio": round(raw / sum(len(s) for s in stored), 3),
            "compress_MBps": round(raw / 1e6 / (t1 - t0), 1),
            "decompress_MBps": round(raw / 1e6 / (t2 - t1), 1),
        }
    return out
