"""Issue 24's acceptance on the bundled teacher itself: a 50 %-depth student of zoo:scenes-flux,
calibrated from the teacher's prompts, comes back as a pipeline folder that stock
`FluxPipeline.from_pretrained` loads and generates with."""

from __future__ import annotations

import copy

import numpy as np
import torch

from dit_compress.core.manifest import StageRecord, base_reference, load_compressed, save_compressed
from dit_compress.core.pipeline import apply_stage
from dit_compress.core.stage import StageContext, get_stage
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.models.load import load_transformer

PROMPT = "a large blue three at the centre on a black background"


def test_half_depth_student_of_scenes_flux_loads_with_stock_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline

    teacher = load_transformer("zoo:scenes-flux")
    assert teacher.pipeline is not None and teacher.pipeline.class_name == "FluxPipeline"
    # Calibration encodes the card's prompts with the pipeline's CLIP and T5 (2 sampling steps: cheap).
    calib = build_calibration(teacher, CalibrationSpec(num_samples=8, sampling_steps=2), tmp_path / "cache")
    pipe = teacher.pipeline.components()
    embeds, pooled, _ = pipe.encode_prompt(calib.prompts[:2], None, max_sequence_length=32)
    assert torch.allclose(calib.cond["encoder_hidden_states"][:2], embeds, atol=1e-5)  # batched differently
    assert torch.allclose(calib.cond["pooled_projections"][:2], pooled, atol=1e-5)

    stage = get_stage("prune")
    config = stage.config_cls.model_validate({"method": "depth", "ratio": 0.5,
                                              "recover": {"steps": 2, "batch_size": 4}})
    ctx = StageContext(teacher=teacher, calibration=calib, work_dir=tmp_path / "work", seed=0,
                       save_variant=lambda *a, **k: None)
    model, record, _ = apply_stage(stage, config, copy.deepcopy(teacher.model), ctx)
    ckpt = save_compressed(tmp_path / "checkpoint", model, base_reference(teacher, {"source": "zoo:scenes-flux"}),
                           [record], pipeline=teacher.pipeline)

    loaded = FluxPipeline.from_pretrained(ckpt / "pipeline")  # stock diffusers, nothing of ours
    blocks = loaded.transformer.config.num_layers + loaded.transformer.config.num_single_layers
    assert blocks == 12 and len(record.plan["removed"]) == 12
    loaded.set_progress_bar_config(disable=True)
    images = loaded(PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                    negative_prompt="", true_cfg_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # The stock folder's transformer is the checkpoint's, weight for weight.
    restored = load_compressed(ckpt).model.state_dict()
    assert all(torch.equal(v, restored[k]) for k, v in loaded.transformer.state_dict().items())
