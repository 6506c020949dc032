"""int4_matmul / adapted_linear (kernels.int4_matmul) against adapted_linear_ref: every path it
dispatches to (the tensor-core tile, the CUDA-core GEMV, the MMA GEMV of int4_mma_gemv and the fold GEMM
of int4_gemm), each forced by its config.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 on small odd shapes (N, K not multiples
of the tiles, ragged last group, odd K) with a small tile config; with CUDA the same cases run
natively (fixed configs), plus Llama-2-7B shapes through the autotuner.
Every case draws fresh random inputs and poisons the output with NaN before the launch.
"""

import itertools
import math
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from scaleserve.kernels import int4_matmul as im  # noqa: E402
from scaleserve.kernels.fused import silu_mul  # noqa: E402
from scaleserve.kernels.int4_matmul import int4_matmul, repack  # noqa: E402
from scaleserve.kernels.linear import MODE_ALPHA, MODE_CHANNEL, MODE_GROUP, QuantLinear, RowAdapters  # noqa: E402
from scaleserve.kernels.quant import pack_int4, rtn_to_alphas  # noqa: E402
from scaleserve.kernels.reference import adapted_linear_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# error bounds relative to max|ref|: elementwise and in Frobenius norm; outputs round to the dtype
TOL = {
    torch.float32: dict(elem=1e-4, norm=1e-5),
    torch.float16: dict(elem=3e-3, norm=1e-3),
    torch.bfloat16: dict(elem=2e-2, norm=8e-3),
}
DISTS = ("distinct", "uniform", "zipf", "identical", "base-only")
SLOTS = 5  # per slab table, slot 0 = base
_seed = [4321]


def _gen() -> torch.Generator:
    _seed[0] += 1
    return torch.Generator().manual_seed(_seed[0])


def _tasks(mode: int, bcq: bool) -> list[tuple[int, int, int]]:
    """(chan, scale, alpha) slot triples a row may carry in this mode; the first is the base."""
    if bcq:
        return [(0, 0, a) for a in range(SLOTS)] + [(1, 2, a) for a in range(1, SLOTS)]
    base = [(0, 0, -1)]
    chan = [(c, 0, -1) for c in range(1, SLOTS)]
    group = [(0, s, -1) for s in range(1, SLOTS)]
    # alpha rows ignore chan_idx / scale_idx: some carry junk there to prove it
    alpha = [(0, 0, a) for a in range(SLOTS)] + [(a, SLOTS - a, a) for a in range(1, SLOTS)]
    return {MODE_CHANNEL: base + chan, MODE_GROUP: base + chan + group, MODE_ALPHA: base + chan + group + alpha}[mode]


def _row_slots(M: int, dist: str, tasks, g: torch.Generator) -> torch.Tensor:
    """[M, 3] int32 slot triples drawn with the given popularity distribution."""
    T = len(tasks)
    if dist == "distinct":
        perm = torch.randperm(T, generator=g)
        pick = perm[torch.arange(M) % T]
    elif dist == "uniform":
        pick = torch.randint(0, T, (M,), generator=g)
    elif dist == "zipf":
        p = 1.0 / torch.arange(1, T + 1).double() ** 1.2
        pick = torch.randperm(T, generator=g)[torch.multinomial(p, M, replacement=True, generator=g)]
    elif dist == "identical":
        pick = torch.full((M,), int(torch.randint(1 if T > 1 else 0, T, (1,), generator=g)))
    elif dist == "base-only":
        pick = torch.zeros(M, dtype=torch.long)
    else:
        raise ValueError(dist)
    return torch.tensor(tasks, dtype=torch.int32)[pick]


def make_case(M, N, K, group_size, bits, mode, dist, dtype, bcq=False, bias=False, device=DEVICE):
    g = _gen()
    G = 1 if group_size == -1 else math.ceil(K / group_size)
    qmax = 2**bits - 1
    codes = torch.randint(0, qmax + 1, (N, K), generator=g, dtype=torch.uint8)
    t = dict(codes=codes, group_size=group_size, bits=bits)
    if bcq:
        t["zeros"] = t["base_scales"] = t["scales"] = None
        alphas = (torch.rand(SLOTS, bits, N, G, generator=g) + 0.1) * 0.02
        betas = torch.randn(SLOTS, N, G, generator=g) * 0.02
    else:
        # rtn zero points are floats (kernels/quant.py: z = -min/s puts the group minimum on code 0)
        t["zeros"] = torch.rand((N, G), generator=g) * qmax
        t["base_scales"] = (torch.rand(N, G, generator=g) + 0.5) * 0.02
        scales = t["base_scales"] * (0.7 + 0.6 * torch.rand(SLOTS, N, G, generator=g))
        scales[0] = t["base_scales"]
        t["scales"] = scales
        a0, b0 = rtn_to_alphas(t["zeros"], t["base_scales"], bits)
        alphas = a0 * (0.7 + 0.6 * torch.rand(SLOTS, bits, N, G, generator=g))
        betas = b0 + 0.01 * torch.randn(SLOTS, N, G, generator=g)
        alphas[0], betas[0] = a0, b0
    chan = 0.7 + 0.6 * torch.rand(SLOTS, N, generator=g)
    chan[0] = 1.0
    t.update(chan=chan, alphas=alphas, betas=betas)
    t["bias"] = torch.randn(N, generator=g) if bias else None
    t["x"] = torch.randn(M, K, generator=g).to(dtype)
    slots = _row_slots(M, dist, _tasks(mode, bcq), g)
    t["chan_idx"], t["scale_idx"], t["alpha_idx"] = (slots[:, i].contiguous() for i in range(3))
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def reference(t) -> torch.Tensor:
    return adapted_linear_ref(
        t["x"].float(), t["codes"], t["zeros"], t["group_size"], t["chan"], t["scales"], t["alphas"], t["betas"],
        t["chan_idx"], t["scale_idx"], t["alpha_idx"], None if t["bias"] is None else t["bias"].float())


def check(y: torch.Tensor, ref: torch.Tensor, dtype, tol_table=TOL) -> None:
    assert y.dtype == dtype
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) or NaN outputs"
    err = (y.float() - ref).abs()
    scale = ref.abs().max().clamp_min(1e-6)
    tol = tol_table[dtype]
    assert err.max() <= tol["elem"] * scale, f"max err {err.max():.3g} vs max|ref| {scale:.3g}"
    rel = (y.float() - ref).norm() / ref.norm().clamp_min(1e-6)
    assert rel <= tol["norm"], f"relative Frobenius error {rel:.3g}"


def run_kernel(t, mode, config=None, n_major=False, scale_slots=0):
    packed = pack_int4(t["codes"])
    K = t["codes"].shape[1]
    w = repack(packed, K, t["zeros"], t["base_scales"], t["group_size"], t["bits"])
    scales, alphas, betas = t["scales"], t["alphas"], t["betas"]
    if n_major:  # the layout adapted_linear hands the kernel: unit stride along N
        nm = lambda a: None if a is None else a.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
        scales, alphas, betas = nm(scales), nm(alphas), nm(betas)
    M, N = t["x"].shape[0], t["codes"].shape[0]
    out = torch.full((M, N), float("nan"), dtype=t["x"].dtype, device=t["x"].device)
    y = int4_matmul(t["x"], w, t["chan"], scales, alphas, betas, t["chan_idx"], t["scale_idx"], t["alpha_idx"], mode,
                    bias=t["bias"], config=config, out=out, scale_slots=scale_slots)
    assert y.data_ptr() == out.data_ptr()
    return y


# --- small odd shapes (interpreter on CPU; natively on CUDA) ---------------------------------

SHAPE_FOR_GROUP = {-1: (80, 131), 32: (72, 200), 128: (48, 300)}  # (N, K): ragged last group, odd K
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cases():
    """Every mode x M x group size once; distribution, dtype and split-K rotate through the cases."""
    out = []
    for i, (mode, M, gs) in enumerate(itertools.product((1, 2, 3), (1, 3, 16, 33), (-1, 32, 128))):
        dist = DISTS[i % len(DISTS)]
        dtype = DTYPES[i % len(DTYPES)] if i % 4 else torch.bfloat16
        split = (1, 3, 2)[i % 3]
        out.append(pytest.param(mode, M, gs, dist, dtype, split, id=f"m{mode}-M{M}-g{gs}-{dist}-{str(dtype)[6:]}-sk{split}"))
    return out


@pytest.mark.parametrize("mode,M,gs,dist,dtype,split", _cases())
def test_modes_small(mode, M, gs, dist, dtype, split):
    N, K = SHAPE_FOR_GROUP[gs]
    t = make_case(M, N, K, gs, 4, mode, dist, dtype, bias=(M == 3))
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": split}
    check(run_kernel(t, mode, cfg, n_major=(M % 2 == 1)), reference(t), dtype)


@pytest.mark.parametrize("dist", DISTS)
def test_alpha_mode_mixed_distributions(dist):
    """Mode 3 serving AlphaTuning, per-channel and group PEQA and base rows in one batch."""
    t = make_case(33, 40, 160, 32, 4, MODE_ALPHA, dist, torch.bfloat16)
    check(run_kernel(t, MODE_ALPHA, {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}), reference(t), torch.bfloat16)


@pytest.mark.parametrize("mode", (1, 2, 3))
def test_three_bit_codes(mode):
    t = make_case(5, 40, 130, 64, 3, mode, "uniform", torch.float16)
    check(run_kernel(t, mode, {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}), reference(t), torch.float16)


@pytest.mark.parametrize("gs", (-1, 128))
def test_bcq_base(gs):
    """A bcq base has no zero points: every row is an alpha row (slot 0 = the base)."""
    t = make_case(17, 40, 259, gs, 4, MODE_ALPHA, "zipf", torch.bfloat16, bcq=True, bias=True)
    check(run_kernel(t, MODE_ALPHA, {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}), reference(t), torch.bfloat16)


