"""Human-readable views of the API's objects for the CLI: tables for lists, `key: value` blocks for one
object. Scripts use `--json` instead; nothing here is meant to be parsed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from src.cli.progress import fraction_of, human_bytes, human_duration


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart; None shows as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def when(value: str | None) -> str:
    """'2024-05-01T10:11:12.123456Z' -> '2024-05-01 10:11:12' (UTC, as the API sends it)."""
    if not value:
        return "-"
    return value.replace("T", " ")[:19]


def ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def snapshot_rows(items: list[dict[str, Any]]) -> str:
    return table(
        ["id", "instance", "status", "raw size", "stored size", "ratio", "parts", "created"],
        [
            [
                s["id"],
                s["instance_id"],
                s["status"],
                _bytes(s.get("raw_bytes")),
                _bytes(s.get("stored_bytes")),
                ratio(s.get("ratio")),
                s.get("parts"),
                when(s.get("created_at")),
            ]
            for s in items
        ],
    )


def job_rows(items: list[dict[str, Any]]) -> str:
    return table(
        ["id", "kind", "status", "phase", "done", "instance", "snapshot", "created"],
        [
            [
                j["id"],
                j["kind"],
                j["status"],
                j.get("phase"),
                _percent(j),
                j.get("machine_id"),
                j.get("snapshot_id"),
                when(j.get("created_at")),
            ]
            for j in items
        ],
    )


def machine_rows(items: list[dict[str, Any]]) -> str:
    return table(
        ["id", "status", "vast id", "ssh", "gpu", "last snapshot", "active job", "updated"],
        [
            [
                m["id"],
                m["status"],
                m.get("vast_instance_id"),
                _ssh(m),
                m.get("gpu_name"),
                m.get("last_snapshot_id"),
                m.get("active_job_id"),
                when(m.get("updated_at")),
            ]
            for m in items
        ],
    )


def snapshot_detail(s: dict[str, Any]) -> str:
    fields: list[tuple[str, Any]] = [
        ("id", s["id"]),
        ("name", s.get("name")),
        ("instance", s["instance_id"]),
        ("status", s["status"]),
        ("workspace", s.get("workspace_path")),
        ("source host", s.get("source_host")),
        ("storage prefix", s.get("storage_prefix")),
        ("codec", s.get("codec")),
        ("parts", _parts(s)),
        ("raw size", _bytes(s.get("raw_bytes"))),
        ("stored size", _bytes(s.get("stored_bytes"))),
        ("ratio", ratio(s.get("ratio"))),
        ("files", s.get("file_count")),
        ("excludes", ", ".join(s.get("excludes") or []) or None),
        ("duration", human_duration(s["duration_s"]) if s.get("duration_s") is not None else None),
        ("created", when(s.get("created_at"))),
        ("completed", when(s.get("completed_at"))),
        ("verified", when(s.get("verified_at"))),
        ("manifest sha256", s.get("manifest_sha256")),
    ]
    if s.get("error"):
        fields.append(("error", f"{s['error']['code']}: {s['error']['message']}"))
    for phase, seconds in (s.get("durations") or {}).items():
        fields.append((f"  {phase}", human_duration(seconds) if isinstance(seconds, (int, float)) else seconds))
    return block(fields)


def job_detail(j: dict[str, Any]) -> str:
    p = j.get("progress") or {}
    fields: list[tuple[str, Any]] = [
        ("id", j["id"]),
        ("kind", j["kind"]),
        ("status", j["status"]),
        ("phase", j.get("phase")),
        ("progress", _percent(j)),
        ("bytes", _pair(p.get("bytes_done"), p.get("bytes_total"), human_bytes)),
        ("parts", _pair(p.get("parts_done"), p.get("parts_total"), str)),
        ("instance", j.get("machine_id")),
        ("snapshot", j.get("snapshot_id")),
        ("attempts", j.get("attempts")),
        ("cancel requested", "yes" if j.get("cancel_requested") else None),
        ("created", when(j.get("created_at"))),
        ("started", when(j.get("started_at"))),
        ("finished", when(j.get("finished_at"))),
    ]
    if j.get("error"):
        fields.append(("error", f"{j['error']['code']}: {j['error']['message']}"))
    if j.get("result"):
        fields.append(("result", json.dumps(j["result"], sort_keys=True)))
    return block(fields)


def machine_detail(m: dict[str, Any]) -> str:
    text = block(
        [
            ("id", m["id"]),
            ("status", m["status"]),
            ("vast instance", m.get("vast_instance_id")),
            ("ssh", _ssh(m)),
            ("host key pinned", "yes" if m.get("host_key_pinned") else "no"),
            ("workspace", m.get("workspace_path")),
            ("gpu", m.get("gpu_name")),
            ("last snapshot", m.get("last_snapshot_id")),
            ("active job", m.get("active_job_id")),
            ("policy", _policy_line(m.get("policy"))),
            ("created", when(m.get("created_at"))),
            ("updated", when(m.get("updated_at"))),
        ]
    )
    events = m.get("events") or []
    if not events:
        return text + "\n\nno events"
    rows = [[when(e.get("at")), e.get("kind"), e.get("job_id"), e.get("message")] for e in events]
    return text + "\n\n" + table(["at", "event", "job", "message"], rows)


def _policy_line(p: dict[str, Any] | None) -> str | None:
    """One line for `instances show`; `instances policy show` has the whole policy."""
    if not p:
        return None
    parts = [
        f"snapshots {p['schedule']} UTC" if p.get("schedule") else "",
        "retention " + ",".join(f"{k.removeprefix('keep_')}={v}" for k, v in (p.get("retention") or {}).items() if v)
        if p.get("retention")
        else "",
        f"idle {p['idle'].get('action')}{' (dry run)' if p['idle'].get('dry_run') else ''}" if p.get("idle") else "",
    ]
    return "; ".join(x for x in parts if x) or "set (empty)"


def policy_detail(p: dict[str, Any]) -> str:
    retention = p.get("retention") or {}
    idle = p.get("idle")
    idle_text = None
    if idle:
        idle_text = (
            f"{'dry run: ' if idle.get('dry_run') else ''}{idle.get('action')} when every GPU < "
            f"{idle.get('gpu_util_below')}% for {idle.get('for_s')}s (sample every {idle.get('sample_every_s')}s"
            f"{', SSH sessions ignored' if not idle.get('respect_ssh_sessions', True) else ''})"
        )
    return block(
        [
            ("machine", p.get("machine_id")),
            ("workspace", p.get("workspace_path") or "(the machine's)"),
            ("excludes", ", ".join(p.get("excludes") or [])),
            ("schedule", p.get("schedule") and f"{p['schedule']} (UTC)"),
            ("next run", when(p.get("next_run_at"))),
            ("last slot", when(p.get("last_slot_at"))),
            ("retention", ", ".join(f"{k}={v}" for k, v in retention.items() if v)),
            ("idle", idle_text),
        ]
    )


def job_summary(j: dict[str, Any]) -> str:
    """One line for a submitted or finished job."""
    text = f"job {j['id']} ({j['kind']}) {j['status']}"
    if j.get("phase") and j["status"] in ("queued", "running"):
        text += f", phase {j['phase']}"
    return text


def block(fields: Sequence[tuple[str, Any]]) -> str:
    """`key: value` lines with the values aligned; unknown values are left out."""
    shown = [(k, _cell(v)) for k, v in fields if v is not None and v != ""]
    width = max(len(k) for k, _ in shown) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in shown)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _bytes(n: int | None) -> str | None:
    return None if n is None else human_bytes(n)


def _parts(s: dict[str, Any]) -> str | None:
    if s.get("parts") is None:
        return None
    size = f" of {human_bytes(s['part_size'])}" if s.get("part_size") else ""
    return f"{s['parts']}{size}"


def _percent(j: dict[str, Any]) -> str | None:
    if j.get("status") == "succeeded":
        return "100%"
    fraction = fraction_of(j.get("progress") or {})
    return None if fraction is None else f"{fraction * 100:.0f}%"


def _pair(done: int | None, total: int | None, fmt: Any) -> str | None:
    if done is None and total is None:
        return None
    return f"{fmt(done or 0)} / {fmt(total) if total is not None else '?'}"


def _ssh(m: dict[str, Any]) -> str | None:
    if not m.get("ssh_host"):
        return None
    user = f"{m['ssh_user']}@" if m.get("ssh_user") else ""
    return f"{user}{m['ssh_host']}:{m.get('ssh_port') or 22}"
