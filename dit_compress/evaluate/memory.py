"""`python -m dit_compress.evaluate.memory CHECKPOINT BATCH`: memory of a model in a fresh process.

Reports the exact bytes of weights and the peak resident-memory increase during one forward
pass, sampled from /proc every 0.2 ms (CPU tensors bypass Python's allocator, so tracemalloc
cannot see them). A fresh process, because the evaluating one holds teacher and student."""

import json
import os
import sys
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0002)


def main() -> None:
    from pathlib import Path

    from ..core.manifest import MANIFEST, load_compressed
    from ..models.load import load_transformer

    source, batch = sys.argv[1], int(sys.argv[2])
    loaded = load_compressed(source) if (Path(source) / MANIFEST).is_file() else load_transformer(source)
    weights = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    x, t, cond = loaded.adapter.example_inputs(batch)
    base = _rss_bytes()
    sampler = _PeakSampler()
    sampler.start()
    with torch.no_grad():
        loaded.adapter.denoise(loaded.model, x, t, cond)
    sampler.running = False
    sampler.join()
    mb = 1024 * 1024
    print(json.dumps({"batch": batch, "weights_mb": round(weights / mb, 2),
                      "forward_peak_increase_mb": round(max(0, sampler.peak - base) / mb, 2),
                      "process_peak_rss_mb": round(sampler.peak / mb, 1)}))


if __name__ == "__main__":
    main()
