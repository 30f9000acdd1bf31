"""glmtrain.parallel without process groups: plans, refusals before spawn, batch arithmetic, environments,
backends, strategy objects, DeepSpeed config generation (deepspeed itself not needed)."""

from __future__ import annotations

import dataclasses
import fnmatch

import pytest
import torch
from torch import nn

from glmtrain.config import ConfigError, StrategyConfig
from glmtrain.models import build_model, config_class, family_names
from glmtrain.parallel import plans
from glmtrain.parallel.deepspeed_config import deepspeed_config
from glmtrain.parallel.strategies import (
    GLMDDPStrategy,
    GLMModelParallelStrategy,
    GLMSingleDeviceStrategy,
    batch_plan,
    build_strategy,
    launcher,
    optim_state_by_index,
    optim_state_by_name,
    resolve_backend,
    topology,
)
from glmtrain.tokenizers import build_tokenizer
from tests._util import compose_run

CPU = ["trainer.accelerator=cpu", "data.window=64"]
TINY = {
    "transformer": ["model=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=4"],
    "hyena": ["model=hyena", "model.d_model=32", "model.n_layers=2", "model.filter_order=16", "model.max_seq_len=64"],
    "evo2": ["model=evo2", "model.d_model=32", "model.pattern=SDH*", "model.n_heads=4", "model.mlp_dim=64",
             "model.se_filter_groups=4", "model.mr_filter_groups=4", "model.mr_filter_length=16"],
}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for k in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "MASTER_ADDR", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NAME"):
        monkeypatch.delenv(k, raising=False)


# ----------------------------------------------------------------------------- plans
def test_every_family_declares_a_plan():
    assert set(family_names()) <= set(plans.PLANS), "a new family joins the strategies by declaring its plan"


@pytest.mark.parametrize("family", sorted(TINY))
def test_plan_covers_every_linear_layer(family):
    """Every linear layer of every block is column- or row-parallel or deliberately replicated, and the
    plan's channel-local parameters exist: a renamed module in a model shows up here, not as a wrong shape."""
    run = compose_run([*TINY[family], *CPU])
    tok = build_tokenizer(dataclasses.asdict(run.model.tokenizer))
    model = build_model(run.model, tok.vocab_size)
    plan = plans.plan_for(family)
    sharded = [p for p, s in plan.block_styles.items() if isinstance(s, (plans.Colwise, plans.Rowwise))]
    local = {p: s for p, s in plan.block_styles.items() if isinstance(s, plans.Local) and s.params}
    for bi, block in enumerate(getattr(model, plan.blocks)):
        # channel-local (split) or summed-gradient (replicated) parameters of Local styles, as block-relative names
        local_names = [f"{m}.{n}" for pat, st in local.items() for m in plans._matches(block, pat)
                       for n in (*st.params, *st.summed)]
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                ok = [p for p in sharded if fnmatch.fnmatchcase(name, p)] or \
                     [p for p in plan.replicated if fnmatch.fnmatchcase(name, p)] or \
                     [p for p in local_names if fnmatch.fnmatchcase(f"{name}.weight", p)]
                assert ok, f"{family} block {bi}: linear layer {name!r} is in no tensor-parallel rule of its plan"
        for pattern, style in local.items():
            for name in plans._matches(block, pattern):
                sub = block.get_submodule(name)
                # Hyena mixers use some of the channel-local parameters (attention mixers none)
                if any(isinstance(m, nn.Conv1d) for m in sub.modules()):
                    assert any(plans._has(sub, n) for n in style.params), f"{family} block {bi}: {name} lost its parameters"


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_of_fused_projections_are_contiguous_slices(tp):
    """Tensor-parallel-native layouts: the contiguous row slice r of a fused projection (what a Colwise
    shard holds, and what checkpoints store unpermuted) computes exactly heads / channels r of the
    full module -- nothing is permuted when sharding, saving or loading."""
    from glmtrain.models.layers import RopeAttention, split_interleaved

    torch.manual_seed(0)
    attn = RopeAttention(32, 4, causal=True, qkv_bias=True, out_bias=True, rope_base=1e4, rope_interpolation=1.0).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, v = attn.heads(x)
    rows, h = attn.qkv.weight.shape[0] // tp, 4 // tp
    for r in range(tp):
        local = nn.Linear(32, rows).double()
        local.weight.data.copy_(attn.qkv.weight[r * rows:(r + 1) * rows])
        local.bias.data.copy_(attn.qkv.bias[r * rows:(r + 1) * rows])
        shard = RopeAttention(32, 4, causal=True, qkv_bias=True, out_bias=True, rope_base=1e4, rope_interpolation=1.0)
        shard.qkv = local
        for got, want in zip(shard.heads(x), (q, k, v)):
            assert torch.equal(got, want[:, r * h:(r + 1) * h])
    # Hyena projections (d -> 3d) and their featurizer conv: channel-interleaved rows
    d, c = 8, 8 // tp
    z, w, b = torch.randn(2, 9, 3 * d), torch.randn(3 * d, 1, 3), torch.randn(3 * d)
    zc, wc, bc = split_interleaved(z, w, b)  # [post; pre; v] chunks of all channels
    for r in range(tp):
        sl = slice(3 * c * r, 3 * c * (r + 1))
        zl, wl, bl = split_interleaved(z[..., sl], w[sl], b[sl])
        for j in range(3):  # chunk j of the shard = channels r of chunk j of the whole
            whole = slice(j * d + r * c, j * d + (r + 1) * c)
            assert torch.equal(zl[:, j * c:(j + 1) * c], zc[:, whole])
            assert torch.equal(wl[j * c:(j + 1) * c], wc[whole]) and torch.equal(bl[j * c:(j + 1) * c], bc[whole])


