"""Digit scenes: deterministic, compositionally split, captions that parse back, attributes measurable."""

import itertools

import numpy as np
import pytest

from dit_compress.data.scenes import (BACKGROUNDS, COLOURS, HELDOUT_ONLY, HELDOUT_PROMPTS, TEMPLATES, VOCABULARY,
                                      Scene, all_scenes, caption, parse_caption, render_captions, scene_split)
from dit_compress.evaluate.adherence import measure


def test_same_seed_gives_byte_identical_arrays_and_other_seeds_differ():
    a, b = scene_split("train", 64, seed=3), scene_split("train", 64, seed=3)
    assert a.images.dtype == np.uint8 and a.images.shape == (64, 32, 32, 3)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions and a.scenes == b.scenes
    assert scene_split("train", 64, seed=4).images.tobytes() != a.images.tobytes()
    captions = [c for _, c in HELDOUT_PROMPTS[:16]]
    assert render_captions(captions, seed=1).tobytes() == render_captions(captions, seed=1).tobytes()
    assert render_captions(captions, seed=1).tobytes() != render_captions(captions, seed=2).tobytes()


def test_heldout_only_pairings_never_appear_in_training_but_do_in_heldout():
    train = scene_split("train", 3000, seed=0)
    assert not any((s.colour, s.position) in HELDOUT_ONLY for s in train.scenes)
    # Each colour and each position on its own is still seen in training.
    assert {s.colour for s in train.scenes} == set(COLOURS)
    assert {s.position for s in train.scenes} == {p for _, p in HELDOUT_ONLY} | {"centre"}
    held = scene_split("heldout", 600, seed=0)
    assert {(s.colour, s.position) for s in held.scenes} >= HELDOUT_ONLY
    assert sum(s.heldout_only for s, _ in HELDOUT_PROMPTS) == 20


def test_heldout_prompt_set_is_fixed_and_balanced():
    assert len(HELDOUT_PROMPTS) == 100 and len({c for _, c in HELDOUT_PROMPTS}) > 90
    for attribute, count in (("digit", 10), ("size", 50), ("colour", 25), ("position", 20)):
        values = [getattr(s, attribute) for s, _ in HELDOUT_PROMPTS]
        assert set(values.count(v) for v in set(values)) == {count}, attribute


def test_every_caption_parses_back_to_its_scene_and_uses_only_the_vocabulary():
    vocabulary = set(VOCABULARY)
    for scene, template in itertools.product(all_scenes(), range(len(TEMPLATES))):
        text = caption(scene, template)
        assert parse_caption(text) == scene
        assert set(text.split()) <= vocabulary
    assert parse_caption("  A Large  blue three at the centre on a black background") == \
        Scene(3, "large", "blue", "centre", "black")
    with pytest.raises(ValueError):
        parse_caption("a large purple three at the centre on a black background")


def test_palette_pairs_contrast():
    palette = [np.array(c, float) for c in (*COLOURS.values(), *BACKGROUNDS.values())]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)) > 160


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_rendered_attributes_are_measured_exactly(split):
    data = scene_split(split, 1200, seed=0)
    for scene, image in zip(data.scenes, data.images):
        m = measure(image)
        assert (m.size, m.colour, m.position, m.background) == \
            (scene.size, scene.colour, scene.position, scene.background), scene


def test_render_places_the_digit_in_its_box_only():
    scene = Scene(7, "small", "red", "bottom right", "white")
    image = render_captions([caption(scene)], seed=0)[0]
    assert (image[:24] == 255).all() and (image[:, :24] == 255).all()
    assert (image[24:, 24:] != 255).any()
