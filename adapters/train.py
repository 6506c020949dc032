"""`scaleserve train`: fine-tune PEQA scales or AlphaTuning alphas of the int4 model into an adapter.

Quantization as a module swap, for training too: every QuantLinear of the loaded int4 model is
swapped for a TrainableQuantLinear that holds this task's adapter tensors as nn.Parameters and
computes y = x @ W^T with a custom autograd Function. W is re-dequantized from the frozen int4
codes in the forward AND again in the backward, one layer at a time, so no dense copy of the
model is ever kept: memory is the int4 model + activations + one layer's transient weight and code index.

Per linear with N outputs, K inputs, G groups (g(k) = the group of column k), Q the codes, z the
zero points, s0 the base scales, b the bits; gW = gy^T x [N, K] is the weight gradient:
  peqa, group     W = s[n,g(k)] (Q - z)          dL/ds[n,g]  = sum_{k in g} gW[n,k] (Q - z)[n,k]
  peqa, channel   W = c[n] s0[n,g(k)] (Q - z)    dL/dc[n]    = sum_k gW[n,k] s0[n,g(k)] (Q - z)[n,k]
  alphatuning     W = sum_i a_i[n,g(k)] (2 bit_i(Q) - 1) + beta[n,g(k)]
                                                 dL/da_i[n,g] = sum_{k in g} gW[n,k] (2 bit_i(Q) - 1)
                                                 dL/dbeta[n,g] = sum_{k in g} gW[n,k]
Each weight element is computed with exactly the float operations of kernels.reference.adapted_linear_ref
(through a small per-(row, group, code) table, see levels()), so a trained adapter served on CPU
reproduces the training-time logits bit for bit (tests/adapters/test_train.py).

What the optimizer sees: each adapter tensor is an anchor (the base, or the --init adapter) times
a trainable multiplier that starts at 1 (PEQA scales, AlphaTuning alphas), or, for AlphaTuning
betas, the anchor plus a trainable shift in units of the group's mean |alpha| that starts at 0.
Identity is therefore exact at step 0, and one learning rate means the same relative change for
every layer whatever its scale. The exported adapter holds the effective tensors (docs/training.md).
AlphaTuning --granularity channel trains one multiplier per (bit plane, row) and one per row for
the betas; the file still holds full [b, N, G] alphas (that is what the server reads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scaleserve.kernels.linear import QuantLinear, RowAdapters
from scaleserve.kernels.quant import bit_planes, group_len, num_groups

from .format import Adapter, AdapterError, BaseSpec, load_adapter, validate
from .train_data import DataError, Dataset, Example, load_jsonl, tokenize_dataset

log = logging.getLogger(__name__)

KINDS = ("peqa", "alphatuning")
GRANULARITIES = ("channel", "group")
SCHEDULES = ("constant", "linear", "cosine")


# --- the adapted linear with an exact, memory-lean backward ----------------------------------
#
# Every adapted weight element is a function of its row, its group and its 4-bit code only, so one
# layer's weight is a gather from a small table levels[n, g, c] (c = 0..15) indexed by the codes;
# the table is computed with the reference's own float operations, element for element, so the
# gathered W is bit-identical to kernels.reference's. In the backward, the weight gradient gW is
# binned by (row, group, code) in one scatter pass, H[n, g, c] = sum_{k in g, Q[n,k] = c} gW[n, k],
# and every adapter gradient is a short sum over c:
#   dL/ds[n,g] = sum_c H (c - z),  dL/dc[n] = sum_{g,c} H s0 (c - z),
#   dL/da_i[n,g] = sum_c H (2 bit_i(c) - 1),  dL/dbeta[n,g] = sum_c H.


def _padded_k(layer: QuantLinear) -> tuple[int, int, int]:
    """(G, gl, G * gl): the groups of a row, a full group's length, and K padded to whole groups."""
    K, gs = layer.in_features, layer.group_size
    gl, G = group_len(K, gs), num_groups(K, gs)
    return G, gl, G * gl


