"""The one base of every validated config: recipes, calibration, stages, distillation."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """Unknown keys are errors (a misspelt key never silently falls back to a default), and a
    validated config is a value: frozen, so the recipe hash recorded for a run stays true."""

    model_config = ConfigDict(extra="forbid", frozen=True)
