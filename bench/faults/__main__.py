"""Run the fault-injection suite and check its goals.

    .venv/bin/python -m bench.faults --trials 10          # S3 trials per fault rate; other scenarios fixed
    .venv/bin/python -m bench.faults --only s3-5,kill-9   # a subset

Prints one row per trial and a summary, and exits non-zero when a goal is missed: 0 data loss, 0 stuck
jobs, 0 orphan remote processes, 0 leaked instances, snapshots and restores each succeeding >= 95% of
the time at 5% injected S3 faults and >= 90% at 20%; in the scale-out run (PostgreSQL, Redis, two API
processes, three workers, one stalled and one killed) every raced request answered as documented and
every job ending consistent. Needs root for the disk-full scenario (tmpfs mounts) and PostgreSQL + Redis
for scale-out; without them those trials are reported as skipped. docs/reliability.md records the figures of a run.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter

from bench.faults import scaleout, scenarios
from bench.faults.world import World

SCENARIOS = ("s3-5", "s3-20", "kill-9", "ssh-reset", "ssh-blackhole", "disk-full", "cancel", "scale-out")
GOALS = {"s3-5%": 0.95, "s3-20%": 0.90}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="snapshot+restore trials per S3 fault rate")
    ap.add_argument("--cancels", type=int, default=4, help="random-cancel trials")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of " + ", ".join(SCENARIOS))
    ap.add_argument("--machines", type=int, default=4, help="scale-out: machines raced per kind of race")
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    rng = random.Random(args.seed)
    started = time.monotonic()
    world = World(seed=args.seed)
    trials: list[scenarios.Trial] = []
    leaked = 0
    try:
        for name in chosen:
            t0 = time.monotonic()
            before = (world.proxy.stats.requests, dict(world.proxy.stats.faults))
            try:
                got = _run(name, world, args, rng)
            except Exception as exc:  # noqa: BLE001 - a broken scenario is reported as such, the rest still runs
                traceback.print_exc()
                got = [
                    scenarios.Trial(
                        name,
                        "scenario",
                        f"error:{type(exc).__name__}",
                        False,
                        True,
                        0,
                        time.monotonic() - t0,
                        str(exc)[:200],
                    )
                ]
            for t in got:
                print(_row(t), flush=True)
            faults = {
                k: v - before[1].get(k, 0) for k, v in world.proxy.stats.faults.items() if v - before[1].get(k, 0)
            }
            print(
                f"# {name}: {len(got)} trials in {time.monotonic() - t0:.0f}s; S3 requests "
                f"{world.proxy.stats.requests - before[0]}, faults injected {faults or 'none'}",
                flush=True,
            )
            trials += got
        leaked = world.leaked_instances()
        stats = world.proxy.stats
        print(
            f"# S3 proxy: {stats.requests} requests, faults injected: {dict(stats.faults)}; "
            f"SSH relay: {world.relay.connections} connections, {world.relay.resets} reset"
        )
    finally:
        world.close()
    return _summary(trials, leaked, time.monotonic() - started)


def _run(name: str, world: World, args: argparse.Namespace, rng: random.Random) -> list[scenarios.Trial]:
    if name in ("s3-5", "s3-20"):
        return scenarios.s3_faults(world, args.trials, 0.05 if name == "s3-5" else 0.20)
    if name == "kill-9":
        return scenarios.kill9(world)
    if name == "ssh-reset":
        return scenarios.ssh_resets(world)
    if name == "ssh-blackhole":
        return scenarios.ssh_blackholes(world)
    if name == "disk-full":
        return scenarios.disk_full(world)
    if name == "cancel":
        return scenarios.random_cancels(world, args.cancels, rng)
    return scaleout.scale_out(world, machines=args.machines)


def _row(t: scenarios.Trial) -> str:
    data = "ok" if t.data_ok else (t.damage or "lost").upper()
    return (
        f"{t.scenario:<14} {t.op:<17} {t.outcome:<32} {'ok' if t.expected else 'UNEXPECTED':<10} "
        f"{data:<9} orphans={t.orphans:<2} {t.seconds:6.1f}s  {t.note}"
    )


def _summary(trials: list[scenarios.Trial], leaked: int, seconds: float) -> int:
    print()
    print(f"{'scenario':<14} {'op':<17} {'trials':>6} {'succeeded':>9} {'rate':>6}  outcomes")
    groups: dict[tuple[str, str], list[scenarios.Trial]] = {}
    for t in trials:
        groups.setdefault((t.scenario, t.op), []).append(t)
    missed: list[str] = []
    for (scenario, op), ts in groups.items():
        ok = sum(1 for t in ts if t.outcome == "succeeded")
        rate = ok / len(ts) if ts else 0.0
        outcomes = ", ".join(f"{k} x{v}" for k, v in Counter(t.outcome for t in ts).most_common())
        print(f"{scenario:<14} {op:<17} {len(ts):>6} {ok:>9} {rate:>6.0%}  {outcomes}")
        goal = GOALS.get(scenario)
        if goal is not None and rate < goal:
            missed.append(f"{scenario} {op} success {rate:.0%} < {goal:.0%}")
    lost = [t for t in trials if not t.data_ok]
    stuck = [t for t in trials if t.outcome == "stuck"]
    orphans = sum(t.orphans for t in trials)
    unexpected = [t for t in trials if not t.expected and t.scenario not in GOALS and t.outcome != "skipped"]
    print()
    changed = sum(1 for t in lost if t.damage == "changed")
    print(
        f"trials {len(trials)} in {seconds:.0f}s | data loss {len(lost) - changed} | failed but workspace "
        f"changed {changed} | stuck jobs {len(stuck)} | orphan "
        f"processes {orphans} | leaked instances {leaked} | unexpected outcomes {len(unexpected)}"
    )
    missed += [
        f"{'failed restore changed the live workspace' if t.damage == 'changed' else 'data loss'} in "
        f"{t.scenario}/{t.op} ({t.outcome})"
        for t in lost
    ]
    missed += [f"stuck job in {t.scenario}/{t.op}" for t in stuck]
    missed += [f"{orphans} orphan remote processes"] if orphans else []
    missed += [f"{leaked} leaked instances"] if leaked else []
    missed += [f"unexpected outcome {t.scenario}/{t.op}: {t.outcome}" for t in unexpected]
    for line in missed:
        print("GOAL MISSED:", line)
    if not missed:
        print("all goals met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
