"""Runs launched on several processes (`accelerate launch`, `torchrun`): who writes, who waits.

Every process runs the stages (distillation needs them all); only the main process writes
checkpoints, caches and reports, and the others read what it wrote once it is complete.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """This process's place in the launch (a single process when not launched distributed)."""
    return PartialState(cpu=not torch.cuda.is_available())
