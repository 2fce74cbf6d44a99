"""The one base of every validated config: recipes, calibration, stages, distillation."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """Unknown keys are errors (a misspelt key never silently falls back to a default); types are
    strict (`steps: true` or `steps: "5"` is an error, not 1 or 5; an integer still reads where a
    float belongs); and a validated config is a value: frozen, so the recipe hash recorded for a
    run stays true."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