def code_index(layer: QuantLinear) -> torch.Tensor:
    """Flat indices into levels [N, G, C]: idx[n, g, j] = (n*G + g)*C + Q[n, g*gl + j], shape [N, G, gl]
    (int32 where it fits: index_select and index_add_ take it, and it is half of int64's traffic).
    Padding past K points at code 0 of its row's last group; its weight is sliced off, its gradient is 0."""
    N, K = layer.out_features, layer.in_features
    G, gl, Kp = _padded_k(layer)
    C = 2**layer.bits
    packed = layer.packed  # [N, ceil(K/2)], low nibble = even k
    codes = torch.stack((packed & 0xF, packed >> 4), -1).view(N, -1)  # [N, 2*ceil(K/2)] uint8
    if codes.shape[1] != Kp:
        codes = F.pad(codes[:, :K], (0, Kp - K))
    dtype = torch.int32 if N * G * C < 2**31 else torch.long
    base = (torch.arange(N * G, dtype=dtype, device=packed.device) * C).view(N, G, 1)
    return codes.view(N, G, gl) + base


def _code_values(bits: int, device) -> torch.Tensor:
    return torch.arange(2**bits, dtype=torch.float32, device=device)  # [C]


def levels(layer: QuantLinear, mode: str, p: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """levels [N, G, C]: the adapted weight of any element of row n, group g with code c.

    mode "chan": p = c [N]; "group": p = s [N, G]; "alpha": p = alphas [b, N, G], q = betas [N, G].
    The float operations are kernels.reference.adapted_linear_ref's, in its order.
    """
    dev = layer.packed.device
    if mode == "alpha":
        b = p.shape[0]
        codes = torch.arange(2**b, dtype=torch.uint8, device=dev)
        signs = bit_planes(codes, b)  # [b, C]
        lv = (p.float()[..., None] * signs[:, None, None, :]).sum(0)  # [N, G, C]
        return lv + q.float()[..., None]
    c = _code_values(layer.bits, dev)
    shift = c - layer.zeros.float()[..., None]  # [N, G, C]
    if mode == "group":
        return p.float()[..., None] * shift
    return (layer.scales.float()[..., None] * shift) * p.float()[:, None, None]


def gather_weight(layer: QuantLinear, lv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """W [N, K] float32 from levels [N, G, C] and code_index [N, G, gl]."""
    N, K = layer.out_features, layer.in_features
    w = lv.reshape(-1).index_select(0, idx.view(-1)).view(N, -1)
    return w if w.shape[1] == K else w[:, :K]


def adapted_weight(layer: QuantLinear, mode: str, p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """Dense W [N, K] float32 of one linear under one adapter (see levels for the modes)."""
    return gather_weight(layer, levels(layer, mode, p, q), code_index(layer))


class AdaptedLinearFn(torch.autograd.Function):
    """y [M, N] = x [M, K] @ W(p, q)^T (+ bias); W rebuilt from the int4 codes in backward too."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, layer: QuantLinear, mode: str, p, q):
        w = adapted_weight(layer, mode, p, q)
        y = x @ w.to(x.dtype).T
        del w
        if layer.bias is not None:
            y = (y.float() + layer.bias.float()).to(x.dtype)
        ctx.layer, ctx.mode = layer, mode
        ctx.save_for_backward(x, p, q)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):
        # gy: [M, N]
        x, p, q = ctx.saved_tensors
        layer, mode = ctx.layer, ctx.mode
        N, K = layer.out_features, layer.in_features
        G, gl, Kp = _padded_k(layer)
        idx = code_index(layer)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gy @ gather_weight(layer, levels(layer, mode, p, q), idx).to(gy.dtype)
        gw = (gy.t() @ x.to(gy.dtype)).float()  # [N, K]
        if Kp != K:
            gw = F.pad(gw, (0, Kp - K))
        C = 2**layer.bits
        hist = torch.zeros(N * G * C, device=gw.device).index_add_(0, idx.view(-1), gw.view(-1)).view(N, G, C)
        del gw, idx
        gq = None
        if mode == "alpha":
            b = p.shape[0]
            signs = bit_planes(torch.arange(C, dtype=torch.uint8, device=hist.device), b)  # [b, C]
            gp = torch.einsum("ngc,ic->ing", hist, signs)
            if q is not None and ctx.needs_input_grad[4]:
                gq = hist.sum(-1).to(q.dtype)
        else:
            shift = _code_values(layer.bits, hist.device) - layer.zeros.float()[..., None]  # [N, G, C]
            gs = (hist * shift).sum(-1)  # [N, G]: dL/ds
            gp = gs if mode == "group" else (gs * layer.scales.float()).sum(-1)
        return gx, None, None, gp.to(p.dtype), gq


class TrainableQuantLinear(nn.Module):
    """Training stand-in for one QuantLinear: the frozen int4 base + this task's adapter parameters.

    forward(x, rows) ignores `rows`: every row uses the adapter being trained.
    """

    def __init__(self, base: QuantLinear, kind: str, granularity: str,
                 init: dict[str, torch.Tensor] | None = None):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: its buffers keep their names
        self.kind, self.granularity = kind, granularity
        dev = base.packed.device
        N, G, b = base.out_features, base.num_groups, base.bits
        init = init or {}
        if kind == "peqa":
            if base.method != "rtn":
                raise AdapterError("PEQA adapters need an rtn base (this base is bcq: use --kind alphatuning)", "kind")
            if granularity == "channel":
                anchor = init.get("chan", torch.ones(N))
            else:
                anchor = init.get("scales", base.scales.float())
            self.register_buffer("anchor", anchor.float().to(dev).clone(), persistent=False)
            self.mult = nn.Parameter(torch.ones_like(self.anchor))
        else:
            a0, b0 = base.base_alphas()
            a0, b0 = init.get("alphas", a0).float().to(dev), init.get("betas", b0).float().to(dev)
            self.register_buffer("anchor", a0.clone(), persistent=False)  # [b, N, G]
            self.register_buffer("anchor_beta", b0.clone(), persistent=False)  # [N, G]
            if granularity == "channel":
                self.mult = nn.Parameter(torch.ones(b, N, 1, device=dev))
                self.beta_param = nn.Parameter(torch.ones(N, 1, device=dev))
            else:
                # the unit a beta shift is counted in: the group's mean |alpha| (its step size)
                unit = a0.abs().mean(0).clamp_min(torch.finfo(torch.float32).tiny)
                self.register_buffer("unit", unit, persistent=False)
                self.mult = nn.Parameter(torch.ones(b, N, G, device=dev))
                self.beta_param = nn.Parameter(torch.zeros(N, G, device=dev))

    @property
    def mode(self) -> str:
        if self.kind == "alphatuning":
            return "alpha"
        return "chan" if self.granularity == "channel" else "group"

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adapter tensors as the server reads them (differentiable in the parameters)."""
        if self.kind == "peqa":
            return self.anchor * self.mult, None
        alphas = self.anchor * self.mult
        if self.granularity == "channel":
            return alphas, self.anchor_beta * self.beta_param
        return alphas, self.anchor_beta + self.unit * self.beta_param

    def forward(self, x: torch.Tensor, rows: RowAdapters | None = None) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        p, q = self.effective()
        lead = x.shape[:-1]
        y = AdaptedLinearFn.apply(x.reshape(-1, self.base.in_features), self.base, self.mode, p, q)
        return y.reshape(*lead, self.base.out_features)

    def export(self) -> dict[str, torch.Tensor]:
        """suffix -> float32 CPU tensor, as stored in the adapter file."""
        with torch.no_grad():
            p, q = self.effective()
            if self.kind == "peqa":
                return {"scales": p.float().cpu().contiguous()}
            return {"alphas": p.float().cpu().contiguous(), "betas": q.float().cpu().contiguous()}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, granularity={self.granularity}, base=({self.base.extra_repr()})"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@contextlib.contextmanager
def trainable(model, kind: str, granularity: str, init: Adapter | None = None):
    """Swap every QuantLinear for a TrainableQuantLinear; yields {name: wrapper}; swaps back on exit."""
    originals = model.quant_linears()
    per_module = _init_tensors(init, originals, granularity) if init is not None else {}
    wrappers = {name: TrainableQuantLinear(m, kind, granularity, per_module.get(name))
                for name, m in originals.items()}
    try:
        for name, w in wrappers.items():
            _set_module(model, name, w)
        yield wrappers
    finally:
        for name, m in originals.items():
            _set_module(model, name, m)


def _init_tensors(init: Adapter, layers: dict[str, QuantLinear], granularity: str) -> dict[str, dict]:
    """A validated --init adapter -> per module {chan | scales | alphas, betas} anchors."""
    out: dict[str, dict] = {}
    for name, m in layers.items():
        if init.kind == "alphatuning":
            d = {"alphas": init.tensors[f"{name}.alphas"]}
            betas = init.tensors.get(f"{name}.betas")
            d["betas"] = torch.zeros_like(m.base_alphas()[1]).cpu() if betas is None else betas
        elif init.granularity == "channel":
            c = init.tensors[f"{name}.scales"]
            # a per-channel adapter continues as group scales s0 * c when asked for group-wise training
            d = {"chan": c} if granularity == "channel" else {"scales": m.scales.float().cpu() * c[:, None].float()}
        else:
            d = {"scales": init.tensors[f"{name}.scales"]}
        out[name] = d
    return out


# --- forward, loss, eval --------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, S] (right-padded: causal attention never lets a real token see the pads), mask [B, S]."""
    S = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), S, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.mask)] = torch.tensor(e.mask)
    return ids.to(device), mask.to(device)


