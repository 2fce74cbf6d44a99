"""Distillation under `torchrun` for tests/test_distributed.py: `torchrun ... distributed_worker.py OUT`.

Runs, in whatever number of processes it is launched with, (1) the generic Distiller on a
depth-pruned tiny DiT with feature matching and a global batch that does not split evenly, and
(2) the PPCL stage (whose objective calls blocks directly), each on a tiny SD3 or DiT. The main
process writes the students' weights and the training summaries to OUT.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import LATENT, tiny_model  # noqa: E402
from dit_compress.core.processes import process_state  # noqa: E402
from dit_compress.core.pipeline import apply_stage  # noqa: E402
from dit_compress.core.stage import StageContext, get_stage  # noqa: E402
from dit_compress.data.calibration import CalibrationSet  # noqa: E402
from dit_compress.models.families import get_adapter  # noqa: E402
from dit_compress.models.load import LoadedModel  # noqa: E402
from dit_compress.sampling import DEFAULT_SCHEDULER, NoiseSchedule  # noqa: E402
from dit_compress.stages.prune.stage import remove_blocks_  # noqa: E402
from dit_compress.train.distill import DistillConfig, Distiller  # noqa: E402


def calibration(adapter) -> CalibrationSet:
    # Random clean latents stand in for teacher samples: what is compared is the training, not the data.
    g = torch.Generator().manual_seed(0)
    cond = adapter.random_conditions(32, g)
    x0 = torch.randn(32, *adapter.latent_shape(), generator=g)
    return CalibrationSet(x0, cond, adapter.null_conditions(cond), NoiseSchedule(), seed=0, uncond_fraction=0.25)


def main(out: Path) -> None:
    state = process_state()
    results, weights = {}, {}

    teacher = tiny_model("dit")
    adapter = get_adapter(teacher, LATENT)
    student = copy.deepcopy(teacher)
    remove_blocks_(student, adapter, [1])
    student.requires_grad_(True)
    config = DistillConfig(steps=6, batch_size=7, lr=1e-3, warmup_steps=0, feature_weight=1.0,
                           checkpoint_every=3)
    layer_map = [("transformer_blocks.1", "transformer_blocks.2")]
    results["distill"] = Distiller(teacher, student, adapter, calibration(adapter), config, out / "distill",
                                   layer_map).run()
    weights.update({f"distill.{k}": v for k, v in student.state_dict().items()})

    sd3 = tiny_model("sd3")
    loaded = LoadedModel(sd3, get_adapter(sd3, LATENT), dict(DEFAULT_SCHEDULER), "tiny:sd3")
    stage = get_stage("prune")
    cfg = stage.config_cls(ratio=0.25, recover={"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0})
    pruned, _, summary = apply_stage(stage, cfg, copy.deepcopy(sd3),
                                     StageContext(loaded, calibration(loaded.adapter), out / "ppcl"))
    results["ppcl"] = summary["training"]["ppcl"]
    weights.update({f"ppcl.{k}": v for k, v in pruned.state_dict().items()})

    if state.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
