"""Five-field cron expressions in UTC (minute hour day-of-month month day-of-week), as crontab(5) reads
them: `*`, numbers, `a-b` ranges, `/step`, comma lists, month and weekday names (`jan`, `mon`), 0 or 7
for Sunday. When both day fields are restricted a day matches either (the crontab rule). No `@daily`
shorthands, no seconds, no `L`/`W`/`#` (Quartz extensions): they are refused, not guessed at.

Written here rather than taken from a dependency: the scheduler needs one question answered ("the last
slot at or before now"), which is a few dozen lines."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

_MONTHS = {
    n: i
    for i, n in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)
}
_DAYS = {n: i for i, n in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# (name, lowest, highest, names)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
# The furthest back a slot is looked for: "0 0 29 2 *" fires once in four years, at most eight apart
# (1900 and 2100 are not leap years).
_MAX_DAYS_BACK = 8 * 366 + 1


class CronError(ValueError):
    """The expression is not a five-field cron expression this parser accepts."""


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def latest_at_or_before(self, now: dt.datetime) -> dt.datetime | None:
        """The newest instant (UTC, whole minute) the expression fires at that is not after `now`; None
        when there is none in the last eight years (an expression like "0 0 31 2 *" never fires)."""
        now = _utc(now).replace(second=0, microsecond=0)
        day = now.date()
        for back in range(_MAX_DAYS_BACK):
            if self.day_matches(day):
                limit = (now.hour, now.minute) if back == 0 else (23, 59)
                best = max(((h, m) for h in self.hours for m in self.minutes if (h, m) <= limit), default=None)
                if best is not None:
                    return dt.datetime(day.year, day.month, day.day, best[0], best[1], tzinfo=dt.timezone.utc)
            day -= dt.timedelta(days=1)
        return None

    def next_after(self, now: dt.datetime) -> dt.datetime | None:
        """The first instant (UTC, whole minute) after `now` that the expression fires at, or None."""
        now = _utc(now).replace(second=0, microsecond=0)
        day = now.date()
        for ahead in range(_MAX_DAYS_BACK):
            if self.day_matches(day):
                floor = (now.hour, now.minute) if ahead == 0 else (-1, -1)
                best = min(((h, m) for h in self.hours for m in self.minutes if (h, m) > floor), default=None)
                if best is not None:
                    return dt.datetime(day.year, day.month, day.day, best[0], best[1], tzinfo=dt.timezone.utc)
            day += dt.timedelta(days=1)
        return None

    def fires(self) -> bool:
        """Whether the expression names a day that exists ("0 0 30 2 *" does not)."""
        return self.next_after(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)) is not None


def parse(expression: str) -> Cron:
    """Parse `expression`. Raises CronError with a message that names the bad field."""
    parts = expression.split()
    if len(parts) != 5:
        raise CronError(
            f"a cron expression has 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
        )
    sets = [_field(text, *spec) for text, spec in zip(parts, _FIELDS)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return Cron(
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=weekdays,
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
    )


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        body, _, step_text = item.partition("/")
        step = _number(step_text, name, names={}) if step_text else 1
        if step_text and step < 1:
            raise CronError(f"{name}: step must be at least 1")
        if body == "*":
            start, end = low, high
        elif "-" in body:
            a, b = body.split("-", 1)
            start, end = _number(a, name, names), _number(b, name, names)
        else:
            start = _number(body, name, names)
            end = high if step_text else start  # "5/15" means 5-59/15, as in cronie
        for value in (start, end):
            if not low <= value <= high:
                raise CronError(f"{name}: {value} is outside {low}-{high}")
        if start > end:
            raise CronError(f"{name}: range {start}-{end} runs backwards")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _number(text: str, name: str, names: dict[str, int]) -> int:
    lowered = text.lower()
    if lowered in names:
        return names[lowered]
    if not (text.isascii() and text.isdigit()) or len(text) > 2:
        raise CronError(f"{name}: {text!r} is not a number" + (" or a name" if names else ""))
    return int(text)


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; every datetime stored is UTC.
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