def loss_sum(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross entropy over the target tokens of a batch, and their count."""
    B, S = ids.shape
    dev = ids.device
    h = model.hidden_dense(ids, RowAdapters.base(B * S, dev))  # the loss needs logits only at targets
    sel = mask[:, 1:]  # target t is predicted at position t - 1
    hs = h[:, :-1][sel]  # [T, D]
    targets = ids[:, 1:][sel]
    logits = model.logits(hs, RowAdapters.base(hs.shape[0], dev))  # [T, V] float32
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device) -> dict:
    """{loss, ppl, tokens}: token-weighted mean cross entropy over `examples`."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask = collate(examples[i : i + batch_size], pad_id, device)
        with _autocast(torch.device(device)):
            s, n = loss_sum(model, ids, mask)
        total += float(s)
        count += n
    if count == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


# --- the trainer ----------------------------------------------------------------------------


@dataclass
class TrainConfig:
    kind: str
    granularity: str = "channel"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 256
    eval_split: float = 0.1
    seed: int = 0
    max_grad_norm: float | None = 1.0
    name: str = "adapter"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for key in ("batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.max_seq_len < 2:
            raise ValueError("--max-seq-len must be >= 2")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError("--warmup-steps must be >= 0")
        if not 0 <= self.eval_split < 1:
            raise ValueError(f"--eval-split must be in [0, 1), got {self.eval_split}")


@dataclass
class TrainResult:
    adapter: Adapter
    eval_before: dict | None
    eval_after: dict | None
    steps: int
    train_tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per optimizer step

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / max(self.seconds, 1e-9)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded shuffle, the first ceil(fraction * n) to eval (none when fraction = 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, math.ceil(fraction * len(examples))))
    ev = sorted(order[:n_eval])
    tr = sorted(order[n_eval:])
    return [examples[i] for i in tr], [examples[i] for i in ev]


def pad_id_of(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def check_init(init: Adapter, lm, cfg: TrainConfig, source: str = "--init") -> Adapter:
    """Validate a starting adapter against the loaded base and the requested kind/granularity."""
    try:
        init = validate(init, BaseSpec.from_model(lm))
    except AdapterError as e:
        raise AdapterError(f"{source}: {e}", e.field) from None
    if init.kind != cfg.kind:
        raise AdapterError(f"{source} is a {init.kind} adapter but --kind is {cfg.kind}", "kind")
    if init.kind == "peqa" and init.granularity == "group" and cfg.granularity == "channel":
        raise AdapterError(f"{source} holds group-wise PEQA scales [N, G]; continue it with --granularity group "
                           f"(per-channel [N] multipliers cannot express it)", "granularity")
    return init


def train(lm, data: str | Path | Dataset, cfg: TrainConfig, eval_data: str | Path | Dataset | None = None,
          init: Adapter | None = None, progress: bool = True, extra_metadata: dict | None = None) -> TrainResult:
    """Fine-tune an adapter of `cfg.kind` on `data` (JSONL path or Dataset). The model is left as it was."""
    model, tok, dev = lm.model, lm.tokenizer, lm.device
    if cfg.kind == "peqa" and lm.meta["method"] != "rtn":
        raise AdapterError("PEQA adapters need an rtn base (this base is bcq: use --kind alphatuning)", "kind")
    if init is not None:
        init = check_init(init, lm, cfg)
    ds = data if isinstance(data, Dataset) else load_jsonl(data)
    examples, dropped = tokenize_dataset(tok, ds, cfg.max_seq_len)
    if dropped:
        log.warning("%d examples of %s have no target token within --max-seq-len %d and were dropped",
                    dropped, ds.path, cfg.max_seq_len)
    if not examples:
        raise DataError(f"{ds.path}: no example has a target token within --max-seq-len {cfg.max_seq_len}")
    eval_ds = None
    if eval_data is not None:
        eval_ds = eval_data if isinstance(eval_data, Dataset) else load_jsonl(eval_data)
        train_ex = examples
        eval_ex, _ = tokenize_dataset(tok, eval_ds, cfg.max_seq_len)
    else:
        train_ex, eval_ex = split_eval(examples, cfg.eval_split, cfg.seed)

    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_ex) / per_step))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    pad = pad_id_of(tok)

    def stream():  # examples in a fresh seeded order every epoch
        while True:
            order = list(range(len(train_ex)))
            rng.shuffle(order)
            yield from (train_ex[i] for i in order)

    it = stream()
    was_training = model.training
    model.eval()  # no dropout in these models; eval() keeps any module-level switches off
    t_start = time.time()
    with trainable(model, cfg.kind, cfg.granularity, init) as wrappers:
        params = [p for w in wrappers.values() for p in w.parameters()]
        n_params = sum(p.numel() for p in params)
        ev_before = evaluate(model, eval_ex, cfg.batch_size, pad, dev) if eval_ex else None
        if ev_before and progress:
            print(f"eval before: loss {ev_before['loss']:.4f}  ppl {ev_before['ppl']:.3f}  "
                  f"({ev_before['tokens']} target tokens, {len(eval_ex)} examples)")
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # decay would pull scales to 0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.schedule))
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"train {cfg.kind}/{cfg.granularity}", unit="step", disable=not progress)
        losses: list[float] = []
        seen_tokens = 0
        t_train = time.time()
        for step in range(total):
            micro = [[next(it) for _ in range(cfg.batch_size)] for _ in range(cfg.grad_accum)]
            n_targets = sum(e.num_targets for mb in micro for e in mb)  # the step's loss is a token mean
            step_loss = 0.0
            for mb in micro:
                ids, mask = collate(mb, pad, dev)
                with _autocast(dev):
                    s, _ = loss_sum(model, ids, mask)
                (s / n_targets).backward()
                step_loss += float(s.detach())
                seen_tokens += sum(len(e.ids) for e in mb)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss / n_targets)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training loss became {losses[-1]} at step {step + 1}; "
                                         f"lower --lr (now {cfg.lr})")
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{seen_tokens / (time.time() - t_train):.0f}",
                            lr=f"{sched.get_last_lr()[0]:.2e}")
            bar.update(1)
        bar.close()
        train_seconds = time.time() - t_train
        ev_after = evaluate(model, eval_ex, cfg.batch_size, pad, dev) if eval_ex else None
        if ev_after and progress:
            print(f"eval after:  loss {ev_after['loss']:.4f}  ppl {ev_after['ppl']:.3f}")
        tensors = {}
        for name, w in wrappers.items():
            for suffix, t in w.export().items():
                tensors[f"{name}.{suffix}"] = t
    model.train(was_training)

    args = asdict(cfg)
    meta = {
        "training_args": json.dumps(args, sort_keys=True),
        "granularity": cfg.granularity,
        "data_file": str(ds.path),
        "data_sha256": ds.sha256,
        "data_format": ds.format,
        "train_examples": str(len(train_ex)),
        "eval_examples": str(len(eval_ex)),
        "trainable_parameters": str(n_params),
        "train_steps": str(total),
        "train_tokens": str(seen_tokens),
        "train_seconds": f"{train_seconds:.1f}",
        "device": str(dev),
    }
    if eval_ds is not None:
        meta["eval_data_file"], meta["eval_data_sha256"] = str(eval_ds.path), eval_ds.sha256
    if init is not None:
        meta["init_adapter"] = init.name
    for tag, ev in (("before", ev_before), ("after", ev_after)):
        if ev is not None:
            meta[f"eval_{tag}"] = json.dumps(ev)
            meta[f"eval_loss_{tag}"] = f"{ev['loss']:.6f}"
            meta[f"eval_ppl_{tag}"] = f"{ev['ppl']:.6f}"
    meta.update(extra_metadata or {})
    adapter = Adapter(cfg.kind, cfg.name, lm.fingerprint, tensors, meta)
    log.debug("trained %s in %.1f s (%d parameters)", cfg.name, time.time() - t_start, n_params)
    return TrainResult(adapter, ev_before, ev_after, total, seen_tokens, train_seconds, losses)


