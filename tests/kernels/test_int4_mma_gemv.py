"""The MMA kernels' inline asm is only right in one register layout; this checks, without a GPU, that Triton
gives it that layout for every config the autotuner or the sweep can pick.

Each `pack=4` inline asm of kernels/int4_mma_gemv.py takes a thread's 4 packed elements as words
4c..4c+3 of one row and block (the A registers of its MMAs, the registers t of its C fragment). That
holds only when the [BLOCK_N / 2, 128] tile is laid out with sizePerThread [1, 4], 32 lanes along the 128
words, order [1, 0]. kernels/int4_mma_batch.py needs the same of its [BPS * BLOCK_N / 2, 16] tiles with 8
lanes along the rows and 4 along the words (its MMA's lane (g, c) = rows g, g + 8 and B column g). Triton
chooses layouts itself: a kernel whose loop structure stopped the load's layout from reaching the asm got
[1, 1], computed garbage and faulted on misaligned pair loads on the H100 (session 11: the persistent
variant). The interpreter cannot see this, so the check compiles for sm_90 (Triton ships ptxas; no GPU
needed) in a subprocess without TRITON_INTERPRET, and reads the layouts off the TTGIR. For the batch kernel
it also reads the PTX: a lane's 4 zero points must be 4 registers (session 12: Triton had computed a pure asm
with operands constant along the lane once and given all 4 elements its last result).
"""

from __future__ import annotations

import json

import pytest

# compiles the kernel for sm_90a per case and prints, per case, the layouts of its pack=4 asm results
_COMPILE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib

def layouts(ttgir):
    alias = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<\{.*?\}>)", ttgir, re.M))
    found = []
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" in line and "packed_element = 4" in line:
            result = line.rsplit("->", 1)[1]
            found += [alias.get(a, a) for a in re.findall(r"tensor<[^,>]*, (#\w+)>", result)]
    return found

def zero_point_operands(ptx):
    # the batch kernel's step asm reads z_t of its 4 elements as `sub.f32 e<t>, <-SCALE>, <z_t>`
    return re.findall(r"sub\.f32 e[0-3], 0f[0-9A-F]{8}, (%r\d+);", ptx)

out = []
for case in json.loads(sys.stdin.read()):
    kernel = getattr(importlib.import_module(case["module"]), case["kernel"])
    x = "*fp16" if case["f16"] else "*bf16"
    ptrs = dict(x_ptr=x, y_ptr=x, bias_ptr=x, q_ptr="*i32", zero_ptr="*fp32", s0_ptr="*fp32", chan_ptr="*fp16",
                scale_ptr=case["slab"], chan_idx_ptr="*i32", scale_idx_ptr="*i32", ws_ptr="*fp32", cnt_ptr="*i32",
                h_ptr=x, g_ptr=x, xg_ptr=x, eps="fp32", sq_in_ptr="*fp32", sq_out_ptr="*fp32", alpha_ptr=case["slab"],
                beta_ptr=case["slab"], alpha_idx_ptr="*i32")
    const = dict(MODE=case["mode"], GROUP_SIZE=case["group_size"], HAS_BIAS=False, FAST=True, F16=case["f16"],
                 PDL=True, S_PAIR=case["s_pair"], EVEN_K=True, SILU=case["silu"],
                 **{"NORM_IN": False, "ACCUM": False, "NORM_OUT": False, "NORM_CHUNK": 4096, "SQ_IN": False,
                    "SQ_OUT": False, **case["meta"]})
    const = {n: v for n, v in const.items() if n in kernel.arg_names}
    sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in kernel.arg_names}
    # as a launch on the 7B shapes specializes them: pointers and sizes divisible by 16, the slab's N stride 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n not in const and n not in ("stride_sn", "stride_an", "stride_bn", "eps")}
    opts = dict(num_warps=case["num_warps"], num_stages=1, **({"maxnreg": case["maxnreg"]} if case["maxnreg"] else {}))
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 64), options=opts)
    out.append(dict(layouts=layouts(c.asm["ttgir"]), zeros=zero_point_operands(c.asm["ptx"])))
