"""Restore a snapshot written by snapshot.py into a workspace directory, verified and all-or-nothing.

    python3 restore.py < config.json   (config: workspace_path, s3, prefix, parallelism, s5cmd,
                                        allow_external_symlinks, keep_setuid, manifest_sha256,
                                        bootstrap, overwrite; see docs/data-plane.md)

Order: refuse a system directory (after resolving symlinks: `system_path`) and, without `overwrite`,
a non-empty workspace (`workspace_exists`), before anything is downloaded -> read and validate the manifest -> check free disk (totals.raw_bytes) -> download parts in a
bounded window, verifying size and SHA-256 before decoding -> stream the decoded tar through the
member safety gate into `tar -x` in a staging directory beside the target -> only when every part
is verified and tar has exited 0, swap staging into place, keeping the replaced workspace beside it
(gs_workspace.Staging). On any failure the existing workspace is untouched and the staging directory
is removed.

A version-2 manifest (format 2) names chunks in the machine's chunk store (config `store_prefix`):
gs_fetch2.ChunkFetcher fetches and verifies them and feeds the same stream, gate and `tar -x`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gs_runlock  # noqa: E402
from gs_codecs import for_restore  # noqa: E402
from gs_common import (  # noqa: E402
    MAX_PARALLELISM,
    Context,
    ScriptError,
    heartbeat,
    key_prefix,
    require,
    run_script,
    tail_text,
    widen_pipe,
)
from gs_fetch import PartFetcher, PartStream  # noqa: E402
from gs_fetch2 import ChunkFetcher  # noqa: E402
from gs_manifest import MANIFEST_NAME, validate  # noqa: E402
from gs_paths import denied_reason  # noqa: E402
from gs_s3 import S5, NotFound  # noqa: E402
from gs_tarsafe import MemberPolicy, extract_command, gate  # noqa: E402
from gs_tuning import Concurrency, plan_here  # noqa: E402
from gs_workspace import Staging, free_bytes, occupied, read_done  # noqa: E402

DEFAULT_PARALLELISM = 16  # a cap: gs_tuning lowers it to fit the host
MAX_MANIFEST_BYTES = 256 << 20
_DISK_FULL = (b"No space left on device", b"Disk quota exceeded")


def parse_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    opts = {
        "workspace": require(cfg, "workspace_path", str),
        "s3": require(cfg, "s3", dict),
        "prefix": key_prefix(require(cfg, "prefix", str)),
        "parallelism": require(cfg, "parallelism", int, DEFAULT_PARALLELISM, within=(1, MAX_PARALLELISM)),
        "s5cmd": require(cfg, "s5cmd", str, "s5cmd"),
        "allow_external_symlinks": require(cfg, "allow_external_symlinks", bool, False),
        "keep_setuid": require(cfg, "keep_setuid", bool, False),
        "manifest_sha256": require(cfg, "manifest_sha256", str, None, required=False),
        "bootstrap": require(cfg, "bootstrap", bool, True),
        "overwrite": require(cfg, "overwrite", bool, False),
        # The same id on every try of one restore job (its job id): a try that finds it committed
        # reports that instead of swapping a second time (gs_workspace.DONE_PREFIX).
        "restore_id": require(cfg, "restore_id", str, None, required=False),
        # Format 2: the machine's chunk store M (chunks/, packs/); required for a version-2 manifest.
        "store_prefix": require(cfg, "store_prefix", str, None, required=False),
    }
    if opts["store_prefix"] is not None:
        opts["store_prefix"] = key_prefix(opts["store_prefix"])
    if opts["restore_id"] is not None and not re.match(r"^[A-Za-z0-9_-]{1,64}$", opts["restore_id"]):
        raise ScriptError("bad_config", "restore_id must be 1-64 letters, digits, '_' or '-'")
    if not os.path.isabs(opts["workspace"]) or os.path.normpath(opts["workspace"]) == "/":
        raise ScriptError("bad_config", "workspace_path must be an absolute path other than /")
    return opts


def restore_plan(manifest: Dict[str, Any], cap: int) -> Dict[str, Any]:
    """gs_tuning's plan for this snapshot: its largest object sizes what one download in flight
    holds, twice for format 1 (stored and decoded buffers), three times for format 2 (the object,
    a second one read ahead, the decoded chunk)."""
    if manifest["version"] == 1:
        unit = max([max(p["raw_size"], p["stored_size"]) for p in manifest["parts"]] or [0])
        copies = 2
    else:
        unit = max([o["size"] for o in manifest["objects"]] + [c["raw_size"] for c in manifest["chunks"]] or [0])
        copies = 3
    return plan_here(cap=cap, part_size=unit, copies=copies)


def check_destination(workspace: str, overwrite: bool) -> None:
    """Refuse, before anything is downloaded, a destination that is a system directory as named or
    as it resolves on this host (`/workspace` may be a symlink to `/etc`), and a non-empty one unless
    the request said `overwrite`."""
    for path in (workspace, os.path.realpath(workspace)):
        reason = denied_reason(path)
        if reason is not None:
            raise ScriptError("system_path", "refusing to restore into %s: %s" % (workspace, reason))
    if not overwrite:
        found = occupied(workspace)
        if found:
            raise ScriptError(
                "workspace_exists",
                "%s is not empty (%s...): restore with overwrite to replace it "
                "(the old tree is kept beside it)" % (workspace, ", ".join(found)),
            )


def load_manifest(s5: S5, prefix: str, expected_sha256: Optional[str] = None) -> Dict[str, Any]:
    """The manifest, validated. With `expected_sha256` (what the control plane recorded when the
    snapshot completed) a manifest replaced since then is refused: `manifest_changed`."""
    key = prefix + MANIFEST_NAME
    try:
        size = s5.head(key, "download_failed")["size"]
        if size > MAX_MANIFEST_BYTES:
            raise ScriptError("manifest_invalid", "manifest is %d bytes, over the limit" % size)
        body = s5.cat(key, size)
    except NotFound:
        raise ScriptError(
            "manifest_missing", "no manifest at %s: the snapshot does not exist or is unfinished" % key
        ) from None
    if expected_sha256 is not None and hashlib.sha256(body).hexdigest() != expected_sha256.lower():
        raise ScriptError("manifest_changed", "the manifest at %s is not the one recorded for this snapshot" % key)
    try:
        return validate(json.loads(bytes(body).decode("utf-8")))
    except ValueError as exc:
        raise ScriptError("manifest_invalid", "manifest is not JSON: %s" % exc) from None


class TarExtract:
    """`tar -x` into the staging dir, fed through write(); watches stderr for ENOSPC."""

    def __init__(self, ctx: Context, staging: str) -> None:
        try:
            self.proc = ctx.spawn(
                extract_command(staging),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                bufsize=0,
                env=dict(os.environ, LC_ALL="C"),
            )
        except FileNotFoundError:
            raise ScriptError("missing_dependency", "GNU tar is not installed") from None
        widen_pipe(self.proc.stdin.fileno())
        self.errors: List[bytes] = []
        self.disk_full = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        for line in self.proc.stderr:
            self.errors.append(line)
            if any(m in line for m in _DISK_FULL) and not self.disk_full:
                self.disk_full = True
                self.proc.kill()  # tar would go on file by file; nothing more can fit anyway

    def write(self, data: Any) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[self.proc.stdin.write(view) :]
        except OSError:  # EPIPE: tar has exited
            self.proc.wait()
            self.thread.join(5)
            raise self._failure("tar -x stopped reading") from None

    def _failure(self, what: str) -> ScriptError:
        text = tail_text(b"".join(self.errors))
        if self.disk_full:
            return ScriptError("disk_full", "no space left while extracting: %s" % text)
        return ScriptError("tar_failed", "%s (exit %s): %s" % (what, self.proc.returncode, text))

    def finish(self) -> None:
        self.proc.stdin.close()
        rc = self.proc.wait()
        self.thread.join(5)
        if rc != 0 or self.disk_full:
            raise self._failure("tar -x failed")


def main(cfg: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    started = time.monotonic()
    opts = parse_config(cfg)
    run_lock = gs_runlock.take(cfg.get("run_lock"))  # noqa: F841 - held (open) until this process ends
    if opts["restore_id"] is not None:
        done = read_done(opts["workspace"], opts["restore_id"])
        if done is not None:  # this restore committed already (its result was lost with the link)
            ctx.events.progress(force=True, phase="done")
            return dict(done, already_restored=True, duration_s=round(time.monotonic() - started, 3))
    check_destination(opts["workspace"], opts["overwrite"])
    events, prefix = ctx.events, opts["prefix"]
    s5 = S5(ctx, opts["s3"], opts["s5cmd"])
    manifest = load_manifest(s5, prefix, opts["manifest_sha256"])
    version = manifest["version"]
    if version == 2 and opts["store_prefix"] is None:
        raise ScriptError("bad_config", "a format-2 snapshot needs store_prefix (its machine's chunk store)")
    parts, totals = (manifest["parts"] if version == 1 else manifest["chunks"]), manifest["totals"]
    codecs = for_restore([p["codec"] for p in parts], opts["bootstrap"])
    staging = Staging(opts["workspace"], "%d-%s" % (os.getpid(), os.urandom(3).hex()))
    staging.remove_stale()
    free = free_bytes(staging.fs_path)
    if free < totals["raw_bytes"]:
        raise ScriptError(
            "insufficient_disk",
            "%d bytes free at %s, the snapshot needs %d" % (free, staging.fs_path, totals["raw_bytes"]),
        )
    t_download = time.monotonic()
    events.progress(
        force=True,
        phase="download",
        bytes_done=0,
        bytes_total=totals["raw_bytes"],
        parts_done=0,
        parts_total=len(parts),
    )
    heartbeat(events, ctx)
    tuning = restore_plan(manifest, opts["parallelism"])
    s5.transfers = transfers = Concurrency(tuning["parallelism_start"], tuning["parallelism_max"])
    window = tuning["parallelism_max"]  # read ahead; downloads at once: `transfers`
    fetcher: Any
    if version == 2:
        fetcher = ChunkFetcher(
            ctx=ctx, s5=s5, store_prefix=opts["store_prefix"], manifest=manifest, codecs=codecs, window=window
        )
    else:
        fetcher = PartFetcher(ctx=ctx, s5=s5, prefix=prefix, parts=parts, codecs=codecs, window=window)
    progress = {"bytes": 0, "parts": 0}

    def on_part(size: int) -> None:
        progress["bytes"] += size
        progress["parts"] += 1
        events.progress(
            phase="download",
            bytes_done=progress["bytes"],
            bytes_total=totals["raw_bytes"],
            parts_done=progress["parts"],
            parts_total=len(parts),
        )

    staging.create()
    try:
        tar = TarExtract(ctx, staging.path)
        try:
            stream = PartStream(fetcher, on_part)
            policy = MemberPolicy(staging.target, opts["allow_external_symlinks"], opts["keep_setuid"])
            members = gate(stream.read, tar.write, policy)
            if stream.total != totals["raw_bytes"]:
                raise ScriptError(
                    "part_corrupt", "stream has %d bytes, manifest says %d" % (stream.total, totals["raw_bytes"])
                )
            tar.finish()
        finally:
            fetcher.close()
            if tar.proc.poll() is None:
                tar.proc.kill()
        ctx.check()
        t_swap = time.monotonic()
        events.progress(force=True, phase="swap")
        check_destination(opts["workspace"], opts["overwrite"])  # again: it may have filled meanwhile
        summary = {
            "workspace_path": staging.target,
            "snapshot_id": manifest.get("snapshot_id", ""),
            "raw_bytes": totals["raw_bytes"],
            "stored_bytes": totals["stored_bytes"],
            "parts": len(parts),
            "files": max(0, members - 1),
            "codec": manifest.get("codec", ""),
            # what the gate neutralised: FIFOs left out (names: the first 100), setuid/setgid cleared
            "skipped_members": policy.skipped_count,
            "skipped_names": policy.skipped,
            "setuid_cleared": policy.cleared_setuid,
            "format": version,
        }
        if version == 2:
            summary.update(objects=len(manifest["objects"]), object_fetches=fetcher.fetches)
        staging.commit((opts["restore_id"], summary) if opts["restore_id"] is not None else None)
    except BaseException:
        staging.discard()
        raise
    timings = {k: round(v, 3) for k, v in fetcher.spent.items()}
    timings.update(stream_s=round(t_swap - t_download, 3), swap_s=round(time.monotonic() - t_swap, 3))
    events.progress(
        force=True,
        phase="done",
        bytes_done=totals["raw_bytes"],
        bytes_total=totals["raw_bytes"],
        parts_done=len(parts),
        parts_total=len(parts),
    )
    return dict(
        summary,
        previous_workspace=staging.kept_old,
        duration_s=round(time.monotonic() - started, 3),
        timings=timings,
        tuning=dict(tuning, **transfers.report()),
    )


if __name__ == "__main__":
    run_script(main)
