"""Lightning strategies from the config: topology, batch arithmetic, backends, portable checkpoint state.

* :func:`topology` -- world size, devices per node and nodes, from ``torchrun``'s
  or SLURM's environment when present (those win over ``trainer.devices`` /
  ``trainer.num_nodes``), else from the config; data- and tensor-parallel degrees.
* :func:`batch_plan` -- ``trainer.global_batch_tokens`` (when set) is the
  config; the per-device micro-batch and the accumulation steps are derived
  from the data-parallel size and logged.
* :func:`build_strategy` -- ``auto`` | ``ddp`` | ``ddp_spawn`` | ``fsdp``
  (FSDP2 ``fully_shard``, optionally 2-D with tensor parallelism) | ``tp``
  (tensor parallel, FSDP2 over the remaining data-parallel ranks) |
  ``deepspeed`` (ZeRO 1/2/3, config from :mod:`glmtrain.parallel.deepspeed_config`).
  NCCL on GPU, gloo on CPU unless ``strategy.backend`` says otherwise.

Checkpoint formats (all resumable under every strategy but DeepSpeed's own) are
read and written by :mod:`glmtrain.ckpt_formats` (never unpickling code):
single-device / DDP and ``strategy.checkpoint=full`` write one file; fsdp / tp with
``strategy.checkpoint=sharded`` (default) a ``torch.distributed.checkpoint``
directory plus ``meta.pt``; DeepSpeed its own directory.

Model tensors are always stored in the models' own layout (tensor-parallel shards are contiguous
slices of it, so nothing is permuted or gathered on save or load), unsharded,
under the LightningModule's parameter names, and optimizer states are keyed by
parameter name in sharded checkpoints (by index in files written by DDP); the
loaders below accept either, so a checkpoint written under one strategy and
world size resumes under another.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from glmtrain import ckpt_formats
from glmtrain.parallel.plans import plan_for, shard_model

MODEL_PARALLEL = ("fsdp", "tp")


# ----------------------------------------------------------------------------- environment
def launcher() -> str:
    """torchrun | slurm | local: who started this process (torchrun wins inside a SLURM job)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env and "RANK" in env and "MASTER_ADDR" in env):
        return "torchrun"
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "slurm"
    return "local"


