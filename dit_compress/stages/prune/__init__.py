from ...core.stage import register_stage
from .stage import PruneStage

register_stage(PruneStage)
