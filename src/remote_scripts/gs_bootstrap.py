"""Import a third-party module, installing it privately with pip when the host lacks it.

Installs go to `~/.cache/gpusnap/pylib-py<major><minor>` (never site-packages, never the workspace),
which is put on sys.path. Failure → ScriptError("missing_dependency", …) naming what is missing.

What pip may install is pinned here, version and SHA-256 of every accepted file: the host's package
index (whatever it is configured to be) is not trusted, and these scripts run as root. pip gets a
requirements file with `--require-hashes --only-binary=:all: --no-deps`: wheels only, because building
an sdist would fetch unpinned build dependencies (setuptools, ...) that no hash covers; no dependency
resolution, because every file that may be installed is listed below. A host whose platform has no
listed wheel gets `missing_dependency`, and the caller falls back (gs_codecs: the `zstd` binary, then
no compression). Hashes were read from PyPI's simple index (JSON form) for these exact versions.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from types import ModuleType
from typing import Dict, List, Optional

from gs_common import ScriptError, tail_text

logger = logging.getLogger("gpusnap.remote")

PIP_TIMEOUT_S = 600

# manylinux wheels for x86_64 and aarch64 (glibc hosts: what GPU images are). zstandard 0.24+ needs
# Python >= 3.9, so a 3.8 host gets 0.23.0, which has the same API for what gs_codecs uses.
_ZSTANDARD = [
    'zstandard==0.23.0 ; python_version < "3.9"'
    " --hash=sha256:2f146f50723defec2975fb7e388ae3a024eb7151542d1599527ec2aa9cacb152"  # cp38 x86_64
    " --hash=sha256:e2d1a054f8f0a191004675755448d12be47fa9bebbcffa3cdf01db19f2d30a54",  # cp38 aarch64
    'zstandard==0.25.0 ; python_version >= "3.9"'
    " --hash=sha256:53e08b2445a6bc241261fea89d065536f00a581f02535f8122eba42db9375530"  # cp39 x86_64
    " --hash=sha256:3b870ce5a02d4b22286cf4944c628e0f0881b11b3f14667c1d62185a99e04f53"  # cp39 aarch64
    " --hash=sha256:4b6d83057e713ff235a12e73916b6d356e3084fd3d14ced499d84240f3eecee0"  # cp310 x86_64
    " --hash=sha256:e05ab82ea7753354bb054b92e2f288afb750e6b439ff6ca78af52939ebbc476d"  # cp310 aarch64
    " --hash=sha256:9300d02ea7c6506f00e627e287e0492a5eb0371ec1670ae852fefffa6164b072"  # cp311 x86_64
    " --hash=sha256:01582723b3ccd6939ab7b3a78622c573799d5d8737b534b86d0e06ac18dbde4a"  # cp311 aarch64
    " --hash=sha256:5a56ba0db2d244117ed744dfa8f6f5b366e14148e00de44723413b2f3938a902"  # cp312 x86_64
    " --hash=sha256:6dffecc361d079bb48d7caef5d673c88c8988d3d33fb74ab95b7ee6da42652ea"  # cp312 aarch64
    " --hash=sha256:8e735494da3db08694d26480f1493ad2cf86e99bdd53e8e9771b2752a5c0246a"  # cp313 x86_64
    " --hash=sha256:bfc4e20784722098822e3eee42b8e576b379ed72cca4a7cb856ae733e62192ea"  # cp313 aarch64
    " --hash=sha256:e09bb6252b6476d8d56100e8147b803befa9a12cea144bbe629dd508800d1ad0"  # cp314 x86_64
    " --hash=sha256:223415140608d0f0da010499eaa8ccdb9af210a543fac54bce15babbcfc78439",  # cp314 aarch64
]

# nvCOMP 6 (Python >= 3.9): the Python package and the native library it requires (==, same version).
_NVCOMP = {
    12: [
        "nvidia-nvcomp-cu12==6.0.0.12"
        " --hash=sha256:9a05eb1c52bfaae108f971af142068ee591e91e10d125d8227b71f2e9deb054c"  # x86_64
        " --hash=sha256:91b2cfde54f9404708464a72c80944ef9fd7b3f288353335bbe7f9e469511e97",  # aarch64
        "nvidia-libnvcomp-cu12==6.0.0.12"
        " --hash=sha256:9b8210d6ae6ee87ec74ea2fb2868c403c441bac4f3a5c60907e8bc0293297bd1"  # x86_64
        " --hash=sha256:b468343beac15948b045b428cd23b907d0aca6e3795f90636711e753396f7a19",  # aarch64
    ],
    13: [
        "nvidia-nvcomp-cu13==6.0.0.12"
        " --hash=sha256:8386ba3ab6c968d001138eda0f66fe7b7a847e7241384a63232b1c2d50a79d74"  # x86_64
        " --hash=sha256:2a249d72451afed47a29f05491399bffd1a31df1dc54145d8b1bcbc40d7b6d2c",  # aarch64
        "nvidia-libnvcomp-cu13==6.0.0.12"
        " --hash=sha256:d1cf156f7885b9b1ad17ac0059b678e04869466f81207e51fed330f8ffbfcd5a"  # x86_64
        " --hash=sha256:becef25cb59b0fbb593d05733be39936ad2f508dc148e2fb125611c28c50a705",  # aarch64
    ],
}

# What `ensure(..., requirement=<key>)` may install: key -> requirements-file lines (with hashes).
PINNED: Dict[str, List[str]] = {
    "zstandard": _ZSTANDARD,
    "nvidia-nvcomp-cu12": _NVCOMP[12],
    "nvidia-nvcomp-cu13": _NVCOMP[13],
}


def private_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpusnap", "pylib-py%d%d" % sys.version_info[:2])


def _try_import(module: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(module)
    except (ImportError, OSError):  # OSError: a C extension whose shared library does not load
        return None


def pip_command(requirements_file: str, target: str, pip: Optional[List[str]] = None) -> List[str]:
    """The pip invocation: hash-checked, wheels only, nothing resolved beyond the pinned files."""
    return (pip or [sys.executable, "-m", "pip"]) + [
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--require-hashes",
        # bounded: a host whose index is black-holed must fall back in seconds, not stall each job
        "--timeout",
        "20",
        "--retries",
        "1",
        "--only-binary=:all:",
        "--no-deps",
        "--target",
        target,
        "-r",
        requirements_file,
    ]


def ensure(
    module: str,
    requirement: str,
    *,
    install: bool = True,
    pip: Optional[List[str]] = None,
    target: Optional[str] = None,
    pins: Optional[Dict[str, List[str]]] = None,
) -> ModuleType:
    """Return `module`, importing it from the environment, then from the private dir, then after
    installing the pinned files of `requirement` (a key of PINNED) into the private dir.

    `pip` overrides the installer command and `pins` the pin table (tests); `install=False` only
    looks. Raises ScriptError("missing_dependency") when every step fails, and for a requirement
    without pins (nothing unpinned is ever installed)."""
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
    lines = (pins if pins is not None else PINNED).get(requirement)
    if not lines:
        raise ScriptError(
            "missing_dependency",
            "python module %r is missing and %r has no pinned, hash-checked release to install" % (module, requirement),
        )
    os.makedirs(target, mode=0o700, exist_ok=True)
    # The requirements file sits in a private temporary directory (mkdtemp: 0700), removed after.
    scratch = tempfile.mkdtemp(prefix="gpusnap-pip-")
    try:
        req_file = os.path.join(scratch, "requirements.txt")
        with open(req_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        cmd = pip_command(req_file, target, pip)
        logger.info("installing pinned %s into %s", requirement, target)
        try:
            res = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=PIP_TIMEOUT_S
            )
            detail = tail_text(res.stderr, 500) if res.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = str(exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    importlib.invalidate_caches()
    found = _try_import(module)
    if found is None:
        raise ScriptError(
            "missing_dependency",
            "python module %r is missing and the pinned, hash-checked install of %s failed: %s"
            % (module, requirement, detail or "module still not importable"),
        )
    return found
