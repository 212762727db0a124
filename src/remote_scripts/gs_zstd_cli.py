"""The `zstd` codec through the zstd command-line tool, for hosts where the zstandard package is
neither installed nor installable (no pip, no reachable index, no wheel for the platform).

It writes and reads the same thing as the package: one standard zstd frame per part, with a content
checksum (the CLI writes one by default; `--check` says so explicitly). So a part compressed here
restores with the package and the other way round, and the manifest names both `zstd`.
"""

from __future__ import annotations

import re
import subprocess
import threading
from typing import Any, List

from gs_codec_base import Codec
from gs_common import ScriptError, read_full, tail_text

_MAGIC = b"\x28\xb5\x2f\xfd"  # zstd frame magic number 0xFD2FB528, little-endian (RFC 8878 3.1.1)
_VERSION_TIMEOUT_S = 10


def frame_has_checksum(stored: Any) -> bool:
    """True when `stored` starts with a zstd frame whose header sets Content_Checksum_flag (bit 2 of
    the Frame_Header_Descriptor, RFC 8878 3.1.1.1.1): the decoder then checks XXH64 of the output."""
    head = bytes(memoryview(stored)[:5])
    return len(head) == 5 and head[:4] == _MAGIC and bool(head[4] & 0x04)


class ZstdCliCodec(Codec):
    """The Codec interface (compress, decompress, decompress_into, checks_output, version), one
    short-lived `zstd` process per part. Thread-safe. Its decoder is another program fed the stored
    bytes: decodes_untrusted_input stays False (readers hash stored bytes before handing them on)."""

    name = "zstd"
    fallback = None

    def __init__(self, binary: str, level: int = 3) -> None:
        self.binary = binary
        self.level = level
        try:
            res = subprocess.run(
                [binary, "--version"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=_VERSION_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ScriptError("missing_dependency", "the zstd binary %s does not run: %s" % (binary, exc)) from None
        found = re.search(r"v(\d+\.\d+\.\d+)", res.stdout.decode("utf-8", "replace"))
        if res.returncode != 0 or found is None:
            raise ScriptError("missing_dependency", "%s --version did not name a zstd version" % binary)
        self._version = found.group(1)

    def version(self) -> str:
        return "zstd-cli " + self._version

    def _compress_args(self) -> List[str]:
        args = [self.binary, "-q", "-c", "--check", "-%d" % self.level]
        return args[:-1] + ["--ultra", args[-1]] if self.level > 19 else args

    def checks_output(self, stored: Any) -> bool:
        return frame_has_checksum(stored)

    def compress(self, raw: Any) -> Any:
        try:
            res = subprocess.run(
                self._compress_args(), input=memoryview(raw), stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise ScriptError("missing_dependency", "cannot run %s: %s" % (self.binary, exc)) from None
        if res.returncode != 0:
            raise ScriptError("internal", "zstd exited %d: %s" % (res.returncode, tail_text(res.stderr)))
        return res.stdout

    def decompress(self, stored: Any, raw_size: int) -> Any:
        out = bytearray(raw_size + 1)
        n = self.decompress_into(stored, memoryview(out))
        if n != raw_size:
            raise ScriptError(
                "part_corrupt",
                "zstd frame decodes to %s bytes, expected %d" % (n if n <= raw_size else "more", raw_size),
            )
        return bytes(out[:n])

    def decompress_into(self, stored: Any, out: memoryview) -> int:
        """Decode into `out`; len(out) means "maybe more" (the caller leaves one spare byte)."""
        try:
            proc = subprocess.Popen(
                [self.binary, "-d", "-q", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise ScriptError("missing_dependency", "cannot run %s: %s" % (self.binary, exc)) from None
        errors: List[bytes] = []
        feeder = threading.Thread(target=self._feed, args=(proc, stored), daemon=True)
        drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
        feeder.start()
        drain.start()
        try:
            got = read_full(proc.stdout, out)
            if got == len(out):
                proc.kill()  # over-long (or exactly full): the caller reports the size mismatch
                return got
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            feeder.join(5)
            drain.join(5)
            proc.stdout.close()
        if rc != 0:
            raise ScriptError("part_corrupt", "zstd frame does not decode: %s" % tail_text(b"".join(errors), 300))
        return got

    @staticmethod
    def _feed(proc: subprocess.Popen, stored: Any) -> None:
        try:
            proc.stdin.write(memoryview(stored))
        except OSError:
            pass  # zstd stopped reading (corrupt frame, or killed): its exit status tells why
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