# --- decode GEMV path (M <= 4, configs without BLOCK_M) ----------------------------------------

GEMV_SHAPE_FOR_GROUP = {-1: (80, 131), 32: (72, 200), 64: (40, 256), 128: (48, 300)}  # 64: K a multiple of BK


def _gemv_cases():
    """Every mode x group size, M in 1..4 rotating; dtype, distribution and split-K rotate too."""
    out = []
    for i, (mode, gs) in enumerate(itertools.product((1, 2, 3), (-1, 32, 64, 128))):
        M = 1 + i % 4
        dist = DISTS[i % len(DISTS)]
        dtype = DTYPES[i % len(DTYPES)]
        split = (1, 2, 3)[i % 3]
        out.append(pytest.param(mode, M, gs, dist, dtype, split, id=f"m{mode}-M{M}-g{gs}-{dist}-{str(dtype)[6:]}-sk{split}"))
    return out


@pytest.mark.parametrize("mode,M,gs,dist,dtype,split", _gemv_cases())
def test_gemv_small(mode, M, gs, dist, dtype, split):
    N, K = GEMV_SHAPE_FOR_GROUP[gs]
    t = make_case(M, N, K, gs, 4, mode, dist, dtype, bias=(M == 3))
    cfg = {"BLOCK_N": 16, "SPLIT_K": split, "PREFETCH": (M + split) % 2}  # register prefetch on and off
    check(run_kernel(t, mode, cfg, n_major=(M != 2)), reference(t), dtype)


# --- MMA GEMV (M = 1, modes 1/2, group size -1 / 128; configs with MMA) ----------------------------

MMA_SHAPES = {-1: (200, 136), 128: (136, 1160)}  # (N, K): N not a multiple of the tile; K over two 8-block
# steps with a ragged last block (g128)


