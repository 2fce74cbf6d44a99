"""One base model, several tasks: load adapters by folder, switch by name, sample."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.calibration import resolved_sampling
from ..models.load import LoadedModel
from ..sampling import NoiseSchedule, sample_batched
from ..errors import AdapterError
from .store import adapter_names, load_adapter, use


def with_adapters(loaded: LoadedModel, folders: list[str | Path], active: str | None = None) -> LoadedModel:
    """`loaded` with every adapter folder attached (named after its folder); `active` (or the only one) runs."""
    for folder in folders:
        load_adapter(loaded.model, folder)
    names = adapter_names(loaded.model)
    if active is None and len(names) > 1:
        raise AdapterError(f"several adapters loaded ({', '.join(names)}); choose one with --use")
    use(loaded.model, active or names[0])
    return loaded


def task_samples(loaded: LoadedModel, labels: torch.Tensor, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0) -> torch.Tensor:
    """Samples for `labels` from the model as it is (with whichever adapter is active)."""
    steps, guidance = resolved_sampling(loaded, steps, guidance)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), *loaded.adapter.latent_shape(), generator=g)
    return sample_batched(loaded.model, loaded.adapter, NoiseSchedule(loaded.scheduler_config),
                          {"class_labels": labels}, noise, steps, guidance)