print(json.dumps(out))
"""

GEMV, BATCH = "scaleserve.kernels.int4_mma_gemv", "scaleserve.kernels.int4_mma_batch"
ALPHA = "scaleserve.kernels.int4_mma_alpha"
# by kernel: the GEMVs' [BLOCK_N / 2, 128] word tiles, the batch kernels' [BPS * BLOCK_N / 2, 16] ones
WANTED = {"_mma_gemv_kernel": "sizePerThread = [1, 4], threadsPerWarp = [1, 32]",
          "_mma_alpha_kernel": "sizePerThread = [1, 4], threadsPerWarp = [1, 32]",
          "_mma_batch_kernel": "sizePerThread = [1, 4], threadsPerWarp = [8, 4]",
          "_mma_batch_alpha_kernel": "sizePerThread = [1, 4], threadsPerWarp = [8, 4]"}


def _case(module, kernel, cfg, mode=2, group_size=128, f16=False, slab="*fp16", s_pair=True, silu=False, **meta):
    return dict(module=module, kernel=kernel, mode=mode, group_size=group_size, f16=f16, slab=slab, s_pair=s_pair,
                silu=silu, meta={**cfg.kwargs, **meta}, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)


def _cases():
    from scaleserve.kernels.int4_mma_batch import MMA_BATCH_CANDIDATE_CONFIGS, MMA_BATCH_CONFIGS, _scales_asm
    from scaleserve.kernels.int4_mma_alpha import BATCH_CONFIGS as alpha_batch_configs
    from scaleserve.kernels.int4_mma_alpha import CONFIGS as alpha_configs_list
    from scaleserve.kernels.int4_mma_alpha import batch_step_asm, step_asm
    from scaleserve.kernels.int4_mma_gemv import MMA_CANDIDATE_CONFIGS, MMA_GEMV_CONFIGS

    def alpha_configs():
        return alpha_configs_list

    def gemv(cfg, **kw):
        return _case(GEMV, "_mma_gemv_kernel", cfg, **kw)

    def batch(cfg, mb2=False, slab="*fp16", s_pair=True, **kw):
        s_asm = _scales_asm({"*fp16": "f16", "*bf16": "bf16", "*fp32": "f32"}[slab], s_pair)
        return _case(BATCH, "_mma_batch_kernel", cfg, MB2=mb2, S_ASM=s_asm, slab=slab, s_pair=s_pair, **kw)

    def alpha(cfg, bits=4, has_zeros=True, pairs=True, f16=False, **kw):
        return _case(ALPHA, "_mma_alpha_kernel", cfg, mode=3, s_pair=False, BITS=bits, HAS_ZEROS=has_zeros,
                     PAIRS=pairs, f16=f16, STEP_ASM=step_asm(f16, bits), **kw)

    def batch_alpha(cfg, mb2=False, bits=4, has_zeros=True, f16=False, slab="*fp16", pairs=True, fold=False, **kw):
        pair_asm = _scales_asm({"*fp16": "f16", "*bf16": "bf16", "*fp32": "f32"}[slab], True)
        return _case(ALPHA, "_mma_batch_alpha_kernel", cfg, mode=3, s_pair=False, MB2=mb2, BITS=bits,
                     HAS_ZEROS=has_zeros, f16=f16, slab=slab, STEP_ASM=batch_step_asm(f16, bits, fold), PAIRS=pairs,
                     A_ASM=pair_asm, S_ASM=pair_asm, **kw)

    first = MMA_GEMV_CONFIGS[0]
    b0 = MMA_BATCH_CONFIGS[0]
    return ([gemv(c) for c in MMA_GEMV_CONFIGS + MMA_CANDIDATE_CONFIGS]
            + [gemv(first, mode=1, f16=True, slab="*fp32"), gemv(first, group_size=-1, slab="*bf16", s_pair=False),
               gemv(MMA_GEMV_CONFIGS[-1], mode=1, group_size=-1)]
            # the SiLU-gated projection (rows N / 2 apart: the tables' two-load asm)
            + [gemv(c, s_pair=False, silu=True) for c in MMA_GEMV_CONFIGS[:3]]
            + [gemv(first, mode=1, group_size=-1, slab="*bf16", s_pair=False, silu=True)]
            # the RMSNorm epilogues: a projection after a norm (its rsqrt in the prologue), one before a norm
            + [gemv(MMA_GEMV_CONFIGS[2], NORM_IN=True), gemv(MMA_GEMV_CONFIGS[6], ACCUM=True, NORM_OUT=True),
               gemv(first, s_pair=False, silu=True, NORM_IN=True)]
            # the same with the norm's sums of squares passed from the projection into the stream to the one after
            + [gemv(MMA_GEMV_CONFIGS[2], NORM_IN=True, SQ_IN=True, NORM_CHUNK=256),
               gemv(MMA_GEMV_CONFIGS[6], ACCUM=True, NORM_OUT=True, SQ_OUT=True)]
            + [batch(c, mb2=bool(i % 2)) for i, c in enumerate(MMA_BATCH_CONFIGS + MMA_BATCH_CANDIDATE_CONFIGS)]
            + [batch(b0, mode=1, f16=True), batch(b0, group_size=-1, slab="*bf16", s_pair=False, mb2=True),
               batch(MMA_BATCH_CONFIGS[-1], mode=1, group_size=-1, slab="*fp32")]
            # the AlphaTuning rows' GEMV: every config it takes, then 3 bits / fp16 / a bcq base / f32 tables
            + [alpha(c) for c in alpha_configs()]
            + [alpha(first, bits=3, f16=True, slab="*fp32"), alpha(MMA_GEMV_CONFIGS[6], has_zeros=False, group_size=-1),
               alpha(first, bits=2, slab="*bf16"), alpha(first, pairs=False, f16=True)]
            # the AlphaTuning batch kernel: its configs (two chains where the batch kernel's prune lets them), then
            # 3 bits / fp16 / a bcq base / per-channel
            + [batch_alpha(c, mb2=bool(i % 2) and c.kwargs["BPS"] <= 2) for i, c in enumerate(alpha_batch_configs)]
            + [batch_alpha(b0, bits=3, f16=True, slab="*fp32"), batch_alpha(b0, has_zeros=False, group_size=-1),
               batch_alpha(b0, bits=2, mb2=True, slab="*bf16"), batch_alpha(b0, pairs=False)]
            # the batch kernel with K_j folded into the plane operands (FOLD_PLANE_SCALES)
            + [batch_alpha(b0, fold=True), batch_alpha(b0, mb2=True, f16=True, bits=3, fold=True)])


@pytest.mark.timeout(600)
def test_mma_asm_gets_its_layout(offline_compile):
    cases = _cases()
    found = offline_compile(_COMPILE, cases)
    for case, got in zip(cases, found):
        layouts = got["layouts"]
        assert len(layouts) >= 2, (case, layouts)  # the step and its tables, at least
        wrong = [lay for lay in layouts if WANTED[case["kernel"]] not in lay or "order = [1, 0]" not in lay]
        assert not wrong, f"{case}: pack=4 asm in {wrong}"
        if case["kernel"] == "_mma_batch_kernel":
            # a lane's 4 elements stand for 2 rows: 4 registers (a pure asm with operands constant along the
            # words was once computed once and its last result handed to all 4 elements: rows0 got rows1's z)
            zeros = got["zeros"]
            assert zeros and len(zeros) % 4 == 0, (case, zeros)
            same = [zeros[j:j + 4] for j in range(0, len(zeros), 4) if len(set(zeros[j:j + 4])) < 4]
            assert not same, f"{case}: one register for a lane's 4 zero points: {same}"


def test_shipped_device_pins_are_configs_of_the_autotune_list():
    """Each kernels/pins/<device>.json (bench/tune_decode.py's output) parses, names (N, K, mode, group size) keys the
    kernel takes, and pins only configs of MMA_GEMV_CONFIGS: the ones the GPU tests and the layout check cover."""
    from scaleserve.kernels.int4_mma_gemv import DEVICE_PINS_DIR, GROUP_SIZES, PIN_CONFIGS, device_pins

    files = sorted(DEVICE_PINS_DIR.glob("*.json"))
    assert files, "no device pins shipped"
    for f in files:
        pins = device_pins(f.stem)
        assert pins, f
        for key, cfg in pins.items():
            N, K, mode, gs, *silu = key
            assert N % 2 == 0 and K % 8 == 0 and mode in (1, 2) and gs in GROUP_SIZES, (f.name, key)
            assert silu in ([], [1]), (f.name, key)
            assert cfg in PIN_CONFIGS, (f.name, cfg)


def test_device_pins_come_below_pinned_and_only_for_their_device(tmp_path, monkeypatch):
    """kernels/pins/<device name>.json by the name's alphanumerics; PINNED wins over it; an unknown device, a CPU
    tensor or USE_DEVICE_PINS off has no device pins (the autotuner, or the interpreter's config)."""
    import torch

    from scaleserve.kernels import int4_mma_gemv as mg

    cfg, silu_cfg = mg.PIN_CONFIGS[1], mg.PIN_CONFIGS[2]
    pins = {"64,128,2,128": cfg, "64,128,2,128,1": silu_cfg}
    (tmp_path / "Some_GPU_80GB.json").write_text(json.dumps({"pins": pins}))
    monkeypatch.setattr(mg, "DEVICE_PINS_DIR", tmp_path)
    mg.device_pins.cache_clear()
    try:
        assert mg.device_pins("Some GPU 80GB") == {(64, 128, 2, 128): cfg, (64, 128, 2, 128, 1): silu_cfg}
        assert mg.device_pins("Other GPU") == {}
        monkeypatch.setattr(mg, "_device_name", lambda index: "Some GPU 80GB")

        class FakeCuda:
            is_cuda, device = True, torch.device("cuda", 0)

        assert mg.current_pin(FakeCuda(), (64, 128, 2, 128)) == cfg
        assert mg.current_pin(FakeCuda(), (64, 128, 1, 128)) is None
        assert mg.current_pin(FakeCuda(), mg.pin_key(64, 128, 2, 128, silu=True)) == silu_cfg  # (the SiLU epilogue's own)
        monkeypatch.setattr(mg, "USE_DEVICE_PINS", False)  # (benches: the autotuner instead)
        assert mg.current_pin(FakeCuda(), (64, 128, 2, 128)) is None
        monkeypatch.setattr(mg, "USE_DEVICE_PINS", True)
        monkeypatch.setitem(mg.PINNED, (64, 128, 2, 128), mg.PIN_CONFIGS[0])
        assert mg.current_pin(FakeCuda(), (64, 128, 2, 128)) == mg.PIN_CONFIGS[0]
        assert mg.current_pin(torch.zeros(1), (64, 128, 2, 128)) == mg.PIN_CONFIGS[0]  # (PINNED applies everywhere)
        monkeypatch.delitem(mg.PINNED, (64, 128, 2, 128))
        assert mg.current_pin(torch.zeros(1), (64, 128, 2, 128)) is None
    finally:
        mg.device_pins.cache_clear()
