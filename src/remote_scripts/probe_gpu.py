"""Sample what keeps a GPU host busy: utilisation of each GPU and the interactive SSH sessions.

    python3 probe_gpu.py < {}

Result: {"gpu_util": [int per GPU] or null, "gpu_error": null or "<code>: <message>",
"ssh_sessions": int or null, "ssh_error": null or a message}.

GPU utilisation is what `nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits` prints,
one integer percent per line, one line per GPU. A missing nvidia-smi, a non-zero exit, a value that is
not an integer (`[N/A]`, `[Unknown Error]`) or no line at all is reported as `gpu_error`, never as 0%.

Interactive SSH sessions are counted from /proc: the distinct pseudo-terminals (/dev/pts/N: tty major
136-143) that are the controlling terminal of a process with an `sshd` (or `sshd-session`, OpenSSH 9.8
on) ancestor. That is one per `ssh host` login with a terminal, whatever runs in it (a shell, vim,
tmux attached). Not counted: commands run without a terminal (`ssh host cmd`, scp, sftp, and gpusnap's
own sessions, which never ask for one), and a detached tmux or screen (its server is no child of sshd).
Only looks: changes nothing on the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gs_common import Context, run_script, tail_text  # noqa: E402

QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
_TIMEOUT_S = 30
_PTS_MAJORS = range(136, 144)
_SSHD_NAMES = ("sshd", "sshd-session")


def gpu_util() -> Tuple[Optional[List[int]], Optional[str]]:
    try:
        res = subprocess.run(
            QUERY, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=_TIMEOUT_S
        )
    except FileNotFoundError:
        return None, "nvidia_smi_missing: nvidia-smi is not on the PATH"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, "nvidia_smi_failed: %s" % exc
    if res.returncode != 0:
        return None, "nvidia_smi_failed: exit %d: %s" % (res.returncode, tail_text(res.stderr or res.stdout, 300))
    values = []
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        text = line.strip()
        if not text:
            continue
        if not (text.isascii() and text.isdigit()):
            return None, "gpu_util_unreadable: nvidia-smi printed %r" % text[:40]
        values.append(int(text))
    if not values:
        return None, "no_gpus: nvidia-smi listed no GPU"
    return values, None


def _stat(pid: str) -> Optional[Tuple[str, int, int]]:
    """(command name, parent pid, controlling tty number) from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    name = raw[raw.find("(") + 1 : raw.rfind(")")]
    fields = raw[raw.rfind(")") + 2 :].split()
    return name, int(fields[1]), int(fields[4])


def ssh_sessions() -> Tuple[Optional[int], Optional[str]]:
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError as exc:
        return None, "cannot read /proc: %s" % exc
    table: Dict[int, Tuple[str, int, int]] = {}
    for pid in pids:
        stat = _stat(pid)
        if stat is not None:
            table[int(pid)] = stat
    ttys = set()
    for pid, (_name, _ppid, tty) in table.items():
        major = (tty >> 8) & 0xFFF
        if tty == 0 or major not in _PTS_MAJORS:
            continue
        seen, current = set(), table.get(pid)
        while current is not None and current[1] not in seen and current[1] > 0:
            seen.add(current[1])
            parent = table.get(current[1])
            if parent is not None and parent[0] in _SSHD_NAMES:
                ttys.add(tty)
                break
            current = parent
    return len(ttys), None


def main(cfg: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    util, gpu_error = gpu_util()
    sessions, ssh_error = ssh_sessions()
    return {"gpu_util": util, "gpu_error": gpu_error, "ssh_sessions": sessions, "ssh_error": ssh_error}


if __name__ == "__main__":
    run_script(main)
