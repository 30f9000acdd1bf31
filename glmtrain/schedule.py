"""A run is a schedule of stages: the config's ``context`` group resolved into :class:`Stage` objects.

Every run is a schedule.  ``context=none`` (no stages) gives one stage made of ``data.window``,
``trainer.max_steps`` and ``optim.*``; ``context=tiny_64_to_1k`` (or any ``conf/context/*.yaml``)
gives several.  Each stage has its own training window, tokens per optimizer step (with the
micro-batch and accumulation derived for the world size), stage length, learning-rate schedule,
RoPE knobs, activation checkpointing and carry-over policy, and its own run config
(:attr:`Stage.run`) in which those values are filled in -- so the trainer, the data and the model
of a stage never look at the schedule.

Windows.  The data are stored once, at ``data.store_window`` (default ``data.window``; the shipped
schedules set it to their longest stage), and every stage cuts each stored window into
``stored / window`` consecutive pieces of its own length (:mod:`glmtrain.data.genome`): no rebuild
per stage, and the training stream of stage ``k`` is a pure function of (seed, k, global sample
index), so a resume lands on the exact sample.

Compatibility.  :func:`model_math` and :meth:`Stage.math` are what a checkpoint is bound to: the
model's mathematics (without the knobs its family declares speed-only, ``SPEED_ONLY``, and without
the per-stage knobs) and the definition of every stage up to the one being trained.  Speed and
memory knobs (activation checkpointing, filter chunking, fused kernels, the attention backend,
micro-batch split) may change between restarts; see :func:`compat`.

Steps.  Optimizer steps are numbered globally across stages: stage ``k`` runs the steps
``offset+1 .. offset+steps``; checkpoint names and logs use the global step.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from glmtrain.config import ConfigError, RunConfig, StageConfig, first_difference

CARRY = ("weights", "weights+optimizer")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class Stage:
    index: int  # 0-based
    name: str
    window: int  # bases per training window
    store_window: int  # bases per stored window (a multiple of window)
    steps: int  # optimizer steps of this stage
    offset: int  # optimizer steps of all earlier stages
    global_batch_tokens: int  # tokens per optimizer step (all ranks)
    tokens_per_sample: int
    lr: float
    final_lr: float
    warmup_steps: int
    schedule: str
    carry: str
    rope_base: float | None  # None: the model has no RoPE
    rope_interpolation: float | None
    context_parallel: int
    run: RunConfig  # the stage's own config: the values above filled into data/trainer/optim/model

    @property
    def end(self) -> int:
        """Global step at which the stage is complete."""
        return self.offset + self.steps

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.name})"

    def math(self) -> dict[str, Any]:
        """What defines this stage's mathematics (checked on resume)."""
        return {
            "window": self.window, "steps": self.steps, "global_batch_tokens": self.global_batch_tokens,
            "lr": self.lr, "final_lr": self.final_lr, "warmup_steps": self.warmup_steps, "schedule": self.schedule,
            "carry": self.carry if self.index else "init", "rope_base": self.rope_base,
            "rope_interpolation": self.rope_interpolation,
        }


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: tuple[Stage, ...]

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_of_step(self, step: int) -> Stage:
        """The stage that global step ``step`` (1-based; 0 = before training) belongs to."""
        for s in self.stages:
            if step <= s.end:
                return s
        return self.stages[-1]

    def table(self) -> list[dict[str, Any]]:
        return [{"stage": s.index + 1, "name": s.name, "window": s.window, "steps": s.steps,
                 "first_step": s.offset + 1, "last_step": s.end, "tokens_per_step": s.global_batch_tokens,
                 "samples_per_step": s.global_batch_tokens // s.tokens_per_sample, "lr": s.lr, "final_lr": s.final_lr,
                 "warmup_steps": s.warmup_steps, "carry": s.carry if s.index else "init",
                 "rope_base": s.rope_base, "rope_interpolation": s.rope_interpolation} for s in self.stages]


# ----------------------------------------------------------------------------- compatibility
def model_math(model_cfg: Any) -> dict[str, Any]:
    """The model config without its speed-only and per-stage knobs: what weights are bound to."""
    d = OmegaConf.to_container(OmegaConf.structured(model_cfg))
    for k in (*type(model_cfg).SPEED_ONLY, *type(model_cfg).STAGE_KNOBS):
        d.pop(k, None)
    return d


def compat(run: RunConfig, schedule: Schedule, stage: Stage) -> dict[str, Any]:
    """The compatibility record a checkpoint of ``stage`` carries (plain types: JSON-able)."""
    return {
        "model": model_math(run.model),
        "objective": dataclasses.asdict(run.objective),
        "stages": [s.math() for s in schedule.stages[: stage.index + 1]],
    }


