"""Export an adapted model to ONNX: exact (the adapter's path stays in the graph) or, for TD-LoRA,
baked (one graph per timestep of a fixed sampling schedule, the update merged into the weights).

Both paths end in the parity check of `export_onnx`; the baked graphs are also checked against
the unbaked TD-LoRA model at their own timestep, which is the equality baking promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..export.onnx import export_onnx, ort_feeds, ort_session
from ..models.load import LoadedModel
from ..sampling import NoiseSchedule
from .td_lora import bake_timestep


def export_baked(loaded: LoadedModel, out_dir: str | Path, steps: int, atol: float = 1e-4,
                 card: dict | None = None) -> dict:
    """One ONNX graph per timestep of a `steps`-step schedule; writes `schedule.json` beside them."""
    out_dir = Path(out_dir)
    scheduler = NoiseSchedule(loaded.scheduler_config).new_scheduler()
    scheduler.set_timesteps(steps)
    entries = []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        baked = bake_timestep(loaded.model, t)
        path = out_dir / f"step{i:02d}.onnx"
        info = export_onnx(baked, loaded.adapter, path, atol=atol, card={**(card or {}), "timestep": t})
        x, _, cond = loaded.adapter.example_inputs(3, seed=7)
        tt = torch.full((3,), float(t))
        with torch.no_grad():
            ref = loaded.adapter.denoise(loaded.model, x, tt, cond).numpy()
        got = ort_session(path).run(None, ort_feeds(x, tt, cond))[0]
        err = float(np.abs(got - ref).max())
        if not err <= atol:
            path.unlink()
            raise ValueError(f"baked graph for timestep {t:g} differs from the TD-LoRA model by {err:.3g} > {atol:g}")
        entries.append({"step": i, "timestep": t, "file": path.name, "parity_vs_onnx": info["parity"]["max_abs_error"],
                        "max_abs_error_vs_td_lora": err})
    schedule = {"steps": steps, "scheduler": loaded.scheduler_config, "graphs": entries}
    (out_dir / "schedule.json").write_text(json.dumps(schedule, indent=2) + "\n")
    return schedule
