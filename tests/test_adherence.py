"""The digit-scene adherence evaluator: perfect on real renders, catching each wrong attribute."""

import dataclasses
import json

import numpy as np
import pytest

from dit_compress.data.scenes import (BACKGROUNDS, COLOURS, HELDOUT_PROMPTS, POSITIONS, SIZES, all_scenes,
                                      parse_caption, render_captions, render_scenes)
from dit_compress.evaluate.adherence import attribute_hits, evaluate_adherence, scene_psnr_ssim
from dit_compress.models.load import ZOO_DIR
from dit_compress.models.scene_classifier import SceneClassifier

CLASSIFIER = ZOO_DIR / "scenes-classifier"


@pytest.fixture(scope="module")
def classifier():
    return SceneClassifier.load(CLASSIFIER)


def test_bundled_classifier_reads_heldout_digits(classifier):
    assert json.loads((CLASSIFIER / "config.json").read_text())["heldout_accuracy"] >= 0.98
    assert (CLASSIFIER / "model.safetensors").stat().st_size < 1_000_000
    scenes = all_scenes()[::2]
    digits, features = classifier.predict(render_scenes(scenes, "heldout", seed=7))
    assert (digits == np.array([s.digit for s in scenes])).mean() >= 0.98
    assert features.shape == (len(scenes), 64)


def test_real_renders_of_the_heldout_prompts_adhere(classifier):
    report = evaluate_adherence(render_captions, seeds=(0, 1), classifier=classifier, reference=render_captions,
                                real_draws=4)
    for attribute in ("size", "colour", "position", "background"):
        assert report[attribute] == {"mean": 1.0, "stderr": 0.0}
    assert report["digit"]["mean"] >= 0.98 and report["all"]["mean"] >= 0.98
    assert report["all_novel_pairs"]["mean"] >= 0.95 and report["novel_pair_prompts"] == 20
    # Same seed, same renders: the reference is matched exactly.
    assert report["psnr"]["mean"] == 100.0 and report["ssim"]["mean"] == pytest.approx(1.0)
    assert len(report["per_seed"]) == 2 and report["fd"]["stderr"] is not None


def _next(values, value):
    values = list(values)
    return values[(values.index(value) + 1) % len(values)]


WRONG = {
    "digit": lambda s: dataclasses.replace(s, digit=(s.digit + 1) % 10),
    "size": lambda s: dataclasses.replace(s, size=_next(SIZES, s.size)),
    "colour": lambda s: dataclasses.replace(s, colour=_next(COLOURS, s.colour)),
    "position": lambda s: dataclasses.replace(s, position=_next(POSITIONS, s.position)),
    "background": lambda s: dataclasses.replace(s, background=_next(BACKGROUNDS, s.background)),
}


@pytest.mark.parametrize("attribute", WRONG)
def test_one_wrong_attribute_is_caught(classifier, attribute):
    scenes = [s for s, _ in HELDOUT_PROMPTS]
    images = render_scenes([WRONG[attribute](s) for s in scenes], "heldout", seed=0)
    hits = attribute_hits(scenes, images, classifier)
    assert hits[attribute].mean() <= 0.02
    assert hits["all"].mean() <= 0.02
    for other in set(WRONG) - {attribute}:
        assert hits[other].mean() >= 0.98, other


def test_fd_separates_collapsed_or_noisy_generations_from_real_ones(classifier):
    # FD compares distributions, not prompts: a shifted digit keeps the marginal, a collapse does not.
    def collapsed(captions, seed):
        return render_scenes([dataclasses.replace(parse_caption(c), digit=1) for c in captions], "heldout", seed)

    def noisy(captions, seed):
        noise = np.random.default_rng(seed).normal(0, 40, (len(captions), 32, 32, 3))
        return np.clip(render_captions(captions, seed) + noise, 0, 255).astype(np.uint8)

    fd = {name: evaluate_adherence(generate, seeds=(0,), classifier=classifier, real_draws=4)["fd"]
          for name, generate in (("real", render_captions), ("collapsed", collapsed), ("noisy", noisy))}
    assert fd["collapsed"]["mean"] > 3 * fd["real"]["mean"] and fd["noisy"]["mean"] > 1.5 * fd["real"]["mean"]
    assert fd["real"]["stderr"] is None  # one seed: no spread to report


def test_psnr_ssim_of_image_batches():
    a = render_captions([c for _, c in HELDOUT_PROMPTS[:8]], seed=0)
    b = render_captions([c for _, c in HELDOUT_PROMPTS[:8]], seed=1)
    assert scene_psnr_ssim(a, a) == (100.0, pytest.approx(1.0))
    psnr, ssim = scene_psnr_ssim(a, b)
    assert psnr < 40 and ssim < 0.99
    assert scene_psnr_ssim(b, a) == pytest.approx((psnr, ssim))


def test_generate_must_return_uint8_scenes(classifier):
    with pytest.raises(ValueError, match="uint8"):
        evaluate_adherence(lambda p, s: render_captions(p, s).astype(np.float32), seeds=(0,), classifier=classifier,
                           real_draws=1)


def test_pixel_noise_does_not_break_the_measurements(classifier):
    # Isolated noisy pixels must not stretch the foreground's bounding box or move its centroid.
    scenes = [s for s, _ in HELDOUT_PROMPTS]
    images = render_scenes(scenes, "heldout", seed=0).astype(np.float64)
    images += np.random.default_rng(0).normal(0, 15, images.shape)
    hits = attribute_hits(scenes, np.clip(images, 0, 255).astype(np.uint8), classifier)
    assert hits["all"].mean() >= 0.95
