"""Scanner state as it travels from a slave to the master's cluster view.

The slave sends, per ICAP service, a fixed record of plain values (checked on the wire by
`cluster/wire.py`'s SLAVE_STATUS); the master keeps the list and turns bad states into warnings.
"""

from __future__ import annotations

from typing import Any

MAX_SERVICES_REPORTED = 16


def to_wire(health: dict[str, Any] | None) -> list[dict[str, Any]]:
    """`Scanner.health()` as wire records (no None: "" and -1.0 stand for unknown)."""
    if not health:
        return []
    out = []
    for s in health.get("services", [])[:MAX_SERVICES_REPORTED]:
        out.append({
            "url": str(s["url"])[:1024],
            "state": str(s["state"])[:16],
            "istag": str(s.get("istag") or "")[:256],
            "scans": int(s["scans"]),
            "detections": int(s["detections"]),
            "failures": int(s["failures"]),
            "latency_ms": float(s["latency_ms"]) if s.get("latency_ms") is not None else -1.0,
        })
    return out


def from_wire(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**r, "istag": r["istag"] or None, "latency_ms": None if r["latency_ms"] < 0 else r["latency_ms"],
         "reachable": r["state"] in ("ok", "broken")}
        for r in records
    ]


def warnings(services: list[dict[str, Any]]) -> list[str]:
    out = []
    for s in services:
        if s["state"] == "down":
            out.append(f"ICAP service {s['url']} is down")
        elif s["state"] == "broken":
            out.append(f"ICAP service {s['url']} lets the EICAR test file through")
    return out


__all__ = ["from_wire", "to_wire", "warnings"]
