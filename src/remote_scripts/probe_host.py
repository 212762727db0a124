"""Report what the host offers the data-plane scripts: its machine type and the s5cmd they would run.

    python3 probe_host.py < {"s5cmd": "s5cmd", "sha256": false}

Result: {"machine": uname -m, "s5cmd_path": resolved path or null, "s5cmd_version": first line of
`s5cmd version` or "", "s5cmd_sha256": hex digest of the binary when asked for ("sha256": true)}.
Run under the same REMOTE_PYTHON and environment as snapshot.py and restore.py, so the s5cmd it
finds is the one they would start. It only looks: installs nothing, changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gs_common import Context, require, run_script, tail_text  # noqa: E402

_VERSION_TIMEOUT_S = 20


def s5cmd_version(path: str) -> str:
    try:
        res = subprocess.run(
            [path, "version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=_VERSION_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return ""  # does not run here (wrong architecture, not executable, hangs)
    if res.returncode != 0:
        return ""
    return tail_text(res.stdout, 200).splitlines()[0] if res.stdout.strip() else ""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(cfg: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    wanted = require(cfg, "s5cmd", str)
    want_digest = require(cfg, "sha256", bool, False)
    path: Optional[str] = shutil.which(wanted) if wanted else None
    return {
        "machine": os.uname().machine,
        "s5cmd_path": path,
        "s5cmd_version": s5cmd_version(path) if path else "",
        "s5cmd_sha256": file_sha256(path) if path and want_digest else None,
    }


if __name__ == "__main__":
    run_script(main)
