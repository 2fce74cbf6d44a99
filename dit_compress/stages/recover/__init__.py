from ...core.stage import register_stage
from .stage import RecoverStage

register_stage(RecoverStage)
