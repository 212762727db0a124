"""The CLI's progress formatting and the wait loop, with a fake clock: no terminal, no server."""

from __future__ import annotations

import io

import pytest

from src.cli.http import ApiError, Unreachable
from src.cli.progress import (
    ProgressDisplay,
    RateMeter,
    WaitTimeout,
    bar_line,
    bytes_pair,
    eta_seconds,
    human_bytes,
    human_duration,
    plain_line,
    render_bar,
    wait_for_job,
)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (int(2.25 * 1024**3), "2.2 GiB"),
        (3 * 1024**4, "3.0 TiB"),
        (150 * 1024**2, "150 MiB"),
        (2048 * 1024**5, "2048 PiB"),
        (None, "?"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (0.4, "0s"),
        (42, "42s"),
        (59.6, "1m00s"),
        (65, "1m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3725, "1h02m"),
        (90000, "1d01h"),
        (None, "?"),
        (-1, "?"),
        (float("nan"), "?"),
        (1e12, "?"),
    ],
)
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_eta_needs_done_total_and_a_positive_rate():
    assert eta_seconds(50, 150, 10.0) == 10.0
    assert eta_seconds(150, 150, 10.0) == 0.0
    assert eta_seconds(None, 150, 10.0) is None
    assert eta_seconds(50, None, 10.0) is None
    assert eta_seconds(50, 150, None) is None
    assert eta_seconds(50, 150, 0.0) is None


def test_rate_first_sample_has_no_rate_then_steady_rate_is_exact():
    meter = RateMeter(alpha=0.3)
    assert meter.update(0.0, 0) is None
    assert meter.update(1.0, 100) == pytest.approx(100)
    assert meter.update(2.0, 200) == pytest.approx(100)


def test_rate_smoothing_damps_a_spike():
    meter = RateMeter(alpha=0.3)
    meter.update(0.0, 0)
    meter.update(1.0, 100)
    spiked = meter.update(2.0, 1100)  # one poll saw 1000 B/s
    assert spiked == pytest.approx(0.3 * 1000 + 0.7 * 100)
    assert 100 < spiked < 1000


def test_rate_starts_over_when_the_count_goes_back_and_ignores_repeated_instants():
    meter = RateMeter()
    meter.update(0.0, 0)
    meter.update(1.0, 500)
    assert meter.update(1.0, 600) == pytest.approx(500)  # no time passed: no new information
    assert meter.update(2.0, 10) is None
    assert meter.update(3.0, 60) == pytest.approx(50)
    assert meter.update(4.0, None) == pytest.approx(50)


@pytest.mark.parametrize(
    "fraction, bar",
    [
        (0.0, "[----------]"),
        (0.5, "[#####-----]"),
        (1.0, "[##########]"),
        (1.7, "[##########]"),
        (-1, "[----------]"),
    ],
)
def test_bar_at_known_fractions(fraction, bar):
    assert render_bar(fraction, width=12) == bar


def test_bar_with_unknown_total_moves_and_keeps_its_width():
    frames = [render_bar(None, width=12, tick=t) for t in range(20)]
    assert all(len(f) == 12 and "<=>" in f and f[0] == "[" and f[-1] == "]" for f in frames)
    assert len(set(frames)) > 1
    assert frames[0] == "[<=>       ]"


def _job(**progress):  # type: ignore[no-untyped-def]
    base = {"bytes_done": None, "bytes_total": None, "parts_done": None, "parts_total": None}
    return {"id": "job_1", "status": "running", "phase": "upload", "progress": {**base, **progress}}


def _bar_of(line: str) -> str:
    return line[line.index("[") : line.index("]") + 1]


def test_bytes_pair_shares_the_unit_when_it_can():
    assert bytes_pair(512 * 1024, 1024 * 1024) == "512 KiB/1.0 MiB"
    assert bytes_pair(1536, 3072) == "1.5/3.0 KiB"
    assert bytes_pair(0, None) == "0 B/?"


