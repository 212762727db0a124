"""Costs and savings from recorded events, against a hand calculation. The machine's status changes are
made the way jobs make them (ORM writes, whose flush records `machine.status` events with the price in
force); the test then spreads those events over a known timeline (what waiting hours would have done)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import select, update

from src.app import create_app
from src.db import transaction
from src.models import Event, Machine, Snapshot
from src.services.costs import machine_costs
from src.settings import Settings
from tests.support.fixtures_app import AUTH, make_settings

T0 = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.timezone.utc)
H = dt.timedelta(hours=1)


@pytest.fixture
def app(tmp_path, database_url):  # type: ignore[no-untyped-def]
    application = create_app(make_settings(tmp_path, database_url, storage_price_gb_month=0.015), configure_logs=False)
    yield application
    application.extensions["gpusnap"].engine.dispose()


def _change(app, machine_id: str, **values) -> None:  # type: ignore[no-untyped-def]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        machine = s.get(Machine, machine_id)
        for key, value in values.items():
            setattr(machine, key, value)


def test_savings_from_recorded_events_match_a_hand_calculation(app):
    sf = app.extensions["gpusnap"].session_factory
    with transaction(sf) as s:
        s.add(
            Machine(
                id="box-7",
                status="running",
                gpu_name="RTX 4090",
                created_at=T0,
                offer={"dph_total": 0.40, "inet_up_cost": 0.002, "inet_down_cost": 0.001},
            )
        )
    # The life of a machine, as hibernate, wake and pause write it:
    _change(app, "box-7", status="hibernating")  # T0+2h     (ran 2 h at $0.40)
    _change(app, "box-7", status="hibernated")  # T0+2.25h  (snapshot took 15 min)
    _change(app, "box-7", status="waking")  # T0+12.25h (hibernated 10 h)
    _change(app, "box-7", status="running", offer={"dph_total": 0.30})  # T0+12.5h: a cheaper instance
    _change(app, "box-7", status="pausing")  # T0+14.5h  (ran 2 h at $0.30)
    _change(app, "box-7", status="paused")  # T0+14.6h
    _change(app, "box-7", status="resuming")  # T0+17.6h  (paused 3 h)
    _change(app, "box-7", status="running")  # T0+17.7h
    when = [
        T0 + 2 * H,
        T0 + 2.25 * H,
        T0 + 12.25 * H,
        T0 + 12.5 * H,
        T0 + 14.5 * H,
        T0 + 14.6 * H,
        T0 + 17.6 * H,
        T0 + 17.7 * H,
    ]
    with transaction(sf) as s:
        recorded = list(
            s.scalars(
                select(Event).where(Event.machine_id == "box-7", Event.kind == "machine.status").order_by(Event.id)
            )
        )
        assert [(e.data["from"], e.data["to"], e.data["hourly_usd"]) for e in recorded] == [
            ("running", "hibernating", 0.40),
            ("hibernating", "hibernated", 0.40),
            ("hibernated", "waking", 0.40),
            ("waking", "running", 0.30),
            ("running", "pausing", 0.30),
            ("pausing", "paused", 0.30),
            ("paused", "resuming", 0.30),
            ("resuming", "running", 0.30),
        ]
        for event, at in zip(recorded, when):
            s.execute(update(Event).where(Event.id == event.id).values(created_at=at))
        s.add(
            Snapshot(
                id="snap_a",
                machine_id="box-7",
                status="complete",
                storage_prefix="p/a/",
                workspace_path="/workspace",
                stored_bytes=2_500_000_000,
            )
        )
        s.add(
            Snapshot(
                id="snap_b",
                machine_id="box-7",
                status="failed",
                storage_prefix="p/b/",
                workspace_path="/workspace",
                stored_bytes=900_000_000,
            )
        )  # not kept: not counted

    now = T0 + 20 * H
    with transaction(sf) as s:
        costs = machine_costs(s, s.get(Machine, "box-7"), storage_price_gb_month=0.015, now=now)
    # By hand. Billed: 2 + 0.25 (hibernating) at $0.40, 0.25 (waking) at $0.40 (the old price was still
    # in force: the new instance's price arrives with `running`), 2 + 0.1 (pausing) at $0.30, 0.1
    # (resuming) + 2.3 (running until now) at $0.30. Paused 3 h. Hibernated 10 h, at the $0.40 of the
    # instance that hibernating destroyed.
    running_h = 2 + 0.25 + 0.25 + 2 + 0.1 + 0.1 + 2.3
    spent = (2 + 0.25 + 0.25) * 0.40 + (2 + 0.1 + 0.1 + 2.3) * 0.30
    assert costs["hours"] == pytest.approx({"running": running_h, "paused": 3.0, "hibernated": 10.0}, abs=1e-4)
    assert costs["saved_usd"] == pytest.approx(10 * 0.40) == 4.0
    assert costs["spent_usd"] == pytest.approx(spent, abs=1e-4) == pytest.approx(2.35)
    assert costs["hourly_usd"] == 0.30
    assert costs["stored_bytes"] == 2_500_000_000
    assert costs["storage_usd_month"] == pytest.approx(2.5 * 0.015)
    assert costs["transfer_usd_per_gb"] is None  # the new offer recorded no transfer prices

    client = app.test_client()
    machine = client.get("/api/instances/box-7", headers=AUTH).get_json()
    assert machine["costs"]["saved_usd"] == 4.0 and machine["costs"]["hours"]["hibernated"] == 10.0
    assert machine["costs"]["spent_usd"] > spent  # still running: "now" is later than the hand calculation's
    listed = client.get("/api/instances", headers=AUTH).get_json()["items"]
    assert listed[0]["costs"]["saved_usd"] == 4.0
    summary = client.get("/api/summary", headers=AUTH).get_json()
    assert summary["machines"] == {"total": 1, "live": 1, "paused": 0, "hibernated": 0, "by_status": {"running": 1}}
    assert summary["costs"]["saved_usd"] == 4.0 and summary["costs"]["stored_bytes"] == 2_500_000_000
    assert summary["costs"]["live_hourly_usd"] == 0.30 and summary["costs"]["storage_price_gb_month"] == 0.015
    assert summary["jobs"] == {"by_status": {}, "active": 0}


def test_a_machine_without_a_known_price_and_transfer_prices(app):
    sf = app.extensions["gpusnap"].session_factory
    with transaction(sf) as s:
        s.add(Machine(id="ssh-box", status="running", created_at=T0))
        s.add(
            Machine(
                id="rented",
                status="hibernated",
                created_at=T0,
                offer={"dph_total": 0.5, "inet_up_cost": 0.002, "inet_down_cost": 0.001},
            )
        )
    _change(app, "ssh-box", status="hibernating")
    _change(app, "ssh-box", status="hibernated")
    with transaction(sf) as s:
        unknown = machine_costs(s, s.get(Machine, "ssh-box"), storage_price_gb_month=0.015)
        rented = machine_costs(s, s.get(Machine, "rented"), storage_price_gb_month=0.015, now=T0 + 3 * H)
    assert unknown["hourly_usd"] is None and unknown["saved_usd"] is None and unknown["spent_usd"] is None
    assert rented["saved_usd"] == pytest.approx(1.5) and rented["hours"]["hibernated"] == pytest.approx(3.0)
    assert rented["transfer_usd_per_gb"] == {"upload": 0.002, "download": 0.001}
    summary = app.test_client().get("/api/summary", headers=AUTH).get_json()
    assert summary["machines"]["hibernated"] == 2 and summary["machines"]["live"] == 0
    assert summary["costs"]["live_hourly_usd"] == 0


def test_storage_price_setting():
    assert Settings.from_env({}, dotenv=False).storage_price_gb_month == 0.015
    assert Settings.from_env({"STORAGE_PRICE_GB_MONTH": "0.023"}, dotenv=False).storage_price_gb_month == 0.023
    for bad in ("-1", "abc", "inf"):
        with pytest.raises(Exception, match="STORAGE_PRICE_GB_MONTH"):
            Settings.from_env({"STORAGE_PRICE_GB_MONTH": bad}, dotenv=False)


def test_a_status_change_stamped_by_a_clock_ahead_counts_no_hours_after_now(app):
    """A worker whose clock runs an hour ahead records `hibernating` in the future: the running interval
    before it must end at `now`, not bill an hour that has not happened."""
    sf = app.extensions["gpusnap"].session_factory
    with transaction(sf) as s:
        s.add(Machine(id="skew", status="running", created_at=T0, offer={"dph_total": 1.0}))
    _change(app, "skew", status="hibernating")
    with transaction(sf) as s:
        s.execute(update(Event).where(Event.machine_id == "skew").values(created_at=T0 + 3 * H))
    with transaction(sf) as s:
        costs = machine_costs(s, s.get(Machine, "skew"), storage_price_gb_month=0.015, now=T0 + 2 * H)
    assert costs["hours"]["running"] == pytest.approx(2.0)
    assert costs["spent_usd"] == pytest.approx(2.0)


def test_an_offer_with_an_infinite_price_is_no_price(app, database_url):
    """vast.ai's JSON is parsed by `requests`, which reads `Infinity`: such a price made every costs answer
    invalid JSON (`Infinity` is not JSON) and the page's `response.json()` fail."""
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's json type refuses such an offer when the machine is stored")
    sf = app.extensions["gpusnap"].session_factory
    with transaction(sf) as s:
        s.add(
            Machine(
                id="inf",
                status="running",
                created_at=T0,
                offer={"dph_total": float("inf"), "inet_up_cost": float("inf")},
            )
        )
    _change(app, "inf", status="hibernating")
    r = app.test_client().get("/api/instances/inf", headers=AUTH)
    assert r.status_code == 200
    costs = json.loads(r.get_data(as_text=True), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))["costs"]
    assert costs["hourly_usd"] is None and costs["transfer_usd_per_gb"] is None
