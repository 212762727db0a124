"""One run at a time per snapshot (or restore) on a host: the newest run wins.

A job's attempt can be left behind while its script keeps running on the GPU host: its worker froze
past its lease, or its SSH link hung, and the job went on in a new attempt. Two scripts on one snapshot
prefix upload the same part keys and write the manifest, so the late one can overwrite parts and the
manifest of a snapshot its successor completed (and the instance may be destroyed by then). A restore
left behind can swap a workspace after its successor did.

So each run takes an exclusive `flock` on a file named after what it works on, in the private cache
directory, and records its rank (job attempt, try) and process group there. A run that finds the lock
held by an older rank stops that process group (TERM, then KILL) and takes the lock; one that finds a
newer rank stops itself (`superseded`). A held lock means its holder is alive, so the recorded process
group is current (never a reused id). Stdlib only, Python 3.8+.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import time
from typing import Any, List, Optional

from gs_bootstrap import private_dir
from gs_common import ScriptError

WAIT_S = 20.0


def take(spec: Optional[Any]) -> Optional[int]:
    """Take the run lock described by the config's `run_lock` ({"name": str, "rank": [attempt, try]});
    None when there is none. Returns the lock's fd: keep it open for the life of the process."""
    if spec is None:
        return None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not re.match(r"^[A-Za-z0-9_-]{1,80}$", spec["name"])
        or not _is_rank(spec.get("rank"))
    ):
        raise ScriptError("bad_config", "run_lock must be {name: a plain name, rank: [attempt, try]}")
    directory = os.path.join(private_dir(), "locks")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(directory, spec["name"] + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    rank: List[int] = list(spec["rank"])
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        holder = _read(fd)
        if holder is not None and holder["rank"] > rank:
            os.close(fd)
            raise ScriptError(
                "superseded",
                "a newer attempt of this job runs on this host (rank %s, ours %s)" % (holder["rank"], rank),
            )
        if holder is not None and holder["pgid"] > 1 and holder["pgid"] != os.getpgrp():
            _stop_group(holder["pgid"])
        if time.monotonic() > deadline:
            os.close(fd)
            raise ScriptError("remote_busy", "an earlier run of this job on this host would not stop")
        time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"rank": rank, "pgid": os.getpgrp(), "pid": os.getpid()}).encode(), 0)
    return fd


def _is_rank(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _read(fd: int) -> Optional[dict]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and _is_rank(data.get("rank")) and isinstance(data.get("pgid"), int):
        return data
    return None


def _stop_group(pgid: int) -> None:
    """TERM the older run's process group, then KILL it if it is still there after a few seconds."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            return  # not ours to stop: the wait ends in remote_busy
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
