"""The MMA kernels' inline PTX run lane by lane on the CPU, against the semantics their docstrings state.

On the GPU the MMA batch kernel's math lives in inline asm: the LOP3 dequantization, the x word loads and
their pair permutes, the chained `mma.sync.m16n8k16` and the scaled epilogue. The interpreter (CPU CI) runs
a plain-arithmetic path instead, so it cannot show that these strings, and the lane roles the kernel gives
its operands, compute what they should. This file emulates the instructions the strings use (mov, shr,
shl, lop3, prmt, setp / @p ld.global, selp, cvt, f32 sub / mul / fma, and mma.sync across a warp of 32 lanes)
and checks a whole step of one warp against float64, for the batch kernel and for the M = 1 MMA GEMV, and both
kernels' table loads, and the mode-3 (AlphaTuning) plane steps of both. (The layout Triton gives the asm, and its registers, are checked in
test_int4_mma_gemv.py.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from scaleserve.kernels import int4_mma_batch as mb
from scaleserve.kernels import int4_mma_gemv as mg

MASK = 0xFFFFFFFF


def _f32(bits: int) -> np.float32:
    return np.array([bits & MASK], dtype=np.uint32).view(np.float32)[0]


def _bits(v) -> int:
    return int(np.array([v], dtype=np.float32).view(np.uint32)[0])


def _signed(bits32: int) -> int:
    return bits32 - (1 << 32) if bits32 & (1 << 31) else bits32


def _half(bits16: int, f16: bool) -> float:
    if f16:
        return float(np.array([bits16], dtype=np.uint16).view(np.float16)[0])
    return float(_f32(bits16 << 16))


def _split(args: str) -> list[str]:
    """Operands at the top level: commas inside {...} and [...] stay."""
    out, depth, cur = [], 0, ""
    for ch in args:
        depth += ch in "{[" and 1 or (ch in "}]" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()] if cur.strip() else out


def _statements(asm: str) -> list[tuple[str | None, str, list[str]]]:
    """(predicate, opcode, operands) of each instruction; declarations and the block's braces dropped."""
    out = []
    for raw in asm.split(";"):
        s = raw.strip()
        s = s[1:].strip() if s.startswith("{") and not s.startswith("{$") else s
        s = s[1:].strip() if s.startswith("}") else s
        if not s or s.startswith(".reg"):
            continue
        pred = None
        if s.startswith("@"):
            pred, s = s[1:].split(None, 1)
        op, _, rest = s.partition(" ")
        out.append((pred, op, _split(rest)))
    return out


class Warp:
    """32 lanes running one asm string in lockstep. operands[lane] = the input registers' bits ($n_out ...);
    memory maps an address to the 32-bit words stored from there."""

    def __init__(self, asm: str, n_out: int, operands: list[list[int]], memory: dict[int, list[int]] | None = None):
        self.asm, self.n_out, self.memory = asm, n_out, memory or {}
        self.regs = [{f"${n_out + i}": v & MASK for i, v in enumerate(ops)} for ops in operands]

    def run(self) -> list[list[int]]:
        for pred, op, args in _statements(self.asm):
            if op.startswith("mma.sync"):
                self._mma(op, args)
                continue
            for r in self.regs:
                if pred is None or r[pred]:
                    self._lane(r, op, args)
        return [[r[f"${i}"] for i in range(self.n_out)] for r in self.regs]

    @staticmethod
    def _val(r: dict, a: str) -> int:
        if a.startswith("0f"):
            return int(a[2:], 16)
        if a.startswith("0x"):
            return int(a, 16)
        if re.fullmatch(r"-?\d+", a):
            return int(a) & MASK
        return r[a]

    def _lane(self, r: dict, op: str, a: list[str]) -> None:
        v = lambda i: self._val(r, a[i])  # noqa: E731
        if op in ("mov.b32", "mov.f32"):
            if a[0].startswith("{"):  # unpack a 32-bit register into two 16-bit halves
                lo, hi = (x.strip() for x in a[0][1:-1].split(","))
                r[lo], r[hi] = v(1) & 0xFFFF, v(1) >> 16
            else:
                r[a[0]] = v(1)
        elif op == "mov.b16":
            r[a[0]] = v(1) & 0xFFFF
        elif op == "shr.u32":
            r[a[0]] = v(1) >> v(2)
        elif op == "shl.b32":
            r[a[0]] = (v(1) << v(2)) & MASK
        elif op == "lop3.b32":
            x, y, z, lut = v(1), v(2), v(3), v(4)
            res = 0
            for i in range(8):  # bit i of the table: the value for (x, y, z) bits = (i >> 2, i >> 1, i) & 1
                if lut >> i & 1:
                    res |= (x if i & 4 else ~x) & (y if i & 2 else ~y) & (z if i & 1 else ~z)
            r[a[0]] = res & MASK
        elif op == "prmt.b32":
            src = v(1).to_bytes(4, "little") + v(2).to_bytes(4, "little")
            sel = v(3)
            assert all((sel >> 4 * i) & 8 == 0 for i in range(4)), "sign replication is not emulated"
            r[a[0]] = int.from_bytes(bytes(src[(sel >> 4 * i) & 7] for i in range(4)), "little")
        elif op == "setp.ne.s32":
            r[a[0]] = v(1) != v(2)
        elif op == "selp.f32":
            r[a[0]] = v(1) if r[a[3]] else v(2)
        elif op.startswith("ld.global.nc"):
            addr = self._val(r, a[1].strip("[]"))
            dst = [x.strip() for x in a[0].strip("{}").split(",")]
            words = self.memory[addr]
            for i, d in enumerate(dst):
                r[d] = words[i] & (0xFFFF if op.endswith(".b16") else MASK)
        elif op == "mul.wide.s32":  # (64-bit results: addresses)
            r[a[0]] = _signed(v(1)) * _signed(v(2))
        elif op == "add.s64":
            r[a[0]] = v(1) + v(2)
        elif op in ("cvt.f32.f16", "cvt.f32.bf16"):
            r[a[0]] = _bits(_half(v(1), op.endswith(".f16")))
        elif op == "sub.f32":
            r[a[0]] = _bits(_f32(v(1)) - _f32(v(2)))
        elif op == "mul.f32":
            r[a[0]] = _bits(_f32(v(1)) * _f32(v(2)))
        elif op == "fma.rn.f32":
            r[a[0]] = _bits(np.float32(float(_f32(v(1))) * float(_f32(v(2))) + float(_f32(v(3)))))
        else:
            raise NotImplementedError(op)

    def _mma(self, op: str, a: list[str]) -> None:
        """m16n8k16, row.col, f32 accumulators: lane (g, c) = (l >> 2, l & 3) holds A rows g, g + 8 at columns
        2c, 2c + 1 (+ 8), B rows 2c, 2c + 1 (+ 8) of column g, and C[g | g + 8][2c | 2c + 1] (PTX ISA)."""
        f16 = ".f16.f16." in op
        regs = lambda s: [x.strip() for x in s.strip("{}").split(",")]  # noqa: E731
        d, av, bv, cv = (regs(x) for x in a)
        A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
        for lane, r in enumerate(self.regs):
            g, c = lane >> 2, lane & 3
            for j, (row, col) in enumerate(((g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8))):
                w = self._val(r, av[j])
                A[row, col], A[row, col + 1] = _half(w & 0xFFFF, f16), _half(w >> 16, f16)
            for j, k in enumerate((2 * c, 2 * c + 8)):
                w = self._val(r, bv[j])
                B[k, g], B[k + 1, g] = _half(w & 0xFFFF, f16), _half(w >> 16, f16)
            for j, (row, col) in enumerate(((g, 2 * c), (g, 2 * c + 1), (g + 8, 2 * c), (g + 8, 2 * c + 1))):
                C[row, col] = _f32(self._val(r, cv[j]))
        D = (A @ B + C).astype(np.float32)
        for lane, r in enumerate(self.regs):
            g, c = lane >> 2, lane & 3
            for j, (row, col) in enumerate(((g, 2 * c), (g, 2 * c + 1), (g + 8, 2 * c), (g + 8, 2 * c + 1))):
                r[d[j]] = _bits(D[row, col])


def _x_bits(x: np.ndarray, f16: bool) -> np.ndarray:
    """16-bit patterns of x (already representable)."""
    if f16:
        return x.astype(np.float16).view(np.uint16).astype(np.int64)
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)


def _batch_warp(rng, f16: bool, levels: int = 16):
    """A batch kernel step's inputs for one warp, one 128-code block of 8 row pairs and 8 batch rows of x: codes Q
    [16, 128] (row pairs (2g, 2g + 1)), x [8, 128], the accumulators [32, 4], and each lane (g, c)'s first operands
    as int4_mma_batch gives them: its words 4c..4c+3 of rows 2g and 2g + 1, its x pairs (each element, word 4c + u,
    loads x row g: B column g) and the ones chain's sums."""
    Q = rng.integers(0, levels, (16, 128))
    x = _representable(rng.standard_normal((8, 128)), f16)
    acc0 = rng.standard_normal((32, 4)).astype(np.float32)
    words = (Q.reshape(16, 16, 8) << (4 * np.arange(8))).sum(-1)  # [rows, word]: nibble j = code 8w + j
    p_ops = _lane_pairs(_x_memory(x, f16, 16), lambda lane, u: 1000 * (lane >> 2) + 4 * (lane & 3) + u)
    xs = Warp(mg._ONES_F16.value if f16 else mg._ONES_BF16.value, 4, p_ops).run()
    heads = [[int(words[2 * (lane >> 2) + h, 4 * (lane & 3) + u]) for h in range(2) for u in range(4)]
             + p_ops[lane] + xs[lane] for lane in range(32)]
    return Q, x, acc0, heads


def _gemv_warp(rng, f16: bool, levels: int = 16):
    """A GEMV step's inputs for one warp, one row pair and an 8-block step: codes Q [2, 8, 128] (rows0 / rows1,
    block, k), x [1, 1024], the accumulators [32, 4], and each lane (r, c)'s first operands: its words 4c..4c+3 of
    block r of rows0 then rows1, its x pairs (x's block r) and the ones chain's sums."""
    Q = rng.integers(0, levels, (2, 8, 128))
    x = _representable(rng.standard_normal((1, 8 * 128)), f16)
    acc0 = rng.standard_normal((32, 4)).astype(np.float32)
    words = (Q.reshape(2, 8, 16, 8) << (4 * np.arange(8))).sum(-1)  # [row, block, word]
    p_ops = _lane_pairs(_x_memory(x, f16, 8 * 16), lambda lane, u: 16 * (lane >> 2) + 4 * (lane & 3) + u)
    xs = Warp(mg._ONES_F16.value if f16 else mg._ONES_BF16.value, 4, p_ops).run()
    heads = [[int(words[h, lane >> 2, 4 * (lane & 3) + u]) for h in range(2) for u in range(4)]
             + p_ops[lane] + xs[lane] for lane in range(32)]
    return Q, x, acc0, heads


@pytest.mark.parametrize("f16", (False, True), ids=("bf16", "fp16"))
@pytest.mark.parametrize("mode", (1, 2))
def test_batch_kernel_step_asm(f16, mode):
    """One warp, one 128-code block of 8 row pairs, 8 batch rows of x: the kernel's x-word asm, ones chain and
    step asm, with each lane's operands as int4_mma_batch gives them, add S * x_b . (Q_n - z_n) to the
    accumulator element (n = 2g + (t >> 1), b = 2c + (t & 1)) of lane (g, c) and register t."""
    rng = np.random.default_rng(7 + f16 + 2 * mode)
    Q, x, acc0, heads = _batch_warp(rng, f16)
    z = rng.random(16) * 15  # float zero points of the block's group
    S = rng.random((16, 8)) + 0.5  # [row, batch]: mode 1 has one scale per row, mode 2 one per row and batch slot
    if mode == 1:
        S[:] = S[:, :1]
    lanes = [(lane >> 2, lane & 3) for lane in range(32)]
    ops = []
    for lane, (g, c) in enumerate(lanes):
        zt = [_bits(z[2 * g + (t >> 1)]) for t in range(4)]
        st = [_bits(S[2 * g + (t >> 1), 2 * c + (t & 1)]) for t in range(4)]
        ops.append(heads[lane] + zt + st + [_bits(v) for v in acc0[lane]])
    step = mb._STEP_F16.value if f16 else mb._STEP_BF16.value
    got = np.array([[_f32(v) for v in lane] for lane in Warp(step, 4, ops).run()], dtype=np.float64)
    want = np.empty((32, 4))
    for lane, (g, c) in enumerate(lanes):
        for t in range(4):
            n, b = 2 * g + (t >> 1), 2 * c + (t & 1)
            want[lane, t] = acc0[lane, t] + S[n, b] * (x[b] @ (Q[n] - z[n]))
    scale = np.abs(x).sum(1).max() * 15 * S.max()  # the size of the terms the float32 sums cancel
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)


def _x_memory(x: np.ndarray, f16: bool, words: int) -> dict[int, list[int]]:
    """x rows as 16-byte words at address 1000 * row + word: each word's 8 values as 4 32-bit registers."""
    xb = _x_bits(x, f16)
    return {1000 * b + w: [int(xb[b, 8 * w + 2 * i] | xb[b, 8 * w + 2 * i + 1] << 16) for i in range(4)]
            for b in range(x.shape[0]) for w in range(words)}


def _lane_pairs(memory: dict, lane_words) -> list[list[int]]:
    """Each lane's x pairs through the kernels' x-word asm (pack=1: one run per element), as the packed
    operands of the chains: P_i of the lane's word u at position 4i + u. lane_words(lane, u) = the address."""
    pairs = [[None] * 4 for _ in range(32)]
    for u in range(4):
        out = Warp(mg._X_WORD_ASM.value, 4, [[lane_words(lane, u), 1] for lane in range(32)], memory).run()
        for lane in range(32):
            pairs[lane][u] = out[lane]
    return [[pairs[lane][u][i] for i in range(4) for u in range(4)] for lane in range(32)]


def _representable(x: np.ndarray, f16: bool) -> np.ndarray:
    if f16:
        return x.astype(np.float16).astype(np.float64)
    return (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("f16", (False, True), ids=("bf16", "fp16"))
def test_gemv_step_asm(f16):
    """The MMA GEMV (M = 1): one warp, one row pair, an 8-block step. Lane (r, c) holds words 4c..4c+3 of block
    r and loads x's block r; the step adds s * x_r . (Q_r - z) of rows0 to register 0 and of rows1 to register 2
    of the 8 lanes holding C's diagonal (c = r >> 1), whose tables are non-zero; every other register passes
    its accumulator through."""
    rng = np.random.default_rng(11 + f16)
    Q, x, acc0, heads = _gemv_warp(rng, f16)
    z, sc = rng.random((2, 8)) * 15, rng.random((2, 8)) + 0.5  # per row and block (group 128)
    ops = []
    for lane in range(32):
        r, c = lane >> 2, lane & 3
        diag = c == r >> 1
        tables = [_bits(v if diag else 0.0) for v in (z[0, r], z[1, r], sc[0, r], sc[1, r])]
        ops.append(heads[lane] + tables + [_bits(v) for v in acc0[lane]] + [r & 1] * 4)
    got = np.array([[_f32(v) for v in lane] for lane in
                    Warp(mg._STEP_F16.value if f16 else mg._STEP_BF16.value, 4, ops).run()], dtype=np.float64)
    want = acc0.astype(np.float64)
    for lane in range(32):
        r, c = lane >> 2, lane & 3
        if c == r >> 1:
            for h, t in ((0, 0), (1, 2)):
                want[lane, t] += sc[h, r] * (x[0, 128 * r:128 * r + 128] @ (Q[h, r] - z[h, r]))
    scale = np.abs(x).sum() * 15 * sc.max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)


def _plane_dots(x: np.ndarray, q: np.ndarray, bits: int) -> np.ndarray:
    """S_j = x . (2 bit_j(q) - 1) for j < bits: [bits]."""
    return np.array([x @ (2 * ((q >> j) & 1) - 1) for j in range(bits)])


@pytest.mark.parametrize("fold", (False, True), ids=("plain", "fold"))
@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("f16", (False, True), ids=("bf16", "fp16"))
def test_alpha_batch_step_asm(f16, bits, fold):
    """The MMA alpha batch kernel's step (kernels/int4_mma_alpha.py): one warp, one 128-code block of 8 row pairs,
    8 batch rows of x. Element t of lane (g, c), row n = 2g + (t >> 1) and batch row b = 2c + (t & 1), gains
    sum_j alpha[j, n, b] S_j + beta[n, b] X_b, its own tables; with fold the plane operands carry K_j."""
    from scaleserve.kernels import int4_mma_alpha as ma

    rng = np.random.default_rng(17 + f16 + 2 * bits + 8 * fold)
    Q, x, acc0, heads = _batch_warp(rng, f16, 2**bits)
    alpha = rng.standard_normal((4, 16, 8)) * 0.1  # [plane, row, batch]: planes past bits are not read
    beta = rng.standard_normal((16, 8)) * 0.1
    ops = []
    for lane in range(32):
        el = [(2 * (lane >> 2) + (t >> 1), 2 * (lane & 3) + (t & 1)) for t in range(4)]
        ops.append(heads[lane] + [_bits(alpha[j, n, b]) for j in range(4) for n, b in el]
                   + [_bits(beta[n, b]) for n, b in el] + [_bits(v) for v in acc0[lane]])
    got = np.array([[_f32(v) for v in lane] for lane in Warp(ma._batch_step_asm(f16, bits, fold), 4, ops).run()])
    want = acc0.astype(np.float64)
    for lane in range(32):
        g, c = lane >> 2, lane & 3
        for t in range(4):
            n, b = 2 * g + (t >> 1), 2 * c + (t & 1)
            want[lane, t] += alpha[:bits, n, b] @ _plane_dots(x[b], Q[n], bits) + beta[n, b] * x[b].sum()
    scale = np.abs(x).sum(1).max() * 2 * ma.plane_scale(0, f16) * 0.4  # the K_j C_j terms the float32 sums cancel
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-8 * scale)


@pytest.mark.parametrize("bits", (2, 4))
@pytest.mark.parametrize("f16", (False, True), ids=("bf16", "fp16"))
def test_alpha_gemv_step_asm(f16, bits):
    """The MMA alpha GEMV's step: one warp, one row pair, an 8-block step laid out as test_gemv_step_asm's. The 8
    lanes of C's diagonal (c = r >> 1) add sum_j alpha_j S_j + beta X of block r for rows0 to register 0 and rows1
    to register 2; every other register passes its accumulator through."""
    from scaleserve.kernels import int4_mma_alpha as ma

    rng = np.random.default_rng(23 + f16 + 2 * bits)
    Q, x, acc0, heads = _gemv_warp(rng, f16, 2**bits)
    alpha = rng.standard_normal((4, 2, 8)) * 0.1  # [plane, row, block]
    beta = rng.standard_normal((2, 8)) * 0.1
    ops = []
    for lane in range(32):
        r, c = lane >> 2, lane & 3
        on = float(c == r >> 1)  # the others read zeros
        tables = [on * alpha[j, h, r] for j in range(4) for h in range(2)] + [on * beta[0, r], on * beta[1, r], 0, 0]
        ops.append(heads[lane] + [_bits(v) for v in tables] + [_bits(v) for v in acc0[lane]] + [r & 1] * 4)
    got = np.array([[_f32(v) for v in lane] for lane in Warp(ma._plane_step_asm(f16, bits), 4, ops).run()])
    want = acc0.astype(np.float64)
    for lane in range(32):
        r, c = lane >> 2, lane & 3
        if c == r >> 1:
            xr = x[0, 128 * r:128 * r + 128]
            for h, t in ((0, 0), (1, 2)):
                want[lane, t] += alpha[:bits, h, r] @ _plane_dots(xr, Q[h, r], bits) + beta[h, r] * xr.sum()
    scale = np.abs(x).sum() / 8 * 2 * ma.plane_scale(0, f16) * 0.4
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-8 * scale)


