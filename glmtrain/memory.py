"""Memory plan: per stage, what one GPU holds for the chosen model, strategy and precision.

``python -m glmtrain model=evo2_7b context=evo2_8k_to_1m strategy=fsdp trainer.devices=8 plan=true``
prints, for every stage, the estimated parameter, gradient, optimizer and activation memory per GPU,
whether the total fits ``plan_card_gib`` (80 by default), and what to change where it does not
(activation checkpointing, context parallelism, sharding).  Nothing is trained or written.

How the numbers are made:

* **Parameters, gradients, optimizer**: the model is built on the meta device (exact parameter
  count, no memory); bytes per parameter follow the precision (``bf16-mixed``: fp32 parameters and
  gradients, AdamW's two fp32 moments; ``bf16-true``: everything bf16; ``32-true``: fp32) and are
  divided by the sharding degree of the strategy: ``fsdp`` shards all three over the
  data-parallel ranks (ZeRO-3), DeepSpeed ZeRO-1/2/3 shard the optimizer / + gradients / +
  parameters (CPU offload removes the optimizer), tensor parallelism divides by ``tp``; DDP keeps
  everything plus one gradient-sized bucket copy.
* **Activations are measured, not guessed**: the family's model is built at a reduced width
  (every width field divided by ``k``, same depth and layer pattern) and run forward on the CPU under
  the stage's autocast dtype, while ``torch.autograd.graph.saved_tensors_hooks`` adds up every tensor
  saved for backward (each storage once).  Two lengths give the bytes per token (constants such as
  weight casts cancel), two widths the dependence on the width, which is linear; the result is
  extrapolated to the real width.  Activation checkpointing is measured the same way: what stays
  saved outside the checkpointed regions, plus the inputs those regions keep, plus the largest
  region's recomputation during backward.  Backward also needs the gradients of the current layer's
  activations; :data:`BACKWARD_FACTOR` accounts for that transient (calibrated on the H200
  measurements of HyenaDNA large-1m at 1M tokens in scripts/gpu_long_context.py).
* Under ``context_parallel`` c and tensor parallelism tp (sequence parallel) each GPU holds 1/c and
  ~1/tp of the sequence's activations.

The plan is an estimate: kernels that are not the CPU's (flash-attn, causal-conv1d), allocator
fragmentation and NCCL buffers are not measured; a 10 % headroom and 1 GiB for the CUDA context are
kept free when deciding "fits".
"""

from __future__ import annotations

import copy
import math
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

GiB = float(1 << 30)
HEADROOM = 0.10  # of the card, kept free (fragmentation, NCCL buffers, kernels' workspaces)
CONTEXT_GIB = 1.0  # CUDA context and cuBLAS/cuFFT handles (not in torch's allocator)
# transient buffers while a layer is differentiated (activation gradients, recomputed FFT spectra), as a
# multiple of what the layer saves: one more copy; checked against the H200 peaks of HyenaDNA large-1m at
# 1M tokens in four checkpointing modes (docs/context.md: within -4 % .. +1 %)
BACKWARD_FACTOR = 1.0

# family -> the config fields that scale with the width (divided by k in the measured proxy)
WIDTH_FIELDS: dict[str, tuple[str, ...]] = {
    "hyena": ("d_model", "d_inner"),
    "evo2": ("d_model", "mlp_dim", "n_heads", "se_filter_groups", "mr_filter_groups", "li_filter_groups"),
    "transformer": ("d_model", "ffn_dim", "n_heads"),
}
MIN_PROXY_WIDTH = 64


# ----------------------------------------------------------------------------- parameters
def count_params(model_cfg: Any, vocab: int) -> int:
    """Exact parameter count (tied weights once), built on the meta device."""
    from glmtrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg, vocab)
    return model.num_params()


@dataclass
class StateBytes:
    params: float
    grads: float
    optimizer: float
    buffers: float = 0.0  # DDP gradient buckets


