"""LiT's hybrid distillation: the task's own loss plus matching the teacher's prediction.

    L = ||pred_S - target||^2 + lambda_1 ||pred_S - pred_T||^2 (+ lambda_2 ||var_S - var_T||^2)

`target` is the noise (or the velocity for flow-matching teachers) the calibration batch was
noised with. Learned-variance models (DiT/PixArt with 2C output channels) also match the
variance channels, read from the full model output by a forward hook.
"""

from __future__ import annotations

import torch

from ...train.distill import OutputFeatureObjective


class _RawOutput:
    """Keeps the first tensor a model's forward returns (every output channel)."""

    def __init__(self, model):
        self.value = None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        self.value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


class HybridObjective(OutputFeatureObjective):
    def __init__(self, adapter, layer_map, feature_weight: float, output_weight: float, variance_weight: float):
        super().__init__(adapter, layer_map, feature_weight)
        self.output_weight, self.variance_weight = output_weight, variance_weight

    def describe(self):
        return f"hybrid task+{self.output_weight}*output+{self.variance_weight}*variance {super().describe()}"

    def attach(self, teacher, student):
        super().attach(teacher, student)
        self.raw_t, self.raw_s = _RawOutput(teacher), _RawOutput(student)

    def loss(self, step, batch, teacher, student):
        pred, out_loss = self.predictions(batch, teacher, student)
        loss = torch.mean((pred - batch.target) ** 2) + self.output_weight * out_loss
        c = pred.shape[1]
        if self.variance_weight > 0 and self.raw_s.value.shape[1] > c:
            loss = loss + self.variance_weight * torch.mean((self.raw_s.value[:, c:] - self.raw_t.value[:, c:]) ** 2)
        return loss + self.feature_loss(), out_loss

    def close(self):
        super().close()
        self.raw_t.handle.remove()
        self.raw_s.handle.remove()


class _AttentionOutputs:
    """The attention output A of each converted attention: its output projection's input, or the
    attention's own output where the block projects it (Flux single-stream blocks)."""

    def __init__(self, model, paths: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        names = dict(model.named_modules())
        self.handles = []
        for p in paths:
            projection = names.get(f"{p}.to_out.0")
            self.handles.append(projection.register_forward_pre_hook(self._before(p)) if projection is not None
                                else names[p].register_forward_hook(self._after(p)))

    def _before(self, path):
        def hook(_module, args):
            self.values[path] = args[0]
        return hook

    def _after(self, path):
        def hook(_module, _args, output):
            self.values[path] = output
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


class CLEARObjective(OutputFeatureObjective):
    """L = ||pred_S - target||^2 + output_weight ||pred_S - pred_T||^2
           + attention_weight * mean over converted layers ||A_S - A_T||^2."""

    def __init__(self, adapter, paths: list[str], output_weight: float, attention_weight: float):
        super().__init__(adapter, [], 0.0)
        self.paths, self.output_weight, self.attention_weight = paths, output_weight, attention_weight

    def describe(self):
        return f"clear task+{self.output_weight}*output+{self.attention_weight}*attention {self.paths}"

    def attach(self, teacher, student):
        self.a_t, self.a_s = _AttentionOutputs(teacher, self.paths), _AttentionOutputs(student, self.paths)

    def loss(self, step, batch, teacher, student):
        pred, out_loss = self.predictions(batch, teacher, student)
        attn = torch.stack([torch.mean((self.a_s.values[p] - self.a_t.values[p]) ** 2) for p in self.paths]).mean()
        loss = torch.mean((pred - batch.target) ** 2) + self.output_weight * out_loss + self.attention_weight * attn
        return loss, out_loss

    def close(self):
        self.a_t.close()
        self.a_s.close()