def _slurm_tasks_per_node() -> int:
    env = os.environ
    v = env.get("SLURM_NTASKS_PER_NODE", "")
    if v:
        return int(v.split("(")[0].split(",")[0])
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")) or 1)
    return max(1, int(env["SLURM_NTASKS"]) // nodes)


@dataclass(frozen=True)
class Topology:
    launcher: str  # torchrun | slurm | local
    devices: int  # processes per node
    num_nodes: int
    world: int
    tp: int  # tensor-parallel degree
    dp: int  # data-parallel degree (world // tp): the FSDP / DDP group (context-parallel ranks included)
    cp: int = 1  # context-parallel degree: ranks of the dp group that split one sequence

    @property
    def data(self) -> int:
        """Ranks that read different samples (dp / cp)."""
        return max(1, self.dp // self.cp) if self.dp else 0

    def describe(self) -> str:
        cp = f" (cp {self.cp}: {self.data} data ranks)" if self.cp > 1 else ""
        return f"world {self.world} = {self.num_nodes} node(s) x {self.devices} ({self.launcher}); dp {self.dp}{cp} x tp {self.tp}"


def topology(run: Any) -> Topology:
    t, s = run.trainer, run.strategy
    kind = launcher()
    env = os.environ
    if kind == "torchrun":
        devices = int(env.get("LOCAL_WORLD_SIZE", t.devices))
        world = int(env["WORLD_SIZE"])
        nodes = max(1, world // max(1, devices))
    elif kind == "slurm":
        devices = _slurm_tasks_per_node()
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")) or 1)
        world = int(env["SLURM_NTASKS"])
    else:
        devices, nodes = t.devices, t.num_nodes
        world = devices * nodes
    tp = 1
    if s.name in MODEL_PARALLEL:
        tp = s.tp_size if s.tp_size > 0 else devices
        if s.name == "fsdp" and s.tp_size <= 0:
            tp = 1
    dp = world // tp if tp and world % tp == 0 else 0
    cp = max(1, getattr(s, "cp_size", 1)) if s.name in MODEL_PARALLEL else 1
    return Topology(kind, devices, nodes, world, tp, dp, cp)


def resolve_backend(run: Any, accelerator: str) -> str:
    b = run.strategy.backend
    if b != "auto":
        return b
    return "nccl" if accelerator == "gpu" else "gloo"


# ----------------------------------------------------------------------------- batch arithmetic
@dataclass(frozen=True)
class BatchPlan:
    micro: int  # samples per device per micro-step
    accumulate: int  # micro-steps per optimizer step
    dp: int
    seq_tokens: int  # tokens per sample
    global_samples: int
    global_tokens: int

    def describe(self) -> str:
        return (f"global batch {self.global_samples} samples x {self.seq_tokens} tokens = {self.global_tokens} tokens/step"
                f" = dp {self.dp} x micro-batch {self.micro} x accumulate {self.accumulate}")


def seq_tokens(run: Any) -> int:
    from glmtrain.tokenizers import build_tokenizer, sample_tokens

    tok = build_tokenizer(run.model.tokenizer)
    return int(sample_tokens(tok, run.data.window, run.data.window_tokens))


def batch_plan(run: Any, dp: int, tokens_per_sample: int | None = None) -> BatchPlan:
    """Micro-batch and accumulation from the global batch and the data-parallel size.

    ``trainer.global_batch_tokens = 0``: the global batch is ``micro_batch_size x
    accumulate x dp`` (the config's micro-batch and accumulation as given).
    Otherwise it is ``global_batch_tokens / tokens per sample`` samples; each
    data-parallel rank takes an equal share, in the fewest micro-steps whose
    micro-batch does not exceed ``trainer.micro_batch_size``.  Raises ValueError
    (one line) if the numbers do not divide.
    """
    t = run.trainer
    L = tokens_per_sample if tokens_per_sample is not None else seq_tokens(run)
    dp = max(1, dp)
    g_tokens = getattr(t, "global_batch_tokens", 0)
    if not g_tokens:
        g = t.micro_batch_size * t.accumulate * dp
        return BatchPlan(t.micro_batch_size, t.accumulate, dp, L, g, g * L)
    if t.accumulate != 1:
        raise ValueError(f"trainer.global_batch_tokens={g_tokens} derives the accumulation steps; leave trainer.accumulate=1 (is {t.accumulate})")
    if g_tokens % L:
        raise ValueError(f"trainer.global_batch_tokens={g_tokens} is not a multiple of the tokens per sample ({L} for data.window={run.data.window})")
    g = g_tokens // L
    if g % dp:
        raise ValueError(f"trainer.global_batch_tokens={g_tokens} gives {g} samples per step, which {dp} data-parallel ranks cannot share equally")
    per_rank = g // dp
    acc = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= t.micro_batch_size)
    return BatchPlan(per_rank // acc, acc, dp, L, g, g * L)


# ----------------------------------------------------------------------------- module-side helpers
def data_parallel(trainer: Any) -> tuple[int, int, Any]:
    """(rank, size, process group) of this process in its data-parallel group."""
    if trainer is None:
        return 0, 1, None
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        mesh = strategy.device_mesh["data_parallel"]
        return mesh.get_local_rank(), mesh.size(), mesh.get_group()
    return trainer.global_rank, trainer.world_size, None


def context_parallel(module: Any) -> tuple[int, int, Any]:
    """(rank, size, group) of this process in its context-parallel group ((0, 1, None) without)."""
    return getattr(module, "_cp_info", None) or (0, 1, None)


def is_deepspeed(trainer: Any) -> bool:
    return trainer is not None and type(trainer.strategy).__name__.startswith(("DeepSpeed", "GLMDeepSpeed"))


def apply_parallelism(module: Any) -> None:
    """LightningModule.configure_model: materialise a meta-built model (block by block, each block sharded
    right after: no rank ever holds the whole model) and shard ``module.model`` as the strategy asks
    (tensor parallel, FSDP2, context parallel); idempotent."""
    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    if getattr(module, "_parallel_applied", False):
        return
    if not isinstance(strategy, GLMModelParallelStrategy):
        if strategy is not None:
            module.materialize(strategy.root_device)  # one device (or DDP / DeepSpeed): directly on it
        return
    o = strategy.options
    mesh = strategy.device_mesh
    dp_mesh, tp_mesh = mesh["data_parallel"], mesh["tensor_parallel"]
    plan = plan_for(module.run.model.family)
    mp = None
    if o["fsdp"] and (o["param_dtype"] or o["reduce_dtype"]):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=o["param_dtype"], reduce_dtype=o["reduce_dtype"])
    if o.get("cp", 1) > 1:
        from glmtrain.parallel.context import apply_context_parallel, new_cp_group

        cp = o["cp"]
        group = new_cp_group(mesh.mesh.t().tolist(), cp)  # consecutive data-parallel ranks of each tp column
        apply_context_parallel(module.model, group)
        module._cp_info = (torch.distributed.get_rank(group), cp, group)
    device = strategy.root_device
    shard_model(module.model, plan, dp_mesh=dp_mesh, tp_mesh=tp_mesh, fsdp=o["fsdp"],
                sequence_parallel=o["sequence_parallel"], vocab_parallel=o["vocab_parallel"], mp_policy=mp,
                reshard_after_forward=o["reshard_after_forward"],
                materialize=lambda prefix: module.materialize(device, prefix))
    module._parallel_applied = True
    local, total = _local_fraction(module.model)
    if strategy.global_rank == 0:
        say(f"sharded {module.run.model.family} (tp {tp_mesh.size()}, fsdp {'on' if o['fsdp'] else 'off'}"
            f"{', cp ' + str(o['cp']) if o.get('cp', 1) > 1 else ''}): {local:,} of {total:,} parameter values on rank 0")


def _local_fraction(model: torch.nn.Module) -> tuple[int, int]:
    from torch.distributed.tensor import DTensor

    local = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (DTensors of any mesh, plain tensors) and in-place clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(g)
    total = None
    for key, gs in groups.items():
        norms = torch._foreach_norm(gs, 2.0)
        sq = torch.stack([n.float() for n in norms]).pow(2).sum()
        if isinstance(sq, DTensor):
            sq = sq.full_tensor()
        total = sq if total is None else total + sq.to(total.device)
    norm = total.sqrt()
    if max_norm and max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g._local_tensor if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return norm


# ----------------------------------------------------------------------------- checkpoint state across layouts
def _names(module: torch.nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for n, p in module.named_parameters():
        out.setdefault(id(p), n)
    return out


def optim_state_by_name(osd: dict, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict:
    """Index-keyed torch optimizer state -> keyed by parameter name (order of ``optimizer``'s groups)."""
    if not osd.get("state") and not osd.get("param_groups"):
        return osd
    first = next(iter(osd["param_groups"][0]["params"]), None) if osd.get("param_groups") else None
    if isinstance(first, str):
        return osd
    names = _names(module)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    n_saved = sum(len(g["params"]) for g in osd["param_groups"])
    if n_saved != len(order):
        raise RuntimeError(f"optimizer state holds {n_saved} parameters, the optimizer has {len(order)}")
    return {
        "state": {order[i]: v for i, v in osd["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]],
    }


def optim_state_by_index(osd: dict, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict:
    """Name-keyed optimizer state -> index-keyed, for ``optimizer.load_state_dict``."""
    first = next(iter(osd["param_groups"][0]["params"]), None) if osd.get("param_groups") else None
    if not isinstance(first, str):
        return osd
    names = _names(module)
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {
        "state": {index[k]: v for k, v in osd["state"].items()},
        "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in osd["param_groups"]],
    }




class _PortableLoad:
    """Single-device / DDP: also read sharded (DCP) directories and name-keyed optimizer states."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        return ckpt_formats.load_full(Path(checkpoint_path))  # weights_only=True, whatever the caller asks

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from lightning.fabric.utilities.optimizer import _optimizer_to_device

        module = self.lightning_module
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            opt = getattr(optimizer, "_optimizer", optimizer)
            opt.load_state_dict(optim_state_by_index(state, opt, module))
            _optimizer_to_device(opt, self.root_device)


class GLMSingleDeviceStrategy(_PortableLoad, SingleDeviceStrategy):
    pass


class GLMDDPStrategy(_PortableLoad, DDPStrategy):
    pass


class GLMModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2 + TP) with glmtrain's plans and portable checkpoints."""

    def __init__(self, *, options: dict, **kw):
        super().__init__(**kw)
        self.options = options

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Samples are split over the data ranks; the ranks of one context-parallel group read the same ones."""
        kw = super().distributed_sampler_kwargs
        cp = self.options.get("cp", 1)
        return {"num_replicas": kw["num_replicas"] // cp, "rank": kw["rank"] // cp}

    # -- save (the live layout is the checkpoint layout: shards are written as they are)
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt = getattr(optimizer, "_optimizer", optimizer)
        full = not self._save_distributed_checkpoint
        return get_optimizer_state_dict(self.model, opt, options=StateDictOptions(full_state_dict=full, cpu_offload=True))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        import torch.distributed.checkpoint as dcp

        path = Path(self.broadcast(str(filepath)))
        if not self._save_distributed_checkpoint:
            if self.is_global_zero and path.is_dir():
                shutil.rmtree(path)
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            self.barrier()
            return
        tmp = ckpt_formats.sharded_partial(path)
        if self.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        state = {"state_dict": checkpoint.pop("state_dict")}
        for i, s in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = s
        dcp.save(state, checkpoint_id=tmp)
        if self.is_global_zero:
            ckpt_formats.publish_sharded(tmp, path, checkpoint)
        self.barrier()

    # -- load
    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        strict = module.strict_loading
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        if ckpt_formats.is_sharded(path):
            state: dict[str, Any] = {"state_dict": get_model_state_dict(self.model)}
            for i, opt in enumerate(optimizers):
                state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, opt)
            ckpt_formats.read_sharded_into(state, path)  # every rank reads its own shards, in place
            set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=strict))
            for i, opt in enumerate(optimizers):
                set_optimizer_state_dict(self.model, opt, state[f"optimizer_{i}"])
            return ckpt_formats.load_meta(path)
        ckpt = ckpt_formats.load_file(path)
        set_model_state_dict(self.model, dict(ckpt.pop("state_dict")), options=StateDictOptions(full_state_dict=True, strict=strict))
        for opt, osd in zip(optimizers, ckpt.pop("optimizer_states", [])):
            set_optimizer_state_dict(self.model, opt, optim_state_by_name(osd, opt, module), options=StateDictOptions(full_state_dict=True))
        return ckpt


# ----------------------------------------------------------------------------- building
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_strategy(run: Any, accelerator: str, topo: Topology | None = None, precision: str = "32-true"):
    """The Lightning strategy object for ``run.strategy`` (validated before: see :func:`check_strategy`)."""
    s = run.strategy
    topo = topo or topology(run)
    backend = resolve_backend(run, accelerator)
    if s.name == "auto" and topo.world == 1:
        device = torch.device("cuda", 0) if accelerator == "gpu" else torch.device("cpu")
        return GLMSingleDeviceStrategy(device=device)
    if s.name in ("auto", "ddp", "ddp_spawn"):
        return GLMDDPStrategy(process_group_backend=backend, find_unused_parameters=s.find_unused_parameters,
                              start_method="spawn" if s.name == "ddp_spawn" else "popen")
    if s.name in MODEL_PARALLEL:
        bf16 = precision.startswith("bf16")
        param_dtype = _DTYPES.get(s.param_dtype) if s.param_dtype != "auto" else (torch.bfloat16 if bf16 and accelerator == "gpu" else None)
        reduce_dtype = _DTYPES.get(s.reduce_dtype) if param_dtype is not None else None
        options = {
            "fsdp": s.name == "fsdp" or topo.dp > 1,
            "sequence_parallel": s.sequence_parallel,
            "vocab_parallel": s.vocab_parallel,
            "reshard_after_forward": s.reshard_after_forward,
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "cp": topo.cp,
        }
        return GLMModelParallelStrategy(options=options, data_parallel_size=topo.dp, tensor_parallel_size=topo.tp,
                                        save_distributed_checkpoint=s.checkpoint == "sharded", process_group_backend=backend)
    if s.name == "deepspeed":
        from glmtrain.parallel.deepspeed_config import deepspeed_config
        from glmtrain.parallel.deepspeed_strategy import GLMDeepSpeedStrategy

        if accelerator == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own device choice follows the trainer's
        plan = batch_plan(run, topo.data)
        cfg = deepspeed_config(s, micro_batch=plan.micro, grad_clip=run.trainer.grad_clip, precision=precision)
        return GLMDeepSpeedStrategy(config=cfg, process_group_backend=backend)
    raise ValueError(f"strategy.name={s.name!r}")


def describe(run: Any, topo: Topology, plan: BatchPlan) -> str:
    s = run.strategy
    extra = ""
    if s.name in MODEL_PARALLEL:
        tp = f", sequence_parallel={s.sequence_parallel}, vocab_parallel={s.vocab_parallel}" if topo.tp > 1 else ""
        extra = f" (fsdp={'on' if s.name == 'fsdp' or topo.dp > 1 else 'off'}{tp}, checkpoint={s.checkpoint})"
    elif s.name == "deepspeed":
        extra = f" (ZeRO-{s.zero_stage}{', optimizer offload' if s.offload_optimizer else ''}{', parameter offload' if s.offload_params else ''})"
    return f"strategy {s.name}{extra}: {topo.describe()}; {plan.describe()}"


def say(msg: str) -> None:
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0:
        print(f"glmtrain: {msg}", file=sys.stdout, flush=True)
