"""Width pruning refuses what it cannot do well, before doing it: a family it cannot trace (before
any ratio arithmetic), an FFN left with a handful of channels (naming the layer), a q/k norm across
all heads."""

from __future__ import annotations

import copy
import logging

import pytest
from click.testing import CliRunner

from conftest import save_tiny, tiny_loaded
from dit_compress.cli import main
from dit_compress.errors import RecipeError, UnsupportedModelError
from dit_compress.stages.prune.stage import uniform_width_fractions
from dit_compress.stages.prune.width import check_qk_norms, width_prune_


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_unsupported_family_refused_before_ratio_arithmetic(family, tmp_path):
    teacher = tiny_loaded(family)
    # was a RecipeError quoting "2358600%" of the channels (no FeedForward FFN to share the ratio)
    with pytest.raises(UnsupportedModelError, match=f"not {family}: .*use depth pruning"):
        uniform_width_fractions(teacher.adapter, teacher.model, 0.3)
    save_tiny(family, tmp_path / "m")
    res = CliRunner().invoke(main, ["prune", str(tmp_path / "m"), "--method", "width", "--ratio", "0.3",
                                    "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "error: stage 'prune' does not support" in res.output
    assert "calibration" not in res.output and not (tmp_path / "out" / ".work" / "calibration").exists(), \
        "refused before calibration"


def test_pixart_ffn_floor_refused_with_the_layer_named():
    teacher = tiny_loaded("pixart")
    head, ffn = uniform_width_fractions(teacher.adapter, teacher.model, 0.5)  # 64-channel FFNs, ~1 left
    with pytest.raises(RecipeError, match=r"leaves transformer_blocks\.0\.ff\.net\.0\.proj with 0 of 64 hidden "
                                          r"channels \(minimum 4\); lower prune\.ratio"):
        width_prune_(copy.deepcopy(teacher.model), teacher.adapter, None, head, ffn, "l2")


def test_thin_ffn_is_warned_with_the_layer_named(caplog):
    teacher = tiny_loaded("pixart")
    with caplog.at_level(logging.WARNING, logger="dit_compress"):
        record = width_prune_(copy.deepcopy(teacher.model), teacher.adapter, None, 0.0, 0.9, "l2")
    assert record["shapes"]["transformer_blocks.0.ff.net.0.proj.weight"][0] == 6
    assert "leaves transformer_blocks.0.ff.net.0.proj with 6 of 64 hidden channels (4 FFN(s)" in caplog.text


def test_q_k_norm_across_heads_refused():
    import torch.nn as nn

    teacher = tiny_loaded("sd35")
    attn = teacher.model.transformer_blocks[1].attn
    attn.norm_k = nn.LayerNorm(attn.to_k.out_features)  # what qk_norm="layer_norm_across_heads" builds
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.attn\.norm_k normalises across all heads"):
        check_qk_norms([("attn", attn)], "transformer_blocks.1")
