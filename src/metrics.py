"""Prometheus metrics. Job and snapshot figures are read from the database at scrape time, so `/metrics`
on any API process tells the truth about jobs that workers on other machines ran."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from src.models import Job, Snapshot, StoreObject


class _DatabaseCollector(Collector):
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sf = session_factory

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("gpusnap_jobs", "Jobs by kind and status", labels=["kind", "status"])
        durations = SummaryMetricFamily(
            "gpusnap_job_duration_seconds", "Run time of finished jobs", labels=["kind", "status"]
        )
        moved = CounterMetricFamily("gpusnap_bytes_moved", "Bytes moved by succeeded jobs", labels=["kind"])
        snaps = GaugeMetricFamily("gpusnap_snapshots", "Snapshots by status", labels=["status"])
        stored = GaugeMetricFamily("gpusnap_snapshot_stored_bytes", "Bytes stored by complete snapshots")
        machine_stored = GaugeMetricFamily(
            "gpusnap_machine_stored_bytes",
            "Bytes a machine's snapshots occupy in "
            "the bucket (its chunk store, shared chunks once, plus format-1 snapshots)",
            labels=["machine"],
        )
        dedup = GaugeMetricFamily(
            "gpusnap_machine_dedup_ratio",
            "Raw bytes of a machine's complete format-2 snapshots over the bytes its chunk store holds",
            labels=["machine"],
        )
        with self._sf() as s:
            for kind, status, count in s.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
            ):
                jobs.add_metric([kind, status], count)
            finished = select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
                Job.finished_at.is_not(None), Job.started_at.is_not(None)
            )
            totals: dict[tuple[str, str], tuple[int, float]] = {}
            for kind, status, started, ended in s.execute(finished):
                if started is None or ended is None:  # the query excludes them; the row type does not know
                    continue
                done, spent = totals.get((kind, status), (0, 0.0))
                totals[(kind, status)] = (done + 1, spent + max(0.0, (ended - started).total_seconds()))
            for (kind, status), (finished_count, seconds) in totals.items():
                durations.add_metric([kind, status], count_value=finished_count, sum_value=seconds)
            for kind, total in s.execute(
                select(Job.kind, func.sum(Job.bytes_done)).where(Job.status == "succeeded").group_by(Job.kind)
            ):
                moved.add_metric([kind], float(total or 0))
            for status, count in s.execute(select(Snapshot.status, func.count()).group_by(Snapshot.status)):
                snaps.add_metric([status], count)
            stored.add_metric(
                [],
                float(
                    s.scalar(
                        select(func.coalesce(func.sum(Snapshot.stored_bytes), 0)).where(Snapshot.status == "complete")
                    )
                    or 0
                ),
            )
            chunked = dict(
                s.execute(
                    select(StoreObject.machine_id, func.sum(StoreObject.size)).group_by(StoreObject.machine_id)
                ).all()
            )
            v1 = dict(
                s.execute(
                    select(Snapshot.machine_id, func.sum(Snapshot.stored_bytes))
                    .where(Snapshot.format == 1, Snapshot.status == "complete")
                    .group_by(Snapshot.machine_id)
                ).all()
            )
            raw = dict(
                s.execute(
                    select(Snapshot.machine_id, func.sum(Snapshot.raw_bytes))
                    .where(Snapshot.format == 2, Snapshot.status == "complete")
                    .group_by(Snapshot.machine_id)
                ).all()
            )
            for machine in sorted(set(chunked) | set(v1)):
                machine_stored.add_metric([machine], float((chunked.get(machine) or 0) + (v1.get(machine) or 0)))
            for machine, held in chunked.items():
                if held:
                    dedup.add_metric([machine], float(raw.get(machine) or 0) / float(held))
        yield from (jobs, durations, moved, snaps, stored, machine_stored, dedup)


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode when it is on in this process, else None.
    It is on when PROMETHEUS_MULTIPROC_DIR was set before prometheus_client was imported (gunicorn.conf.py
    sets it in the master, so every worker starts with it); set later, it would change nothing."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and values.ValueClass is not values.MutexValue and os.path.isdir(path):
        return path
    return None


class Metrics:
    """One registry per app (no process globals, so tests can build many apps).

    The HTTP counters are counted where requests are served. Under gunicorn that is several worker
    processes, and a scrape lands on one of them: in multiprocess mode every worker writes its counts to
    files in PROMETHEUS_MULTIPROC_DIR and a scrape sums them all (dead workers' files included), so what
    any scrape reads only grows. Job and snapshot figures come from the database either way."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DatabaseCollector(session_factory))
        from src.services.policy_metrics import PolicyCollector

        self.registry.register(PolicyCollector(session_factory))
        shared = multiprocess_dir()
        if shared:
            multiprocess.MultiProcessCollector(self.registry, path=shared)
        own = None if shared else self.registry  # multiprocess: values go to the files, read back above
        self.http_requests = Counter(
            "gpusnap_http_requests", "HTTP requests", ["method", "route", "status"], registry=own
        )
        self.http_latency = Histogram(
            "gpusnap_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=own,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
