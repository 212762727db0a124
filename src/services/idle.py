"""When a machine is idle. The rule (also in docs/policies.md), for a policy with `gpu_util_below` U,
`for_s` W, `sample_every_s` E, at time `now`:

1. The window is full: there is a sample taken at or before `now - W` (call the newest such one s0).
   A machine whose samples do not go back that far (a new policy, a machine that just woke) is busy.
2. s0 and every sample after it succeeded (a failed probe, an unreadable value, a host that did not
   answer, zero GPUs found: busy, never idle) and read every GPU below U (every GPU, every sample: one
   busy GPU keeps the machine awake; the average is never used). A sample listing a different number of
   GPUs than s0 did (one vanished or appeared) is busy: a GPU without readings is not known to be idle.
3. No sample is missing: no two consecutive samples from s0 on, nor the newest sample and `now`, are
   further apart than 2 x max(E, 60 s) (the scheduler runs once a minute). A gap is busy.
4. With `respect_ssh_sessions`, none of those samples saw an interactive SSH session (a session with a
   terminal, other than gpusnap's own, which never asks for one).

Pure functions over the samples; the scheduler records samples and calls `decide`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SCHEDULER_TICK_S = 60


@dataclass(frozen=True)
class Sample:
    taken_at: dt.datetime
    ok: bool
    gpu_util: list[int] | None = None
    ssh_sessions: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Decision:
    idle: bool
    reason: str


def max_gap_s(rules: dict[str, Any]) -> float:
    return 2.0 * max(float(rules.get("sample_every_s") or 60), SCHEDULER_TICK_S)


def decide(samples: Sequence[Sample], *, now: dt.datetime, rules: dict[str, Any]) -> Decision:
    """Whether the machine is idle at `now` by the rule above (`rules`: the policy's `idle` part)."""
    window = dt.timedelta(seconds=float(rules["for_s"]))
    gap = dt.timedelta(seconds=max_gap_s(rules))
    threshold = int(rules["gpu_util_below"])
    ordered = sorted(samples, key=lambda x: _utc(x.taken_at))
    now = _utc(now)
    start = [i for i, x in enumerate(ordered) if _utc(x.taken_at) <= now - window]
    if not start:
        return Decision(False, f"window not full: no sample from {int(window.total_seconds())}s ago yet")
    considered = ordered[start[-1] :]
    previous = None
    for x in considered:
        at = _utc(x.taken_at)
        if previous is not None and at - previous > gap:
            return Decision(False, f"a sample is missing: {int((at - previous).total_seconds())}s between two")
        previous = at
        if not x.ok:
            return Decision(False, f"a sample failed ({x.error or 'no reading'}): counted as busy")
        if not x.gpu_util:
            return Decision(False, "a sample read no GPU: counted as busy")
        if len(x.gpu_util) != len(considered[0].gpu_util or []):
            # A GPU that left the list (fell off the bus, a reset) has no reading for the rest of the
            # window: unknown, so busy. One that appeared has no reading for its start.
            return Decision(
                False,
                f"the GPU count changed within the window "
                f"({len(considered[0].gpu_util or [])} -> {len(x.gpu_util)}): counted as busy",
            )
        busy = [u for u in x.gpu_util if u >= threshold]
        if busy:
            return Decision(False, f"a GPU read {max(busy)}% (not below {threshold}%)")
        if rules.get("respect_ssh_sessions", True) and (x.ssh_sessions is None or x.ssh_sessions > 0):
            return Decision(
                False, "an interactive SSH session is open" if x.ssh_sessions else "SSH sessions could not be counted"
            )
    assert previous is not None
    if now - previous > gap:
        return Decision(False, f"no sample for {int((now - previous).total_seconds())}s")
    return Decision(True, f"every GPU below {threshold}% in every sample for {int(window.total_seconds())}s")


def parse_probe(result: dict[str, Any]) -> tuple[list[int] | None, int | None, str | None]:
    """(utilisation per GPU, interactive SSH sessions, error) from probe_gpu's result event. The host is
    not trusted: anything but small non-negative integers is an error (a busy sample)."""
    error = result.get("gpu_error")
    raw = result.get("gpu_util")
    util = None
    if error is None:
        if (
            isinstance(raw, list)
            and raw
            and len(raw) <= 64
            and all(isinstance(u, int) and not isinstance(u, bool) and 0 <= u <= 100 for u in raw)
        ):
            util = list(raw)
        else:
            error = "gpu_util_unreadable: the probe's GPU values are not 0-100 integers"
    sessions = result.get("ssh_sessions")
    if not (isinstance(sessions, int) and not isinstance(sessions, bool) and 0 <= sessions < 100_000):
        sessions = None
    return util, sessions, (str(error)[:500] if error is not None else None)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
