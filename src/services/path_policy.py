"""What a request may name as a restore destination or a snapshot exclude, refused before any job is
created. The rules themselves live in `src/remote_scripts/gs_paths.py`, shared with the restore script,
which checks the destination again on the host after resolving symlinks (a request is only text)."""

from __future__ import annotations

from src.errors import Unprocessable
from src.remote_scripts.gs_paths import DENY_EXACT, DENY_TREES, denied_reason, excludes_everything

__all__ = ["DENY_EXACT", "DENY_TREES", "check_excludes", "check_restore_path"]


def check_restore_path(path: str, *, what: str = "workspace_path") -> str:
    """`path` normalised, when a restore may replace it. Raises Unprocessable(`system_path`) for the
    deny list of docs/data-plane.md (system directories, `.ssh`, `/root` and `/home/<user>` themselves)."""
    reason = denied_reason(path)
    if reason is not None:
        raise Unprocessable(f"{what} {path!r} cannot be restored into: {reason}", code="system_path")
    return path


def check_excludes(excludes: list[str] | None) -> list[str]:
    """The excludes, unless one of them would leave the snapshot empty (it matches the workspace root,
    as `.`, `*`, `.*`, `./`, `/` and `**` do for GNU tar, or every entry in it, as `./*` does).
    Raises Unprocessable(`exclude_matches_root`)."""
    for pattern in excludes or []:
        if excludes_everything(pattern):
            hint = " (for dot files use './.*')" if pattern.strip() == ".*" else ""
            raise Unprocessable(
                f"exclude {pattern!r} matches the workspace root or every entry in it: the "
                f"snapshot would hold nothing{hint}",
                code="exclude_matches_root",
            )
    return list(excludes or [])
