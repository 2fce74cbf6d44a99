"""Runs launched on several processes (`accelerate launch`, `torchrun`): who writes, who waits.

Every process runs the stages (distillation needs them all); only the main process writes
checkpoints, caches and reports, and the others read what it wrote once it is complete.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """This process's place in the launch (a single process when not launched distributed)."""
    return PartialState(cpu=not torch.cuda.is_available())


def process_local(path: Path) -> Path:
    """`path` made this process's own: scratch space (e.g. streamed analysis shards) that every
    process writes and deletes for itself."""
    return path.with_name(f"{path.name}-process{process_state().process_index}")
