"""Config of the `recover` stage: a distillation of the model so far, nothing else."""

from __future__ import annotations

from ...train.distill import DistillConfig


class RecoverConfig(DistillConfig):
    """Distillation settings; `trainable: td_lora` trains a timestep-dynamic LoRA on frozen weights."""
