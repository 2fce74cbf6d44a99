"""The quality gate: bounds on report metrics that CI asserts with an exit code; and the two files
`ditc check` reads, report.json and a gate file, validated before any field is used."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.recipe import GateRule
from ..errors import RecipeError
from ..fileio import read_json, read_yaml, validate

REPORT_VERSION = 1  # report.json's `report_version`; reports written before it have none and read as 1


class _ReportRecipe(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    gate: list[GateRule] | None = None


class ReportFile(BaseModel):
    """What `ditc check` reads from report.json: its version and its recipe's gate. The other
    sections are looked up by the gate's dotted paths as written (a missing or non-numeric metric
    fails its rule)."""

    model_config = ConfigDict(strict=True, extra="allow")
    report_version: Literal[1] = REPORT_VERSION
    recipe: _ReportRecipe | None = None


class GateFile(BaseModel):
    """A gate file: `gate:` (a list of rules) and an optional `version`; a recipe may serve as one,
    so its other keys are allowed here (the recipe's own schema checks them when it runs)."""

    model_config = ConfigDict(strict=True, extra="allow")
    version: Literal[1] = 1
    gate: list[GateRule] = Field(min_length=1)


def read_report(path: Path) -> dict:
    """report.json as a mapping whose version and gate are valid, or a RecipeError naming the field."""
    data = read_json(path, "report", RecipeError)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: not a report (expected a JSON object)")
    validate(ReportFile, data, str(path), RecipeError)
    return data


def gate_rules(raw: Any, where: str | Path) -> list[dict]:
    """Validated gate rules from a gate list, a mapping with `gate:` (a gate file or a recipe)."""
    if not isinstance(raw, dict):
        if not isinstance(raw, list):
            raise RecipeError(f"{where}: expected a `gate:` list of rules like "
                              "`- {metric: quality.fd_ratio, max: 2}`")
        raw = {"gate": raw}
    return [r.model_dump() for r in validate(GateFile, raw, str(where), RecipeError).gate]


def read_gate_file(path: Path) -> list[dict]:
    return gate_rules(read_yaml(path, "gate file", RecipeError), path)


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
