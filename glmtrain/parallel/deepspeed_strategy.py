"""Lightning's DeepSpeedStrategy, also on CPU (DeepSpeed's CPU accelerator, gloo).

Lightning 2.6 refuses DeepSpeed unless the accelerator is CUDA, although DeepSpeed itself trains
ZeRO 1/2/3 on its CPU accelerator with gloo.  :class:`GLMDeepSpeedStrategy` lifts exactly the two
CUDA-only checks (the accelerator type, and device indices that match local ranks) and otherwise
runs Lightning's own DeepSpeed path, so that ``make test`` exercises glmtrain's DeepSpeed training
(GLMModule's loss scaling, the generated ZeRO config, Lightning's engine set-up) on any machine.
On CUDA nothing is changed.  Checkpoint files are checked by :mod:`glmtrain.ckpt_formats` before
DeepSpeed unpickles them.  The overridden methods are private Lightning API: if a Lightning
upgrade breaks them, the DeepSpeed test in ``tests/test_scale.py`` says so.

DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel when its communication
backend starts (about two minutes on two cores, and it needs a compiler); it is only a speed-up
for CPU collectives, so it is skipped here and gloo does the collectives.
"""

from __future__ import annotations

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class GLMDeepSpeedStrategy(DeepSpeedStrategy):
    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """DeepSpeed reads its files with weights_only=False: every file is opened safely first."""
        from pathlib import Path

        from glmtrain import ckpt_formats

        ckpt_formats.check_deepspeed(Path(checkpoint_path))
        return super().load_checkpoint(checkpoint_path, weights_only)

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's CUDA-only check; calls setup_distributed

    def setup_distributed(self) -> None:
        _forget_previous_process_group()
        if not self._on_cpu():
            return super().setup_distributed()
        import importlib

        from lightning.fabric.utilities.seed import reset_seed

        ds_comm = importlib.import_module("deepspeed.comm.torch")  # the attribute deepspeed.comm.torch is torch itself
        ds_comm.build_shm_op = lambda: None  # gloo collectives; no JIT-built shared-memory kernel
        # (Lightning's index check expects cuda:0..n-1; CPU devices have no index)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import argparse

        import deepspeed

        # as Lightning's, but with the process's local rank as DeepSpeed's device rank (CPU devices have no index)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


def _forget_previous_process_group() -> None:
    """DeepSpeed caches its communication backend and its process groups in module globals; after a
    previous run in this process destroyed the default group (glmtrain.train does), they are stale."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS", "_WORLD_SIZE", "_RANK")) and name.isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None
