"""Stopping one run of a remote script and confirming it is gone, on any session to its host.

A job may end only once its remote script is known dead ("failed" must mean the host is no longer
being changed), so the kill reports whether it could confirm that. See `docs/ssh.md`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from src.adapters.remote_session import RemoteSession

logger = logging.getLogger(__name__)

# Stop one run of our script and confirm it is gone. POSIX sh (dash has no `kill --`), /proc only.
# Arguments: $1 = the session's script directory, $2 = the script's name, $3 = its process group (or
# "-" when the script never reported one), $4 = how many 0.1 s polls to wait after TERM.
# - The group is found, when unknown, by the script's unique path (`<mktemp dir>/<name>.py`) in
#   /proc/*/cmdline. The path is assembled here, so this shell's own argv never contains it.
# - A live leader that is not our script means our group ended and its id was reused: nothing to do.
# - TERM, wait until no live member is left (zombies do not count: they linger for ever in containers
#   whose PID 1 never reaps, and `kill -0` would count them), KILL what remains, then confirm.
# Exit 0: nothing of ours runs any more. Exit 3: still alive. Exit 4: cannot tell (no /proc).
KILL_GROUP_SH = r"""want="$1/$2.py" pg=$3 polls=$4
[ -r /proc/self/stat ] || { echo "no /proc on this host" >&2; exit 4; }
ours() {
  c=$(tr '\000' ' ' < "/proc/$1/cmdline" 2>/dev/null) || return 1
  case "$c" in *"$want"*) return 0;; esac
  return 1
}
state() {
  read -r l 2>/dev/null < "/proc/$1/stat" || return 1
  set -- ${l##*) }
  echo "$1 $3"
}
alive() {
  for s in /proc/[0-9]*/stat; do
    read -r l 2>/dev/null < "$s" || continue
    set -- ${l##*) }
    [ "$3" = "$pg" ] && [ "$1" != Z ] && return 0
  done
  return 1
}
if [ "$pg" = - ]; then
  pg=
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    if ours "$p"; then st=$(state "$p") && pg=${st#* } && break; fi
  done
  [ -n "$pg" ] || exit 0
elif st=$(state "$pg") && [ "${st% *}" != Z ] && ! ours "$pg"; then
  exit 0
fi
[ "$pg" -gt 1 ] 2>/dev/null || { echo "bad process group $pg" >&2; exit 4; }
kill -TERM -"$pg" 2>/dev/null
i=0
while alive && [ "$i" -lt "$polls" ]; do sleep 0.1; i=$((i+1)); done
kill -KILL -"$pg" 2>/dev/null
i=0
while alive && [ "$i" -lt 30 ]; do sleep 0.1; i=$((i+1)); done
if alive; then echo "process group $pg is still alive after SIGKILL" >&2; exit 3; fi
exit 0
"""


def kill_script(
    session: RemoteSession, *, remote_dir: str, name: str, pgid: int | None, grace_s: float, where: str
) -> bool:
    """TERM the process group of script `name` run from `remote_dir` (found by path when `pgid` is
    None), KILL it after `grace_s`, and return True once nothing of it is left alive. False when the
    host says it is still alive or cannot tell. Raises what `session.run` raises (bounded in time)."""
    result = session.run(
        ["sh", "-c", KILL_GROUP_SH, "sh", remote_dir, name, str(pgid) if pgid else "-", str(int(grace_s / 0.1))],
        timeout=grace_s + 10,
    )
    if result.ok:
        logger.info("remote script %s on %s stopped (process group %s)", name, where, pgid or "found by path")
        return True
    logger.warning(
        "could not confirm remote script %s on %s stopped: exit %d: %s",
        name,
        where,
        result.exit_status,
        result.stderr.strip()[-300:],
    )
    return False
