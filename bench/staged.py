"""The old design's staged pipeline, as a baseline for bench_dataplane.py (bench only, never shipped).

    python bench/staged.py snapshot|restore < config.json     (credentials in AWS_* env vars)

snapshot: tar to disk -> split into 32 files -> compress each (zstd, same level, same number of
threads as ours) -> `s5cmd --numworkers 32 cp` upload.
restore: `s5cmd --numworkers 32 cp` download -> decompress each -> cat into one tar -> tar -x.
Each phase ends before the next starts, as in the design we replace. Prints one JSON line of
timings and sizes. Config: {"workspace", "spool", "target", "endpoint", "url", "level", "threads",
"s5cmd"}.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zstandard

PARTS = 32
WORKERS = 32


def run(cmd: list[str], **kw: Any) -> None:
    subprocess.run(cmd, check=True, **kw)


def snapshot(cfg: dict[str, Any]) -> dict[str, Any]:
    spool, t = cfg["spool"], {}
    os.makedirs(spool, exist_ok=True)
    tar_path = os.path.join(spool, "workspace.tar")
    t0 = time.monotonic()
    run(
        ["tar", "--create", "--file=" + tar_path, "--directory=" + cfg["workspace"], "--sparse", "--numeric-owner", "."]
    )
    raw = os.path.getsize(tar_path)
    t1 = time.monotonic()
    run(["split", "-n", str(PARTS), "-d", "-a", "3", tar_path, os.path.join(spool, "part_")])
    os.remove(tar_path)
    t2 = time.monotonic()

    def compress(path: str) -> int:
        with open(path, "rb") as fh:
            data = fh.read()
        out = zstandard.ZstdCompressor(level=cfg["level"]).compress(data)
        with open(path + ".zst", "wb") as fh:
            fh.write(out)
        os.remove(path)
        return len(out)

    with ThreadPoolExecutor(cfg["threads"]) as pool:
        stored = sum(pool.map(compress, sorted(glob.glob(os.path.join(spool, "part_*")))))
    t3 = time.monotonic()
    run(
        [
            cfg["s5cmd"],
            "--endpoint-url",
            cfg["endpoint"],
            "--numworkers",
            str(WORKERS),
            "cp",
            os.path.join(spool, "*.zst"),
            cfg["url"],
        ],
        stdout=subprocess.DEVNULL,
    )
    t4 = time.monotonic()
    for path in glob.glob(os.path.join(spool, "*.zst")):
        os.remove(path)
    t.update(tar_s=t1 - t0, split_s=t2 - t1, compress_s=t3 - t2, upload_s=t4 - t3, total_s=t4 - t0)
    return {"raw_bytes": raw, "stored_bytes": stored, "timings": {k: round(v, 3) for k, v in t.items()}}


def restore(cfg: dict[str, Any]) -> dict[str, Any]:
    spool, t = cfg["spool"], {}
    os.makedirs(spool, exist_ok=True)
    t0 = time.monotonic()
    run(
        [
            cfg["s5cmd"],
            "--endpoint-url",
            cfg["endpoint"],
            "--numworkers",
            str(WORKERS),
            "cp",
            cfg["url"] + "*",
            spool + "/",
        ],
        stdout=subprocess.DEVNULL,
    )
    t1 = time.monotonic()

    def decompress(path: str) -> int:
        with open(path, "rb") as fh:
            data = fh.read()
        out = zstandard.ZstdDecompressor().decompress(data)
        with open(path[:-4], "wb") as fh:
            fh.write(out)
        os.remove(path)
        return len(out)

    with ThreadPoolExecutor(cfg["threads"]) as pool:
        raw = sum(pool.map(decompress, sorted(glob.glob(os.path.join(spool, "part_*.zst")))))
    t2 = time.monotonic()
    tar_path = os.path.join(spool, "workspace.tar")
    with open(tar_path, "wb") as out:
        for path in sorted(glob.glob(os.path.join(spool, "part_*"))):
            with open(path, "rb") as fh:
                while True:
                    chunk = fh.read(8 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
            os.remove(path)
    t3 = time.monotonic()
    os.makedirs(cfg["target"], exist_ok=True)
    run(
        [
            "tar",
            "--extract",
            "--file=" + tar_path,
            "--directory=" + cfg["target"],
            "--numeric-owner",
            "--preserve-permissions",
        ]
    )
    os.remove(tar_path)
    t4 = time.monotonic()
    t.update(download_s=t1 - t0, decompress_s=t2 - t1, join_s=t3 - t2, extract_s=t4 - t3, total_s=t4 - t0)
    return {"raw_bytes": raw, "timings": {k: round(v, 3) for k, v in t.items()}}


if __name__ == "__main__":
    config = json.loads(sys.stdin.read())
    result = snapshot(config) if sys.argv[1] == "snapshot" else restore(config)
    print(json.dumps(result), flush=True)
