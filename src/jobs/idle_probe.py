"""Take one idle sample of a machine over SSH (`probe_gpu.py`) and record it: a row in `idle_samples`
(what `decide` reads), an `idle_sample` event on the machine and the `/metrics` gauges. A probe that
fails in any way is recorded as a failed sample, which the idle rule counts as busy."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from contextlib import closing
from typing import TYPE_CHECKING

from sqlalchemy import update

from src.db import transaction
from src.errors import GpusnapError
from src.models import IdleSample, Machine
from src.services.idle import Sample, parse_probe
from src.services.machines import add_event

if TYPE_CHECKING:
    from src.container import Container

logger = logging.getLogger(__name__)
PROBE_DEADLINE_S = 45.0  # connect, upload the scripts, run nvidia-smi: a host slower than this reads busy


def take_sample(c: Container, machine_id: str, *, now: dt.datetime) -> Sample:
    """Probe the machine now and record the sample (taken at `now`). Never raises for the host's sake:
    every failure is a failed sample."""
    from src.adapters.remote_types import SshTarget

    with transaction(c.session_factory) as s:
        m = s.get(Machine, machine_id)
        target = None
        if m is not None and m.ssh_host and m.ssh_port:
            target = SshTarget(
                host=m.ssh_host, port=m.ssh_port, user=m.ssh_user or c.settings.ssh_user, pinned_host_key=m.host_key
            )
    if target is None:
        sample = Sample(taken_at=now, ok=False, error="no_ssh_endpoint: the machine has no SSH endpoint")
    else:
        sample = _probe(c, machine_id, target, now=now)
    record(c, machine_id, sample)
    return sample


def _probe(c: Container, machine_id: str, target: object, *, now: dt.datetime) -> Sample:
    cancel = threading.Event()
    timer = threading.Timer(PROBE_DEADLINE_S, cancel.set)  # bounds the connect retries too
    timer.daemon = True
    timer.start()
    try:
        with c.ssh().open(target, cancel=cancel) as session:
            if getattr(target, "pinned_host_key", None) is None:
                _pin(c, machine_id, session.host_key)
            result = None
            with closing(
                session.run_script(
                    "probe_gpu", {}, cancel=cancel, deadline_s=PROBE_DEADLINE_S, idle_timeout_s=PROBE_DEADLINE_S
                )
            ) as events:
                for event in events:
                    if event.get("event") == "result":
                        result = event
                    elif event.get("event") == "error":
                        error = f"{event.get('code')}: {event.get('message')}"[:500]
                        return Sample(taken_at=now, ok=False, error=error)
    except GpusnapError as e:
        return Sample(taken_at=now, ok=False, error=f"{e.code}: {e.message}"[:500])
    finally:
        timer.cancel()
    if result is None:
        return Sample(taken_at=now, ok=False, error="remote_error: the probe ended without a result")
    util, sessions, problem = parse_probe(result)
    return Sample(taken_at=now, ok=problem is None, gpu_util=util, ssh_sessions=sessions, error=problem)


def _pin(c: Container, machine_id: str, host_key: str) -> None:
    """Trust on first use, as jobs do (src/jobs/remote.py): the first key seen is the machine's."""
    with transaction(c.session_factory) as s:
        s.execute(update(Machine).where(Machine.id == machine_id, Machine.host_key.is_(None)).values(host_key=host_key))


def record(c: Container, machine_id: str, sample: Sample) -> None:
    with transaction(c.session_factory) as s:
        s.add(
            IdleSample(
                machine_id=machine_id,
                taken_at=sample.taken_at,
                ok=sample.ok,
                gpu_util=sample.gpu_util,
                ssh_sessions=sample.ssh_sessions,
                error=sample.error,
            )
        )
        text = (
            f"GPU {', '.join(f'{u}%' for u in sample.gpu_util or [])}; {sample.ssh_sessions} SSH session(s)"
            if sample.ok
            else f"probe failed (counted as busy): {sample.error}"
        )
        add_event(
            s,
            machine_id,
            "idle_sample",
            text,
            data={
                "gpu_util": sample.gpu_util,
                "ssh_sessions": sample.ssh_sessions,
                "ok": sample.ok,
                "error": sample.error,
            },
        )
    if not sample.ok:
        logger.info("idle probe of %s failed: %s", machine_id, sample.error)