def test_tp_problems_name_the_sizes():
    cfg = config_class("transformer")(d_model=48, n_heads=6, ffn_dim=102)
    bad = plans.tp_problems(cfg, 16, 4, seq_len=64, sequence_parallel=True, vocab_parallel=False)
    assert bad == ["model.n_heads=6", "the MLP width (model.ffn_dim)=102"]
    assert plans.tp_problems(cfg, 16, 2, seq_len=63, sequence_parallel=True, vocab_parallel=False) == [
        "the sequence length (63 tokens per window; strategy.sequence_parallel=true)"]


# ----------------------------------------------------------------------------- refusals before spawn
@pytest.mark.parametrize("overrides,expected", [
    (["strategy=tp", "trainer.devices=3", "model=transformer"], "strategy.tp_size=3 does not divide model.n_heads=4"),
    (["strategy=fsdp_tp", "trainer.devices=3"], "strategy.tp_size=2 does not divide the world size 3"),
    (["strategy=tp", "strategy.tp_size=2", "trainer.devices=2", "model=evo2", "model.se_filter_groups=3",
      "model.d_model=24", "model.n_heads=4", "model.mlp_dim=64", "model.mr_filter_groups=4"],
     "strategy.tp_size=2 does not divide model.se_filter_groups=3"),
    (["strategy=ddp", "+strategy.tp_size=2"], "needs strategy=tp or strategy=fsdp"),
    (["trainer.global_batch_tokens=100"], "not a multiple of the tokens per sample (64"),
    (["strategy=ddp", "trainer.devices=3", "trainer.global_batch_tokens=256"], "3 data-parallel ranks cannot share"),
    (["trainer.global_batch_tokens=256", "trainer.accumulate=2"], "leave trainer.accumulate=1"),
    (["strategy=fsdp", "trainer.devices=2", "strategy.cp_size=3"], "strategy.cp_size=3 does not divide the data-parallel size 2"),
    (["strategy=fsdp_tp", "trainer.devices=4", "+strategy.cp_size=2"], "context parallelism runs under strategy=fsdp with tp_size=1"),
    (["strategy=fsdp", "trainer.devices=2", "strategy.cp_size=2", "data.window=63"], "does not divide the sequence length (63"),
], ids=["tp-heads", "tp-world", "tp-channels", "tp-without-tp", "tokens-window", "tokens-ranks", "tokens-accumulate",
        "cp-world", "cp-with-tp", "cp-length"])
def test_refusals_are_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        compose_run([*CPU, *overrides])
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg


def test_deepspeed_without_the_package_is_refused(monkeypatch):
    import glmtrain.parallel as par

    monkeypatch.setattr(par, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError, match=r"strategy=deepspeed needs the deepspeed package: pip install"):
        compose_run([*CPU, "strategy=deepspeed"])


