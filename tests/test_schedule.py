"""The one learning-rate schedule reproduces each loop's former hand-written formula."""

import math

import pytest
import torch

from dit_compress.train.schedule import cosine_decay, lr_factor, warmup

STEPS = [0, 1, 7, 49, 50, 51, 123, 250, 499, 500, 640]


def _distill_before(step, steps, warmup_steps):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _zoo_before(step, steps):
    return min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def _finetune_before(step, steps):  # computed in float32 by torch
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item()


@pytest.mark.parametrize("steps,warmup_steps", [(500, 50), (500, 0), (1, 0), (40, 40)])
def test_distillation_schedule_is_unchanged(steps, warmup_steps):
    for step in STEPS:
        assert lr_factor(step, steps, warmup_steps, floor=0.1) == _distill_before(step, steps, warmup_steps)


def test_zoo_teacher_schedule_is_unchanged():
    for step in STEPS:
        assert warmup(step, 200) * cosine_decay(step / 500) == _zoo_before(step, 500)


def test_finetune_schedule_is_unchanged_up_to_float32():
    for step in [s for s in STEPS if s < 500]:
        assert lr_factor(step, 500, floor=0.1) == pytest.approx(_finetune_before(step, 500), rel=1e-6)


def test_shape():
    f = [lr_factor(s, 100, 10, floor=0.2) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 == f[10]
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # decays after the warmup, never rises
    assert f[100] == f[119] == pytest.approx(0.2)  # held at the floor past the last step
