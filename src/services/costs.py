"""Costs and savings: what each machine costs and what hibernating it has saved, from the status history
the event log keeps (`machine.status` events, each with the hourly price in force when it was recorded).

- Billed hours: every status in which a vast.ai instance exists and bills its full hourly price:
  running, and the transitions around it (hibernating, waking, pausing, resuming, error: an instance in
  error may well be alive, and savings must never be overstated).
- Paused hours: the instance is stopped; vast.ai bills its disk only (reported, not priced).
- Hibernated hours: no instance; `saved_usd` is what those hours would have cost at the price of the
  instance that was destroyed (the price in force when the machine went `hibernated`).
- Storage: what its snapshots occupy in the bucket (`store_usage.store_bytes`: shared chunks counted once),
  at STORAGE_PRICE_GB_MONTH (GB = 10^9 bytes).
- Transfer: vast.ai's per-GB upload and download prices of the rented offer, when the offer had them.

History starts when the machine row was created; a machine older than the `events` table counts its
time before the first recorded change in the status that change started from."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from src.db import transaction
from src.models import Event, Job, Machine, utcnow
from src.services.events import MACHINE_STATUS, hourly_price, price_or_none
from src.services.store_usage import store_bytes
from src.services.views import iso

BILLED = frozenset({"running", "hibernating", "waking", "pausing", "resuming", "error"})
GB = 10**9


@dataclass(frozen=True)
class Interval:
    status: str
    start: dt.datetime
    end: dt.datetime
    hourly_usd: float | None

    @property
    def hours(self) -> float:
        return max(0.0, (self.end - self.start).total_seconds() / 3600)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def status_intervals(
    created_at: dt.datetime,
    changes: list[tuple[dt.datetime, dict[str, Any]]],
    *,
    current_status: str,
    current_price: float | None,
    now: dt.datetime,
) -> list[Interval]:
    """The machine's history as (status, start, end, price) intervals, from `changes`: (when, data of a
    `machine.status` event: from, to, hourly_usd), oldest first."""
    out: list[Interval] = []
    start = _aware(created_at)
    status = changes[0][1].get("from") if changes else current_status
    price = changes[0][1].get("hourly_usd") if changes else current_price
    now = max(_aware(now), start)
    for at, data in changes:
        # Between the last change and now: a change stamped by a clock running ahead bills no hours
        # that have not happened yet (nor one behind, hours before the machine existed).
        at = min(max(_aware(at), start), now)
        out.append(Interval(str(status), start, at, price))
        start, status = at, data.get("to")
        # A change recorded without a price (a machine gpusnap did not rent) keeps the last known one.
        price = data.get("hourly_usd") if data.get("hourly_usd") is not None else price
    out.append(Interval(str(status), start, now, price))
    return out


def summarize(intervals: list[Interval]) -> dict[str, Any]:
    hours = {"running": 0.0, "paused": 0.0, "hibernated": 0.0}
    spent = saved = 0.0
    spent_known = saved_known = False
    for iv in intervals:
        if iv.status in BILLED:
            hours["running"] += iv.hours
            if iv.hourly_usd is not None:
                spent, spent_known = spent + iv.hours * iv.hourly_usd, True
        elif iv.status == "paused":
            hours["paused"] += iv.hours
        elif iv.status == "hibernated":
            hours["hibernated"] += iv.hours
            if iv.hourly_usd is not None:
                saved, saved_known = saved + iv.hours * iv.hourly_usd, True
    return {
        "hours": {k: round(v, 4) for k, v in hours.items()},
        "spent_usd": round(spent, 4) if spent_known or not hours["running"] else None,
        "saved_usd": round(saved, 4) if saved_known or not hours["hibernated"] else None,
    }


def machine_costs(
    s: Session, machine: Machine, *, storage_price_gb_month: float, now: dt.datetime | None = None
) -> dict[str, Any]:
    """The machine's costs and savings (the `costs` object of GET /api/instances/<id>)."""
    now = now or utcnow()
    changes = [
        (e.created_at, e.data or {})
        for e in s.scalars(
            select(Event).where(Event.machine_id == machine.id, Event.kind == MACHINE_STATUS).order_by(Event.id)
        )
    ]
    price = hourly_price(machine)
    totals = summarize(
        status_intervals(machine.created_at, changes, current_status=machine.status, current_price=price, now=now)
    )
    stored = store_bytes(s, machine.id)  # a chunk shared by several format-2 snapshots is billed once
    offer = machine.offer or {}
    up, down = price_or_none(offer.get("inet_up_cost")), price_or_none(offer.get("inet_down_cost"))
    return {
        "hourly_usd": price,
        **totals,
        "stored_bytes": stored,
        "storage_usd_month": round(stored / GB * storage_price_gb_month, 4),
        "transfer_usd_per_gb": {"upload": up, "download": down} if up is not None or down is not None else None,
        "as_of": iso(now),
    }


def summary(session_factory: sessionmaker[Session], *, storage_price_gb_month: float) -> dict[str, Any]:
    """Totals across machines (GET /api/summary): machines by status, live hourly spend, spent and saved
    USD, stored bytes and their monthly price, jobs by status."""
    now = utcnow()
    with transaction(session_factory) as s:
        machines = list(s.scalars(select(Machine).order_by(Machine.id)))
        by_status = Counter(m.status for m in machines)
        spent = saved = live_hourly = 0.0
        stored = 0
        for machine in machines:
            c = machine_costs(s, machine, storage_price_gb_month=storage_price_gb_month, now=now)
            spent += c["spent_usd"] or 0.0
            saved += c["saved_usd"] or 0.0
            stored += c["stored_bytes"]
            if machine.status in BILLED and c["hourly_usd"] is not None:
                live_hourly += c["hourly_usd"]
        jobs = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        return {
            "machines": {
                "total": len(machines),
                "live": sum(n for st, n in by_status.items() if st in BILLED),
                "paused": by_status.get("paused", 0),
                "hibernated": by_status.get("hibernated", 0),
                "by_status": dict(sorted(by_status.items())),
            },
            "costs": {
                "live_hourly_usd": round(live_hourly, 4),
                "spent_usd": round(spent, 4),
                "saved_usd": round(saved, 4),
                "stored_bytes": stored,
                "storage_usd_month": round(stored / GB * storage_price_gb_month, 4),
                "storage_price_gb_month": storage_price_gb_month,
            },
            "jobs": {
                "by_status": {k: int(v) for k, v in sorted(jobs.items())},
                "active": int(jobs.get("queued", 0)) + int(jobs.get("running", 0)),
            },
            "as_of": iso(now),
        }
