"""Which directories a restore may replace, and which exclude patterns would empty a snapshot.

One definition for both sides: the control plane imports this module (`src.services.path_policy`)
to refuse a request before any job exists, and restore.py runs it again on the GPU host against
the *resolved* path (`os.path.realpath`), because a request only names text: `/workspace` may be a
symlink to `/etc` on the host. Standard library only, no sibling imports (it is copied to the host
with the other scripts and imported from both places).

Deny list (a restore replaces the whole directory, so each entry says what would break):
- the path itself and everything below it: `/bin`, `/boot`, `/dev`, `/etc`, `/lib`, `/lib32`,
  `/lib64`, `/libx32`, `/proc`, `/run`, `/sbin`, `/snap`, `/sys`, `/usr`, `/var` (the OS, its
  devices and state), and any `.ssh` directory at any depth (the host's login keys);
- only the path itself (a subdirectory is a fine workspace): `/`, `/root`, `/home`, `/home/<user>`,
  `/opt`, `/srv`, `/tmp`, `/mnt`, `/media` (each holds other people's data, logins or mounts).
"""

from __future__ import annotations

import fnmatch
from typing import List, Optional

DENY_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/snap",
    "/sys",
    "/usr",
    "/var",
)
DENY_EXACT = ("/", "/root", "/home", "/opt", "/srv", "/tmp", "/mnt", "/media")

# Names only tar's exclude matching can tell apart from "every entry": a pattern that matches both
# of these children (one plain, one a dot file) excludes every child of the workspace root.
_PROBES = ("./Zq9-gpusnap-probe.bin", "./.zq9-gpusnap-probe")


def normalise(path: str) -> str:
    """`//etc/`, `/etc/.` -> `/etc`. `..` is resolved textually (`/usr/../etc` -> `/etc`); the host
    resolves symlinks on top of this."""
    parts: List[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def denied_reason(path: str) -> Optional[str]:
    """Why a restore must not replace `path` (an absolute path), or None when it may."""
    if not path.startswith("/"):
        return "must be an absolute path"
    p = normalise(path)
    parts = [x for x in p.split("/") if x]
    if p in DENY_EXACT or (len(parts) == 2 and parts[0] == "home"):
        return "%s is a system directory (a subdirectory of it may be used)" % p
    for tree in DENY_TREES:
        if p == tree or p.startswith(tree + "/"):
            return "%s is inside the system directory %s" % (p, tree)
    if ".ssh" in parts:
        return "%s is an SSH configuration directory (login keys)" % p
    return None


def _tar_match(name: str, pattern: str) -> bool:
    # GNU tar's default for --exclude: unanchored (the pattern may match any trailing run of path
    # components) and wildcards match '/'. fnmatch's '*' also matches '/'.
    candidates = [name] + [name[i + 1 :] for i, ch in enumerate(name) if ch == "/"]
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates if c)


def excludes_everything(pattern: str) -> bool:
    """True when `pattern`, given to the snapshot's `tar --exclude`, matches the workspace root
    (GNU tar then writes an empty archive: `.`, `*`, `.*`, `?`, `**`, `[.]`) or every child of it
    (`./*`, `.[!.]*`), or only means the root (`./`, `/`, empty)."""
    stripped = pattern.strip()
    if stripped.rstrip("/") in ("", ".", "./."):
        return True
    if _tar_match(".", pattern):  # tar names the root "." when matching (no trailing slash)
        return True
    return all(_tar_match(probe, pattern) for probe in _PROBES)
