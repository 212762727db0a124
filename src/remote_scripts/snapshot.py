"""Stream a workspace to object storage as independently compressed parts plus a manifest.

    python3 snapshot.py < config.json      (config and output: docs/architecture.md, docs/data-plane.md)

Pipeline, all stages overlapping: GNU tar (deterministic stream) -> fixed-size raw parts read from
tar's stdout -> compress + hash in a bounded thread pool -> upload each part from memory through one
long-lived `s5cmd run`.
At most `parallelism` parts are alive at once (lowered to fit the host's memory by gs_tuning, which
also adapts how many of them upload at once), so memory is bounded by about
parallelism x (part_size + 2 x stored part) and no local disk is used at all. The manifest is uploaded last, after a
listing confirms every part is present with its size. A re-run with the same prefix resumes: a part
whose object already carries the same SHA-256 (object metadata) is compressed but not uploaded again.

With `"format": 2` the run is gs_snapshot2's instead: the same tar stream cut into chunks shared by
all snapshots of a machine, only new ones uploaded (docs/data-plane.md, "Format 2").
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gs_runlock  # noqa: E402
import gs_snapshot2  # noqa: E402
from gs_codecs import CODEC_NAMES, fallback_warning, for_snapshot  # noqa: E402
from gs_common import MAX_PARALLELISM, Context, ScriptError, heartbeat, key_prefix, require, run_script  # noqa: E402
from gs_manifest import MANIFEST_NAME, build, part_key, upload, utc_now  # noqa: E402
from gs_pipeline import PartUploader  # noqa: E402
from gs_s3 import S5  # noqa: E402
from gs_scan import BackgroundScan  # noqa: E402
from gs_tuning import Concurrency, plan_here  # noqa: E402
from gs_upload import BatchUploader  # noqa: E402
from gs_workspace import OWN_EXCLUDES  # noqa: E402

DEFAULT_PART_SIZE = 32 << 20
DEFAULT_PARALLELISM = 16  # a cap: gs_tuning lowers it to fit the host
DEFAULT_ZSTD_LEVEL = 3
MIN_PART_SIZE = 4096
MAX_PART_SIZE = 1 << 30
SNAPSHOT_COPIES = 3  # per part in flight: raw, compressed, the in-memory file s5cmd reads (gs_tuning)
# Format 2 holds one more per unit in flight: a new block's compressed bytes are copied into the run
# (pack) being built, and sealed runs wait for their upload. Measured with bench/bench_dedup.py (1 GiB,
# cap 16): 3 copies gave 8 units in flight and a 933 MiB peak, too close to the 1 GiB goal.
SNAPSHOT_COPIES_V2 = 4


def tar_command(workspace: str, excludes: List[str], index_fd: int) -> List[str]:
    """GNU tar that writes a byte-identical stream for an unchanged tree (what resume relies on):
    sorted names, no atime/ctime, pid-free PAX header names, sparse format 0.0 (1.0 embeds the pid)."""
    cmd = [
        "tar",
        "--create",
        "--file=-",
        "--directory=" + workspace,
        "--format=posix",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        "--sort=name",
        "--numeric-owner",
        "--sparse",
        "--sparse-version=0.0",
        "--blocking-factor=128",
        "--verbose",
        "--index-file=/dev/fd/%d" % index_fd,
    ]
    cmd += ["--exclude=" + pattern for pattern in excludes]
    return cmd + ["."]


def parse_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {
        "workspace": require(cfg, "workspace_path", str),
        "s3": require(cfg, "s3", dict),
        "prefix": key_prefix(require(cfg, "prefix", str)),
        "codec": require(cfg, "codec", str, "auto"),
        "zstd_level": require(cfg, "zstd_level", int, DEFAULT_ZSTD_LEVEL, within=(1, 22)),
        "part_size": require(cfg, "part_size", int, DEFAULT_PART_SIZE, within=(MIN_PART_SIZE, MAX_PART_SIZE)),
        "parallelism": require(cfg, "parallelism", int, DEFAULT_PARALLELISM, within=(1, MAX_PARALLELISM)),
        "excludes": require(cfg, "excludes", list, []),
        "s5cmd": require(cfg, "s5cmd", str, "s5cmd"),
        "work_dir": require(cfg, "work_dir", str, None, required=False),
        "bootstrap": require(cfg, "bootstrap", bool, True),
        "format": require(cfg, "format", int, 1, within=(1, 2)),
    }
    if not os.path.isabs(opts["workspace"]):
        raise ScriptError("bad_config", "workspace_path must be absolute")
    if opts["codec"] not in CODEC_NAMES:
        raise ScriptError("bad_config", "codec must be one of %s" % ", ".join(CODEC_NAMES))
    if not all(isinstance(p, str) and p for p in opts["excludes"]):
        raise ScriptError("bad_config", "excludes must be non-empty strings")
    opts["excludes"] = opts["excludes"] + OWN_EXCLUDES  # a restore's kept copy inside a mounted workspace
    return opts


def choose_codec(opts: Dict[str, Any], v2: Dict[str, Any], tuning: Dict[str, Any], gpu_probe: Any = None) -> Any:
    """The run's codec. The GPU check (gs_gpu.needed_bytes) is for the units this run really
    compresses at once: its part (format 2: block) size, `compress_workers` of them."""
    return for_snapshot(
        opts["codec"],
        opts["zstd_level"],
        opts["bootstrap"],
        part_size=v2["block_size"] if v2 else opts["part_size"],
        parallelism=tuning["compress_workers"],
        gpu_probe=gpu_probe,
    )


def _tool_version(cmd: List[str]) -> str:
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10).stdout
        return out.decode("utf-8", "replace").strip().splitlines()[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _source(opts: Dict[str, Any], workspace: str, codec: Any) -> Dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "workspace_path": workspace,
        "python": platform.python_version(),
        "tar": _tool_version(["tar", "--version"]),
        "s5cmd": _tool_version([opts["s5cmd"], "version"]),
        "codecs": {codec.name: codec.version()},
    }


def main(cfg: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    started, created_at = time.monotonic(), utc_now()
    opts = parse_config(cfg)
    run_lock = gs_runlock.take(cfg.get("run_lock"))  # noqa: F841 - held (open) until this process ends
    workspace, prefix, events = opts["workspace"], opts["prefix"], ctx.events
    if not os.path.isdir(workspace):
        raise ScriptError("workspace_not_found", "workspace %s is not a directory" % workspace)
    v2: Dict[str, Any] = {}
    if opts["format"] == 2:
        v2 = gs_snapshot2.parse_config(cfg, opts)  # before any tool runs: a bad v2 config is bad_config
    walk = BackgroundScan(ctx, workspace, opts["excludes"])  # beside codec choice, listing and stream
    # Format 2 holds 16 MiB blocks and packs in flight, not parts: its largest unit sizes the plan.
    unit = max(v2["block_size"], v2["pack_size"]) if v2 else opts["part_size"]
    tuning = plan_here(cap=opts["parallelism"], part_size=unit, copies=SNAPSHOT_COPIES_V2 if v2 else SNAPSHOT_COPIES)
    codec = choose_codec(opts, v2, tuning)
    s5 = S5(ctx, opts["s3"], opts["s5cmd"], opts["work_dir"])
    s5.transfers = transfers = Concurrency(tuning["parallelism_start"], tuning["parallelism_max"])
    opts["parallelism"] = tuning["parallelism_max"]  # parts alive at once; uploads: `transfers`
    if opts["format"] == 2:
        result = gs_snapshot2.run(
            ctx=ctx,
            cfg=cfg,
            opts=opts,
            v2=v2,
            codec=codec,
            s5=s5,
            started=started,
            created_at=created_at,
            make_tar=lambda fd: tar_command(workspace, opts["excludes"], fd),
            source=lambda: _source(opts, workspace, codec),
            walk=walk,
        )
        return dict(result, tuning=dict(tuning, **transfers.report()))
    existing = s5.list(prefix)  # also the credentials check, before any real work
    if prefix + MANIFEST_NAME in existing:
        # Parts are about to be rewritten: the old manifest would describe objects that change
        # under it. Without a manifest the prefix is an unfinished snapshot until we finish.
        s5.remove([prefix + MANIFEST_NAME])
    total = walk.total()  # known already on a tree of few files; else the first parts' events say it
    events.progress(
        force=True,
        phase="upload",
        bytes_done=0,
        bytes_total=total,
        parts_done=0,
        parts_total=None if total is None else max(1, -(-total // opts["part_size"])),
    )
    heartbeat(events, ctx)
    t_stream = time.monotonic()
    with BatchUploader(s5, workers=opts["parallelism"]) as batch:
        uploader = PartUploader(
            ctx=ctx,
            s5=s5,
            codec=codec,
            prefix=prefix,
            part_size=opts["part_size"],
            parallelism=opts["parallelism"],
            existing=existing,
            total=walk.total,
            put=batch.put,
        )
        parts, files = uploader.run(lambda fd: tar_command(workspace, opts["excludes"], fd))

    t_verify = time.monotonic()
    events.progress(force=True, phase="verify")
    listing = s5.list(prefix)
    for part in parts:
        size = listing.get(prefix + part["key"])
        if size != part["stored_size"]:
            raise ScriptError(
                "upload_failed",
                "part %s is %s in the bucket, expected %d bytes"
                % (part["key"], "missing" if size is None else "%d bytes" % size, part["stored_size"]),
            )
    known = {prefix + part_key(i) for i in range(len(parts))}
    stale = [k for k in listing if k[len(prefix) :].startswith("part-") and k not in known]
    s5.remove(stale)  # left by an earlier, longer attempt at this prefix; not in the manifest

    t_manifest = time.monotonic()
    events.progress(force=True, phase="manifest")
    bytes_total, entries = walk.result()
    timings = {
        "scan_s": round(walk.seconds, 3),  # beside the stream, not before it
        "stream_s": round(t_verify - t_stream, 3),
        "verify_s": round(t_manifest - t_verify, 3),
    }
    timings.update(uploader.timings())
    source = _source(opts, workspace, codec)
    warning = fallback_warning(codec)  # a missing compressor is said, never an error
    warnings = [warning] if warning else []
    if codec.fallback:
        source["codec_fallback"] = codec.fallback
    manifest = build(
        cfg=cfg,
        codec=codec.name,
        part_size=opts["part_size"],
        parts=parts,
        files=files,
        source=source,
        created_at=created_at,
        timings=dict(timings, total_s=round(time.monotonic() - started, 3)),
    )
    if warnings:
        manifest["warnings"] = warnings
    digest = upload(s5, prefix, manifest)
    timings["manifest_s"] = round(time.monotonic() - t_manifest, 3)
    totals = manifest["totals"]
    events.progress(
        force=True,
        phase="done",
        bytes_done=totals["raw_bytes"],
        bytes_total=totals["raw_bytes"],
        parts_done=len(parts),
        parts_total=len(parts),
    )
    return {
        "manifest_key": prefix + MANIFEST_NAME,
        "manifest_sha256": digest,
        "raw_bytes": totals["raw_bytes"],
        "stored_bytes": totals["stored_bytes"],
        "parts": len(parts),
        "files": files,
        "codec": codec.name,
        "part_size": opts["part_size"],
        "uploaded_parts": uploader.uploaded,
        "skipped_parts": uploader.skipped,
        # What the pre-scan found (entries below the root, estimated tar bytes): hibernate compares
        # `files` and `raw_bytes` with it before destroying anything (hollow_snapshot).
        "scan": {"entries": max(0, entries - 1), "bytes": bytes_total},
        "duration_s": round(time.monotonic() - started, 3),
        "timings": timings,
        "warnings": warnings,
        "codec_fallback": codec.fallback,
        "tuning": dict(tuning, **transfers.report()),
    }


if __name__ == "__main__":
    run_script(main)
