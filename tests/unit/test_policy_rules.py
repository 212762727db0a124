"""The pure rules behind policies: cron slots, restic-style retention, and when a machine is idle."""

from __future__ import annotations

import datetime as dt

import pytest

from src.services import cron
from src.services.idle import Sample, decide, parse_probe
from src.services.retention import plan

UTC = dt.timezone.utc


def t(day: int, hour: int = 0, minute: int = 0, second: int = 0, month: int = 12) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


# ---- cron -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, now, latest, following",
    [
        ("* * * * *", t(1, 15, 47, 30), t(1, 15, 47), t(1, 15, 48)),
        ("0 3 * * *", t(1, 15, 47), t(1, 3), t(2, 3)),
        ("0 3 * * *", t(1, 3, 0, 59), t(1, 3), t(2, 3)),
        ("*/15 * * * *", t(1, 15, 47), t(1, 15, 45), t(1, 16, 0)),
        ("0 0 * * mon", t(1, 12), t(30, month=11), t(7)),  # 2026-12-01 is a Tuesday
        ("0 0 * * 7", t(1, 12), t(29, month=11), t(6)),  # 7 is Sunday too
        ("0 0 1 * 0", t(2), t(1), t(6)),  # both day fields restricted: either matches (crontab(5))
        ("30 2 1-3 jan,dec *", t(5), t(3, 2, 30), dt.datetime(2027, 1, 1, 2, 30, tzinfo=UTC)),
        ("5/20 * * * *", t(1, 10, 4), t(1, 9, 45), t(1, 10, 5)),
    ],
)
def test_cron_latest_and_next_slot(expr, now, latest, following):  # type: ignore[no-untyped-def]
    c = cron.parse(expr)
    assert c.latest_at_or_before(now) == latest
    assert c.next_after(now) == following


@pytest.mark.parametrize(
    "bad",
    [
        "* * * *",
        "* * * * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "*/0 * * * *",
        "5-1 * * * *",
        "a * * * *",
        "@daily",
        "* * * * MON#2",
        "0 0 L * *",
        "-1 * * * *",
        "1,,2 * * * *",
    ],
)
def test_cron_refuses_what_it_does_not_understand(bad):  # type: ignore[no-untyped-def]
    with pytest.raises(cron.CronError):
        cron.parse(bad)


def test_cron_that_never_fires_is_known():
    assert not cron.parse("0 0 31 2 *").fires()
    assert cron.parse("0 0 31 2 *").latest_at_or_before(t(1)) is None
    assert cron.parse("0 0 29 2 *").latest_at_or_before(t(1)) == dt.datetime(2024, 2, 29, tzinfo=UTC)


def test_naive_datetimes_are_utc():
    assert cron.parse("0 * * * *").latest_at_or_before(dt.datetime(2026, 12, 1, 5, 30)) == t(1, 5)


# ---- retention (restic forget) ------------------------------------------------------------------------


def _snaps(*times: dt.datetime) -> list[tuple[str, dt.datetime]]:
    return [(f"s{i:02d}", at) for i, at in enumerate(times)]


def test_keep_last_keeps_the_newest_n():
    snaps = _snaps(t(1, 1), t(1, 2), t(1, 3), t(1, 4))
    p = plan(snaps, {"keep_last": 2})
    assert set(p.keep) == {"s03", "s02"} and p.forget == ["s01", "s00"]


def test_daily_keeps_the_newest_of_each_day_and_rules_are_ored():
    snaps = _snaps(t(1, 1), t(1, 23), t(2, 5), t(2, 6), t(3, 1), t(4, 1))
    p = plan(snaps, {"keep_daily": 3})
    assert set(p.keep) == {"s05", "s04", "s03"}  # days 4, 3, 2 (newest of day 2 is s03)
    p = plan(snaps, {"keep_daily": 3, "keep_last": 3})
    assert set(p.keep) == {"s05", "s04", "s03"}  # keep_last's three are the same ones
    p = plan(snaps, {"keep_daily": 4, "keep_last": 1})
    assert set(p.keep) == {"s05", "s04", "s03", "s01"} and p.keep["s05"] == ["keep_last", "keep_daily"]


def test_weekly_and_monthly_buckets():
    # ISO weeks: 2026-11-30 (Mon) .. 12-06 is one week; 12-07 starts the next.
    snaps = _snaps(t(25, month=11), t(30, month=11), t(6), t(7), t(8))
    assert set(plan(snaps, {"keep_weekly": 2}).keep) == {"s04", "s02"}
    assert set(plan(snaps, {"keep_monthly": 2}).keep) == {"s04", "s01"}


def test_protected_snapshots_are_kept_whatever_the_rules_say():
    snaps = _snaps(t(1, 1), t(1, 2), t(1, 3))
    p = plan(snaps, {"keep_last": 1}, protected={"s00": "needed to wake"})
    assert set(p.keep) == {"s02", "s00"} and p.forget == ["s01"]
    assert p.keep["s00"] == ["needed to wake"]


def test_the_only_snapshot_is_never_forgotten():
    assert plan(_snaps(t(1)), {"keep_last": 0, "keep_daily": 0}).forget == []
    assert plan([], {"keep_last": 2}).forget == []


# ---- idle -------------------------------------------------------------------------------------------

RULES = {"gpu_util_below": 5, "for_s": 180, "sample_every_s": 60, "respect_ssh_sessions": True}


def _series(
    *utils: list[int] | None, start: dt.datetime = t(1, 10), every: int = 60, sessions: int = 0
) -> list[Sample]:
    out = []
    for i, u in enumerate(utils):
        at = start + dt.timedelta(seconds=every * i)
        out.append(
            Sample(
                taken_at=at,
                ok=u is not None,
                gpu_util=u,
                ssh_sessions=sessions,
                error=None if u is not None else "nvidia_smi_failed: exit 9",
            )
        )
    return out


