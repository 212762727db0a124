"""probe_gpu.py run for real (as the SSH adapter runs it: JSON on stdin, events on stdout) with a fake
nvidia-smi first on its PATH, printing what real drivers print when things go wrong. Whatever the
fake prints that is not one integer per GPU must come back as `gpu_error`, never as a reading.
(Counting interactive SSH sessions needs a real sshd: tests/e2e/test_policies.py.)"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "src" / "remote_scripts" / "probe_gpu.py"


def _run(tmp_path: pathlib.Path, smi: str | None) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if smi is not None:
        fake = bindir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n" + smi)
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin" if smi is not None else str(bindir)}
    out = subprocess.run([sys.executable, str(SCRIPT)], input=b"{}\n", capture_output=True, env=env, timeout=60)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0, out.stderr
    (result,) = [e for e in events if e["event"] == "result"]
    return result


@pytest.mark.parametrize(
    "smi, util, error",
    [
        ("printf '0\\n37\\n100\\n'", [0, 37, 100], None),
        ("printf ' 3 \\n'", [3], None),
        ("printf '[N/A]\\n0\\n'", None, "gpu_util_unreadable"),  # a GPU that cannot report utilisation
        ("printf '[Unknown Error]\\n'", None, "gpu_util_unreadable"),
        ("printf '3 %%\\n'", None, "gpu_util_unreadable"),  # units, though nounits was asked for
        ("printf '\\n'", None, "no_gpus"),
        (
            'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9',
            None,
            "nvidia_smi_failed: exit 9",
        ),
        ("echo 'No devices were found'; exit 6", None, "nvidia_smi_failed: exit 6"),
        (None, None, "nvidia_smi_missing"),
    ],
)
def test_gpu_readings_and_failures(tmp_path, smi, util, error):  # type: ignore[no-untyped-def]
    result = _run(tmp_path, smi)
    assert result["gpu_util"] == util
    assert (result["gpu_error"] is None) if error is None else result["gpu_error"].startswith(error)


def test_the_exact_query_is_asked(tmp_path):  # type: ignore[no-untyped-def]
    result = _run(
        tmp_path, '[ "$*" = "--query-gpu=utilization.gpu --format=csv,noheader,nounits" ] || exit 2\necho 0\n'
    )
    assert result["gpu_util"] == [0]
