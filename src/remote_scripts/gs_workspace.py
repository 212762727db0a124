"""Local filesystem helpers: size pre-scan, free space, and the staging directory that restore fills
and then swaps into place.

Staging lives beside the target on the same filesystem (`<target>.gpusnap-staging-<id>`) so the
final swap is two renames. When the target is itself a mount point (a volume mounted at
/workspace cannot be renamed), staging moves inside it (`<target>/.gpusnap-staging-<id>`) and the
swap moves the entries instead. Either way the live workspace is not touched before commit().

The workspace a commit replaces is kept, not deleted: as `<target>.gpusnap-old-<UTC timestamp>`
beside it (inside it, as `.gpusnap-old-<UTC timestamp>`, for a mount point; snapshots exclude that
name), until the next successful restore of the same path removes it. An empty one is not kept.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from gs_common import ScriptError

logger = logging.getLogger("gpusnap.remote")

TAR_HEADER = 512
STAGING_PREFIX = ".gpusnap-staging-"
OLD_PREFIX = ".gpusnap-old-"
# `<target>.gpusnap-restored-<restore id>` (inside the target for a mount point): written when a restore
# commits, holding its result. A re-run of the same restore (a retry after the link dropped, a job re-run
# after a worker died) finds it and reports that result instead of swapping again: a second swap would
# move the restored tree aside and remove the kept original, the user's own workspace.
DONE_PREFIX = ".gpusnap-restored-"
# What a snapshot never saves: our own restore leftovers inside a mounted workspace (anchored: only
# at the workspace root, where restore puts them).
OWN_EXCLUDES = ["./" + STAGING_PREFIX + "*", "./" + OLD_PREFIX + "*", "./" + DONE_PREFIX + "*"]


def _excluded(rel: str, name: str, patterns: List[str]) -> bool:
    # Approximates GNU tar's unanchored --exclude: a pattern may match the name or a path suffix,
    # and tar sees members as "./<rel>" (so "./cache" matches).
    return any(
        fnmatch.fnmatchcase(name, p)
        or fnmatch.fnmatchcase(rel, p)
        or fnmatch.fnmatchcase(rel, "*/" + p)
        or fnmatch.fnmatchcase("./" + rel, p)
        for p in patterns
    )


def scan(root: str, excludes: List[str]) -> Tuple[int, int]:
    """(estimated tar stream bytes, entries) of the tree: apparent sizes + one header per entry.

    Also what a hibernate compares the snapshot with before it destroys anything (a snapshot far
    smaller than this is `hollow_snapshot`), so a hard-linked file's data counts once, as tar stores
    it. Unreadable directories are skipped, symlinks never followed."""
    total, entries = TAR_HEADER, 1
    seen_inodes = set()
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
                            if st.st_nlink > 1:
                                if (st.st_dev, st.st_ino) in seen_inodes:
                                    continue
                                seen_inodes.add((st.st_dev, st.st_ino))
                            total += -(-min(st.st_size, st.st_blocks * 512) // 512) * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total, entries


def occupied(target: str) -> List[str]:
    """Up to 5 entries of `target` that a restore would replace (empty when it is missing or empty).
    Our own staging/old directories and an empty `lost+found` (a fresh filesystem has one) do not count."""
    try:
        names = sorted(os.listdir(target))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        return [os.path.basename(target)]
    found = []
    for name in names:
        if name.startswith((STAGING_PREFIX, OLD_PREFIX, DONE_PREFIX)):
            continue
        if name == "lost+found":
            try:
                if not os.listdir(os.path.join(target, name)):
                    continue
            except OSError:
                pass
        found.append(name)
        if len(found) == 5:
            break
    return found


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def done_marker(target: str, restore_id: str) -> str:
    """Where the restore `restore_id` of `target` records that it committed (see DONE_PREFIX)."""
    target = os.path.normpath(target)
    if os.path.isdir(target) and os.path.ismount(target):
        return os.path.join(target, DONE_PREFIX + restore_id)
    return target + DONE_PREFIX + restore_id


def read_done(target: str, restore_id: str) -> Optional[Dict[str, Any]]:
    """The result recorded by restore `restore_id` of `target` when it committed, or None."""
    try:
        with open(done_marker(target, restore_id)) as fh:
            recorded = json.load(fh)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and os.path.isdir(target) else None


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
            self.path = os.path.join(self.target, STAGING_PREFIX + run_id)
            self.old_base = os.path.join(self.target, OLD_PREFIX)
        else:
            self.path = self.target + STAGING_PREFIX + run_id
            self.old_base = self.target + OLD_PREFIX
        self.old = self.old_base + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        n = 1
        while os.path.lexists(self.old):  # two restores within a second
            n += 1
            self.old = "%s%s-%d" % (self.old_base, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), n)
        self.kept_old: Optional[str] = None  # set by commit() when the replaced workspace was kept
        self.fs_path = self.target if self.inside else parent
        # Inside a mount point, creating and removing staging changes the live root's mtime/atime:
        # remember them (and mode, owner) so a failed restore can put the root back as it was.
        self.root_before = os.lstat(self.target) if self.inside else None

    def remove_stale(self) -> None:
        """Remove staging dirs left by restores that were killed (never the live data, never old-*)."""
        pattern = (
            os.path.join(glob.escape(self.target), STAGING_PREFIX + "*")
            if self.inside
            else glob.escape(self.target) + STAGING_PREFIX + "*"
        )
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

    def commit(self, done: Optional[Tuple[str, Dict[str, Any]]] = None) -> None:
        """Swap staging into place; keep the replaced workspace (`kept_old`) and remove the ones kept
        by earlier restores of this path. `done` (restore id, result) is recorded as that restore's
        marker (DONE_PREFIX) right after the swap, replacing earlier restores' markers."""
        if self.inside:
            root = self._commit_inside()
            self._keep_old()
            self._mark_done(done)
            # last, since removing staging/old inside the target changes the target's own mtime
            if os.geteuid() == 0:
                os.chown(self.target, root.st_uid, root.st_gid)
            os.chmod(self.target, root.st_mode & 0o7777)
            os.utime(self.target, ns=(root.st_atime_ns, root.st_mtime_ns))
            return
        if not os.path.lexists(self.target):
            os.rename(self.path, self.target)
            self._keep_old()
            self._mark_done(done)
            return
        os.rename(self.target, self.old)
        try:
            os.rename(self.path, self.target)
        except OSError:
            os.rename(self.old, self.target)  # put the old workspace back before failing
            raise
        self._keep_old()
        self._mark_done(done)

    def _mark_done(self, done: Optional[Tuple[str, Dict[str, Any]]]) -> None:
        base = os.path.join(self.target, DONE_PREFIX) if self.inside else self.target + DONE_PREFIX
        for earlier in glob.glob(glob.escape(base) + "*"):
            os.unlink(earlier)
        if done is not None:
            restore_id, result = done
            with open(base + restore_id, "w") as fh:
                json.dump(dict(result, previous_workspace=self.kept_old), fh)

    def _keep_old(self) -> None:
        """After a successful swap: the replaced workspace stays as `self.old` (unless it was empty);
        older copies from earlier restores of this path are removed now."""
        try:
            os.rmdir(self.old)  # only succeeds when empty: nothing worth keeping
        except OSError:
            if os.path.isdir(self.old):
                self.kept_old = self.old
        for earlier in glob.glob(glob.escape(self.old_base) + "*"):
            if earlier != self.old:
                logger.info("removing %s, kept by an earlier restore", earlier)
                shutil.rmtree(earlier, onerror=lambda *a: logger.warning("could not remove %s", a[1]))

    def _commit_inside(self) -> os.stat_result:
        root = os.lstat(self.path)  # the archive's "./" entry, before moving entries changes its mtime
        # Our own directories stay where they are (earlier kept copies are pruned after success).
        keep = {os.path.basename(self.path), os.path.basename(self.old)}
        keep.update(n for n in os.listdir(self.target) if n.startswith((STAGING_PREFIX, OLD_PREFIX)))
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