def state_bytes(n: int, precision: str, strategy: Any, dp: int, tp: int) -> StateBytes:
    """Bytes per GPU of parameters, gradients and AdamW state for ``n`` parameters, sharded over ``dp`` ranks."""
    low = precision in ("bf16-true", "16-true")
    p, g, o = (2.0, 2.0, 4.0) if low else (4.0, 4.0, 8.0)
    n_local = n / max(1, tp)
    name = strategy.name
    if name == "deepspeed":
        z = strategy.zero_stage
        # DeepSpeed bf16: bf16 parameters and gradients, fp32 master copy + moments with the optimizer
        p, g, o = 2.0, 2.0, 12.0
        opt = 0.0 if strategy.offload_optimizer else o / dp
        return StateBytes(n_local * (p / dp if z >= 3 else p), n_local * (g / dp if z >= 2 else g), n_local * opt)
    if name in ("fsdp", "tp") and dp > 1:  # FSDP2 over the data-parallel ranks: ZeRO-3
        # the gathered (bf16 under mixed precision) copy of ~2 blocks lives transiently; counted as buffers
        return StateBytes(n_local * p / dp, n_local * g / dp, n_local * o / dp, buffers=0.0)
    buckets = n_local * g if name in ("ddp", "auto") and dp > 1 else 0.0
    return StateBytes(n_local * p, n_local * g, n_local * o, buffers=buckets)


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activations:
    """Bytes per token (batch 1) saved for backward: by the embedding/head/loss and by each layer (outside
    checkpointed regions, including the inputs those regions keep), and what each layer's checkpointed
    region saves again when it is recomputed during backward."""

    head: float
    layers: tuple[float, ...]
    recompute: tuple[float, ...]

    @property
    def stored(self) -> float:
        return self.head + sum(self.layers)

    def peak(self, tokens: float) -> float:
        """Peak bytes during backward: the head's backward first, then each layer from the last, with
        everything below it still stored, its recomputation, and its transient gradient buffers."""
        f = BACKWARD_FACTOR
        peak = self.stored + f * self.head
        below = sum(self.layers)
        for stored, rec in zip(reversed(self.layers), reversed(self.recompute)):
            peak = max(peak, below + rec + f * max(rec, stored))
            below -= stored
        return tokens * peak


def _resolved(cfg: Any) -> Any:
    """``cfg`` with derived widths written out (``mlp_dim: 0`` = rounded 8/3 d): a proxy must scale the
    real width, not re-derive (and re-round) it from the proxy's d."""
    c = copy.deepcopy(cfg)
    for f in WIDTH_FIELDS[cfg.family]:
        fn = getattr(c, f"resolved_{f}", None)
        if getattr(c, f, None) == 0 and fn is not None:
            setattr(c, f, fn())
    return c


def _proxy_k(cfg: Any, fields: tuple[str, ...]) -> int:
    """The largest k that divides every width field and keeps the proxy >= MIN_PROXY_WIDTH wide."""
    vals = [getattr(cfg, f) for f in fields if getattr(cfg, f, 0)]
    g = 0
    for v in vals:
        g = math.gcd(g, int(v))
    k = 1
    for cand in range(1, g + 1):
        if g % cand == 0 and cfg.d_model // cand >= MIN_PROXY_WIDTH:
            k = cand
    return k


def proxy_config(cfg: Any, k: int, chunk_below: int | None = None) -> Any:
    """``cfg`` with every width field divided by ``k`` (same depth, pattern and everything else)."""
    p = copy.deepcopy(cfg)
    for f in WIDTH_FIELDS[cfg.family]:
        v = getattr(p, f, 0)
        if v:
            setattr(p, f, v // k)
    if hasattr(p, "embed_dropout"):
        p.embed_dropout = 0.0
    if chunk_below is not None and hasattr(p, "filter_chunk"):
        p.filter_chunk = chunk_below
    return p


@contextmanager
def _count_saved():
    """Collect the storages saved for backward (outside checkpointed regions) and the checkpointed regions."""
    import importlib

    saved: dict[int, int] = {}  # storage -> bytes, saved outside checkpointed regions (and regions' inputs)
    alive: list = []  # the storages themselves: a freed storage's address must not be reused while counting
    regions: list[tuple[Any, int, int]] = []  # (the region's function, bytes of its inputs, bytes it saves recomputed)

    def packer(into: dict[int, int]):
        def pack(t):
            try:
                s = t.untyped_storage()
                if s.data_ptr() not in into:
                    into[s.data_ptr()] = s.nbytes()
                    alive.append(s)
            except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, fake)
                pass
            return t
        return pack

    import torch.utils.checkpoint as tuc

    real = tuc.checkpoint

    def counting_checkpoint(fn, *args, **kw):
        kept = 0
        for a in args:  # the region keeps its inputs for the recomputation
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() not in saved:
                saved[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
                alive.append(a.untyped_storage())
                kept += a.untyped_storage().nbytes()
        inner: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(packer(inner), lambda t: t):
            fn(*args)  # what recomputation saves while the region is being differentiated
        regions.append((fn, kept, sum(inner.values())))
        return real(fn, *args, **kw)

    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("glmtrain.models") and getattr(mod, "checkpoint", None) is real:
            patched.append(mod)
            mod.checkpoint = counting_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(packer(saved), lambda t: t):
            yield saved, regions
    finally:
        for mod in patched:
            mod.checkpoint = real
        importlib.invalidate_caches()


def _measure(cfg: Any, vocab: int, tokens: int, dtype: torch.dtype | None) -> list[float]:
    """[head, layer_0 .. layer_n-1, recompute_0 .. recompute_n-1] in bytes, batch 1, ``tokens`` long."""
    from glmtrain.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, vocab).train()
    ids = torch.randint(0, min(vocab, 8), (1, tokens))
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
    blocks = list(getattr(model, "blocks", []))
    layer = [0.0] * len(blocks)
    rec = [0.0] * len(blocks)
    current: list[int] = []
    with torch.enable_grad(), ctx, _count_saved() as (saved, regions):
        marks: dict[int, tuple[int, int]] = {}

        def pre(i):
            def hook(m, a):
                if i not in marks:  # the first call (a checkpointed block also runs again when measured)
                    marks[i] = (sum(saved.values()), len(regions))
                    current.append(i)
            return hook

        def post(i):
            def hook(m, a, o):
                if current and current[-1] == i:
                    current.pop()
                    b0, r0 = marks[i]
                    layer[i] += sum(saved.values()) - b0
                    rec[i] = max([rec[i]] + [r for _, _, r in regions[r0:]])
            return hook

        hooks = [h for i, blk in enumerate(blocks)
                 for h in (blk.register_forward_pre_hook(pre(i)), blk.register_forward_hook(post(i)))]
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        for h in hooks:
            h.remove()
        for fn, kept, r in regions:  # block-level checkpointing: the region is the block, its input the block's
            if fn in blocks:
                i = blocks.index(fn)
                rec[i] = max(rec[i], r)
                layer[i] += kept
        total = float(sum(saved.values()))
    return [total - sum(layer), *layer, *rec]