def compat_problem(saved: dict, run: RunConfig, schedule: Schedule) -> str | None:
    """Why a checkpoint's compatibility record does not fit this config, or None.

    The saved record covers the stages up to the checkpoint's own: those must be defined exactly as
    now (later stages may have been added or changed), except the length of the checkpoint's own
    stage, which may be changed to train it longer or shorter (its schedule is recomputed for the
    new length).  Model maths and objective must match.
    """
    if not isinstance(saved, dict) or not isinstance(saved.get("stages"), list) or not saved["stages"]:
        return "the checkpoint has no stage record (written by another glmtrain version)"
    n = len(saved["stages"])
    if n > len(schedule.stages):
        return f"the checkpoint is from stage {n}, the schedule now has {len(schedule.stages)} stage(s)"
    now = compat(run, schedule, schedule.stages[n - 1])
    old_stages = [dict(s) for s in saved["stages"]]
    new_stages = [dict(s) for s in now["stages"]]
    old_stages[-1].pop("steps", None)
    new_stages[-1].pop("steps", None)
    for key, a, b in (("model", saved.get("model"), now["model"]), ("objective", saved.get("objective"), now["objective"]),
                      ("context.stages", old_stages, new_stages)):
        d = first_difference(a, b, f"{key}.", " in the checkpoint")
        if d:
            if not run.context.stages:  # a plain run: name the keys the user set
                for math_key, plain in PLAIN_NAMES.items():
                    d = d.replace(f"context.stages[0].{math_key} ", f"{plain} ")
            return d
    return None


# the keys of a plain run's single stage, as the user sets them
PLAIN_NAMES = {
    "window": "data.window", "global_batch_tokens": "tokens per step (trainer.global_batch_tokens, or micro-batch x "
    "accumulate x data-parallel ranks)", "lr": "optim.lr", "final_lr": "the final lr (optim.lr x optim.min_lr_ratio)",
    "warmup_steps": "optim.warmup_steps", "schedule": "optim.schedule", "rope_base": "model.rope_base",
    "rope_interpolation": "model.rope_interpolation",
}


# ----------------------------------------------------------------------------- resolution
def _tokens(run: RunConfig, window: int) -> int:
    from glmtrain.parallel.strategies import seq_tokens

    r = copy.copy(run)
    r.data = dataclasses.replace(run.data, window=window)
    return seq_tokens(r)


def _stage_configs(run: RunConfig) -> list[tuple[StageConfig, bool]]:
    """(stage config, given explicitly) for every stage; a plain run is one stage from the rest of the config."""
    if run.context.stages:
        return [(s, True) for s in run.context.stages]
    return [(StageConfig(window=run.data.window, steps=run.trainer.max_steps, name=str(run.data.window)), False)]


def _say_key(i: int, explicit: bool, key: str, plain: str) -> str:
    return f"context.stages[{i}].{key}" if explicit else plain


def _batch_problem(run: RunConfig, data_ranks: int) -> str | None:
    from glmtrain.parallel.strategies import batch_plan

    try:
        batch_plan(run, data_ranks)
    except ValueError as e:
        return str(e)
    return None


