"""The bundled teacher and classifier are real, trained models that meet their targets."""

from __future__ import annotations

import json

import pytest
import torch

from dit_compress.data.digits import load_digits_split
from dit_compress.models.classifier import DigitClassifier
from dit_compress.models.load import ZOO_DIR, load_transformer, zoo_names
from dit_compress.sampling import NoiseSchedule, sample_batched
from dit_compress.train.zoo import TEACHERS


def test_classifier_heldout_accuracy():
    clf = DigitClassifier.load(ZOO_DIR / "digits-classifier")
    held = load_digits_split("heldout")
    with torch.no_grad():
        acc = (clf(held.images).argmax(1) == held.labels).float().mean().item()
    assert acc >= 0.96, f"classifier held-out accuracy {acc:.3f} < 0.96"


@pytest.mark.parametrize("name", [n for n in zoo_names() if n in TEACHERS])
def test_teacher_guided_samples_are_the_requested_digits(name):
    teacher = load_transformer(f"zoo:{name}")
    card = json.loads((ZOO_DIR / name / "ditc_zoo.json").read_text())
    assert teacher.card["classifier"] == "digits-classifier" and teacher.adapter.num_classes == 10
    g = torch.Generator().manual_seed(99)
    labels = torch.arange(10).repeat(10)
    noise = torch.randn(100, *teacher.adapter.latent_shape(), generator=g)
    x = sample_batched(teacher.model, teacher.adapter, NoiseSchedule(teacher.scheduler_config),
                       {"class_labels": labels}, noise, card["sampling"]["steps"], card["sampling"]["guidance_scale"])
    clf = DigitClassifier.load(ZOO_DIR / "digits-classifier")
    with torch.no_grad():
        acc = (clf(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    assert acc >= 0.9, f"guided accuracy {acc:.2f} on 100 samples"
