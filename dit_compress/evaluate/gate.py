"""The quality gate: bounds on report metrics that CI asserts with an exit code."""

from __future__ import annotations

import math


def lookup(report: dict, dotted: str) -> float | None:
    """The number at `dotted` (dict keys, list indices) in the report, or None if absent or not a number."""
    node = report
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # e.g. stages.0.summary...
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def check_gate(report: dict, rules: list[dict]) -> dict:
    """Evaluate every rule; a missing or non-finite metric (NaN, an infinite loss) fails its rule.
    `passed` is False if any rule fails."""
    results = []
    for rule in rules:
        value = lookup(report, rule["metric"])
        kind = "max" if rule.get("max") is not None else "min"
        bound = rule[kind]
        finite = value is not None and math.isfinite(value)
        ok = finite and (value <= bound if kind == "max" else value >= bound)
        results.append({"metric": rule["metric"], "kind": kind, "bound": bound, "value": value, "ok": ok,
                        "by": None if not finite else (0.0 if ok else round(abs(value - bound), 6))})
    return {"passed": all(r["ok"] for r in results), "rules": results}


def describe_failures(gate: dict) -> list[str]:
    lines = []
    for r in gate["rules"]:
        if r["ok"]:
            continue
        if r["value"] is None:
            lines.append(f"gate failed: {r['metric']} is not in the report (see report.json for metric names)")
        elif not math.isfinite(r["value"]):
            lines.append(f"gate failed: {r['metric']} = {r['value']} is not a finite number")
        else:
            lines.append(f"gate failed: {r['metric']} = {r['value']:.4g} violates {r['kind']} {r['bound']:g} "
                         f"(by {r['by']:.4g})")
    return lines