def measure_activations(model_cfg: Any, vocab: int, tokens: int, dtype: torch.dtype | None) -> Activations | None:
    """Activation bytes per token of ``model_cfg`` when trained at ``tokens`` tokens (None: family not covered)."""
    fields = WIDTH_FIELDS.get(model_cfg.family)
    if fields is None:
        return None
    L1, L2 = 128, 256
    chunk = None
    if hasattr(model_cfg, "filter_chunk"):  # reproduce the chunked (or not) filter regime of the real length
        chunk = 64 if 0 < model_cfg.filter_chunk < tokens else 1 << 30
    model_cfg = _resolved(model_cfg)
    k1 = _proxy_k(model_cfg, fields)
    widths = [k1] if k1 == 1 else [k1, k1 // 2 if k1 % 2 == 0 and k1 > 1 else k1]
    per_width = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest (and does not fight a training process)
    try:
        per_width = _measure_widths(model_cfg, vocab, widths, chunk, dtype, L1, L2)
    finally:
        torch.set_num_threads(threads)
    d = model_cfg.d_model
    if len(per_width) == 1:
        w, vals = per_width[0]
        out = [v * d / w for v in vals] if w != d else vals  # only one width measurable: proportional
    else:
        (w1, v1), (w2, v2) = per_width
        out = [a + (b - a) * (d - w1) / (w2 - w1) for a, b in zip(v1, v2)]
    out = [max(0.0, v) for v in out]
    n = (len(out) - 1) // 2
    return Activations(out[0], tuple(out[1:1 + n]), tuple(out[1 + n:]))


def _measure_widths(model_cfg, vocab, widths, chunk, dtype, L1, L2) -> list[tuple[int, list[float]]]:
    per_width = []
    for k in dict.fromkeys(widths):
        cfg = proxy_config(model_cfg, k, chunk)
        key = (repr(cfg), vocab, str(dtype))
        if key not in _CACHE:
            a = _measure(cfg, vocab, L1, dtype)
            b = _measure(cfg, vocab, L2, dtype)
            _CACHE[key] = [(y - x) / (L2 - L1) for x, y in zip(a, b)]
        per_width.append((cfg.d_model, _CACHE[key]))
    return per_width


_CACHE: dict[tuple, list[float]] = {}


class PeakLiveBytes:
    """Context manager: the peak of live bytes of the CPU tensor storages created inside it (a dispatch mode
    adds each new storage and a finalizer subtracts it when freed) -- a measured peak to check estimates."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                torch.utils._pytree.tree_map(outer._track, out)
                return out

        self._mode = _Mode()
        self.live: dict[int, int] = {}
        self.cur = self.peak = 0

    def _track(self, t):
        import weakref

        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return t
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live:
            return t
        self.live[key] = n
        self.cur += n
        self.peak = max(self.peak, self.cur)

        def freed(key=key, n=n):
            if self.live.pop(key, None) is not None:
                self.cur -= n

        weakref.finalize(st, freed)
        return t

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


# ----------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    stage: Any
    world: int
    dp: int
    tp: int
    cp: int
    micro: int
    n_params: int
    state: StateBytes
    act: Activations | None
    tokens_per_gpu: float
    card_gib: float

    @property
    def act_bytes(self) -> float:
        return self.act.peak(self.tokens_per_gpu) if self.act is not None else float("nan")

    @property
    def total_gib(self) -> float:
        s = self.state
        return (s.params + s.grads + s.optimizer + s.buffers + (self.act_bytes if self.act else 0.0)) / GiB

    @property
    def usable_gib(self) -> float:
        return self.card_gib * (1 - HEADROOM) - CONTEXT_GIB

    @property
    def fits(self) -> bool | None:
        return None if self.act is None else self.total_gib <= self.usable_gib


def _dtype(precision: str) -> torch.dtype | None:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def plan_stage(run: Any, stage: Any, world: int | None = None) -> StagePlan:
    from omegaconf import OmegaConf

    from glmtrain.parallel.strategies import batch_plan, topology
    from glmtrain.tokenizers import build_tokenizer

    sr = stage.run
    topo = topology(sr)
    world = world or topo.world
    tp = topo.tp
    cp = stage.context_parallel
    dp = max(1, world // (tp * cp))
    bp = batch_plan(sr, dp)
    precision = sr.trainer.precision if sr.trainer.precision != "auto" else "bf16-mixed"  # planned for a GPU
    vocab = build_tokenizer(OmegaConf.to_container(OmegaConf.structured(sr.model.tokenizer))).vocab_size
    n = count_params(sr.model, vocab)
    state = state_bytes(n, precision, sr.strategy, dp * cp, tp)  # sharding spans the context-parallel ranks too
    act = measure_activations(sr.model, vocab, stage.tokens_per_sample, _dtype(precision))
    tokens = bp.micro * stage.tokens_per_sample / cp / (tp if tp > 1 else 1)
    return StagePlan(stage, world, dp, tp, cp, bp.micro, n, state, act, tokens, run.plan_card_gib)


def suggestion(p: StagePlan, run: Any) -> str:
    if p.fits is None:
        return f"activations not estimated for model family {p.stage.run.model.family!r}"
    if p.fits:
        return "fits"
    need = p.total_gib - p.usable_gib
    tips = []
    m = p.stage.run.model
    if not getattr(m, "activation_checkpointing", False):
        tips.append(f"context.stages[{p.stage.index}].activation_checkpointing=true")
    state_gib = (p.state.params + p.state.grads + p.state.optimizer) / GiB
    act_gib = p.act_bytes / GiB
    if act_gib > 0:
        # context parallel degree that brings the activations under the remaining room
        room = p.usable_gib - (p.total_gib - act_gib)
        if room > 0:
            c = p.cp
            while act_gib * p.cp / c > room and c < 1024:
                c *= 2
            if c > p.cp:
                tips.append(f"context.stages[{p.stage.index}].context_parallel={c} under strategy=fsdp (activations / {c})")
    if state_gib > p.usable_gib * 0.5 and p.stage.run.strategy.name not in ("fsdp", "deepspeed"):
        tips.append("strategy=fsdp (shard parameters, gradients and optimizer state)")
    return f"over by {need:.1f} GiB: try " + (", ".join(tips) if tips else "more GPUs or a smaller micro-batch")


def plan_report(run: Any, schedule: Any, world: int | None = None) -> str:
    rows = [plan_stage(run, s, world) for s in schedule.stages]
    p0 = rows[0]
    s = run.strategy
    head = (f"memory plan: model {run.model.name} ({p0.n_params / 1e6:,.1f}M parameters), strategy {s.name}, "
            f"{p0.world} GPU(s) (dp {p0.dp} x tp {p0.tp}), precision "
            f"{run.trainer.precision if run.trainer.precision != 'auto' else 'bf16-mixed'}, card {run.plan_card_gib:g} GiB "
            f"(usable {p0.usable_gib:.1f} GiB after {HEADROOM:.0%} headroom and {CONTEXT_GIB:g} GiB CUDA context)")
    cols = f"{'stage':<10} {'window':>9} {'micro':>5} {'cp':>3} {'ckpt':>5} {'params':>8} {'grads':>8} {'optim':>8} " \
           f"{'activ.':>8} {'total':>8}  verdict"
    lines = [head, "GiB per GPU:", cols]
    for p in rows:
        st = p.state
        m = p.stage.run.model
        ck = "on" if getattr(m, "activation_checkpointing", False) else "off"
        lines.append(f"{p.stage.name:<10} {p.stage.window:>9,} {p.micro:>5} {p.cp:>3} {ck:>5} {st.params / GiB:>8.2f} "
                     f"{st.grads / GiB:>8.2f} {(st.optimizer + st.buffers) / GiB:>8.2f} {p.act_bytes / GiB:>8.2f} "
                     f"{p.total_gib:>8.2f}  {suggestion(p, run)}")
    return "\n".join(lines)