def test_deepspeed_on_cpu_builds_the_cpu_capable_strategy(monkeypatch):
    """Lightning's DeepSpeedStrategy refuses CPU; glmtrain's subclass runs on DeepSpeed's CPU accelerator
    (trained and compared with one process in test_parallel_parity.py and test_scale.py)."""
    import glmtrain.parallel as par
    from glmtrain.parallel.deepspeed_strategy import GLMDeepSpeedStrategy

    monkeypatch.setattr(par, "deepspeed_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run = compose_run([*CPU, "strategy=deepspeed", "trainer.devices=2", "strategy.zero_stage=3"])
    s = build_strategy(run, "cpu")
    assert isinstance(s, GLMDeepSpeedStrategy) and s.process_group_backend == "gloo"
    assert s.config["zero_optimization"]["stage"] == 3


def test_family_without_plan_or_tp_is_refused(monkeypatch):
    monkeypatch.delitem(plans.PLANS, "hyena")
    with pytest.raises(ConfigError, match=r"strategy=fsdp: model family 'hyena' declares no sharding plan"):
        compose_run([*CPU, *TINY["hyena"], "strategy=fsdp", "trainer.devices=2"])
    compose_run([*CPU, *TINY["hyena"], "strategy=ddp", "trainer.devices=2"])  # DDP needs no plan
    monkeypatch.setitem(plans.PLANS, "evo2", dataclasses.replace(plans.PLANS["evo2"], tensor_parallel=False))
    with pytest.raises(ConfigError, match=r"model family 'evo2' has no tensor-parallel plan"):
        compose_run([*CPU, *TINY["evo2"], "strategy=tp", "trainer.devices=2"])
    compose_run([*CPU, *TINY["evo2"], "strategy=fsdp", "trainer.devices=2"])


def test_cli_refuses_before_spawn_with_one_line(tmp_path):
    from tests._util import run_cli

    r = run_cli(["strategy=tp", "trainer.devices=3", "trainer.accelerator=cpu", f"run_dir={tmp_path / 'r'}"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("glmtrain: error: config: strategy.tp_size=3 does not divide")
    assert not (tmp_path / "r").exists()  # nothing written, no process started


# ----------------------------------------------------------------------------- batch arithmetic
def test_batch_plan_from_global_tokens():
    run = compose_run([*CPU, "trainer.micro_batch_size=4", "trainer.global_batch_tokens=2048"])  # 32 windows of 64
    assert [(p.micro, p.accumulate) for p in (batch_plan(run, d) for d in (1, 2, 4, 8, 16, 32))] == \
        [(4, 8), (4, 4), (4, 2), (4, 1), (2, 1), (1, 1)]
    p = batch_plan(run, 2)
    assert p.global_samples == 32 and p.global_tokens == 2048 and "dp 2 x micro-batch 4 x accumulate 4" in p.describe()
    run = compose_run([*CPU, "trainer.micro_batch_size=5", "trainer.global_batch_tokens=1536"])  # 24 per step
    assert (batch_plan(run, 2).micro, batch_plan(run, 2).accumulate) == (4, 3)  # largest divisor <= 5 of 12
    plain = compose_run([*CPU, "trainer.micro_batch_size=3", "trainer.accumulate=2"])
    assert (batch_plan(plain, 4).micro, batch_plan(plain, 4).accumulate, batch_plan(plain, 4).global_samples) == (3, 2, 24)


# ----------------------------------------------------------------------------- environments and backends
def test_topology_local_torchrun_slurm(monkeypatch):
    run = compose_run([*CPU, "strategy=tp", "trainer.devices=4", "model=transformer"])
    t = topology(run)
    assert (t.launcher, t.world, t.devices, t.num_nodes, t.tp, t.dp) == ("local", 4, 4, 1, 4, 1)
    # torchrun on 2 nodes x 4: the environment wins over trainer.devices
    for k, v in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5", "MASTER_ADDR": "n0"}.items():
        monkeypatch.setenv(k, v)
    run = compose_run([*CPU, "strategy=fsdp_tp", "model=transformer"])
    t = topology(run)
    assert (launcher(), t.world, t.devices, t.num_nodes, t.tp, t.dp) == ("torchrun", 8, 4, 2, 2, 4)
    for k in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k)
    for k, v in {"SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(k, v)
    t = topology(compose_run([*CPU, "strategy=tp", "model=transformer", "model.n_heads=8"]))
    assert (launcher(), t.world, t.devices, t.num_nodes, t.tp, t.dp) == ("slurm", 16, 8, 2, 8, 2)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc shell: not a SLURM task launch
    assert launcher() == "local"


def test_backend_is_chosen_by_device():
    run = compose_run([*CPU, "strategy=ddp"])
    assert resolve_backend(run, "gpu") == "nccl" and resolve_backend(run, "cpu") == "gloo"
    assert resolve_backend(compose_run([*CPU, "strategy=ddp", "strategy.backend=gloo"]), "gpu") == "gloo"


def test_strategy_objects():
    assert isinstance(build_strategy(compose_run(CPU), "cpu"), GLMSingleDeviceStrategy)
    s = build_strategy(compose_run([*CPU, "strategy=ddp", "trainer.devices=2"]), "cpu")
    assert isinstance(s, GLMDDPStrategy) and s.process_group_backend == "gloo"
    s = build_strategy(compose_run([*CPU, "strategy=fsdp_tp", "trainer.devices=4"]), "cpu")
    assert isinstance(s, GLMModelParallelStrategy)
    assert (s._data_parallel_size, s._tensor_parallel_size, s.options["fsdp"], s.options["sequence_parallel"]) == (2, 2, True, True)
    s = build_strategy(compose_run([*CPU, "strategy=tp", "trainer.devices=2"]), "cpu")
    assert (s._data_parallel_size, s._tensor_parallel_size, s.options["fsdp"]) == (1, 2, False)
    s = build_strategy(compose_run([*CPU, "strategy=fsdp", "trainer.devices=2", "trainer.precision=bf16-mixed"]), "gpu",
                       precision="bf16-mixed")
    assert s.options["param_dtype"] is torch.bfloat16 and s.options["reduce_dtype"] is torch.float32  # bf16 params, fp32 reduce
    s = build_strategy(compose_run([*CPU, "strategy=fsdp", "trainer.devices=2"]), "cpu")
    assert s.options["param_dtype"] is None  # CPU fp32: no mixed-precision policy


def test_optimizer_state_keys_round_trip():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight]},
                             {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0}])
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    named = optim_state_by_name(sd, opt, model)
    assert named["param_groups"][0]["params"] == ["0.weight", "2.weight"]
    assert torch.equal(named["state"]["1.bias"]["exp_avg"], opt.state[model[1].bias]["exp_avg"])
    back = optim_state_by_index(named, opt, model)
    assert back["param_groups"] == sd["param_groups"] and back["state"].keys() == sd["state"].keys()