def resolve(run: RunConfig, dp: int | None = None, plan_only: bool = False) -> Schedule:
    """The run's stages, checked against data, model and strategy (ConfigError: one line).

    ``dp`` is the data-parallel size (context-parallel ranks included) the batch split is derived for
    (default: the topology's).  ``plan_only``: for the memory plan, a stage whose samples per step
    cannot be shared by the data-parallel ranks gets the context-parallel degree that makes them fit.
    """
    from glmtrain.parallel import strategy_problem
    from glmtrain.parallel.strategies import batch_plan, topology

    if dp is None:
        topo = topology(run)
        dp = topo.dp or 1
    t, o, d, m = run.trainer, run.optim, run.data, run.model
    store = d.store_window or d.window
    items = _stage_configs(run)
    staged = bool(run.context.stages)
    if staged and not t.global_batch_tokens and any(s.global_batch_tokens is None for s, _ in items):
        raise ConfigError("a context schedule needs trainer.global_batch_tokens (tokens per optimizer step, kept across "
                          "stages) or global_batch_tokens on every stage")
    if staged and d.window_tokens:  # k-mer / BPE samples: their token count must follow each stage's window
        raise ConfigError(f"data.window_tokens={d.window_tokens} fixes every stage's sample length; leave it 0 under "
                          f"context={run.context.name} (each stage then takes what its window becomes in tokens)")
    stages: list[Stage] = []
    offset = 0
    for i, (sc, explicit) in enumerate(items):
        key = lambda k, plain="": _say_key(i, explicit, k, plain or k)  # noqa: E731
        w = sc.window
        if w < 2:
            raise ConfigError(f"{key('window', 'data.window')}={w}: must be >= 2")
        if store % w:
            raise ConfigError(f"{key('window', 'data.window')}={w} does not divide the stored window "
                              f"({store} bases: data.store_window, or data.window) (every stage cuts stored windows into pieces of its length); "
                              "use windows that divide it, or set data.store_window to a common multiple")
        L = _tokens(run, w)
        if sc.micro_batch_size is not None and sc.micro_batch_size < 1:
            raise ConfigError(f"{key('micro_batch_size')}={sc.micro_batch_size}: must be >= 1")
        micro_cap = sc.micro_batch_size or t.micro_batch_size
        G = sc.global_batch_tokens if sc.global_batch_tokens is not None else t.global_batch_tokens
        if G is not None and G < 0:
            raise ConfigError(f"{key('global_batch_tokens')}={G}: must be >= 0")
        if explicit:
            if (sc.steps > 0) == (sc.tokens > 0) or sc.steps < 0 or sc.tokens < 0:
                raise ConfigError(f"context.stages[{i}]: give its length as steps or as tokens (exactly one, > 0)")
        steps = sc.steps
        if sc.tokens:
            if not G or sc.tokens % G:
                raise ConfigError(f"context.stages[{i}].tokens={sc.tokens} is not a whole number of steps of "
                                  f"{G} tokens; give steps or a multiple of the stage's tokens per step")
            steps = sc.tokens // G
        lr = o.lr if sc.lr is None else sc.lr
        if lr <= 0:
            raise ConfigError(f"{key('lr', 'optim.lr')}={lr}: must be > 0")
        final_lr = lr * o.min_lr_ratio if sc.final_lr is None else sc.final_lr
        if not 0 <= final_lr <= lr:
            raise ConfigError(f"{key('final_lr', 'optim.min_lr_ratio')}: the final learning rate {final_lr} must lie in [0, lr={lr}]")
        if sc.warmup_steps is not None and sc.warmup_fraction is not None:
            raise ConfigError(f"context.stages[{i}]: give warmup_steps or warmup_fraction, not both")
        if sc.warmup_fraction is not None:
            if not 0 <= sc.warmup_fraction < 1:
                raise ConfigError(f"context.stages[{i}].warmup_fraction={sc.warmup_fraction}: must lie in [0, 1)")
            warmup = round(sc.warmup_fraction * steps)
        else:
            warmup = o.warmup_steps if sc.warmup_steps is None else sc.warmup_steps
        if warmup < 0:
            raise ConfigError(f"{key('warmup_steps', 'optim.warmup_steps')}={warmup}: must be >= 0")
        schedule = sc.schedule or o.schedule
        if schedule not in SCHEDULES:
            raise ConfigError(f"context.stages[{i}].schedule={schedule!r}: allowed values are {', '.join(SCHEDULES)}")
        if sc.carry not in CARRY:
            raise ConfigError(f"context.stages[{i}].carry={sc.carry!r}: allowed values are {', '.join(CARRY)}")
        if sc.carry == "weights+optimizer" and i > 0 and run.strategy.name in ("fsdp", "tp", "deepspeed"):
            raise ConfigError(f"context.stages[{i}].carry=weights+optimizer is supported under strategy auto and ddp "
                              f"(the optimizer state is read from a single-file checkpoint); under strategy="
                              f"{run.strategy.name} use carry=weights")
        cp = run.strategy.cp_size if sc.context_parallel is None else sc.context_parallel
        if cp < 1:
            raise ConfigError(f"context.stages[{i}].context_parallel={cp}: must be >= 1")
        # the stage's model: RoPE and checkpointing knobs filled in
        model = copy.deepcopy(m)
        knobs = type(m).STAGE_KNOBS
        for k in ("rope_base", "rope_interpolation"):
            v = getattr(sc, k)
            if v is None:
                continue
            if k not in knobs:
                raise ConfigError(f"context.stages[{i}].{k}: model family {m.family!r} has no attention layers with "
                                  "RoPE; remove the key")
            if v <= 0:
                raise ConfigError(f"context.stages[{i}].{k}={v}: must be > 0")
            setattr(model, k, float(v))
        if sc.activation_checkpointing is not None:
            model.activation_checkpointing = sc.activation_checkpointing
        if sc.checkpoint_layers is not None:
            if not hasattr(model, "checkpoint_layers"):
                raise ConfigError(f"context.stages[{i}].checkpoint_layers: model family {m.family!r} has no such knob")
            model.checkpoint_layers = sc.checkpoint_layers
        limit = getattr(model, "max_seq_len", 0)
        if staged and m.family == "hyena" and L > limit:
            raise ConfigError(f"{key('window', 'data.window')}={w}: {L} tokens exceed model.max_seq_len={limit}, "
                              "the length the implicit filters' positions are normalised by; train the whole schedule "
                              f"with model.max_seq_len >= {L} (HyenaDNA sets it to the longest stage)")
        if staged and limit and m.family != "hyena" and L > limit:  # learned positions (NT-v1, DNABERT)
            raise ConfigError(f"{key('window', 'data.window')}={w}: {L} tokens exceed model.max_seq_len={limit} "
                              "(the model's position table); use windows whose samples fit, or a model without a limit")
        sr = copy.deepcopy(run)
        sr.model = model
        sr.data = dataclasses.replace(d, window=w, store_window=store)
        sr.trainer = dataclasses.replace(t, max_steps=max(1, steps), micro_batch_size=micro_cap,
                                         global_batch_tokens=G or 0)
        sr.optim = dataclasses.replace(o, lr=lr, min_lr_ratio=final_lr / lr, warmup_steps=warmup, schedule=schedule)
        sr.context = dataclasses.replace(run.context, stages=[])
        sr.strategy = dataclasses.replace(run.strategy, cp_size=cp)  # context parallelism of this stage
        problem = strategy_problem(sr)
        if problem and plan_only and "cannot share" in problem:
            # the memory plan: the context-parallel degree this stage needs on this many GPUs (every rank of a
            # context-parallel group reads the same samples); training it needs strategy=fsdp with that cp_size
            for c in (2, 4, 8, 16, 32, 64, 128, 256):
                if (dp or 1) % (cp * c) == 0 and _batch_problem(sr, (dp or 1) // (cp * c)) is None:
                    cp, problem = cp * c, None
                    sr.strategy = dataclasses.replace(run.strategy, cp_size=cp)
                    break
        if problem:
            where = f"{sc.name or w} (window {w}): " if staged else ""
            raise ConfigError(f"{where}{problem}")
        bp = batch_plan(sr, max(1, (dp or 1) // cp))
        if steps < 1:
            raise ConfigError(f"{key('steps', 'trainer.max_steps')}={steps}: must be >= 1")
        if warmup > steps and staged:
            raise ConfigError(f"context.stages[{i}]: warmup ({warmup} steps) is longer than the stage ({steps} steps)")
        stages.append(Stage(
            index=i, name=sc.name or (f"{i + 1}-{w}" if staged else str(w)), window=w, store_window=store,
            steps=steps, offset=offset, global_batch_tokens=bp.global_tokens, tokens_per_sample=L, lr=lr,
            final_lr=final_lr, warmup_steps=warmup, schedule=schedule, carry=sc.carry,
            rope_base=getattr(model, "rope_base", None) if knobs else None,
            rope_interpolation=getattr(model, "rope_interpolation", None) if knobs else None,
            context_parallel=cp, run=sr))
        offset += steps
    if staged and t.max_steps not in (0, offset):
        raise ConfigError(f"trainer.max_steps={t.max_steps} conflicts with context={run.context.name} (its stages "
                          f"total {offset} steps); leave trainer.max_steps=0 under a schedule")
    if staged and t.stop_at_step < 0:
        raise ConfigError(f"trainer.stop_at_step={t.stop_at_step}: must be >= 0")
    if staged and t.stop_at_step >= offset:
        raise ConfigError(f"trainer.stop_at_step={t.stop_at_step} never takes effect: the schedule ends at step {offset} "
                          f"(context={run.context.name}); use a smaller stop_at_step or 0")
    return Schedule(run.context.name if staged else "none", tuple(stages))


def check(run: RunConfig) -> Schedule:
    """Everything that must hold before a process starts: the schedule, each stage against the strategy."""
    return resolve(run, plan_only=run.plan)


def main(argv: list[str] | None = None) -> int:
    """``python -m glmtrain.schedule [overrides...]``: the resolved stages, one line each (used by slurm/chain.sh):
    ``<stage> <name> <window> <first step> <last step> <tokens per step>``."""
    import sys

    from glmtrain.config import compose, validate

    argv = sys.argv[1:] if argv is None else argv
    try:
        run = validate(compose(argv))
        schedule = check(run)
    except ConfigError as e:
        print(f"glmtrain.schedule: error: config: {e}", file=sys.stderr)
        return 2
    for s in schedule.stages:
        print(s.index + 1, s.name, s.window, s.offset + 1, s.end, s.global_batch_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
