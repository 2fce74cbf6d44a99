"""The `recover` stage: further distillation of whatever the earlier stages made, from the teacher.

No surgery and no plan: one phase, output matching against the teacher (the stages before it
may have changed the block structure, so there is no block correspondence to match features
at). With `trainable: td_lora` the phase trains an adapter on frozen weights, which is then
recorded by the training layer and rebuilt on restore.
"""

from __future__ import annotations

from ...core.stage import Phase, Plan, Stage
from .config import RecoverConfig


class RecoverStage(Stage):
    name = "recover"
    config_cls = RecoverConfig
    families = ("dit", "pixart", "sd3", "flux", "sana")

    def build(self, model, adapter, config: RecoverConfig, plan: Plan):
        return model

    def phases(self, config: RecoverConfig, plan: Plan, adapter) -> list[Phase]:
        return [Phase("recover", config)]

    def adapter_allowed(self, config: RecoverConfig) -> bool:
        return True