# --- command line ---------------------------------------------------------------------------


def train_cli(args) -> int:
    """`scaleserve train` (flags: server/cli.py)."""
    from scaleserve.server.cli import _model_dir
    from scaleserve.server.loader import load_model

    out = Path(args.out)
    name = args.name or out.stem
    cfg = TrainConfig(kind=args.kind, granularity=args.granularity, epochs=args.epochs, max_steps=args.max_steps,
                      lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, max_seq_len=args.max_seq_len,
                      eval_split=args.eval_split, seed=args.seed, name=name)
    # Fail on bad data before loading (or converting) the model.
    ds = load_jsonl(args.data)
    eval_ds = load_jsonl(args.eval_data) if args.eval_data else None
    init = load_adapter(args.init) if args.init else None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = _model_dir(args.model_dir)
    lm = load_model(model_dir, device=device)
    print(f"model {model_dir} ({lm.meta['method']}{lm.meta['bits']} g{lm.meta['group_size']}) on {device}; "
          f"data {ds.path}: {len(ds.records)} {ds.format} examples")
    extra = {"model_dir": str(model_dir)}
    if args.init:
        extra["init_file"] = str(args.init)
    res = train(lm, ds, cfg, eval_data=eval_ds, init=init, progress=True, extra_metadata=extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    res.adapter.save(out)
    n = int(res.adapter.metadata["trainable_parameters"])
    print(f"wrote {out}: {cfg.kind} ({cfg.granularity}) adapter '{name}', {n} trained parameters, "
          f"{res.adapter.nbytes / 2**20:.2f} MiB; {res.steps} steps, {res.train_tokens} tokens in "
          f"{res.seconds:.1f} s ({res.tokens_per_s:.0f} tokens/s)")
    if res.eval_before and res.eval_after:
        b, a = res.eval_before, res.eval_after
        print(f"eval loss {b['loss']:.4f} -> {a['loss']:.4f}, perplexity {b['ppl']:.3f} -> {a['ppl']:.3f}")
    if args.push:
        try:
            from scaleserve.adapters.client import push
        except ImportError as e:
            raise RuntimeError(f"--push needs scaleserve.adapters.client ({e})") from None
        result = push(str(out), name, args.push, args.api_key)
        print(f"pushed '{name}' to {args.push}: {json.dumps(result)}")
    return 0
