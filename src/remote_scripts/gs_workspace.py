"""Local filesystem helpers: size pre-scan, free space, and the staging directory that restore fills
and then swaps into place.

Staging lives beside the target on the same filesystem (`<target>.gpusnap-staging-<id>`) so the
final swap is two renames. When the target is itself a mount point (a volume mounted at
/workspace cannot be renamed), staging moves inside it (`<target>/.gpusnap-staging-<id>`) and the
swap moves the entries instead. Either way the live workspace is not touched before commit().
"""
from __future__ import annotations

import fnmatch
import glob
import logging
import os
import shutil
from typing import List, Tuple

from gs_common import ScriptError

logger = logging.getLogger("gpusnap.remote")

TAR_HEADER = 512


def _excluded(rel: str, name: str, patterns: List[str]) -> bool:
    # Approximates GNU tar's unanchored --exclude: a pattern may match the name or a path suffix.
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(rel, p) or
               fnmatch.fnmatchcase(rel, "*/" + p) for p in patterns)


def scan(root: str, excludes: List[str]) -> Tuple[int, int]:
    """(estimated tar stream bytes, entries) of the tree: apparent sizes + one header per entry.

    An estimate for progress only; unreadable directories are skipped, symlinks never followed."""
    total, entries = TAR_HEADER, 1
    stack = [(root, "")]
    while stack:
        path, rel = stack.pop()
        try:
            with os.scandir(path) as it:
                for entry in it:
                    sub = entry.name if not rel else rel + "/" + entry.name
                    if excludes and _excluded(sub, entry.name, excludes):
                        continue
                    entries += 1
                    total += TAR_HEADER
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append((entry.path, sub))
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)  # sparse files: allocated size
                            total += -(-min(st.st_size, st.st_blocks * 512) // 512) * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total, entries


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Staging:
    """Owns one staging directory for a restore into `target` (an absolute path)."""

    def __init__(self, target: str, run_id: str) -> None:
        self.target = os.path.normpath(target)
        parent = os.path.dirname(self.target) or "/"
        if not os.path.isdir(parent):
            raise ScriptError("workspace_not_found", "parent directory of %s does not exist" % self.target)
        if os.path.exists(self.target) and not os.path.isdir(self.target):
            raise ScriptError("bad_config", "workspace_path %s exists and is not a directory" % self.target)
        self.inside = os.path.isdir(self.target) and os.path.ismount(self.target)
        if self.inside:
            self.path = os.path.join(self.target, ".gpusnap-staging-" + run_id)
            self.old = os.path.join(self.target, ".gpusnap-old-" + run_id)
        else:
            self.path = "%s.gpusnap-staging-%s" % (self.target, run_id)
            self.old = "%s.gpusnap-old-%s" % (self.target, run_id)
        self.fs_path = self.target if self.inside else parent
        # Inside a mount point, creating and removing staging changes the live root's mtime/atime:
        # remember them (and mode, owner) so a failed restore can put the root back as it was.
        self.root_before = os.lstat(self.target) if self.inside else None

    def remove_stale(self) -> None:
        """Remove staging dirs left by restores that were killed (never the live data, never old-*)."""
        pattern = (os.path.join(self.target, ".gpusnap-staging-*") if self.inside
                   else glob.escape(self.target) + ".gpusnap-staging-*")
        removed = False
        for stale in glob.glob(pattern):
            if stale != self.path:
                logger.info("removing stale staging directory %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
                removed = True
        if removed:
            self._put_back_root()

    def create(self) -> None:
        os.mkdir(self.path, 0o700)

    def discard(self) -> None:
        """The failure path: remove staging; inside a mount point, put the root's attributes back."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._put_back_root()

    def _put_back_root(self) -> None:
        """Restore the live root's owner, mode and times as they were before this restore (mount-point
        case only; elsewhere staging lives beside the root and never touches it). Best effort: a
        failure is logged, and the restore's own error is what gets reported."""
        st = self.root_before
        if st is None:
            return
        try:
            if os.geteuid() == 0:
                os.chown(self.target, st.st_uid, st.st_gid)
            os.chmod(self.target, st.st_mode & 0o7777)
            os.utime(self.target, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError as exc:
            logger.warning("could not restore the attributes of %s: %s", self.target, exc)

    def commit(self) -> None:
        """Swap staging into place, then delete the previous workspace."""
        if self.inside:
            root = self._commit_inside()
            shutil.rmtree(self.old, onerror=lambda *a: logger.warning("could not remove %s", a[1]))
            # last, since removing staging/old inside the target changes the target's own mtime
            if os.geteuid() == 0:
                os.chown(self.target, root.st_uid, root.st_gid)
            os.chmod(self.target, root.st_mode & 0o7777)
            os.utime(self.target, ns=(root.st_atime_ns, root.st_mtime_ns))
            return
        if not os.path.lexists(self.target):
            os.rename(self.path, self.target)
            return
        os.rename(self.target, self.old)
        try:
            os.rename(self.path, self.target)
        except OSError:
            os.rename(self.old, self.target)  # put the old workspace back before failing
            raise
        shutil.rmtree(self.old, onerror=lambda *a: logger.warning("could not remove %s", a[1]))

    def _commit_inside(self) -> os.stat_result:
        root = os.lstat(self.path)  # the archive's "./" entry, before moving entries changes its mtime
        keep = {os.path.basename(self.path), os.path.basename(self.old)}
        os.mkdir(self.old, 0o700)
        moved: List[str] = []
        try:
            for name in os.listdir(self.target):
                if name not in keep:
                    os.rename(os.path.join(self.target, name), os.path.join(self.old, name))
                    moved.append(name)
            for name in os.listdir(self.path):
                os.rename(os.path.join(self.path, name), os.path.join(self.target, name))
        except OSError:
            # Undo: new entries go back to staging, old ones back to the target.
            for name in os.listdir(self.target):
                if name not in keep and name not in moved:
                    os.rename(os.path.join(self.target, name), os.path.join(self.path, name))
            for name in moved:
                os.rename(os.path.join(self.old, name), os.path.join(self.target, name))
            os.rmdir(self.old)
            raise
        os.rmdir(self.path)
        return root
