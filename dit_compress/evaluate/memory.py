"""`python -m dit_compress.evaluate.memory CHECKPOINT BATCH`: peak RSS of load + one forward."""

import json
import resource
import sys

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    from ..core.manifest import MANIFEST, load_compressed
    from ..models.load import load_transformer
    from pathlib import Path

    source, batch = sys.argv[1], int(sys.argv[2])
    before = _rss_mb()
    loaded = load_compressed(source) if (Path(source) / MANIFEST).is_file() else load_transformer(source)
    after_load = _rss_mb()
    x, t, cond = loaded.adapter.example_inputs(batch)
    with torch.no_grad():
        loaded.adapter.denoise(loaded.model, x, t, cond)
    peak = _rss_mb()
    print(json.dumps({"batch": batch, "peak_rss_mb": round(peak, 1), "after_load_mb": round(after_load, 1),
                      "forward_peak_increase_mb": round(peak - after_load, 1),
                      "interpreter_mb": round(before, 1)}))


if __name__ == "__main__":
    main()
