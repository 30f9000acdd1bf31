"""What the downstream tasks need to know about each model family, in one table.

A family joins fine-tuning, variant scoring and generation with one :class:`FamilySpec` line in
:data:`SPECS` (defaults fit any family built like the ones here: ``embed`` -> ``blocks`` ->
``norm_f`` -> ``lm_head`` with ``hidden_states(ids)``).  Adapter targets are suffixes of module
names inside the blocks; they are resolved against the built model, so a target that matches
nothing is refused instead of silently doing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    # LoRA / AdaLoRA / IA3 default targets: suffixes of nn.Linear names inside the blocks
    # (empty: every nn.Linear inside the blocks)
    adapter_targets: tuple[str, ...] = ()
    # IA3: targets whose *input* is scaled (the MLP's output projection), as in the IA3 paper
    ia3_feedforward: tuple[str, ...] = ("fc2", "down")
    pooling_causal: str = "last"  # last | mean
    pooling_encoder: str = "mean"  # mean | cls
    embed: str = "embed"  # the token embedding (prompt tuning prepends soft tokens to its output)
    blocks: str = "blocks"  # ModuleList whose outputs the bottleneck adapters refine

    def hidden_size(self, model) -> int:
        return int(model.cfg.d_model)


SPECS: dict[str, FamilySpec] = {
    "transformer": FamilySpec(
        adapter_targets=("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2", "mlp.gate", "mlp.up", "mlp.down"),
        ia3_feedforward=("mlp.fc2", "mlp.down"),
    ),
    # HyenaDNA: mean pooling as in the released fine-tuning code ("pool" decoder mode)
    "hyena": FamilySpec(
        adapter_targets=("mixer.in_proj", "mixer.out_proj", "mlp.fc1", "mlp.fc2"),
        ia3_feedforward=("mlp.fc2",),
        pooling_causal="mean",
    ),
    "evo2": FamilySpec(
        adapter_targets=("mixer.qkv", "mixer.proj", "mixer.out", "mlp.gate", "mlp.up", "mlp.down"),
        ia3_feedforward=("mlp.down",),
    ),
}


def spec_for(family: str) -> FamilySpec:
    """The family's spec; a family without a line here gets the generic one (every Linear in the blocks)."""
    return SPECS.get(family, FamilySpec())
