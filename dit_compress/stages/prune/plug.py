"""PPCL's pluggable sizes: switch any subset of a checkpoint's trained intervals in.

Training leaves the teacher's blocks untouched, so a PPCL checkpoint (every interval plugged)
plus its teacher holds every size: an interval switched off gets its teacher blocks back, one
switched on its trained replacement. The FFN maps (width) stay in every size.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ...core.manifest import load_compressed, load_teacher, read_manifest
from ...errors import CheckpointError, RecipeError
from ...models.load import LoadedModel
from .depth import remove_blocks_
from .intervals import plan_from_json


def parse_plug(text: str) -> list[str]:
    """'8-17,20-22' -> interval keys; 'none' -> the teacher's depth (no interval)."""
    if text.strip().lower() == "none":
        return []
    keys = [k.strip() for k in text.split(",") if k.strip()]
    for k in keys:
        a, _, b = k.partition("-")
        if not (a.isdigit() and b.isdigit() and int(a) < int(b)):
            raise RecipeError(f"--plug: {k!r} is not an interval FIRST-LAST (e.g. 8-17), nor 'none'")
    return keys


def plug_sizes(plan: dict) -> list[list[str]]:
    """The sizes worth evaluating in a PPCL plan: none, each interval alone, each of the run's
    ratios, all; deduplicated, fewest removed blocks first (intervals in block order)."""
    intervals = plan_from_json(plan["intervals"])
    removed = {iv.key: len(iv.blocks()) - 1 for iv in intervals}
    sets = [[], *([iv.key] for iv in intervals), *plan["plugs"].values(), [iv.key for iv in intervals]]
    unique = {tuple(sorted(s, key=lambda k: int(k.split("-")[0]))) for s in sets}
    return [list(s) for s in sorted(unique, key=lambda s: (sum(removed[k] for k in s), s))]


def ppcl_plan(folder: Path) -> dict:
    """The plan of a checkpoint whose only stage is PPCL (the paper's method), else a clear error."""
    stages = read_manifest(folder)["stages"]
    if len(stages) != 1 or stages[0].get("name") != "prune" or stages[0].get("config", {}).get("method") != "ppcl":
        names = [f"{s.get('name')}({s.get('config', {}).get('method', '')})" for s in stages]
        raise CheckpointError(f"{folder}: plugging needs a checkpoint made by one PPCL stage "
                              f"(prune, method ppcl); this one has {names}")
    return stages[0]["plan"]


def plug(folder: str | Path, keys: list[str], teacher: str | None = None) -> LoadedModel:
    """The model with exactly the intervals `keys` plugged, from the checkpoint and its pinned
    teacher (`teacher`: where that teacher is now, if it moved)."""
    folder = Path(folder)
    plan = ppcl_plan(folder)
    trained = plan_from_json(plan["intervals"])
    unknown = [k for k in keys if k not in {iv.key for iv in trained}]
    if unknown:
        raise RecipeError(f"--plug: {unknown[0]} is not an interval this run trained; "
                          f"trained: {', '.join(iv.key for iv in trained)}")
    held = set(plan["plugged"])
    missing = [k for k in keys if k not in held]
    if missing:
        raise CheckpointError(f"{folder}: holds the replacements of {sorted(held)} only (a smaller "
                              f"variant); plug {missing[0]} from the run's main checkpoint")
    student = load_compressed(folder)
    teacher = load_teacher(folder, teacher)
    names = plan["names"]
    if [f"{g.attr}.{j}" for g, j, _ in teacher.adapter.blocks(teacher.model)] != names:
        raise CheckpointError(f"{folder}: the teacher's blocks no longer match the ones this checkpoint was cut from")
    kept_in_checkpoint = [i for i in range(len(names)) if i not in plan["removed"]]
    from_checkpoint = [b for _, _, b in student.adapter.blocks(student.model)]
    chosen = [iv for iv in trained if iv.key in keys]
    switched_off = {iv.anchor for iv in trained if iv.key in held and iv.key not in keys}
    model = copy.deepcopy(teacher.model)
    located = [(g.attr, j) for g, j, _ in teacher.adapter.blocks(model)]
    for pos, i in enumerate(kept_in_checkpoint):
        if i not in switched_off:  # a replacement, or a teacher block (its FFN maybe a linear map)
            attr, j = located[i]
            getattr(model, attr)[j] = copy.deepcopy(from_checkpoint[pos])
    removed = sorted(i for iv in chosen for i in iv.blocks() if i != iv.anchor)
    remove_blocks_(model, teacher.with_model(model).adapter, removed)
    return teacher.with_model(model.eval().requires_grad_(False))
