"""Import a third-party module, installing it privately with pip when the host lacks it.

Installs go to `~/.cache/gpusnap/pylib-py<major><minor>` (never site-packages, never the workspace),
which is put on sys.path. Failure → ScriptError("missing_dependency", …) naming what is missing.
"""
from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from types import ModuleType
from typing import List, Optional

from gs_common import ScriptError, tail_text

logger = logging.getLogger("gpusnap.remote")

PIP_TIMEOUT_S = 600


def private_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpusnap", "pylib-py%d%d" % sys.version_info[:2])


def _try_import(module: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def ensure(module: str, requirement: str, *, install: bool = True,
           pip: Optional[List[str]] = None, target: Optional[str] = None) -> ModuleType:
    """Return `module`, importing it from the environment, then from the private dir, then after
    `pip install --target <private dir> <requirement>`.

    `pip` overrides the installer command (tests); `install=False` only looks. Raises
    ScriptError("missing_dependency") when every step fails."""
    found = _try_import(module)
    if found is not None:
        return found
    target = target or private_dir()
    if target not in sys.path:
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        found = _try_import(module)
        if found is not None:
            return found
    if not install:
        raise ScriptError("missing_dependency", "python module %r is not installed" % module)
    os.makedirs(target, mode=0o700, exist_ok=True)
    cmd = (pip or [sys.executable, "-m", "pip"]) + [
        "install", "--quiet", "--disable-pip-version-check", "--no-input", "--target", target, requirement]
    logger.info("installing %s into %s", requirement, target)
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=PIP_TIMEOUT_S)
        detail = tail_text(res.stderr, 500) if res.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        detail = str(exc)
    importlib.invalidate_caches()
    found = _try_import(module)
    if found is None:
        raise ScriptError("missing_dependency",
                          "python module %r is missing and `pip install %s` failed: %s"
                          % (module, requirement, detail or "module still not importable"))
    return found