def test_bar_line_shows_phase_percent_bytes_parts_rate_and_eta():
    line = bar_line(
        _job(bytes_done=512 * 1024, bytes_total=1024 * 1024, parts_done=1, parts_total=2), 256 * 1024.0, width=200
    )
    assert line.startswith("upload  [")
    for part in (" 50%", "512 KiB/1.0 MiB", "parts 1/2", "256 KiB/s", "ETA 2s"):
        assert part in line
    bar = _bar_of(line)
    assert len(bar) == 30 and bar.count("#") == 14 and bar.count("-") == 14


@pytest.mark.parametrize("width", [120, 80, 60, 40, 20])
def test_bar_line_fits_the_terminal_dropping_parts_first(width):
    job = _job(bytes_done=5 * 1024**3, bytes_total=10 * 1024**3, parts_done=5, parts_total=10)
    line = bar_line(job, 123e6, width=width)
    assert len(line) <= width - 1
    assert ("parts 5/10" in line) == (width >= 80)
    assert line.startswith("upload  [")


def test_bar_line_without_totals_is_indeterminate():
    line = bar_line(_job(), None, width=80)
    assert "<=>" in line and "%" not in line and "ETA" not in line
    assert len(line) <= 79


def test_bar_line_falls_back_to_parts_for_the_fraction():
    bar = _bar_of(bar_line(_job(parts_done=1, parts_total=4), None, width=200))
    assert bar.count("#") * 3 == bar.count("-")


def test_plain_line_names_the_job_and_its_phase():
    line = plain_line(_job(parts_done=3, parts_total=3, bytes_done=3072, bytes_total=3072), None, 12.0)
    assert line == "[12s] job_1 running phase=upload 100% 3.0/3.0 KiB parts 3/3"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_display_on_a_tty_redraws_one_line_and_ends_it():
    out, clock = io.StringIO(), FakeClock()
    display = ProgressDisplay(out, tty=True, width=80, clock=clock)
    display.update(_job(bytes_done=0, bytes_total=100))
    clock.sleep(1)
    display.update(_job(bytes_done=50, bytes_total=100))
    display.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "50 B/s  ETA 1s" in text


def test_display_off_a_tty_writes_changes_and_periodic_lines_only():
    out, clock = io.StringIO(), FakeClock()
    display = ProgressDisplay(out, tty=False, plain_every=10, clock=clock)
    for _ in range(5):  # same phase, 1 s apart: one line
        display.update(_job(bytes_done=1, bytes_total=10))
        clock.sleep(1)
    clock.sleep(6)
    display.update(_job(bytes_done=5, bytes_total=10))  # 10 s later: a periodic line
    display.update({**_job(), "phase": "verify"})  # a new phase: a line at once
    display.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert "phase=verify" in lines[-1]


class FakeApi:
    """Answers GET /api/jobs/<id> from a script: dicts are jobs, exceptions are raised."""

    def __init__(self, answers: list) -> None:  # type: ignore[type-arg]
        self.answers, self.calls = answers, 0

    def get(self, path: str, params: dict | None = None) -> dict:  # type: ignore[type-arg]
        assert path == "/api/jobs/job_1"
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


def _wait(api: FakeApi, clock: FakeClock, timeout: float | None = None) -> dict:  # type: ignore[type-arg]
    display = ProgressDisplay(io.StringIO(), tty=False, clock=clock)
    return wait_for_job(api, "job_1", timeout=timeout, interval=1.0, display=display, clock=clock, sleep=clock.sleep)


def test_wait_returns_the_finished_job_and_survives_a_brief_outage():
    done = {**_job(), "status": "succeeded"}
    api, clock = FakeApi([_job(), Unreachable("unreachable", "refused"), done]), FakeClock()
    assert _wait(api, clock) == done
    assert api.calls == 3


def test_wait_raises_a_permanent_error_at_once():
    api = FakeApi([ApiError("not_found", "no such job", status=404)])
    with pytest.raises(ApiError):
        _wait(api, FakeClock())


def test_wait_times_out_with_the_last_job_seen():
    api, clock = FakeApi([_job()]), FakeClock()
    with pytest.raises(WaitTimeout) as caught:
        _wait(api, clock, timeout=2.5)
    assert caught.value.job["status"] == "running"
    assert clock.now == pytest.approx(2.5)