def test_idle_only_when_every_gpu_of_every_sample_in_a_full_window_is_below():
    samples = _series([0, 1], [0, 0], [2, 0], [0, 4])  # 10:00 .. 10:03
    assert decide(samples, now=t(1, 10, 3), rules=RULES).idle
    assert not decide(samples[1:], now=t(1, 10, 3), rules=RULES).idle  # 10:01 on: the window is not full
    assert "window not full" in decide(samples[1:], now=t(1, 10, 3), rules=RULES).reason


def test_one_busy_gpu_keeps_it_awake_even_when_the_average_is_low():
    samples = _series([0, 0, 0, 0], [0, 0, 0, 80], [0, 0, 0, 0], [0, 0, 0, 0])
    d = decide(samples, now=t(1, 10, 3), rules=RULES)
    assert not d.idle and "80%" in d.reason
    assert not decide(_series([5], [5], [5], [5]), now=t(1, 10, 3), rules=RULES).idle  # "below" is strict


def test_a_busy_sample_before_the_window_does_not_count():
    samples = _series([90], [0], [0], [0], [0])  # the 90% was at 10:00; the window from 10:01 is all idle
    assert decide(samples, now=t(1, 10, 4), rules=RULES).idle


def test_a_failed_or_empty_sample_is_busy_never_idle():
    assert not decide(_series([0], None, [0], [0]), now=t(1, 10, 3), rules=RULES).idle
    empty = _series([0], [0], [0], [0])
    empty[2] = Sample(taken_at=empty[2].taken_at, ok=True, gpu_util=[], ssh_sessions=0)
    assert not decide(empty, now=t(1, 10, 3), rules=RULES).idle
    all_failed = _series(None, None, None, None)
    assert not decide(all_failed, now=t(1, 10, 3), rules=RULES).idle


def test_a_missing_sample_is_busy():
    samples = _series([0], [0], [0], [0], [0], [0], [0], every=30)
    gap = samples[:2] + samples[6:]  # 10:00, 10:00:30, then 10:03: 150 s between two > 2 x 60 s
    assert decide(samples, now=t(1, 10, 3), rules=RULES).idle
    d = decide(gap, now=t(1, 10, 3), rules=RULES)
    assert not d.idle and "missing" in d.reason
    assert not decide(samples, now=t(1, 10, 6), rules=RULES).idle  # no sample for 3 minutes up to now


def test_an_open_ssh_session_defers_unless_ignored():
    samples = _series([0], [0], [0], [0], sessions=1)
    assert not decide(samples, now=t(1, 10, 3), rules=RULES).idle
    assert decide(samples, now=t(1, 10, 3), rules={**RULES, "respect_ssh_sessions": False}).idle
    unknown = [Sample(taken_at=x.taken_at, ok=True, gpu_util=[0], ssh_sessions=None) for x in samples]
    assert not decide(unknown, now=t(1, 10, 3), rules=RULES).idle


@pytest.mark.parametrize(
    "result, util, error",
    [
        ({"gpu_util": [0, 12], "gpu_error": None, "ssh_sessions": 0}, [0, 12], None),
        ({"gpu_util": None, "gpu_error": "nvidia_smi_missing: x", "ssh_sessions": 0}, None, "nvidia_smi_missing: x"),
        ({"gpu_util": [0, 101], "gpu_error": None, "ssh_sessions": 0}, None, "gpu_util_unreadable"),
        ({"gpu_util": [True], "gpu_error": None, "ssh_sessions": 0}, None, "gpu_util_unreadable"),
        ({"gpu_util": "0", "gpu_error": None, "ssh_sessions": 0}, None, "gpu_util_unreadable"),
        ({"gpu_util": [], "gpu_error": None, "ssh_sessions": 0}, None, "gpu_util_unreadable"),
        ({"gpu_util": [-1], "gpu_error": None, "ssh_sessions": 0}, None, "gpu_util_unreadable"),
    ],
)
def test_probe_answers_are_not_trusted(result, util, error):  # type: ignore[no-untyped-def]
    got_util, _sessions, got_error = parse_probe(result)
    assert got_util == util
    assert (got_error is None) if error is None else got_error.startswith(error)


def test_hostile_session_counts_become_unknown():
    assert parse_probe({"gpu_util": [0], "ssh_sessions": -3})[1] is None
    assert parse_probe({"gpu_util": [0], "ssh_sessions": "1"})[1] is None


# ---- wake-time histograms ---------------------------------------------------------------------------


def test_wake_phase_histograms_count_each_phase_of_succeeded_wakes():
    from src.services.policy_metrics import _wake_histogram

    results = [
        {"timings": {"queue_s": 0.0, "rent_s": 40.0, "restore_s": 400.0}},
        {"timings": {"queue_s": 100.0, "rent_s": 200.0, "restore_s": 700.0}},
        {"timings": {"queue_s": None}},
        None,
        {"no": "timings"},
    ]
    family = _wake_histogram(results)
    samples = {(s.name, s.labels["phase"], s.labels.get("le")): s.value for s in family.samples}
    assert samples[("gpusnap_wake_phase_seconds_count", "queue", None)] == 2
    assert samples[("gpusnap_wake_phase_seconds_bucket", "queue", "5.0")] == 1
    assert samples[("gpusnap_wake_phase_seconds_bucket", "rent", "60.0")] == 1
    assert samples[("gpusnap_wake_phase_seconds_bucket", "rent", "300.0")] == 2
    assert samples[("gpusnap_wake_phase_seconds_bucket", "restore", "+Inf")] == 2
    assert samples[("gpusnap_wake_phase_seconds_sum", "restore", None)] == 1100.0
