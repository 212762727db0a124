"""An outside tester's repro: a GPU that disappears from nvidia-smi's list within the idle window (fell off
the bus, driver reset, a MIG/vGPU reconfiguration) is a GPU whose utilisation is not known for the rest
of the window. Unknown is busy, never idle (issue 11: a failed or missing sample counts as busy)."""

from __future__ import annotations

import datetime as dt

from src.services.idle import Sample, decide

RULES = {"gpu_util_below": 5, "for_s": 180, "sample_every_s": 60, "respect_ssh_sessions": True}
T0 = dt.datetime(2026, 12, 1, 10, tzinfo=dt.timezone.utc)


def _series(*utils: list[int]) -> list[Sample]:
    return [
        Sample(taken_at=T0 + dt.timedelta(minutes=i), ok=True, gpu_util=u, ssh_sessions=0) for i, u in enumerate(utils)
    ]


def test_a_gpu_that_vanishes_within_the_window_is_not_read_as_idle():
    # GPU 1 ran at 80% and then stopped being listed: the remaining GPU reads 0%.
    samples = _series([0, 80], [0], [0], [0])
    assert not decide(samples, now=T0 + dt.timedelta(minutes=3), rules=RULES).idle
    vanished = _series([0, 0], [0], [0], [0])  # even when its last reading was idle: its count changed
    d = decide(vanished, now=T0 + dt.timedelta(minutes=3), rules=RULES)
    assert not d.idle and "GPU" in d.reason
    appeared = _series([0], [0, 0], [0, 0], [0, 0])
    assert not decide(appeared, now=T0 + dt.timedelta(minutes=3), rules=RULES).idle


def test_the_same_gpus_all_window_long_is_still_idle():
    assert decide(_series([0, 1], [0, 0], [2, 0], [0, 4]), now=T0 + dt.timedelta(minutes=3), rules=RULES).idle
