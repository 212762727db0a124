"""Receive or check files in the job's private directory on the GPU host (stdlib, Python >= 3.8).

The control plane runs this source with `<remote_python> -c <this file> <dir> receive|check` over an
exec channel, for hosts whose sshd has no SFTP subsystem (`receive`) and to check, after any upload,
that what arrived is what was sent (`check`). stdin: one JSON line {"files": [{"name", "size",
"sha256", "mode"}]}, then (receive only) the files' bytes back to back. stdout: one JSON line,
{"ok": true} or {"ok": false, "error": "..."}; exit status 0 only when ok.

Refused: a directory that is a symlink, not ours, or open to group/others (mktemp -d makes it 0700);
names with a slash or a leading dot. Each file is written beside its final name with O_EXCL and
O_NOFOLLOW, checked (size and SHA-256), given its mode and only then renamed into place.
"""

import hashlib
import json
import os
import re
import stat
import sys

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_CHUNK = 1 << 20


class Refused(Exception):
    pass


def check_dir(path):
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Refused("%s is not a directory" % path)
    if st.st_uid != os.geteuid():
        raise Refused("%s is owned by uid %d, not by us" % (path, st.st_uid))
    if st.st_mode & 0o077:
        raise Refused("%s has mode %o; a private directory must be 0700" % (path, stat.S_IMODE(st.st_mode)))


def parse_header(line):
    try:
        files = json.loads(line.decode("utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise Refused('the header is not {"files": [...]}') from None
    for f in files:
        if not (
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and _NAME.match(f["name"])
            and isinstance(f.get("size"), int)
            and f["size"] >= 0
            and isinstance(f.get("mode"), int)
            and isinstance(f.get("sha256"), str)
            and re.match(r"^[0-9a-f]{64}$", f["sha256"])
        ):
            raise Refused("bad file entry %r" % (f,))
    return files


def receive_one(directory, entry, stream):
    final = os.path.join(directory, entry["name"])
    partial = os.path.join(directory, ".%s.partial" % entry["name"])
    if os.path.lexists(partial):
        os.unlink(partial)  # left by an earlier, interrupted upload into this same private directory
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    digest, left = hashlib.sha256(), entry["size"]
    try:
        while left:
            chunk = stream.read(min(_CHUNK, left))
            if not chunk:
                raise Refused("%s: the stream ended %d bytes short" % (entry["name"], left))
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            left -= len(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise Refused(
                "%s arrived with SHA-256 %s, expected %s" % (entry["name"], digest.hexdigest(), entry["sha256"])
            )
        os.fchmod(fd, entry["mode"] & 0o700)
    except BaseException:
        os.close(fd)
        os.unlink(partial)
        raise
    os.close(fd)
    os.rename(partial, final)


def check_one(directory, entry):
    path = os.path.join(directory, entry["name"])
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
        raise Refused("%s is not a regular file of %d bytes" % (entry["name"], entry["size"]))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise Refused(
            "%s on the host has SHA-256 %s, expected %s" % (entry["name"], digest.hexdigest(), entry["sha256"])
        )


def main(argv):
    try:
        if len(argv) != 3 or argv[2] not in ("receive", "check"):
            raise Refused("usage: <dir> receive|check")
        directory = argv[1]
        check_dir(directory)
        stream = sys.stdin.buffer
        files = parse_header(stream.readline(1 << 20))
        for entry in files:
            if argv[2] == "receive":
                receive_one(directory, entry, stream)
            else:
                check_one(directory, entry)
        if argv[2] == "receive" and stream.read(1):
            raise Refused("more bytes arrived than the header announced")
    except (Refused, OSError) as exc:
        sys.stdout.write(json.dumps({"ok": False, "error": str(exc)}) + "\n")
        return 1
    sys.stdout.write(json.dumps({"ok": True, "files": len(files)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
