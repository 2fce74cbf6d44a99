from ...core.stage import register_stage
from .stage import MoEStage

register_stage(MoEStage)
