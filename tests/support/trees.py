"""Build workspace trees with every tricky kind of file, and describe trees for comparison: contents,
modes, symlink targets, hard-link groups and mtimes (to the second, what tar keeps)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat

MTIME = 1_700_000_000  # a fixed past time, so a restore that forgot mtimes is visible


def make_tricky_tree(root: pathlib.Path, *, big_bytes: int = 3 << 20, seed: int = 7) -> pathlib.Path:
    """A workspace: compressible and random files (one `big_bytes` long, crossing part boundaries),
    odd modes, relative, dangling and absolute (venv-style) symlinks, a hard link, an empty dir, a zero-byte file, a sparse
    file and a non-UTF-8 name. Returns `root`."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir()
    (root / "models" / "weights.bin").write_bytes(rng.randbytes(big_bytes // 2) + bytes(big_bytes // 2))
    (root / "src" / "pkg").mkdir(parents=True)
    for i in range(20):
        (root / "src" / "pkg" / f"mod_{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i + 1))
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "secret.key").write_text("not really\n")
    os.chmod(root / "secret.key", 0o600)
    (root / "empty_dir").mkdir()
    (root / "zero").write_bytes(b"")
    os.symlink("src/pkg/mod_1.py", root / "link_to_mod")
    os.symlink("does/not/exist", root / "dangling")
    (root / "venv" / "bin").mkdir(parents=True)
    os.symlink("/usr/bin/python3", root / "venv" / "bin" / "python")  # leaves the tree, as venvs do
    os.link(root / "src" / "pkg" / "mod_2.py", root / "hardlink_to_mod2")
    with open(root / "sparse.img", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
    os.makedirs(os.fsencode(root) + b"/caf\xe9-latin1")  # a name that is not UTF-8
    with open(os.fsencode(root) + b"/caf\xe9-latin1/data", "wb") as f:
        f.write(b"latin-1 named\n")
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root), topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))
    return root


def describe_tree(root: pathlib.Path) -> dict[bytes, tuple]:
    """Relative path -> (kind, mode, mtime, content digest or link target, hard-link group size)."""
    base = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    inodes: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, int(st.st_mtime), os.readlink(path), 1)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, int(st.st_mtime), None, 1)
            else:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
                out[rel] = ("file", mode, int(st.st_mtime), digest, st.st_nlink)
    return out
