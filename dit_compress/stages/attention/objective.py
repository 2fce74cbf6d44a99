"""LiT's hybrid distillation: the task's own loss plus matching the teacher's prediction.

    L = ||pred_S - target||^2 + lambda_1 ||pred_S - pred_T||^2 (+ lambda_2 ||var_S - var_T||^2)

`target` is the noise (or the velocity for flow-matching teachers) the calibration batch was
noised with. Learned-variance models (DiT/PixArt with 2C output channels) also match the
variance channels, read from the full model output by a capture.
"""

from __future__ import annotations

import torch

from ...probes.capture import Capture, first_tensor
from ...train.distill import OutputFeatureObjective


class HybridObjective(OutputFeatureObjective):
    def __init__(self, adapter, layer_map, feature_weight: float, output_weight: float, variance_weight: float):
        super().__init__(adapter, layer_map, feature_weight)
        self.output_weight, self.variance_weight = output_weight, variance_weight

    def describe(self):
        return f"hybrid task+{self.output_weight}*output+{self.variance_weight}*variance {super().describe()}"

    def attach(self, teacher, student):
        super().attach(teacher, student)
        # every output channel of the model, variance included
        self.raw_t = Capture({"model": teacher}, transform=first_tensor)
        self.raw_s = Capture({"model": student}, transform=first_tensor)

    def loss(self, step, batch, teacher, student):
        pred, out_loss = self.predictions(batch, teacher, student)
        loss = torch.mean((pred - batch.target) ** 2) + self.output_weight * out_loss
        c = pred.shape[1]
        raw_s, raw_t = self.raw_s.values["model"], self.raw_t.values["model"]
        if self.variance_weight > 0 and raw_s.shape[1] > c:
            loss = loss + self.variance_weight * torch.mean((raw_s[:, c:] - raw_t[:, c:]) ** 2)
        return loss + self.feature_loss(), out_loss

    def close(self):
        super().close()
        self.raw_t.close()
        self.raw_s.close()


def _attention_outputs(model, layout, paths: list[str]) -> Capture:
    """The attention output A of each attention at `paths`: its output projection's input, or the
    attention's own output where the block projects it (Flux single-stream blocks)."""
    points = {p: layout.attention(p).output_projection for p in paths}
    return Capture({p: model.get_submodule(out or p) for p, out in points.items()},
                   at={p: "input" if out else "output" for p, out in points.items()})


class CLEARObjective(OutputFeatureObjective):
    """L = ||pred_S - target||^2 + output_weight ||pred_S - pred_T||^2
           + attention_weight * mean over converted layers ||A_S - A_T||^2."""

    def __init__(self, adapter, paths: list[str], output_weight: float, attention_weight: float):
        super().__init__(adapter, [], 0.0)
        self.paths, self.output_weight, self.attention_weight = paths, output_weight, attention_weight

    def describe(self):
        return f"clear task+{self.output_weight}*output+{self.attention_weight}*attention {self.paths}"

    def attach(self, teacher, student):
        layout = self.adapter.layout(teacher)  # names the same modules in the student
        self.a_t = _attention_outputs(teacher, layout, self.paths)
        self.a_s = _attention_outputs(student, layout, self.paths)

    def loss(self, step, batch, teacher, student):
        pred, out_loss = self.predictions(batch, teacher, student)
        attn = torch.stack([torch.mean((self.a_s.values[p] - self.a_t.values[p]) ** 2) for p in self.paths]).mean()
        loss = torch.mean((pred - batch.target) ** 2) + self.output_weight * out_loss + self.attention_weight * attn
        return loss, out_loss

    def close(self):
        self.a_t.close()
        self.a_s.close()
