from ...core.stage import register_stage
from .stage import CLEARStage, LiTStage

register_stage(LiTStage)
register_stage(CLEARStage)
