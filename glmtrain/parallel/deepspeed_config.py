"""DeepSpeed ZeRO configuration generated from the Hydra ``strategy`` group.

Ownership of the knobs, so that nothing is set on two sides:

* glmtrain (this module): ZeRO stage, optimizer / parameter offload, bucket
  sizes, communication overlap, the per-device micro-batch
  (``train_micro_batch_size_per_gpu``, from :func:`glmtrain.parallel.strategies.batch_plan`),
  gradient clipping (``trainer.grad_clip``) and the precision section;
* Lightning: ``gradient_accumulation_steps`` (it copies ``Trainer(accumulate_grad_batches=...)``
  into the config and refuses a config that already has it), and
  ``train_batch_size`` (DeepSpeed derives it: micro x accumulation x world).

The optimizer stays the one ``GLMModule.configure_optimizers`` builds (AdamW groups,
or DeepSpeed's CPU Adam in AdamW mode when the optimizer is offloaded) and so does
the learning-rate schedule: the generated config has no ``optimizer`` or
``scheduler`` section.  Importing this module does not import deepspeed.
"""

from __future__ import annotations

from typing import Any


def deepspeed_config(s: Any, *, micro_batch: int, grad_clip: float, precision: str) -> dict[str, Any]:
    """``s``: a StrategyConfig (name=deepspeed).  Returns a JSON-serialisable DeepSpeed config dict."""
    stage = int(s.zero_stage)
    if stage not in (1, 2, 3):
        raise ValueError(f"strategy.zero_stage={stage}: allowed values are 1, 2, 3")
    if s.offload_params and stage != 3:
        raise ValueError(f"strategy.offload_params=true needs strategy.zero_stage=3 (is {stage})")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(s.overlap_comm),
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": int(s.reduce_bucket_size),
        "allgather_partitions": True,
        "allgather_bucket_size": int(s.allgather_bucket_size),
    }
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": int(s.stage3_prefetch_bucket_size),
            "stage3_param_persistence_threshold": int(s.stage3_param_persistence_threshold),
            "stage3_max_live_parameters": int(s.stage3_max_live_parameters),
            "stage3_gather_16bit_weights_on_model_save": False,
        })
        for k in ("allgather_partitions", "allgather_bucket_size", "reduce_scatter"):
            zero.pop(k)  # stage-1/2 knobs; stage 3 uses the prefetch / persistence ones
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict[str, Any] = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # glmtrain logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if precision.startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    elif precision.startswith("16"):
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg
