"""The fold GEMM (kernels/int4_gemm.py) compiled for sm_90a on this machine, no GPU needed: with SWAP the dequantized
code tile reaches wgmma's A fragment from registers, never through shared memory, and no wgmma is waited for inside
the loop, in Triton's IR or in the SASS, on four tiles where ptxas keeps a block's slices in flight; without SWAP
the tile is stored to shared memory in the loop (the B operand must be there) and each block's dots are waited for,
which is what the check would see if SWAP lost its layout. Its numbers are checked in
tests/kernels/test_int4_matmul.py."""

from __future__ import annotations

import pytest

# compiles each case for sm_90a; prints, per case, the main loop's SASS opcode counts and its wgmma waits
_COMPILE = r"""
import collections, json, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scaleserve.kernels import int4_gemm

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

def loop_opcodes(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loop = []
    for addr, text in ins:  # the longest backward branch's body is the K loop
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            loop = body if len(body) > len(loop) else loop
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in loop)
    # how many wgmma groups a warp group may leave in flight at each of the loop's waits on them
    return ops, [int(v, 16) for v in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", "\n".join(loop))]

kernel = int4_gemm._int4_gemm_kernel
out = []
for case in json.loads(sys.stdin.read()):
    const = dict(MODE=case["mode"], ONE_SLOT=case["one_slot"], SWAP=case["swap"], GROUP_SIZE=case["group_size"],
                 HAS_BIAS=False, FAST=True, DT=tl.bfloat16, PREC=None, PDL=True, **case["meta"])
    ptrs = dict(x_ptr="*bf16", y_ptr="*bf16", bias_ptr="*bf16", q_ptr="*u8" if case["swap"] else "*i32",
                zero_ptr="*fp32", s0_ptr="*fp32", chan_ptr="*fp16", scale_ptr="*fp16", chan_idx_ptr="*i32",
                scale_idx_ptr="*i32", ws_ptr="*fp32", cnt_ptr="*i32")
    sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in kernel.arg_names}
    # as a launch on the 7B shapes specializes them: pointers and sizes divisible by 16, the slab's N stride 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n not in const and n not in ("stride_sn", "M", "M_BUCKET", "chan_idx_ptr", "scale_idx_ptr")}
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    ttgir = c.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"):]
    loop = loop[:loop.index("scf.yield")]
    ops, sass_waits = loop_opcodes(c.asm["cubin"])
    out.append(dict(ops=ops, sass_waits=sass_waits,
                    waits=[int(v) for v in re.findall(r"ttng.warp_group_dot_wait .*?pendings = (\d+)", loop)]))
print(json.dumps(out))
"""


def _cases():
    from scaleserve.kernels.int4_gemm import SWAP_CONFIGS

    # (tiles whose slices ptxas keeps in flight: it serializes some others, e.g. 16 x 128 and BLOCK_K 64 tiles, which
    # the autotuner may still pick where they are faster)
    picked = [c for c in SWAP_CONFIGS if c.kwargs["BLOCK_K"] == 128 and c.kwargs["SPLIT_K"] == 1
              and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) in ((16, 256), (64, 128), (128, 128), (256, 128))]
    assert len(picked) == 4
    out = []
    for i, cfg in enumerate(picked):
        for mode, one_slot, gs in ((1, False, 128), (2, True, (-1, 64)[i % 2])):
            out.append(dict(mode=mode, one_slot=one_slot, swap=True, group_size=gs, meta=dict(cfg.kwargs),
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    # the check's own control: a tile without SWAP
    out.append({**out[2], "swap": False})
    return out


@pytest.mark.timeout(600)
def test_swap_keeps_the_dequantized_tile_in_registers(offline_compile):
    cases = _cases()
    found = offline_compile(_COMPILE, cases)
    for case, got in zip(cases, found):
        ops, waits = got["ops"], got["waits"]
        label = {k: case[k] for k in ("mode", "one_slot", "swap", "group_size", "meta", "num_warps")}
        assert ops.get("HGMMA", 0) > 0, (label, ops)
        if case["swap"]:
            # stores to shared memory (STS) or ldmatrix (LDSM) in the loop would be the tile's round trip; the
            # pipeline's copies are LDGSTS
            assert not ops.get("STS") and not ops.get("LDSM"), (label, ops)
            # no wgmma waited for inside the loop, by Triton or by ptxas (which serializes a warp group's slices,
            # WARPGROUP.DEPBAR.LE gsb0, 0x0 before each next fragment, where it reuses their registers)
            assert waits and min(waits) > 0, (label, waits)
            assert got["sass_waits"] and min(got["sass_waits"]) > 0, (label, got["sass_waits"])
        else:
            assert ops.get("STS", 0) > 0 and 0 in waits and 0 in got["sass_waits"], (label, ops, waits)