# ----------------------------------------------------------------------------- DeepSpeed config
def _ds(**kw) -> StrategyConfig:
    return StrategyConfig(name="deepspeed", **kw)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_from_hydra_keys(stage):
    run = compose_run([*CPU, "trainer.micro_batch_size=4", "trainer.global_batch_tokens=1024", "trainer.grad_clip=0.5"])
    plan = batch_plan(run, 2)
    cfg = deepspeed_config(_ds(zero_stage=stage, reduce_bucket_size=123, allgather_bucket_size=456,
                               stage3_prefetch_bucket_size=789), micro_batch=plan.micro, grad_clip=run.trainer.grad_clip,
                           precision="bf16-mixed")
    z = cfg["zero_optimization"]
    assert z["stage"] == stage and z["reduce_bucket_size"] == 123
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    # accumulation is Lightning's (Trainer(accumulate_grad_batches)), never set here; no optimizer/scheduler sections
    assert not {"gradient_accumulation_steps", "train_batch_size", "optimizer", "scheduler"} & set(cfg)
    if stage == 3:
        assert z["stage3_prefetch_bucket_size"] == 789 and "allgather_bucket_size" not in z
    else:
        assert z["allgather_bucket_size"] == 456 and "stage3_prefetch_bucket_size" not in z
    assert "offload_optimizer" not in z and "offload_param" not in z
    import json

    json.dumps(cfg)  # plain JSON, as DeepSpeed's own config files


def test_deepspeed_offload_and_refusals():
    cfg = deepspeed_config(_ds(zero_stage=3, offload_optimizer=True, offload_params=True), micro_batch=2, grad_clip=1.0,
                           precision="16-mixed")
    z = cfg["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert cfg["fp16"]["enabled"] and "bf16" not in cfg
    with pytest.raises(ValueError, match="offload_params=true needs strategy.zero_stage=3"):
        deepspeed_config(_ds(zero_stage=2, offload_params=True), micro_batch=1, grad_clip=1.0, precision="bf16-mixed")
    with pytest.raises(ValueError, match="allowed values are 1, 2, 3"):
        deepspeed_config(_ds(zero_stage=4), micro_batch=1, grad_clip=1.0, precision="bf16-mixed")
