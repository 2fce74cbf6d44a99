from ...core.stage import register_stage
from .stage import MoBStage

register_stage(MoBStage)
