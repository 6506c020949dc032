"""`scaleserve` command line: quantize, generate, serve, train, adapter {identity,inspect,push}.

Each subcommand parses its flags here and calls the module that does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _model_dir(arg: str | None, data_dir: Path | None = None) -> Path:
    """MODEL_DIR, or the embedded default (converted and cached on first use)."""
    if arg:
        return Path(arg)
    from .loader import ensure_default_model
    from .settings import Settings

    return ensure_default_model(data_dir or Settings().data_dir)


def cmd_quantize(args) -> int:
    from scaleserve.kernels.quant import QuantConfig

    from .loader import quantize_checkpoint

    q = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, bcq_iters=args.bcq_iters)
    meta = quantize_checkpoint(args.src, args.out, q, quantize_lm_head=args.quantize_lm_head)
    sizes = meta["sizes"]
    print(f"wrote {args.out}  ({q.method}, {q.bits}-bit, group {q.group_size})")
    print("SQNR vs bf16 (dB), mean per layer type: " +
          ", ".join(f"{k} {v:.2f}" for k, v in meta["sqnr_db"].items()))
    print(f"linear weights: {sizes['linear_bf16_bytes'] / 2**20:.1f} MiB bf16 -> "
          f"{sizes['linear_int4_bytes'] / 2**20:.1f} MiB int4; whole file {sizes['total_bytes'] / 2**20:.1f} MiB")
    print(f"base fingerprint: {meta['base_fingerprint']}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from scaleserve.adapters.format import load_adapter

    from .generate import generate
    from .loader import load_model

    for ok, msg in ((args.max_new_tokens >= 0, "--max-new-tokens must be at least 0"),
                    (args.temperature >= 0, "--temperature must be at least 0 (0 = greedy)"),
                    (0 < args.top_p <= 1, "--top-p must be in (0, 1]"), (args.top_k >= 0, "--top-k must be at least 0")):
        if not ok:
            raise ValueError(msg)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(_model_dir(args.model_dir), device=device)
    adapter = load_adapter(args.adapter) if args.adapter else None
    (res,) = generate(lm, args.prompt, adapter, chat=args.chat, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    print(res.text)
    return 0


def cmd_serve(args) -> int:
    from .main import serve

    return serve(args)


def cmd_train(args) -> int:
    from scaleserve.adapters.train import train_cli

    return train_cli(args)


def cmd_adapter(args) -> int:
    from scaleserve.adapters import format as fmt

    if args.adapter_cmd == "identity":
        from .loader import load_model

        lm = load_model(_model_dir(args.model_dir))
        a = fmt.identity_adapter(lm, args.kind, per_channel=args.per_channel, name=Path(args.out).stem)
        a.save(args.out)
        print(f"wrote {args.out}: {args.kind}{' per-channel' if args.per_channel else ''} identity adapter, "
              f"{a.nbytes / 2**20:.2f} MiB")
        return 0
    if args.adapter_cmd == "inspect":
        print(json.dumps(fmt.describe(fmt.load_adapter(args.file)), indent=2))
        return 0
    if args.adapter_cmd == "push":
        from scaleserve.adapters.client import push

        print(json.dumps(push(args.file, args.name, args.server, args.api_key), indent=2))
        return 0
    raise AssertionError(args.adapter_cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaleserve", description="multi-tenant int4 LLM server")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="convert a HF checkpoint dir or GGUF file into scaleserve int4")
    q.add_argument("src", help="Hugging Face checkpoint directory (safetensors) or .gguf file")
    q.add_argument("out", help="output directory")
    q.add_argument("--method", choices=["rtn", "bcq"], default="rtn")
    q.add_argument("--bits", type=int, choices=[3, 4], default=4)
    q.add_argument("--group-size", type=int, default=128, help="-1 = per channel, or 32/64/128")
    q.add_argument("--bcq-iters", type=int, default=15, help="alternating least-squares rounds (bcq)")
    q.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (default: bf16)")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("model_dir", nargs="?", help="scaleserve model directory (default: embedded SmolLM2)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--adapter", help="adapter .safetensors file")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    s.add_argument("--model", help="scaleserve model directory (default: embedded SmolLM2)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--adapters", help="directory of adapter files to load at start (named by file stem)")
    s.add_argument("--adapter-store", help="file:///dir or s3://bucket/prefix")
    s.add_argument("--served-model-name")
    s.add_argument("--max-num-seqs", type=int)
    s.add_argument("--max-waiting", type=int)
    s.add_argument("--max-model-len", type=int)
    s.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step (chunked prefill)")
    s.add_argument("--kv-cache-memory-fraction", type=float, help="share of free GPU memory for the KV cache")
    s.add_argument("--kv-cache-max-blocks", type=int)
    s.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse computed prompt blocks across requests of one tenant and adapter (default off)")
    s.add_argument("--drain-grace-s", type=float, help="how long SIGTERM waits for in-flight requests")
    s.add_argument("--gpu-adapter-slots", type=int, help="per-channel adapters resident on the device")
    s.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                   help="programmatic dependent launch of the kernels on Hopper+ (default on)")
    s.add_argument("--tune-decode-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="after warm-up, pick the batch-1 GEMV configs by timing the decode graph (kept in "
                        "--data-dir/kernel-pins/ for later starts; default off)")
    s.add_argument("--gpu-step-timing", action=argparse.BooleanOptionalAction, default=None,
                   help="time each engine step's forward on the GPU into scaleserve_engine_gpu_step_seconds "
                        "(default off)")
    s.add_argument("--api-keys-file")
    s.add_argument("--data-dir")
    s.add_argument("--log-level")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="fine-tune PEQA scales or AlphaTuning alphas into an adapter")
    t.add_argument("model_dir", nargs="?", help="scaleserve model directory (default: embedded SmolLM2)")
    t.add_argument("--data", required=True, help="JSONL: {text} | {prompt, completion} | {messages}")
    t.add_argument("--eval-data", help="JSONL for evaluation (default: split off --eval-split of --data)")
    t.add_argument("--eval-split", type=float, default=0.1)
    t.add_argument("--kind", choices=["peqa", "alphatuning"], required=True)
    t.add_argument("--granularity", choices=["channel", "group"], default="channel")
    t.add_argument("--out", required=True, help="adapter .safetensors to write")
    t.add_argument("--name", help="adapter name (default: --out's stem)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-seq-len", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", help="continue from this adapter file")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--push", metavar="URL", help="upload the result to this server when done")
    t.add_argument("--api-key")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("adapter", help="adapter tools")
    asub = a.add_subparsers(dest="adapter_cmd", required=True)
    ai = asub.add_parser("identity", help="write the adapter that reproduces the base exactly")
    ai.add_argument("model_dir")
    ai.add_argument("out")
    ai.add_argument("--kind", choices=["peqa", "alphatuning"], required=True)
    ai.add_argument("--per-channel", action="store_true", help="PEQA [N] multipliers instead of [N, G] scales")
    an = asub.add_parser("inspect", help="print kind, base fingerprint, modules and size")
    an.add_argument("file")
    ap = asub.add_parser("push", help="upload an adapter to a running server")
    ap.add_argument("file")
    ap.add_argument("--name", required=True)
    ap.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    ap.add_argument("--api-key")
    a.set_defaults(func=cmd_adapter)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"scaleserve {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
