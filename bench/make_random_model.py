"""A randomly initialised scaleserve int4 model directory of a real model's shapes.

    python bench/make_random_model.py OUT --preset llama2-7b      # 32 layers, 4096 wide, group 128
    python bench/make_random_model.py OUT --preset smollm2-135m   # SmolLM2's shapes, group 32

The builder lives in scaleserve.server.random_model (the GPU tests use it too).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

from scaleserve.server.random_model import PRESETS, main, write_random_model

__all__ = ["PRESETS", "make_random_model"]


def make_random_model(out: str | Path, preset: str = "llama2-7b", seed: int = 0, device: str = "cpu",
                      quantize_lm_head: bool = False) -> Path:
    """Write the model directory OUT (kept if OUT/scaleserve.json exists). Returns OUT."""
    t0 = time.time()
    out = write_random_model(out, preset, seed=seed, device=device, quantize_lm_head=quantize_lm_head)
    print(f"random {preset} model in {out} ({time.time() - t0:.1f} s)", flush=True)
    return out


if __name__ == "__main__":
    main()