def _mma_cases():
    """Both modes x group sizes; dtypes, distributions, tile widths, splits, load depth and the slab's
    table dtype in mode 2 (16-bit tables take the one-load scale pairs) rotate."""
    out = []
    for i, (mode, gs, dtype) in enumerate(itertools.product((1, 2), (-1, 128), DTYPES)):
        dist = DISTS[i % len(DISTS)]
        bn, split, depth = (16, 32, 8)[(i + i // 3) % 3], (1, 2, 3)[i % 3], 1 + (i // 2) % 2
        sdt = (torch.float16, torch.bfloat16, torch.float32)[(i // 2) % 3]
        xa = (i // 4) % 2
        unroll = 2 if depth == 1 and i % 4 in (0, 3) else 1
        out.append(pytest.param(mode, gs, dtype, dist, bn, split, depth, sdt, xa, unroll,
                                id=f"m{mode}-g{gs}-{str(dtype)[6:]}-{dist}-bn{bn}-sk{split}-d{depth}-s{str(sdt)[6:]}"
                                   f"-xa{xa}-u{unroll}"))
    return out


@pytest.mark.parametrize("mode,gs,dtype,dist,bn,split,depth,sdt,xa,unroll", _mma_cases())
def test_mma_gemv_small(mode, gs, dtype, dist, bn, split, depth, sdt, xa, unroll):
    if CUDA and dtype == torch.float32:
        pytest.skip("the MMA GEMV takes 16-bit x on CUDA")
    N, K = MMA_SHAPES[gs]
    t = make_case(1, N, K, gs, 4, mode, dist, dtype, bias=(split == 2))
    if mode == MODE_GROUP:  # the slab's table dtype; the reference reads the same rounded values
        t["scales"] = t["scales"].to(sdt)
    cfg = {"MMA": 1, "BLOCK_N": bn, "SPLIT_K": split, "DEPTH": depth, "X_AHEAD": xa, "UNROLL": unroll}
    check(run_kernel(t, mode, cfg, n_major=(split != 3)), reference({**t, "scales": t["scales"].float()}), dtype)


@pytest.mark.skipif(not CUDA, reason="STAGES only changes the GPU path (the interpreter has no pipeliner)")
@pytest.mark.parametrize("mode,gs,dtype", [(1, 128, torch.bfloat16), (2, 128, torch.float16), (2, -1, torch.bfloat16),
                                           (1, -1, torch.float16)])
def test_mma_gemv_pipelined(mode, gs, dtype):
    """Codes streamed through Triton's pipeliner (STAGES > 1): more steps than stages and fewer (a ring deeper
    than the loop), splits, both tile widths, 8 warps, mixed slots and the base row."""
    for (N, K), bn, split, stages, dist, warps in (
            (MMA_SHAPES[gs], 16, 1, 4, "zipf", 4), ((136, 4000), 32, 1, 3, "base-only", 4),
            ((200, 3000), 16, 2, 4, "uniform", 4), ((200, 4096), 16, 1, 8, "distinct", 4),
            ((264, 11008), 16, 1, 6, "zipf", 8)):
        t = make_case(1, N, K, gs, 4, mode, dist, dtype, bias=(split == 2))
        cfg = {"MMA": 1, "BLOCK_N": bn, "SPLIT_K": split, "STAGES": stages, "num_warps": warps}
        check(run_kernel(t, mode, cfg, n_major=True), reference(t), dtype)


@pytest.mark.parametrize("sdt", (torch.float16, torch.bfloat16, torch.float32))
def test_mma_gemv_scale_layouts(sdt):
    """Mode 2 slab tables of each dtype, N-major (a lane loads its two rows' scales at once) and G-major
    (two loads), over mixed slots and the base row's slot in turn."""
    N, K = MMA_SHAPES[128]
    for n_major, dist in ((True, "zipf"), (False, "base-only"), (True, "identical")):
        t = make_case(1, N, K, 128, 4, MODE_GROUP, dist, torch.bfloat16)
        t["scales"] = t["scales"].to(sdt)
        cfg = {"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 2, "DEPTH": 1}
        check(run_kernel(t, MODE_GROUP, cfg, n_major=n_major), reference({**t, "scales": t["scales"].float()}),
              torch.bfloat16)


def _silu_gated(ref: torch.Tensor, dtype) -> torch.Tensor:
    """silu(gate) * up of a float32 gate / up reference, each half rounded to dtype first as the kernel does."""
    gate, up = ref.to(dtype).float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# silu(gate) * up carries the roundings of gate, up and the product (the interpreter truncates to 16 bits)
SILU_TOL = {dt: dict(elem=2 * t["elem"], norm=2.5 * t["norm"]) for dt, t in TOL.items()}
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


@pytest.mark.parametrize("mode,gs,dtype,dist,bn,split,depth,unroll,sdt", [
    (2, 128, torch.bfloat16, "zipf", 16, 1, 1, 1, torch.float16),
    (2, 128, torch.float16, "distinct", 32, 2, 2, 1, torch.bfloat16),
    (2, -1, torch.bfloat16, "base-only", 8, 3, 1, 2, torch.float32),
    (1, 128, torch.bfloat16, "uniform", 16, 2, 1, 2, torch.float32),
    (1, -1, torch.float16, "identical", 32, 1, 2, 1, torch.float32),
])
def test_mma_gemv_silu_gate(mode, gs, dtype, dist, bn, split, depth, unroll, sdt):
    """A fused gate / up projection with silu_gate: y [1, N / 2] = silu(gate) * up from the GEMV's epilogue.
    N / 2 is not a multiple of the tile (the last tile's spare lanes repeat a real pair and must not be
    stored), splits sum both halves, a bias on some cases; every output poisoned first."""
    N, K = {128: (2 * 69, 1160), -1: (2 * 101, 136)}[gs]
    t = make_case(1, N, K, gs, 4, mode, dist, dtype, bias=(split == 2))
    if mode == MODE_GROUP:
        t["scales"] = t["scales"].to(sdt)
    packed = pack_int4(t["codes"])
    w = repack(packed, K, t["zeros"], t["base_scales"], gs, 4)
    out = torch.full((1, N // 2), float("nan"), dtype=dtype, device=DEVICE)
    cfg = {"MMA": 1, "BLOCK_N": bn, "SPLIT_K": split, "DEPTH": depth, "UNROLL": unroll}
    args = (t["x"], w, t["chan"], t["scales"], t["alphas"], t["betas"], t["chan_idx"], t["scale_idx"], t["alpha_idx"],
            mode)
    _check_silu_gate(args, dict(bias=t["bias"], config=cfg), out, reference({**t, "scales": t["scales"].float()}),
                     dtype)


def _check_silu_gate(args, kwargs, out, ref, dtype):
    """int4_matmul(*args, **kwargs, silu_gate=True) into the poisoned out: against the gated reference, and the
    same as gating the unfused projection (same config, so the same sums) with kernels.fused.silu_mul, to the
    last bit or two of the output."""
    y = int4_matmul(*args, **kwargs, out=out, silu_gate=True)
    assert y.data_ptr() == out.data_ptr()
    check(y, _silu_gated(ref, dtype), dtype, SILU_TOL)
    unfused = silu_mul(int4_matmul(*args, **kwargs)).float()
    assert (y.float() - unfused).abs().max() <= 2 * ULP[dtype] * unfused.abs().max()


@pytest.mark.parametrize("M,mode", [(1, MODE_ALPHA), (3, MODE_GROUP), (1, MODE_GROUP)])
def test_silu_gate_through_the_layer(M, mode):
    """QuantLinear.silu_gate on every path: the one-row GEMV's epilogue (mode 2, M = 1) and the projection then
    kernels.fused.silu_mul (mode 3, several rows), against the layer's own forward gated in torch."""
    torch.manual_seed(M + 10 * mode)
    layer = QuantLinear(96, 2 * 40, 4, 32 if mode == MODE_ALPHA else 128, "rtn").to(DEVICE)
    layer.packed.random_(0, 256)
    layer.zeros.uniform_(0, 15)
    layer.scales.uniform_(0.01, 0.03)
    layer.invalidate_caches()
    x = torch.randn(M, 96, device=DEVICE).to(torch.bfloat16)
    rows = RowAdapters.base(M, DEVICE)
    rows.mode = mode
    y = layer.silu_gate(x, rows) if CUDA else _cpu_kernel_silu_gate(layer, x, rows)
    assert y.shape == (M, 40)
    check(y, _silu_gated(layer(x.float(), rows), torch.bfloat16), torch.bfloat16, SILU_TOL)


def _cpu_kernel_silu_gate(layer, x, rows):
    """The CUDA branch of QuantLinear.silu_gate, run on CPU tensors (the interpreter)."""
    return im.adapted_linear(layer, x, rows, silu_gate=True)


def test_silu_gate_rejects_an_odd_width():
    t = make_case(1, 41, 256, 128, 4, MODE_GROUP, "uniform", torch.bfloat16)
    w = repack(pack_int4(t["codes"]), 256, t["zeros"], t["base_scales"], 128, 4)
    with pytest.raises(ValueError, match="even N"):
        int4_matmul(t["x"], w, t["chan"], t["scales"], None, None, t["chan_idx"], t["scale_idx"], t["alpha_idx"],
                    MODE_GROUP, silu_gate=True)


# --- MMA alpha GEMV (M = 1, mode 3: AlphaTuning rows, PEQA rows, a bcq base; configs with MMA) ------------------


def _alpha_cases():
    """Row kinds x group sizes x dtypes; bits, tiles, splits, load depth, table dtypes and bias rotate."""
    out = []
    kinds = ("alpha", "peqa", "alpha-base", "bcq")
    for i, (kind, gs, dtype) in enumerate(itertools.product(kinds, (-1, 128), DTYPES)):
        bits = (4, 3, 2)[i % 3] if kind != "peqa" else (4, 3)[i % 2]
        bn, split, depth = (16, 32, 8)[(i + i // 3) % 3], (1, 2, 3)[i % 3], 1 + (i // 2) % 2
        tdt = (torch.float16, torch.bfloat16, torch.float32)[(i // 2) % 3]
        out.append(pytest.param(kind, gs, dtype, bits, bn, split, depth, tdt,
                                id=f"{kind}-g{gs}-{str(dtype)[6:]}-b{bits}-bn{bn}-sk{split}-d{depth}-t{str(tdt)[6:]}"))
    return out


@pytest.mark.parametrize("kind,gs,dtype,bits,bn,split,depth,tdt", _alpha_cases())
def test_mma_alpha_gemv_small(kind, gs, dtype, bits, bn, split, depth, tdt):
    """kernels/int4_mma_alpha.py against the reference: an adapter's AlphaTuning row, the base in alpha form (slot
    0), a PEQA row in a mode-3 call (its tables made from the scales and zero points), a bcq base; N not a multiple
    of the tile, K over two 8-block steps with a ragged last block, slab tables in any float dtype; outputs
    poisoned first."""
    if CUDA and dtype == torch.float32:
        pytest.skip("the MMA alpha GEMV takes 16-bit x on CUDA")
    N, K = MMA_SHAPES[gs]
    t = make_case(1, N, K, gs, bits, MODE_ALPHA, "uniform", dtype, bcq=kind == "bcq", bias=(split == 2))
    slot = int(torch.randint(1, SLOTS, (1,)))
    if kind == "alpha":
        t["chan_idx"][0], t["scale_idx"][0], t["alpha_idx"][0] = slot, SLOTS - slot, slot  # junk in chan / scale
    elif kind == "peqa":
        t["chan_idx"][0], t["scale_idx"][0], t["alpha_idx"][0] = slot, SLOTS - slot, -1
    else:
        t["chan_idx"][0], t["scale_idx"][0], t["alpha_idx"][0] = 0, 0, 0
    tables = {k: t[k].to(tdt) for k in ("chan", "alphas", "betas") + (("scales",) if kind != "bcq" else ())}
    t.update(tables)
    cfg = {"MMA": 1, "BLOCK_N": bn, "SPLIT_K": split, "DEPTH": depth}
    y = run_kernel(t, MODE_ALPHA, cfg, n_major=(split != 3))
    check(y, reference({**t, **{k: v.float() for k, v in tables.items()}}), dtype)


def test_mma_alpha_gemv_takes_the_default_path_under_its_policy(monkeypatch):
    """MMA_ALPHA_POLICY "auto" (the default) sends one mode-3 row at group size -1 / 128 to the MMA alpha GEMV (on
    the CPU a forced config: without one the interpreter runs the CUDA-core GEMV's); batches, other group sizes and
    other modes stay on the other kernels, and "never" keeps every call off it."""
    assert im.mma_alpha_chosen(1, MODE_ALPHA, 128) and im.mma_alpha_chosen(1, MODE_ALPHA, -1)
    assert not im.mma_alpha_chosen(2, MODE_ALPHA, 128) and not im.mma_alpha_chosen(1, MODE_ALPHA, 32)
    assert not im.mma_alpha_chosen(1, MODE_GROUP, 128)
    assert im.autotuned_kernel(1, 64, 256, MODE_ALPHA, 128) == "mma alpha"
    monkeypatch.setattr(im, "MMA_ALPHA_POLICY", "never")
    assert not im.mma_alpha_chosen(1, MODE_ALPHA, 128) and im.autotuned_kernel(1, 64, 256, MODE_ALPHA, 128) == "gemv"
    monkeypatch.setattr(im, "MMA_ALPHA_POLICY", "auto")
    N, K = MMA_SHAPES[128]
    t = make_case(1, N, K, 128, 4, MODE_ALPHA, "distinct", torch.bfloat16)
    t["alpha_idx"][0] = 2
    launched = []
    real = im.launch_mma_alpha
    monkeypatch.setattr(im, "launch_mma_alpha", lambda *a, **k: launched.append(1) or real(*a, **k))
    if CUDA:
        check(run_kernel(t, MODE_ALPHA, n_major=True), reference(t), torch.bfloat16)
        assert launched
    else:  # no config on the CPU is the CUDA-core GEMV's interpreter config: force the MMA kernel's
        check(run_kernel(t, MODE_ALPHA, {"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 1}, n_major=True), reference(t),
              torch.bfloat16)
        assert launched


@pytest.mark.skipif(not CUDA, reason="TABLE_PAIRS only changes the GPU path (the interpreter reads plain tables)")
@pytest.mark.parametrize("bits,gs,tdt", [(4, 128, torch.float16), (3, -1, torch.bfloat16), (2, 128, torch.float32)])
def test_mma_alpha_gemv_table_pairs(bits, gs, tdt, monkeypatch):
    """TABLE_PAIRS: the alpha and beta tables read a lane's two rows in one load, one step ahead."""
    from scaleserve.kernels import int4_mma_alpha

    monkeypatch.setattr(int4_mma_alpha, "TABLE_PAIRS", True)
    N, K = MMA_SHAPES[gs]
    t = make_case(1, N, K, gs, bits, MODE_ALPHA, "uniform", torch.bfloat16, bias=True)
    t["alpha_idx"][0] = 3
    tables = {k: t[k].to(tdt) for k in ("chan", "alphas", "betas", "scales")}
    t.update(tables)
    for cfg in ({"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 2, "DEPTH": 1}, {"MMA": 1, "BLOCK_N": 32, "SPLIT_K": 1,
                                                                       "DEPTH": 2, "num_warps": 8}):
        y = run_kernel(t, MODE_ALPHA, cfg, n_major=True)
        check(y, reference({**t, **{k: v.float() for k, v in tables.items()}}), torch.bfloat16)


def test_mma_alpha_gemv_rejects_what_it_cannot_run():
    """An odd N, group size 32, two rows: a clear error before anything is launched."""
    for M, N, gs in ((1, 41, 128), (1, 40, 32), (2, 40, 128)):
        t = make_case(M, N, 256, gs, 4, MODE_ALPHA, "uniform", torch.bfloat16)
        with pytest.raises(ValueError, match="MMA alpha GEMV"):
            run_kernel(t, MODE_ALPHA, {"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 1}, n_major=True)


# --- the RMSNorm epilogues of the MMA GEMV (norm_in, accumulate, norm_out) -----------------------

def _norm_case(t, dtype, K, eps=1e-5):
    """The RMSNorm a projection follows, with its division left to the projection: h [1, K], the norm weight,
    x = round(h * g) in place of t's x, and rsqrt(mean(h^2) + eps)."""
    g = _gen()
    h = (torch.randn(1, K, generator=g) * 3).to(dtype).to(DEVICE)
    weight = (0.5 + torch.rand(K, generator=g)).to(dtype).to(DEVICE)
    t["x"] = (h.float() * weight.float()).to(dtype)
    rstd = torch.rsqrt(h.float().pow(2).mean() + eps)
    return h, rstd


@pytest.mark.parametrize("mode,gs,dtype,dist,bn,split,loop,norm_in,accumulate,norm_out", [
    (2, 128, torch.bfloat16, "zipf", 16, 1, {}, True, False, False),
    (2, 128, torch.float16, "distinct", 32, 2, {"DEPTH": 2}, True, True, True),
    (2, -1, torch.bfloat16, "base-only", 8, 3, {}, False, True, True),
    (1, 128, torch.bfloat16, "uniform", 16, 2, {}, False, True, False),
    (1, -1, torch.float16, "identical", 32, 1, {"DEPTH": 2}, True, False, True),
    # the GPU's other two loops (each sums h's squares after its own first loads)
    (2, 128, torch.bfloat16, "uniform", 16, 2, {"UNROLL": 2}, True, True, True),
    (1, 128, torch.float16, "zipf", 32, 1, {"STAGES": 2}, True, False, False),
    pytest.param(2, 128, torch.float32, "uniform", 16, 2, {}, True, True, True,
                 marks=pytest.mark.skipif(CUDA, reason="on the GPU the MMA GEMV takes 16-bit x")),
])
def test_mma_gemv_norm_epilogues(mode, gs, dtype, dist, bn, split, loop, norm_in, accumulate, norm_out):
    """The RMSNorms around a projection in the one-row MMA GEMV's epilogue: norm_in scales the sums by
    rsqrt(mean(h^2) + eps) of the h that x = round(h * g) came from, before the adapter's channel factor and the
    bias; accumulate adds y into the residual stream out holds; norm_out also writes xg = round(out * g2).
    Odd N (not a multiple of the tile), splits, biased cases, each GPU loop (DEPTH 1 / 2, UNROLL 2, STAGES 2);
    xg (and out where it is not the stream) poisoned."""
    N, K = MMA_SHAPES[gs]
    t = make_case(1, N, K, gs, 4, mode, dist, dtype, bias=(split == 2))
    h, rstd = _norm_case(t, dtype, K) if norm_in else (None, torch.tensor(1.0))
    w = repack(pack_int4(t["codes"]), K, t["zeros"], t["base_scales"], gs, 4)
    g = _gen()
    stream = (torch.randn(1, N, generator=g) * 4).to(dtype).to(DEVICE)
    out = stream.clone() if accumulate else torch.full((1, N), float("nan"), dtype=dtype, device=DEVICE)
    weight2 = (0.5 + torch.rand(N, generator=g)).to(dtype).to(DEVICE)
    xg = torch.full((1, N), float("nan"), dtype=dtype, device=DEVICE)
    y = int4_matmul(t["x"], w, t["chan"], t["scales"], t["alphas"], t["betas"], t["chan_idx"], t["scale_idx"],
                    t["alpha_idx"], mode, bias=t["bias"], out=out,
                    config={"MMA": 1, "BLOCK_N": bn, "SPLIT_K": split, **loop},
                    norm_in=(h, 1e-5) if norm_in else None, accumulate=accumulate,
                    norm_out=(weight2, xg) if norm_out else None)
    assert y.data_ptr() == out.data_ptr()
    ref = reference({**t, "x": t["x"].float() * rstd.cpu().item()})
    ref_cpu = ref.cpu()
    if accumulate:  # the error is judged against the projection's size, not the stream's
        err = (y.float().cpu() - (stream.float().cpu() + ref_cpu)).abs().max()
        assert not y.isnan().any() and err <= TOL[dtype]["elem"] * ref_cpu.abs().max() + ULP[dtype] * y.abs().max()
    else:
        check(y, ref, dtype)
    if norm_out:  # from the kernel's own y: the same roundings (the interpreter truncates, so one ulp)
        want = (y.float() * weight2.float()).to(dtype).float()
        assert not xg.isnan().any()
        assert ((xg.float() - want).abs() <= 2 * ULP[dtype] * want.abs()).all()
    else:
        assert xg.isnan().all()


def _sums_of_squares(v: torch.Tensor) -> torch.Tensor:
    """float32 [ceil(n / 16)]: the sums of v^2 over each 16 consecutive elements of v [1, n] (the last ragged)."""
    n = v.shape[-1]
    padded = torch.zeros(-(-n // 16) * 16, device=v.device)
    padded[:n] = v.float().reshape(-1)
    return padded.pow(2).reshape(-1, 16).sum(1)


@pytest.mark.parametrize("mode,gs,dtype,bn,split,loop", [
    (2, 128, torch.bfloat16, 16, 1, {}),
    (2, -1, torch.float16, 32, 3, {"DEPTH": 2}),
    (1, 128, torch.bfloat16, 64, 2, {"UNROLL": 2}),
    (2, 128, torch.float16, 32, 1, {"STAGES": 2}),
])
def test_mma_gemv_passes_the_norms_sums_of_squares(mode, gs, dtype, bn, split, loop):
    """norm_out's sumsq: the projection into the stream writes the sums of its stored y^2 per 16 rows (N ragged, every
    entry poisoned first); norm_in's sumsq: the projection after the norm takes mean(h^2) from them and not from h,
    which here is a decoy (so a kernel that read h would be off by the ratio of the two norms)."""
    N, K = MMA_SHAPES[gs]
    t = make_case(1, N, K, gs, 4, mode, "zipf", dtype)
    w = repack(pack_int4(t["codes"]), K, t["zeros"], t["base_scales"], gs, 4)
    args = (w, t["chan"], t["scales"], None, None, t["chan_idx"], t["scale_idx"], t["alpha_idx"], mode)
    config = {"MMA": 1, "BLOCK_N": bn, "SPLIT_K": split, **loop}
    g = _gen()
    stream = (torch.randn(1, N, generator=g) * 4).to(dtype).to(DEVICE)
    weight2 = (0.5 + torch.rand(N, generator=g)).to(dtype).to(DEVICE)
    xg = torch.empty(1, N, dtype=dtype, device=DEVICE)
    sumsq = torch.full((-(-N // 16),), float("nan"), device=DEVICE)
    y = int4_matmul(t["x"], *args, out=stream, accumulate=True, norm_out=(weight2, xg, sumsq), config=config)
    want = _sums_of_squares(y)
    assert not sumsq.isnan().any(), "an entry of sumsq left unwritten"
    torch.testing.assert_close(sumsq, want, rtol=1e-5, atol=0)

    h, rstd = _norm_case(t, dtype, K)
    decoy = (torch.randn(1, K, generator=g) * 7).to(dtype).to(DEVICE)
    out = torch.full((1, N), float("nan"), dtype=dtype, device=DEVICE)
    y = int4_matmul(t["x"], *args, out=out, norm_in=(decoy, 1e-5, _sums_of_squares(h)), config=config)
    check(y, reference({**t, "x": t["x"].float() * rstd.cpu().item()}), dtype)


def test_norm_in_reaches_the_gate_up_projection_fused_or_not():
    """silu_gate with norm_in (h, or the sums of squares it came with): the SiLU epilogue (a forced MMA config) and,
    under the default FUSE_SILU_GATE, the MMA GEMV then kernels.fused.silu_mul; both scale gate and up before the
    SiLU."""
    N, K = 2 * 69, 1160
    t = make_case(1, N, K, 128, 4, MODE_GROUP, "zipf", torch.bfloat16)
    h, rstd = _norm_case(t, torch.bfloat16, K)
    w = repack(pack_int4(t["codes"]), K, t["zeros"], t["base_scales"], 128, 4)
    want = _silu_gated(reference({**t, "x": t["x"].float() * rstd.cpu().item()}), torch.bfloat16)
    args = (t["x"], w, t["chan"], t["scales"], None, None, t["chan_idx"], t["scale_idx"], t["alpha_idx"], MODE_GROUP)
    for config in ({"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 2}, None):
        for norm_in in ((h, 1e-5), (torch.zeros_like(h), 1e-5, _sums_of_squares(h))):  # (h, or its sums: a zero h)
            out = torch.full((1, N // 2), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            y = int4_matmul(*args, config=config, out=out, silu_gate=True, norm_in=norm_in)
            check(y, want, torch.bfloat16, SILU_TOL)


def test_norm_epilogues_refuse_what_they_cannot_do():
    """Asked of a call the MMA GEMV does not take, or with inconsistent buffers: a clear error, nothing written."""
    N, K = 40, 256
    t = make_case(2, N, K, 128, 4, MODE_GROUP, "uniform", torch.bfloat16)
    w = repack(pack_int4(t["codes"]), K, t["zeros"], t["base_scales"], 128, 4)
    args = (w, t["chan"], t["scales"], None, None)
    idx = (t["chan_idx"], t["scale_idx"], t["alpha_idx"])
    h = torch.randn(1, K).to(torch.bfloat16).to(DEVICE)
    stream = torch.randn(1, N).to(torch.bfloat16).to(DEVICE)
    kept = stream.clone()
    with pytest.raises(ValueError, match="MMA GEMV's epilogue"):  # two rows
        int4_matmul(t["x"], *args, *idx, MODE_GROUP, norm_in=(h, 1e-5))
    one = (t["x"][:1], *args, *(i[:1] for i in idx), MODE_GROUP)
    with pytest.raises(ValueError, match="accumulate adds into out"):
        int4_matmul(*one, accumulate=True)
    with pytest.raises(ValueError, match="norm_in's h"):
        int4_matmul(*one, norm_in=(h[:, :-8], 1e-5))
    with pytest.raises(ValueError, match="norm_out's xg"):
        int4_matmul(*one, out=stream, accumulate=True, norm_out=(torch.ones(N, device=DEVICE), stream))
    with pytest.raises(ValueError, match=r"norm_out's sumsq must be a contiguous float32 \[3\]"):
        int4_matmul(*one, out=stream, accumulate=True,
                    norm_out=(torch.ones(N, device=DEVICE), torch.empty_like(stream), torch.empty(2, device=DEVICE)))
    with pytest.raises(ValueError, match=r"norm_in's sumsq must be a contiguous float32 \[16\]"):
        int4_matmul(*one, norm_in=(h, 1e-5, torch.empty(16, dtype=torch.float16, device=DEVICE)))
    with pytest.raises(ValueError, match="neither adds"):
        int4_matmul(*one, out=torch.empty(1, N // 2, dtype=torch.bfloat16, device=DEVICE), accumulate=True,
                    silu_gate=True, config={"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 1})
    assert torch.equal(stream, kept)


def test_mma_gemv_rejects_what_it_cannot_run():
    """Group size 32, two rows and an odd N are refused with a clear error, not computed wrongly (mode 3 takes the
    MMA alpha GEMV: test_mma_alpha_gemv_rejects_what_it_cannot_run)."""
    for mode, gs, M, N in ((MODE_GROUP, 32, 1, 40), (MODE_GROUP, 128, 2, 40), (MODE_GROUP, 128, 1, 41)):
        t = make_case(M, N, 256, gs, 4, mode, "uniform", torch.bfloat16)
        with pytest.raises(ValueError, match="MMA GEMV"):
            run_kernel(t, mode, {"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 1})


# --- MMA batch kernel (1 <= M <= 16, modes 1/2; configs with MMA_BATCH) ---------------------------

BATCH_SHAPES = {-1: (104, 136), 128: (72, 1000)}  # (N, K): N not a multiple of the tile; ragged last block


def _batch_cases():
    """Both modes x group sizes x row counts around the chains' 8 columns (1, 5: a partial chain; 8; 9, 16: the
    second chain); dtypes, distributions, tile widths, splits, load depth and the slab's table dtype rotate."""
    out = []
    for i, (mode, gs, M) in enumerate(itertools.product((1, 2), (-1, 128), (1, 5, 8, 9, 16))):
        dtype = DTYPES[i % 3]
        dist = DISTS[i % len(DISTS)]
        warps, split, depth = (1, 2)[(i // 2) % 2], (1, 2, 3)[i % 3], 1 + (i // 3) % 2
        bps, xa = (1, 2, 4)[(i // 4) % 3], (i // 5) % 2
        sdt = (torch.float16, torch.bfloat16, torch.float32)[(i // 2) % 3]
        unroll = 2 if depth == 1 and i % 4 in (1, 2) else 1
        out.append(pytest.param(mode, gs, M, dtype, dist, warps, split, depth, bps, xa, sdt, unroll,
                                id=f"m{mode}-g{gs}-M{M}-{str(dtype)[6:]}-{dist}-w{warps}-sk{split}-d{depth}-b{bps}"
                                   f"-xa{xa}-s{str(sdt)[6:]}-u{unroll}"))
    return out


@pytest.mark.parametrize("mode,gs,M,dtype,dist,warps,split,depth,bps,xa,sdt,unroll", _batch_cases())
def test_mma_batch_small(mode, gs, M, dtype, dist, warps, split, depth, bps, xa, sdt, unroll):
    if CUDA and dtype == torch.float32:
        pytest.skip("the MMA batch kernel takes 16-bit x on CUDA")
    N, K = BATCH_SHAPES[gs]
    t = make_case(M, N, K, gs, 4, mode, dist, dtype, bias=(split == 2))
    if mode == MODE_GROUP:  # the slab's table dtype; the reference reads the same rounded values
        t["scales"] = t["scales"].to(sdt)
    cfg = {"MMA_BATCH": 1, "BLOCK_N": 16 * warps, "num_warps": warps, "SPLIT_K": split, "DEPTH": depth, "BPS": bps,
           "X_AHEAD": xa, "UNROLL": unroll}
    # n_major: the slab's layout (scale pairs in one load); G-major tables take one load per scale
    check(run_kernel(t, mode, cfg, n_major=(split != 3)), reference({**t, "scales": t["scales"].float()}), dtype)


def test_mma_batch_rejects_what_it_cannot_run():
    """Group size 32, 17 rows, an odd N and a tile that is not 16 rows per warp are refused with a clear error, not
    computed wrongly, in modes 1/2 and (the alpha batch kernel) mode 3."""
    for mode, gs, M, N, bn in ((MODE_ALPHA, 32, 4, 40, 16), (MODE_GROUP, 32, 4, 40, 16),
                               (MODE_GROUP, 128, 17, 40, 16), (MODE_ALPHA, 128, 17, 40, 16),
                               (MODE_GROUP, 128, 4, 41, 16), (MODE_ALPHA, 128, 4, 41, 16),
                               (MODE_CHANNEL, 128, 4, 40, 32), (MODE_ALPHA, 128, 4, 40, 32)):
        t = make_case(M, N, 256, gs, 4, mode, "uniform", torch.bfloat16)
        with pytest.raises(ValueError, match="MMA (alpha )?batch kernel|BLOCK_N"):
            run_kernel(t, mode, {"MMA_BATCH": 1, "BLOCK_N": bn, "SPLIT_K": 1, "num_warps": 1})


def _alpha_batch_cases():
    """Row counts around the chains' 8 columns x group sizes x an rtn / a bcq base; bits, dtypes, distributions (mode
    3's: AlphaTuning, PEQA group / channel and base rows mixed), tile widths, splits, blocks a step and the slab's
    table dtype rotate."""
    out = []
    for i, (M, gs, bcq) in enumerate(itertools.product((1, 2, 5, 8, 9, 16), (-1, 128), (False, True))):
        dtype = DTYPES[i % 3]
        dist = DISTS[i % len(DISTS)]
        bits = (4, 3, 2)[i % 3]
        warps, split, bps = (1, 2)[(i // 2) % 2], (1, 2, 3)[i % 3], (1, 2)[(i // 3) % 2]
        tdt = (torch.float16, torch.bfloat16, torch.float32)[(i // 2) % 3]
        out.append(pytest.param(M, gs, bcq, dtype, dist, bits, warps, split, bps, tdt,
                                id=f"M{M}-g{gs}-{'bcq' if bcq else 'rtn'}-{str(dtype)[6:]}-{dist}-b{bits}-w{warps}"
                                   f"-sk{split}-bps{bps}-t{str(tdt)[6:]}"))
    return out


@pytest.mark.parametrize("M,gs,bcq,dtype,dist,bits,warps,split,bps,tdt", _alpha_batch_cases())
def test_mma_alpha_batch_small(M, gs, bcq, dtype, dist, bits, warps, split, bps, tdt):
    """kernels/int4_mma_alpha.py's batch kernel (mode 3, 1 <= M <= 16) against the reference: every row its own
    adapter kind and slot, N not a multiple of the tile, K over several steps with a ragged last block; outputs
    poisoned first."""
    if CUDA and dtype == torch.float32:
        pytest.skip("the MMA alpha batch kernel takes 16-bit x on CUDA")
    N, K = BATCH_SHAPES[gs]
    t = make_case(M, N, K, gs, bits, MODE_ALPHA, dist, dtype, bcq=bcq, bias=(split == 2))
    tables = {k: t[k].to(tdt) for k in ("chan", "alphas", "betas") + (() if bcq else ("scales",))}
    t.update(tables)
    cfg = {"MMA_BATCH": 1, "BLOCK_N": 16 * warps, "num_warps": warps, "SPLIT_K": split, "BPS": bps}
    y = run_kernel(t, MODE_ALPHA, cfg, n_major=(split != 3))
    check(y, reference({**t, **{k: v.float() for k, v in tables.items()}}), dtype)


@pytest.mark.skipif(not CUDA, reason="FOLD_PLANE_SCALES only changes the GPU path's asm (the interpreter's is plain)")
@pytest.mark.parametrize("M,gs,bcq,dtype,dist,bits,warps,split,bps,tdt", _alpha_batch_cases()[::2])
def test_mma_alpha_batch_fold_planes(M, gs, bcq, dtype, dist, bits, warps, split, bps, tdt, monkeypatch):
    """FOLD_PLANE_SCALES: the plane operands carry K_j (tests/kernels/test_mma_asm.py checks the asm lane by lane);
    the same cases as test_mma_alpha_batch_small."""
    from scaleserve.kernels import int4_mma_alpha

    monkeypatch.setattr(int4_mma_alpha, "FOLD_PLANE_SCALES", True)
    test_mma_alpha_batch_small(M, gs, bcq, dtype, dist, bits, warps, split, bps, tdt)


def test_mma_alpha_batch_dispatch_rule(monkeypatch):
    """auto (the default): 2 to 16 rows in mode 3 at group size -1 and 128; one row stays on the MMA alpha GEMV,
    17 rows and more on the tile, modes 1/2 on their kernels; never: none."""
    assert im.mma_batch_alpha_chosen(2, MODE_ALPHA, 128) and im.mma_batch_alpha_chosen(8, MODE_ALPHA, -1)
    assert im.mma_batch_alpha_chosen(16, MODE_ALPHA, 128) and not im.mma_batch_alpha_chosen(17, MODE_ALPHA, 128)
    assert not im.mma_batch_alpha_chosen(1, MODE_ALPHA, 128) and not im.mma_batch_alpha_chosen(4, MODE_ALPHA, 32)
    assert not im.mma_batch_alpha_chosen(4, MODE_GROUP, 128)
    assert im.autotuned_kernel(4, 64, 256, MODE_ALPHA, 128) == "mma alpha batch"
    assert im.autotuned_kernel(16, 64, 256, MODE_ALPHA, 128) == "mma alpha batch"
    assert im.autotuned_kernel(1, 64, 256, MODE_ALPHA, 128) == "mma alpha"
    assert im.autotuned_kernel(17, 64, 256, MODE_ALPHA, 128) == "tensor-core"
    monkeypatch.setattr(im, "MMA_BATCH_ALPHA_POLICY", "never")
    assert not im.mma_batch_alpha_chosen(4, MODE_ALPHA, 128)
    assert im.autotuned_kernel(4, 64, 256, MODE_ALPHA, 128) == "tensor-core"


def test_mma_batch_dispatch_rule(monkeypatch):
    """auto: 2 to 8 rows in modes 1/2 at group size -1 and 128 (one row stays on the MMA GEMV, 9-16 rows on the
    tensor-core tile, which is faster there); never mode 3 (its own batch kernel) or group size 32; "all" takes 1 to
    16 rows; "never" none."""
    for mode in (MODE_CHANNEL, MODE_GROUP):
        for M in (2, 5, 8):
            assert im.autotuned_kernel(M, 4096, 4096, mode, 128) == "mma batch"
            assert im.autotuned_kernel(M, 4096, 4096, mode, -1) == "mma batch"
        assert im.autotuned_kernel(1, 4096, 4096, mode, 128) == "mma gemv"
        assert im.autotuned_kernel(9, 4096, 4096, mode, 128) == "tensor-core"
        assert im.autotuned_kernel(4, 4096, 4096, mode, 32) == "tensor-core"
    assert im.autotuned_kernel(4, 4096, 4096, MODE_ALPHA, 128) == "mma alpha batch"  # mode 3's own batch kernel
    monkeypatch.setattr(im, "MMA_BATCH_POLICY", "all")
    assert im.autotuned_kernel(1, 4096, 4096, MODE_GROUP, 128) == "mma batch"
    assert im.autotuned_kernel(16, 4096, 4096, MODE_GROUP, 128) == "mma batch"
    assert im.autotuned_kernel(17, 4096, 4096, MODE_GROUP, 128) == "tensor-core"
    monkeypatch.setattr(im, "MMA_BATCH_POLICY", "never")
    assert im.autotuned_kernel(4, 4096, 4096, MODE_GROUP, 128) == "tensor-core"


# --- fold GEMM (batches, modes 1/2; configs with FOLD) -------------------------------------------

FOLD_SHAPES = {-1: (72, 300), 32: (40, 200), 64: (56, 257), 128: (48, 300)}  # (N, K): ragged tiles and groups


def _fold_cases():
    """Modes x group sizes x dtypes; batch sizes, distributions, tiles and splits rotate."""
    out = []
    for i, (mode, gs, dtype) in enumerate(itertools.product((1, 2), (-1, 32, 64, 128), DTYPES)):
        M = (2, 3, 16, 33)[i % 4]
        dist = DISTS[i % len(DISTS)]
        bn, bm, split = (16, 32)[i % 2], (16, 32)[(i // 2) % 2], (1, 2, 3)[i % 3]
        out.append(pytest.param(mode, gs, dtype, M, dist, bn, bm, split,
                                id=f"m{mode}-g{gs}-{str(dtype)[6:]}-M{M}-{dist}-bn{bn}-bm{bm}-sk{split}"))
    return out


@pytest.mark.parametrize("mode,gs,dtype,M,dist,bn,bm,split", _fold_cases())
def test_fold_gemm_small(mode, gs, dtype, M, dist, bn, bm, split):
    if CUDA and dtype == torch.float32:
        pytest.skip("the fold GEMM takes 16-bit x on CUDA")
    N, K = FOLD_SHAPES[gs]
    t = make_case(M, N, K, gs, 4, mode, dist, dtype, bias=(split == 2))
    cfg = {"FOLD": 1, "BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_K": split}
    check(run_kernel(t, mode, cfg, n_major=(split != 3)), reference(t), dtype)


@pytest.mark.parametrize("gs,dtype,M,dist,split", [
    (128, torch.bfloat16, 33, "identical", 1), (128, torch.float16, 2, "base-only", 2),
    (32, torch.bfloat16, 16, "identical", 3), (-1, torch.float16, 33, "identical", 2),
    (64, torch.float32, 3, "identical", 1), (-1, torch.float32, 16, "base-only", 1)])
def test_fold_gemm_one_slot(gs, dtype, M, dist, split, monkeypatch):
    """Mode 2 on the caller's promise of one scale slot (scale_slots=1, FOLD_ONE_SLOT): one pass on the first row's
    slot, mode 1's loop; every row still gets its slot's scales and its own channel factor."""
    if CUDA and dtype == torch.float32:
        pytest.skip("the fold GEMM takes 16-bit x on CUDA")
    monkeypatch.setattr(im, "FOLD_ONE_SLOT", True)
    N, K = FOLD_SHAPES[gs]
    t = make_case(M, N, K, gs, 4, MODE_GROUP, dist, dtype, bias=(split == 2))
    assert len(set(t["scale_idx"].tolist())) == 1
    for bn, bm in ((16, 16), (32, 32)):
        cfg = {"FOLD": 1, "BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_K": split}
        check(run_kernel(t, MODE_GROUP, cfg, n_major=(split != 3), scale_slots=1), reference(t), dtype)


def _swap_cases():
    """SWAP (the code bytes as the MMA's A operand): modes x group sizes x dtypes, with batch sizes, slot
    distributions, tiles (weight rows x tokens, both orientations of a non-square tile), splits and K blocks
    below the group size rotating; mode 2 on the one-slot promise in some."""
    out = []
    for i, (mode, gs, dtype) in enumerate(itertools.product((1, 2), (-1, 32, 64, 128), DTYPES)):
        M = (3, 33, 2, 16)[i % 4]
        dist = DISTS[(i + 2) % len(DISTS)]
        bn, bm, split = (32, 16, 64)[i % 3], (16, 32)[(i // 3) % 2], (1, 3, 2)[i % 3]
        bk = gs // 2 if gs in (64, 128) and i % 2 else None
        one_slot = mode == 2 and i % 3 == 0
        out.append(pytest.param(mode, gs, dtype, M, "identical" if one_slot else dist, bn, bm, split, bk, one_slot,
                                id=f"m{mode}-g{gs}-{str(dtype)[6:]}-M{M}-bn{bn}-bm{bm}-sk{split}-bk{bk}"
                                   f"{'-one' if one_slot else ''}"))
    return out


@pytest.mark.parametrize("mode,gs,dtype,M,dist,bn,bm,split,bk,one_slot", _swap_cases())
def test_fold_gemm_swap(mode, gs, dtype, M, dist, bn, bm, split, bk, one_slot, monkeypatch):
    if CUDA and dtype == torch.float32:
        pytest.skip("the fold GEMM takes 16-bit x on CUDA")
    monkeypatch.setattr(im, "FOLD_ONE_SLOT", one_slot)
    N, K = FOLD_SHAPES[gs]
    t = make_case(M, N, K, gs, 4, mode, dist, dtype, bias=(split == 2))
    cfg = {"FOLD": 1, "SWAP": 1, "BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_K": split, **({"BLOCK_K": bk} if bk else {})}
    check(run_kernel(t, mode, cfg, n_major=(split != 3), scale_slots=1 if one_slot else 0), reference(t), dtype)


@pytest.mark.skipif(not CUDA, reason="the dispatch picks a kernel on CUDA only (the interpreter runs the tile)")
@pytest.mark.parametrize("swap", (False, True))
def test_fold_swap_switch_reaches_the_kernel(swap, monkeypatch):
    """FOLD_SWAP and FOLD_ONE_SLOT are what the autotuned dispatch hands the fold GEMM (no config given)."""
    seen, launch = [], im.launch_int4_gemm

    def spy(*args, **kwargs):
        seen.append((kwargs["swap"], kwargs["one_slot"]))
        return launch(*args, **kwargs)

    monkeypatch.setattr(im, "launch_int4_gemm", spy)
    monkeypatch.setattr(im, "FOLD_POLICY", "always")
    monkeypatch.setattr(im, "MMA_BATCH_POLICY", "never")
    monkeypatch.setattr(im, "FOLD_SWAP", swap)
    monkeypatch.setattr(im, "FOLD_ONE_SLOT", swap)
    dtype = torch.bfloat16
    t = make_case(5, 72, 300, 128, 4, MODE_GROUP, "identical", dtype)
    check(run_kernel(t, MODE_GROUP, n_major=True, scale_slots=1), reference(t), dtype)
    t = make_case(3, 72, 300, -1, 4, MODE_CHANNEL, "zipf", dtype)
    check(run_kernel(t, MODE_CHANNEL, n_major=True), reference(t), dtype)
    assert seen == [(swap, swap), (swap, False)]


def test_fold_gemm_rejects_what_it_cannot_run():
    """Mode 3 and a bcq base are refused with a clear error, not computed wrongly."""
    cfg = {"FOLD": 1, "BLOCK_N": 16, "BLOCK_M": 16, "SPLIT_K": 1}
    t = make_case(4, 40, 256, 128, 4, MODE_ALPHA, "uniform", torch.bfloat16)
    with pytest.raises(ValueError, match="fold GEMM"):
        run_kernel(t, MODE_ALPHA, cfg)
    t = make_case(4, 40, 256, 128, 4, MODE_ALPHA, "uniform", torch.bfloat16, bcq=True)
    with pytest.raises(ValueError, match="fold GEMM"):
        run_kernel(t, MODE_GROUP, cfg)


def test_fold_gemm_dispatch_rule(monkeypatch):
    """Mode 1 from FOLD_MIN_M rows; mode 2 only on the caller's promise of one scale slot (a tile costs a
    pass per slot), per-channel mode 2 from twice that; mode 3 never; the policy switches it off or down
    to two rows."""
    big = im.FOLD_MIN_M
    assert im.fold_gemm_chosen(big, MODE_CHANNEL, 128) and im.fold_gemm_chosen(big, MODE_CHANNEL, -1)
    assert not im.fold_gemm_chosen(big - 1, MODE_CHANNEL, 128)
    assert im.fold_gemm_chosen(big, MODE_GROUP, 128, scale_slots=1)
    assert not im.fold_gemm_chosen(big, MODE_GROUP, -1, scale_slots=1)
    assert im.fold_gemm_chosen(2 * big, MODE_GROUP, -1, scale_slots=1)
    assert not im.fold_gemm_chosen(big, MODE_GROUP, 128, scale_slots=0)
    assert not im.fold_gemm_chosen(big, MODE_GROUP, 128, scale_slots=2)
    assert not im.fold_gemm_chosen(4 * big, MODE_ALPHA, 128, scale_slots=1)
    monkeypatch.setattr(im, "FOLD_POLICY", "never")
    assert not im.fold_gemm_chosen(4 * big, MODE_CHANNEL, 128)
    monkeypatch.setattr(im, "FOLD_POLICY", "always")
    assert im.fold_gemm_chosen(2, MODE_CHANNEL, 128) and not im.fold_gemm_chosen(1, MODE_CHANNEL, 128)
    assert not im.fold_gemm_chosen(2, MODE_GROUP, 128, scale_slots=3)


def test_mma_gemv_dispatch_rule(monkeypatch):
    """auto: one row in modes 1/2 at group size -1 and 128; never for batches or mode 3; the other
    policies."""
    for mode in (MODE_CHANNEL, MODE_GROUP):
        assert im.mma_gemv_chosen(1, mode, -1) and im.mma_gemv_chosen(1, mode, 128)
        assert not im.mma_gemv_chosen(2, mode, -1) and not im.mma_gemv_chosen(2, mode, 128)
    assert not im.mma_gemv_chosen(1, MODE_ALPHA, -1)
    monkeypatch.setattr(im, "MMA_GEMV_POLICY", "per-channel")
    assert im.mma_gemv_chosen(1, MODE_GROUP, -1) and not im.mma_gemv_chosen(1, MODE_GROUP, 128)
    monkeypatch.setattr(im, "MMA_GEMV_POLICY", "never")
    assert not im.mma_gemv_chosen(1, MODE_CHANNEL, -1)


@pytest.mark.parametrize("bcq", (False, True))
def test_gemv_three_bit_and_bcq(bcq):
    """3-bit codes in mode 3 (planes j < 3 only) and a bcq base, through the GEMV."""
    bits = 4 if bcq else 3
    t = make_case(3, 40, 259, 128, bits, MODE_ALPHA, "zipf", torch.bfloat16, bcq=bcq, bias=True)
    check(run_kernel(t, MODE_ALPHA, {"BLOCK_N": 32, "SPLIT_K": 2}, n_major=True), reference(t), torch.bfloat16)


@pytest.mark.parametrize("M", (1, 16))
def test_chan_table_as_a_column_range(M):
    """AdapterSlab keeps every layer's per-channel table as a column range of one [S, sum N] table: the
    kernels read a layer's columns through the row stride (NaN in the other columns shows a wrong read)."""
    N, K = GEMV_SHAPE_FOR_GROUP[32]
    t = make_case(M, N, K, 32, 4, MODE_CHANNEL, "distinct", torch.bfloat16)
    chan = t["chan"]
    wide = torch.full((chan.shape[0], 3 * N + 5), float("nan"), dtype=chan.dtype, device=chan.device)
    wide[:, N + 5 : 2 * N + 5] = chan
    cfg = {"BLOCK_N": 16, "SPLIT_K": 2, "PREFETCH": 1} if M == 1 else {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}
    check(run_kernel(dict(t, chan=wide[:, N + 5 : 2 * N + 5]), MODE_CHANNEL, cfg), reference(t), torch.bfloat16)


@pytest.mark.parametrize("mode,M", [(MODE_GROUP, 1), (MODE_GROUP, 16), (MODE_ALPHA, 1), (MODE_ALPHA, 16)])
def test_half_precision_slab_tables(mode, M):
    """On CUDA the AdapterSlab keeps every table in fp16 (N-contiguous): the kernels read them in any float
    dtype and compute in fp32, so the result is the reference over the same (fp16-rounded) values."""
    N, K = GEMV_SHAPE_FOR_GROUP[32]
    t = make_case(M, N, K, 32, 4, mode, "zipf", torch.bfloat16)
    half = {k: t[k].half() for k in ("chan", "scales", "alphas", "betas")}
    cfg = {"BLOCK_N": 16, "SPLIT_K": 2, "PREFETCH": 1} if M == 1 else {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}
    y = run_kernel(dict(t, **half), mode, cfg, n_major=True)
    check(y, reference(dict(t, **{k: v.float() for k, v in half.items()})), torch.bfloat16)


def test_gemv_default_dispatch():
    """M = 1 with no config runs the GEMV (autotuned on CUDA, a fixed config under the interpreter)."""
    t = make_case(1, 40, 256, 128, 4, MODE_GROUP, "distinct", torch.float16)
    check(run_kernel(t, MODE_GROUP, n_major=True), reference(t), torch.float16)


def _layer_from_case(t, K, N, gs, bits):
    layer = QuantLinear(K, N, bits, gs, "rtn", bias=t["bias"] is not None, device=t["x"].device)
    layer.packed.copy_(pack_int4(t["codes"]))
    layer.zeros.copy_(t["zeros"])
    layer.scales.copy_(t["base_scales"])
    if t["bias"] is not None:
        layer.bias.copy_(t["bias"])
    layer.slab_chan = t["chan"].clone()
    layer.slab_scales = t["scales"].clone()  # [Sg, N, G], G contiguous as AdapterSlab allocates it
    layer.slab_alphas, layer.slab_betas = t["alphas"].clone(), t["betas"].clone()
    return layer


def test_adapted_linear_layer_and_slab_refresh():
    """QuantLinear entry point: repack at first use, N-major slab copy refreshed on in-place writes."""
    from scaleserve.kernels.int4_matmul import adapted_linear

    M, N, K, gs = 9, 48, 200, 64
    t = make_case(M, N, K, gs, 4, MODE_ALPHA, "uniform", torch.bfloat16, bias=True)
    layer = _layer_from_case(t, K, N, gs, 4)
    rows = RowAdapters(t["chan_idx"], t["scale_idx"], t["alpha_idx"], MODE_ALPHA)
    check(adapted_linear(layer, t["x"], rows), reference(t), torch.bfloat16)
    assert layer._kernel_state is not None
    # write a new adapter into slots 2 in place (as AdapterSlab.copy_into does): picked up next call
    g = _gen()
    new_scales = t["base_scales"] * (0.5 + torch.rand(N, layer.num_groups, generator=g).to(t["x"].device))
    layer.slab_scales[2] = new_scales
    t["scales"][2] = new_scales
    layer.slab_alphas[2] *= 1.3
    t["alphas"][2] *= 1.3
    rows2 = RowAdapters(t["chan_idx"], t["scale_idx"], t["alpha_idx"], MODE_ALPHA)
    check(adapted_linear(layer, t["x"], rows2), reference(t), torch.bfloat16)
    layer.invalidate_caches()
    assert layer._kernel_state is None


def test_channel_and_group_mode_through_layer():
    from scaleserve.kernels.int4_matmul import adapted_linear

    M, N, K, gs = 4, 40, 96, 32
    for mode in (MODE_CHANNEL, MODE_GROUP):
        t = make_case(M, N, K, gs, 4, mode, "distinct", torch.float16)
        layer = _layer_from_case(t, K, N, gs, 4)
        check(adapted_linear(layer, t["x"], RowAdapters(t["chan_idx"], t["scale_idx"], t["alpha_idx"], mode)),
              reference(t), torch.float16)


@pytest.mark.parametrize("M,gs", [(1, 128), (3, -1), (12, 128), (1, 32)])
def test_mode1_rows_read_the_slabs_base_slot(M, gs, monkeypatch):
    """Base and per-channel rows (mode 1) bound for the MMA kernels (M <= 8, group size -1 / 128) run as mode 2 on
    the slab's 16-bit slot 0; other shapes, and MODE1_FROM_SLAB False, stay in mode 1 on the float32 base table.
    Either way the result is the reference's with the scales the kernel read."""
    N, K = 40, 256
    t = make_case(M, N, K, gs, 4, MODE_CHANNEL, "uniform", torch.bfloat16)
    layer = _layer_from_case(t, K, N, gs, 4)
    # as AdapterSlab keeps it on the GPU: fp16, N-major, the base scales in slot 0
    slab = t["scales"].to(torch.float16).transpose(1, 2).contiguous().transpose(1, 2)
    layer.slab_scales = slab
    modes = []
    real = im.int4_matmul
    monkeypatch.setattr(im, "int4_matmul", lambda *a, **k: modes.append(a[9]) or real(*a, **k))
    rows = RowAdapters(t["chan_idx"], t["scale_idx"], t["alpha_idx"], MODE_CHANNEL)
    want_group = M <= im.MMA_BATCH_AUTO_MAX_M and gs in (-1, 128)
    for from_slab in (True, False):
        monkeypatch.setattr(im, "MODE1_FROM_SLAB", from_slab)
        y = im.adapted_linear(layer, t["x"], rows)
        assert modes.pop() == (MODE_GROUP if from_slab and want_group else MODE_CHANNEL)
        base = slab[0].float() if from_slab and want_group else t["base_scales"]
        check(y, reference({**t, "base_scales": base, "scales": base[None].expand_as(t["scales"])}), torch.bfloat16)


def test_rejects_bad_shapes():
    t = make_case(2, 40, 64, 32, 4, MODE_GROUP, "uniform", torch.float16)
    w = repack(pack_int4(t["codes"]), 64, t["zeros"], t["base_scales"], 32)
    with pytest.raises(ValueError):
        int4_matmul(t["x"][:, :63], w, t["chan"], t["scales"], None, None, t["chan_idx"], t["scale_idx"],
                    t["alpha_idx"], MODE_GROUP)
    with pytest.raises(ValueError):
        repack(pack_int4(t["codes"]), 61, t["zeros"], t["base_scales"], 32)


# --- CUDA: Llama-2-7B shapes through the autotuner ---------------------------------------------

LLAMA7B = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", list(LLAMA7B))
@pytest.mark.parametrize("M", (1, 16, 64, 256))
@pytest.mark.parametrize("mode", (1, 2, 3))
def test_llama7b_shapes(shape, M, mode):
    """Fixed tile configs (one compile per variant); the autotuned path is checked below."""
    K, N = LLAMA7B[shape]
    gs = 128 if (M + mode) % 2 else -1
    dist = ("distinct", "zipf", "uniform")[mode - 1]
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 4} if M <= 16 else {"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 1,
                                                                           "num_warps": 8}
    t = make_case(M, N, K, gs, 4, mode, dist, torch.bfloat16, bias=(shape == "qkv"))
    check(run_kernel(t, mode, cfg, n_major=True), reference(t), torch.bfloat16)
    if M == 16:  # the other 16-bit dtype too
        t = make_case(M, N, K, gs, 4, mode, dist, torch.float16)
        check(run_kernel(t, mode, cfg, n_major=True), reference(t), torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", list(LLAMA7B))
@pytest.mark.parametrize("M", (1, 3))
@pytest.mark.parametrize("mode", (1, 2, 3))
def test_llama7b_gemv(shape, M, mode):
    """The decode GEMV on the real shapes, fixed config (per-channel and group 128 alternate)."""
    K, N = LLAMA7B[shape]
    gs = 128 if (M + mode) % 2 else -1
    t = make_case(M, N, K, gs, 4, mode, "uniform", torch.bfloat16, bias=(shape == "qkv"))
    check(run_kernel(t, mode, {"BLOCK_N": 128, "SPLIT_K": 8}, n_major=True), reference(t), torch.bfloat16)
    # long K blocks through the compiler-pipelined code tile (ragged for down: K = 11008 = 21.5 * 512)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 2, "STAGES": 3}
    check(run_kernel(t, mode, cfg, n_major=True), reference(t), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", list(LLAMA7B))
@pytest.mark.parametrize("gs", (-1, 128))
@pytest.mark.parametrize("mode", (1, 2))
def test_llama7b_mma_gemv(shape, gs, mode):
    """The MMA GEMV on the real shapes (down: K = 11008 = 86 blocks, a ragged last step), fixed config
    with both load depths, then the default dispatch (autotuned where the policy sends it) in fp16."""
    K, N = LLAMA7B[shape]
    t = make_case(1, N, K, gs, 4, mode, "zipf", torch.bfloat16, bias=(shape == "qkv"))
    for depth, unroll in ((1, 1), (2, 1), (1, 2)):
        cfg = {"MMA": 1, "BLOCK_N": 16, "SPLIT_K": 2, "DEPTH": depth, "UNROLL": unroll}
        check(run_kernel(t, mode, cfg, n_major=True), reference(t), torch.bfloat16)
    t = make_case(1, N, K, gs, 4, mode, "distinct", torch.float16)
    check(run_kernel(t, mode, n_major=True), reference(t), torch.float16)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("gs", (-1, 128))
@pytest.mark.parametrize("mode", (1, 2))
def test_llama7b_silu_gate(gs, mode):
    """silu(gate) * up from the MMA GEMV on the 7B gate / up shape: a fixed config with splits, then the autotuned
    one (the decode path), both against the reference and against the unfused projection gated by silu_mul."""
    K, N = LLAMA7B["gate_up"]
    t = make_case(1, N, K, gs, 4, mode, "zipf", torch.bfloat16)
    w = repack(pack_int4(t["codes"]), K, t["zeros"], t["base_scales"], gs, 4)
    nm = t["scales"].transpose(-1, -2).contiguous().transpose(-1, -2)
    args = (t["x"], w, t["chan"], nm, None, None, t["chan_idx"], t["scale_idx"], t["alpha_idx"], mode)
    for cfg in ({"MMA": 1, "BLOCK_N": 32, "SPLIT_K": 2, "DEPTH": 1}, None):
        out = torch.full((1, N // 2), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        _check_silu_gate(args, dict(config=cfg), out, reference(t), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", list(LLAMA7B))
@pytest.mark.parametrize("gs", (-1, 128))
@pytest.mark.parametrize("M", (4, 13))
def test_llama7b_mma_batch(shape, gs, M, monkeypatch):
    """The MMA batch kernel on the real shapes (down: K = 11008 = 86 blocks, a ragged split) over mixed slots
    with the base rows: fixed configs with both load depths, 1-4 blocks a step, split-K and two steps an iteration
    (a ragged split: an odd number of steps in one of them), then the autotuned
    kernel in fp16 (policy "all": 13 rows too)."""
    monkeypatch.setattr(im, "MMA_BATCH_POLICY", "all")
    K, N = LLAMA7B[shape]
    mode = MODE_GROUP if (M + gs) % 2 else MODE_CHANNEL
    t = make_case(M, N, K, gs, 4, mode, "zipf", torch.bfloat16, bias=(shape == "qkv"))
    for depth, split, bps, xa, unroll in ((1, 3, 1, 1, 1), (2, 1, 2, 1, 1), (1, 2, 4, 0, 1), (1, 2, 2, 1, 2)):
        cfg = {"MMA_BATCH": 1, "BLOCK_N": 64, "num_warps": 4, "SPLIT_K": split, "DEPTH": depth, "BPS": bps,
               "X_AHEAD": xa, "UNROLL": unroll}
        check(run_kernel(t, mode, cfg, n_major=True), reference(t), torch.bfloat16)
    if shape not in ("qkv", "down"):  # (the autotuner compiles its list per variant: two shapes show it)
        return
    t = make_case(M, N, K, gs, 4, 3 - mode, "distinct", torch.float16)
    assert im.autotuned_kernel(M, N, K, 3 - mode, gs) == "mma batch"
    check(run_kernel(t, 3 - mode, n_major=True), reference(t), torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", (1, 4, 64))
def test_autotuned_path(M):
    K, N = LLAMA7B["o"]
    for mode in (MODE_GROUP, MODE_ALPHA):
        t = make_case(M, N, K, 128, 4, mode, "uniform", torch.bfloat16)
        check(run_kernel(t, mode, n_major=True), reference(t), torch.bfloat16)


def test_mma_pins_take_the_fastest_config_per_shape():
    from scaleserve.kernels.int4_mma_gemv import pins_from_rows

    def row(N, us, bn, **kw):
        return {"N": N, "K": 4096, "mode": 2, "group_size": 128, "graph_us": us, "MMA": 1, "BLOCK_N": bn, "SPLIT_K": 1,
                "DEPTH": 1, "X_AHEAD": 1, "STAGES": 1, "UNROLL": 1, "num_warps": 4, **kw}

    rows = [row(4096, 7.0, 16), row(4096, 6.5, 32, maxnreg=168), row(4096, 6.9, 64), row(12288, 12.0, 16),
            row(12288, 1.0, 64, MMA=0), row(12288, None, 32)]  # not an MMA config / not timed: never a pin
    pins = pins_from_rows(rows, "graph_us")
    assert pins == {(4096, 4096, 2, 128): {"BLOCK_N": 32, "SPLIT_K": 1, "DEPTH": 1, "X_AHEAD": 1, "STAGES": 1,
                                           "UNROLL": 1, "num_warps": 4, "maxnreg": 168},
                    (12288, 4096, 2, 128): {"BLOCK_N": 16, "SPLIT_K": 1, "DEPTH": 1, "X_AHEAD": 1, "STAGES": 1,
                                            "UNROLL": 1, "num_warps": 4}}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_pinned_mma_config_replaces_the_autotuner(monkeypatch):
    from scaleserve.kernels import int4_mma_gemv as mg

    K, N = LLAMA7B["o"]
    monkeypatch.setattr(mg, "_tuned", None)  # the autotuned launch would fail: every call below takes its pin
    for mode in (MODE_CHANNEL, MODE_GROUP):
        monkeypatch.setitem(mg.PINNED, (N, K, mode, 128), {"BLOCK_N": 16, "SPLIT_K": 4, "DEPTH": 2, "num_warps": 8})
        t = make_case(1, N, K, 128, 4, mode, "zipf", torch.bfloat16)
        check(run_kernel(t, mode, n_major=True), reference(t), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", list(LLAMA7B))
@pytest.mark.parametrize("M,swap", [pytest.param(M, swap, id=f"M{M}{'-swap' if swap else ''}")
                                     for M, swap in ((4, False), (16, False), (64, False), (256, False), (16, True),
                                                     (64, True), (256, True))])
@pytest.mark.parametrize("mode", (1, 2))
def test_llama7b_fold_gemm(shape, M, swap, mode, monkeypatch):
    """The fold GEMM on the real shapes (down: K = 11008, a ragged split), group 128 and per-channel
    alternating: a fixed config with split-K on mixed slots, then the autotuned kernel in fp16 on rows
    of one adapter, as the dispatch sends them (FOLD_POLICY "always" reaches it below FOLD_MIN_M), with
    the code bytes as the MMA's A operand or not (SWAP); mode 2 on its one-slot loop where SWAP is on."""
    K, N = LLAMA7B[shape]
    gs = 128 if (M // 4 + mode) % 2 else -1
    t = make_case(M, N, K, gs, 4, mode, ("distinct", "zipf")[mode - 1], torch.bfloat16, bias=(shape == "qkv"))
    cfg = {"FOLD": 1, "SWAP": int(swap), "BLOCK_M": min(64, max(16, M)), "BLOCK_N": 128, "SPLIT_K": 3}
    check(run_kernel(t, mode, cfg, n_major=True), reference(t), torch.bfloat16)
    monkeypatch.setattr(im, "FOLD_POLICY", "always")
    monkeypatch.setattr(im, "MMA_BATCH_POLICY", "never")  # (it would take M <= 8 first)
    monkeypatch.setattr(im, "FOLD_SWAP", swap)
    monkeypatch.setattr(im, "FOLD_ONE_SLOT", swap)
    t = make_case(M, N, K, gs, 4, mode, "identical", torch.float16)
    assert im.fold_gemm_chosen(M, mode, gs, scale_slots=1)
    check(run_kernel(t, mode, n_major=True, scale_slots=1), reference(t), torch.float16)