@pytest.mark.parametrize("s_type", ("f32", "f16", "bf16"))
@pytest.mark.parametrize("pair", (True, False), ids=("pair", "single"))
def test_batch_kernel_table_asm(s_type, pair):
    """The batch kernel's table loads: the zero-point pair (z0, z1) of a lane becomes (z0, z0, z1, z1); mode 2's
    scales of (row t >> 1, batch column t & 1) land in register t, read as the two rows' pair per batch column
    (pointers of elements 0 and 1) or one scale per element."""
    rng = np.random.default_rng(3)
    zp = rng.random(2).astype(np.float32)
    out = Warp(mb._PAIR_ASM.value, 4, [[100, 100, 100, 100, 0, 1, 2, 3]] * 32,
               {100: [_bits(zp[0]), _bits(zp[1])]}).run()
    assert all(np.allclose([_f32(v) for v in lane], [zp[0], zp[0], zp[1], zp[1]]) for lane in out)
    S = _representable(rng.random((2, 2)) + 0.5, s_type == "f16") if s_type != "f32" else rng.random((2, 2))
    S = S.astype(np.float32)  # [row, batch column]

    def raw(v):
        if s_type == "f32":
            return _bits(v)
        return int(_x_bits(np.array([v]), s_type == "f16")[0])

    if pair:  # elements 0 / 1: the (row 0, row 1) pair of batch column 0 / 1
        memory = {200 + b: [raw(S[0, b]) | (raw(S[1, b]) << 16)] if s_type != "f32" else [raw(S[0, b]), raw(S[1, b])]
                  for b in range(2)}
        ptrs = [200, 201, 200, 201]
    else:
        memory = {300 + t: [raw(S[t >> 1, t & 1])] for t in range(4)}
        ptrs = [300, 301, 302, 303]
    out = Warp(mb._scales_asm(s_type, pair), 4, [ptrs + [0, 1, 2, 3]] * 32, memory).run()
    want = [S[t >> 1, t & 1] for t in range(4)]
    assert all(np.allclose([_f32(v) for v in lane], want, rtol=0, atol=0) for lane in out)


@pytest.mark.parametrize("s_type", ("f32", "f16", "bf16"))
@pytest.mark.parametrize("kind", ("pair", "single", "apart"))
def test_gemv_table_asm(s_type, kind):
    """The MMA GEMV's table loads give a lane (z0, z1, s0, s1) of its rows0 / rows1, zeros where it does not
    read: adjacent rows' zero points in one load and scales in one (pair) or two (single) loads from the
    pointers of elements 0 and 2; the SiLU-gated GEMV's rows N / 2 apart (apart) from rows0's pointers and
    $12 = N / 2, the distance to rows1 in elements."""
    rng = np.random.default_rng(5)
    z = rng.random(2).astype(np.float32) * 15
    S = rng.random(2) + 0.5
    S = (S if s_type == "f32" else _representable(S, s_type == "f16")).astype(np.float32)
    size, half = (4, 7) if s_type == "f32" else (2, 7)

    def raw(v):
        return _bits(v) if s_type == "f32" else int(_x_bits(np.array([v]), s_type == "f16")[0])

    if kind == "apart":
        asm = mg._apart_tables_asm(s_type)
        memory = {100: [_bits(z[0])], 100 + 4 * half: [_bits(z[1])], 200: [raw(S[0])], 200 + size * half: [raw(S[1])]}
        zp, sp = [100] * 4, [200] * 4
    else:
        asm = mg._tables_asm(s_type, kind == "pair")
        memory = {100: [_bits(z[0]), _bits(z[1])]}
        if kind == "pair":
            memory[200] = [raw(S[0]), raw(S[1])] if s_type == "f32" else [raw(S[0]) | (raw(S[1]) << 16)]
        else:
            memory.update({200: [raw(S[0])], 300: [raw(S[1])]})
        zp, sp = [100] * 4, [200, 200, 300, 300]
    lanes = [zp + sp + [half if lane % 4 == 1 else 0] * 4 for lane in range(32)]
    out = Warp(asm, 4, lanes, memory).run()
    for lane, got in enumerate(out):
        want = [z[0], z[1], S[0], S[1]] if lane % 4 == 1 else [0.0] * 4
        np.testing.assert_array_equal([_f32(v) for v in got], np.array(want, dtype=np.float32))


def test_emulator_knows_its_instructions():
    """The emulator's bit operations against hand-worked values, so a failure above points at the asm."""
    r = {}
    lane = Warp("", 0, [])._lane
    lane(r, "lop3.b32", ["d", "0x12345678", "0x000F000F", "0x3F803F80", "0xEA"])  # (a & b) | c
    assert r["d"] == 0x3F843F88  # bf16 pair (1 + 8/128, 1 + 4/128): nibbles 0 and 4
    lane(r, "prmt.b32", ["d", "0x11223344", "0x55667788", "0x5410"])  # bytes 0, 1 of a, then 0, 1 of b
    assert r["d"] == 0x77883344
    lane(r, "shr.u32", ["d", "0x80000000", "4"])
    assert r["d"] == 0x08000000
    assert _half(0x3F84, False) == 1 + 4 / 128 and _half(0x3C00 | 0x40, True) == 1 + 1 / 16
