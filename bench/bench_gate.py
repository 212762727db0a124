"""Restore member-gate benchmark: the gate of this tree vs the gate at a git ref (default `main`).

    .venv/bin/python bench/bench_gate.py [--size 1536M] [--small-files 20000] [--many-files 100000]
                                         [--rounds 3] [--ref main] [--no-docs]

Builds a workspace (a few large files plus many small ones in nested directories, symlinks, hard
links), turns it into a tar stream with the snapshot writer's own command (snapshot.tar_command),
and times, alternating old and new gate each round:

* gate only: the stream read in 1 MiB chunks from the page cache, the gate's output discarded
  (the gate's own CPU cost, what issue 9 asks not to grow by more than 10 %);
* gate | tar -x: the restore's extraction step for real into a scratch directory on the same disk.

`--many-files` adds a stream of that many tiny files (the case of issue 13) in gate-only mode.
Writes JSON to bench/out/gate.json and a table into docs/benchmarks.md between the gate markers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(ROOT, "src", "remote_scripts")
sys.path.insert(0, SCRIPTS)
sys.path.insert(0, HERE)

import gs_tarsafe  # noqa: E402
from report import replace_section  # noqa: E402
from snapshot import tar_command  # noqa: E402
from workspace import parse_size  # noqa: E402

BEGIN, END = "<!-- gate:begin -->", "<!-- gate:end -->"


def load_gate_at(ref: str, scratch: str) -> Any:
    """gs_tarsafe (and whatever gs_* it imports from the same ref) as of git `ref`."""
    folder = os.path.join(scratch, "ref-scripts")
    os.makedirs(folder, exist_ok=True)
    listing = subprocess.run(
        ["git", "-C", ROOT, "ls-tree", "--name-only", ref, "src/remote_scripts/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for path in listing:
        if path.endswith(".py"):
            body = subprocess.run(
                ["git", "-C", ROOT, "show", "%s:%s" % (ref, path)], check=True, capture_output=True
            ).stdout
            with open(os.path.join(folder, os.path.basename(path)), "wb") as fh:
                fh.write(body)
    spec = importlib.util.spec_from_file_location("gs_tarsafe_at_ref", os.path.join(folder, "gs_tarsafe.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.insert(0, folder)  # its own `from gs_common import ...` resolves to the same ref
    # ... and not to this tree's modules already imported (gs_tarheader, gs_common): set them aside
    # while it loads, so the "old" gate does not run on the new header code.
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name.startswith("gs_")}
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(folder)
        sys.modules.update(ours)
    return module


def build_workspace(root: str, size: int, small_files: int) -> None:
    os.makedirs(root)
    block = os.urandom(16 << 20)  # content does not matter to the gate; writing it fast does
    large = max(1, size // (256 << 20))
    each = size // large
    for i in range(large):
        with open(os.path.join(root, "weights-%02d.bin" % i), "wb") as fh:
            left = each
            while left > 0:
                fh.write(block[: min(left, len(block))])
                left -= len(block)
    for i in range(small_files):
        folder = os.path.join(root, "src", "pkg%03d" % (i // 200))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "mod_%05d.py" % i), "wb") as fh:
            fh.write(block[i % 4096 : i % 4096 + 200 + (i * 37) % 8000])
    os.symlink("src/pkg000/mod_00000.py", os.path.join(root, "link"))
    os.link(os.path.join(root, "weights-00.bin"), os.path.join(root, "hard-weights"))


def write_stream(workspace: str, path: str) -> int:
    with open(os.devnull, "wb") as index, open(path, "wb") as out:
        cmd = tar_command(workspace, [], index.fileno())
        subprocess.run(cmd, stdout=out, check=True, pass_fds=(index.fileno(),))
    return os.path.getsize(path)


def run_gate(module: Any, stream: str, extract_to: str = "") -> tuple[float, float, float]:
    """(wall, gate CPU, tar CPU) seconds to push `stream` through `module`'s gate (into tar -x when
    `extract_to`). CPU seconds are what to compare on a loaded machine: wall time follows the load."""
    fh = open(stream, "rb", buffering=0)
    proc = None
    sink: Callable[[Any], None] = lambda data: None  # noqa: E731
    if extract_to:
        proc = subprocess.Popen(
            gs_tarsafe.extract_command(extract_to), stdin=subprocess.PIPE, bufsize=0, env=dict(os.environ, LC_ALL="C")
        )

        def sink(data: Any) -> None:
            view = memoryview(data)
            while view:
                view = view[proc.stdin.write(view) :]  # type: ignore[union-attr]

    t0, c0, k0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    module.gate(lambda n: fh.read(min(n, 1 << 20)), sink, module.MemberPolicy("/workspace"))
    cpu = time.process_time() - c0
    if proc is not None:
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait() == 0
    elapsed = time.perf_counter() - t0
    k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    fh.close()
    return elapsed, cpu, (k1.ru_utime + k1.ru_stime) - (k0.ru_utime + k0.ru_stime)


def measure(modules: dict[str, Any], stream: str, scratch: str, rounds: int, extract: bool) -> dict[str, Any]:
    size = os.path.getsize(stream)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            target = ""
            if extract:
                target = os.path.join(scratch, "x-" + name)
                shutil.rmtree(target, ignore_errors=True)
                os.makedirs(target)
            times[name].append(run_gate(module, stream, target))
            if target:
                shutil.rmtree(target)
    out: dict[str, Any] = {}
    for name, t in times.items():
        wall, cpu, tar_cpu = (statistics.median(x[i] for x in t) for i in range(3))
        out[name] = {
            "median_s": wall,
            "cpu_s": cpu,
            "tar_cpu_s": tar_cpu,
            "MBps": size / wall / 1e6,
            "cpu_MBps": size / cpu / 1e6,
            "rounds": [[round(v, 3) for v in x] for x in t],
        }
    return out


def report_md(res: dict[str, Any]) -> str:
    rows = [
        "| stream | mode | gate at `%s`: wall, gate CPU | this gate: wall, gate CPU | this / old (gate CPU) |"
        % res["ref"],
        "|---|---|---|---|---|",
    ]
    for label, key in (
        ("mixed, %s in %d members" % (_mib(res["mixed_bytes"]), res["mixed_members"]), "mixed"),
        ("%d tiny files, %s" % (res["many_files"], _mib(res.get("many_bytes", 0))), "many"),
    ):
        for mode in ("gate_only", "extract"):
            r = res.get(key, {}).get(mode)
            if not r:
                continue
            old, new = r["old"], r["new"]
            tar = "" if mode == "gate_only" else " + tar %.2f s"
            rows.append(
                (
                    "| %s | %s | %.2f s, %.2f s (%.0f MB/s)"
                    + tar
                    + " | %.2f s, %.2f s (%.0f MB/s)"
                    + tar
                    + " | **%.2f** |"
                )
                % tuple(
                    [
                        label,
                        "gate only" if mode == "gate_only" else "gate \\| tar -x",
                        old["median_s"],
                        old["cpu_s"],
                        old["cpu_MBps"],
                    ]
                    + ([old["tar_cpu_s"]] if tar else [])
                    + [new["median_s"], new["cpu_s"], new["cpu_MBps"]]
                    + ([new["tar_cpu_s"]] if tar else [])
                    + [new["cpu_s"] / old["cpu_s"]]
                )
            )
    head = (
        "## Restore member gate (bench/bench_gate.py)\n\nMeasured %s on a %d-CPU machine (load average "
        "%.1f at start), streams written by the snapshot writer's own tar command, %d round(s) alternating "
        'old and new, medians. "gate only" discards the output (the gate\'s CPU cost); "gate | tar -x" '
        "is the restore's extraction step for real, onto the local disk. MB/s are per gate CPU second; "
        "the ratio compares gate CPU seconds (wall times follow the machine's load).\n\n"
        % (res["date"], os.cpu_count() or 1, res["loadavg"], res["rounds"])
    )
    return "%s\n%s%s\n\n%s\n" % (BEGIN, head, "\n".join(rows), END)


def _mib(n: int) -> str:
    return "%.0f MiB" % (n / (1 << 20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1536M")
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--many-files", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ref", default="main")
    ap.add_argument("--no-extract", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="bench-gate-", dir=os.environ.get("BENCH_DIR"))
    try:
        modules = {"old": load_gate_at(args.ref, scratch), "new": gs_tarsafe}
        res: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ref": args.ref,
            "rounds": args.rounds,
            "loadavg": os.getloadavg()[0],
            "many_files": args.many_files,
        }
        ws = os.path.join(scratch, "ws")
        build_workspace(ws, parse_size(args.size), args.small_files)
        stream = os.path.join(scratch, "mixed.tar")
        res["mixed_bytes"] = write_stream(ws, stream)
        res["mixed_members"] = sum(len(d) + len(f) for _, d, f in os.walk(ws)) + 1
        shutil.rmtree(ws)
        res["mixed"] = {"gate_only": measure(modules, stream, scratch, args.rounds, False)}
        if not args.no_extract:
            res["mixed"]["extract"] = measure(modules, stream, scratch, args.rounds, True)
        os.remove(stream)
        if args.many_files:
            ws = os.path.join(scratch, "many")
            build_workspace(ws, 1, args.many_files)
            stream = os.path.join(scratch, "many.tar")
            res["many_bytes"] = write_stream(ws, stream)
            shutil.rmtree(ws)
            res["many"] = {"gate_only": measure(modules, stream, scratch, args.rounds, False)}
        print(json.dumps(res, indent=1))
        os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
        with open(os.path.join(HERE, "out", "gate.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        if not args.no_docs:
            replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), BEGIN, END, report_md(res))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
