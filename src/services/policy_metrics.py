"""`/metrics` for policies, read from the database at scrape time like the job figures (so any API
process tells the truth about what workers elsewhere sampled and woke):

- `gpusnap_idle_gpu_utilization{machine,gpu}`: the newest successful idle sample, percent per GPU;
- `gpusnap_idle_ssh_sessions{machine}`: interactive SSH sessions in that sample;
- `gpusnap_idle_samples{machine,ok}`: samples kept for the current windows, by outcome;
- `gpusnap_wake_phase_seconds{phase}`: histograms of succeeded wakes per phase: `queue` (waiting for a
  place under WAKE_CONCURRENCY), `rent` (rent until the instance runs), `restore` (the workspace restore);
  p50/p95 cold starts come from these with `histogram_quantile`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from src.models import IdleSample, Job

WAKE_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
_PHASES = (("queue", "queue_s"), ("rent", "rent_s"), ("restore", "restore_s"))


class PolicyCollector(Collector):
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sf = session_factory

    def collect(self) -> Iterator[Metric]:
        util = GaugeMetricFamily(
            "gpusnap_idle_gpu_utilization",
            "GPU utilisation in the newest idle sample, percent",
            labels=["machine", "gpu"],
        )
        sessions = GaugeMetricFamily(
            "gpusnap_idle_ssh_sessions", "Interactive SSH sessions in the newest idle sample", labels=["machine"]
        )
        counts = GaugeMetricFamily(
            "gpusnap_idle_samples", "Idle samples in the current windows, by outcome", labels=["machine", "ok"]
        )
        with self._sf() as s:
            newest = (
                select(IdleSample.machine_id, func.max(IdleSample.id).label("id"))
                .where(IdleSample.ok.is_(True))
                .group_by(IdleSample.machine_id)
                .subquery()
            )
            for row in s.scalars(select(IdleSample).join(newest, IdleSample.id == newest.c.id)):
                for gpu, value in enumerate(row.gpu_util or []):
                    util.add_metric([row.machine_id, str(gpu)], float(value))
                if row.ssh_sessions is not None:
                    sessions.add_metric([row.machine_id], float(row.ssh_sessions))
            for machine_id, ok, count in s.execute(
                select(IdleSample.machine_id, IdleSample.ok, func.count()).group_by(
                    IdleSample.machine_id, IdleSample.ok
                )
            ):
                counts.add_metric([machine_id, "true" if ok else "false"], float(count))
            results = s.scalars(select(Job.result).where(Job.kind == "wake", Job.status == "succeeded")).all()
        yield from (util, sessions, counts, _wake_histogram(results))


def _wake_histogram(results: Sequence[dict | None]) -> HistogramMetricFamily:
    family = HistogramMetricFamily("gpusnap_wake_phase_seconds", "Time per phase of succeeded wakes", labels=["phase"])
    for phase, key in _PHASES:
        values = [
            float(v)
            for r in results
            if isinstance(r, dict)
            for v in [(r.get("timings") or {}).get(key)]
            if isinstance(v, (int, float))
        ]
        buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in WAKE_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric([phase], buckets, sum_value=sum(values))
    return family
