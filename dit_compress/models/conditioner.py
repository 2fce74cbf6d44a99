"""A learned class-label conditioner that stands in for a text encoder (bundled SD3-family teacher).

It maps a digit label to the inputs a text-conditioned DiT expects: a few prompt-token
embeddings and a pooled vector. Label `num_classes` is the empty prompt, for guidance."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .load_weights import load_weights_


class LabelConditioner(nn.Module):
    def __init__(self, num_classes: int, tokens: int, token_dim: int, pooled_dim: int):
        super().__init__()
        self.config = {"num_classes": num_classes, "tokens": tokens, "token_dim": token_dim, "pooled_dim": pooled_dim}
        self.num_classes = num_classes
        self.token_table = nn.Embedding(num_classes + 1, tokens * token_dim)  # +1: the null label
        self.pooled_table = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.token_table.weight, std=1.0)
        nn.init.normal_(self.pooled_table.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        return {"encoder_hidden_states": self.token_table(labels).view(-1, c["tokens"], c["token_dim"]),
                "pooled_projections": self.pooled_table(labels)}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "LabelConditioner":
        try:
            config = json.loads((Path(folder) / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read conditioner config in {folder}: {e}") from None
        model = cls(**config)
        load_weights_(model, Path(folder) / "model.safetensors", f"conditioner config {folder}/config.json")
        return model.eval().requires_grad_(False)
