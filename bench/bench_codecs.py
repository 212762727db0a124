"""Part codecs on model weights: ratio and MB/s per core, zstd vs zstd-planes vs auto.

    .venv/bin/python bench/bench_codecs.py --onnx MODEL.onnx [--onnx ...] [--normals-mib 16] [--rounds 3]

Real weights: the float32 weights of the ONNX files given (bench/weights.py reads them without
onnx/numpy), as bf16 and fp16 (round to nearest even) and as float32, plus random normals
N(0, 0.02) as bf16 and fp16. Models that ship in PyPI packages, e.g.
`pip download --no-deps rapidocr-onnxruntime==1.4.4 nudenet==3.4.2` and unzip the wheels.

Each data set is cut into 32 MiB parts (the default part size) and each part goes through
gs_codecs.encode_part exactly as the snapshot pipeline calls it, one thread. "MB/s per core" is raw
bytes over the CPU time of that thread (time.thread_time), so a loaded machine does not count other
processes' time against the codec; wall time is reported too. Prints a markdown table; --json-out
writes the numbers.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src", "remote_scripts"))
sys.path.insert(0, ROOT)

from gs_codecs import ZstdCodec, encode_part, for_restore, for_snapshot  # noqa: E402
from gs_planes import PlanesCodec  # noqa: E402

from bench.weights import onnx_float32, to_bf16, to_fp16  # noqa: E402

PART = 32 << 20
MB = 1e6


def normals(n: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    return array.array("f", (rng.gauss(0.0, 0.02) for _ in range(n))).tobytes()


def codecs() -> dict[str, Any]:
    z3 = ZstdCodec(level=3)
    return {
        "zstd -3": z3,
        "zstd -1": ZstdCodec(level=1),
        "zstd-planes": PlanesCodec(z3.zstd),
        "zstd-planes (level 1)": PlanesCodec(z3.zstd, level=1),
        "auto (CPU)": for_snapshot("auto", 3, bootstrap=False),
    }


def measure(codec: Any, data: bytes, rounds: int) -> dict[str, Any]:
    parts = [memoryview(data)[o : o + PART] for o in range(0, len(data), PART)]
    best: dict[str, Any] = {}
    for _ in range(rounds):
        c0, w0 = time.thread_time(), time.perf_counter()
        encoded = [encode_part(codec, p) for p in parts]
        c1, w1 = time.thread_time(), time.perf_counter()
        decoders = for_restore({name for name, _ in encoded}, bootstrap=False)
        out = bytearray(PART + 1)
        for (name, stored), p in zip(encoded, parts):
            if name == "none":
                continue
            n = decoders[name].decompress_into(stored, memoryview(out)[: len(p) + 1])
            assert n == len(p) and out[:n] == p, "round trip failed"
        c2 = time.thread_time()
        stored_bytes = sum(len(s) for _, s in encoded)
        run = {
            "ratio": len(data) / stored_bytes,
            "c_cpu": len(data) / MB / max(c1 - c0, 1e-9),
            "c_wall": len(data) / MB / max(w1 - w0, 1e-9),
            "d_cpu": len(data) / MB / max(c2 - c1, 1e-9),
            "parts": sorted({name for name, _ in encoded}),
        }
        if not best or run["c_cpu"] > best["c_cpu"]:
            best = run
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", action="append", default=[])
    ap.add_argument("--normals-mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out")
    ap.add_argument("--codecs", help="comma-separated subset of the codec column, e.g. 'zstd -3,zstd-planes'")
    ap.add_argument("--sets", help="comma-separated subset of the data column, e.g. 'real bf16'")
    args = ap.parse_args()
    f32 = b"".join(onnx_float32(p) for p in args.onnx)
    sets: list[tuple[str, Callable[[], bytes]]] = []
    if f32:
        names = ", ".join(os.path.basename(p) for p in args.onnx)
        print("real weights: %d float32 values from %s" % (len(f32) // 4, names), file=sys.stderr)
        sets += [("real bf16", lambda: to_bf16(f32)), ("real fp16", lambda: to_fp16(f32)), ("real fp32", lambda: f32)]
    n = args.normals_mib * (1 << 20) // 2
    sets += [("normal bf16", lambda: to_bf16(normals(n))), ("normal fp16", lambda: to_fp16(normals(n, 8)))]
    results: dict[str, dict[str, Any]] = {}
    print("| data | MiB | codec | ratio | compress MB/s per core (wall) | decompress MB/s per core | parts stored as |")
    print("|---|---|---|---|---|---|---|")
    wanted = set(args.codecs.split(",")) if args.codecs else None
    for label, make in sets:
        if args.sets and label not in args.sets.split(","):
            continue
        data = make()
        for cname, codec in codecs().items():
            if wanted is not None and cname not in wanted:
                continue
            r = measure(codec, data, args.rounds)
            results["%s / %s" % (label, cname)] = dict(r, mib=len(data) / (1 << 20))
            print(
                "| %s | %.1f | %s | %.3f | %.0f (%.0f) | %.0f | %s |"
                % (
                    label,
                    len(data) / (1 << 20),
                    cname,
                    r["ratio"],
                    r["c_cpu"],
                    r["c_wall"],
                    r["d_cpu"],
                    ", ".join(r["parts"]),
                ),
                flush=True,
            )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "loadavg": os.getloadavg(),
                    "cpus": os.cpu_count(),
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
