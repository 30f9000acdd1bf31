"""Inference for causal genomic LMs: log-likelihood scoring and autoregressive sampling.

Works with any causal :class:`~glmtrain.models.base.GenomicModel` (``forward(ids) ->
logits [B, L, V]``): the Transformer baseline, HyenaDNA and the Evo 2-style
StripedHyena 2.

Generation decodes with a cache by default (:mod:`glmtrain.models.decode`: a KV cache for
attention, FIR states for short/explicit filters, the recurrent form of Evo 2's modal filters and
a direct-convolution history for HyenaDNA's implicit filters), so a new token costs O(L) (Hyena)
or O(state) (modal filter) instead of a full O(L log L) forward pass.  ``cached=False`` (or
``max_context`` > 0, a sliding window) recomputes the whole forward pass for every token; that is
exact for every family -- the Hyena filters are defined per position, not per length -- and is
the reference the cached decoder is tested against.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _require_causal(model) -> None:
    if not getattr(model, "causal", True):
        raise ValueError(f"{type(model).__name__} is not a causal model: next-token scoring and generation need model.causal=True")


@torch.no_grad()
def token_log_probs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..L-1, shape [B, L-1] (fp32)."""
    _require_causal(model)
    with _eval_mode(model):
        logits = model(input_ids)[:, :-1].float()
    logp = F.log_softmax(logits, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def sequence_log_likelihood(
    model,
    input_ids: torch.Tensor,
    pad_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Per-sequence log-likelihood (natural log) of tokens 1..L-1 given their prefix.

    Targets equal to ``pad_id`` or masked out by ``attention_mask`` [B, L] are
    skipped; use right padding (a causal model never sees the padding to the
    right of a position).  ``reduction``: ``sum`` (total log-likelihood) or
    ``mean`` (per scored token).  Returns [B] fp32.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: allowed values are sum, mean")
    lp = token_log_probs(model, input_ids)
    keep = torch.ones_like(lp, dtype=torch.bool)
    if pad_id is not None:
        keep &= input_ids[:, 1:] != pad_id
    if attention_mask is not None:
        keep &= attention_mask[:, 1:].bool()
    total = (lp * keep).sum(-1)
    if reduction == "mean":
        return total / keep.sum(-1).clamp(min=1)
    return total


@torch.no_grad()
def score_sequences(
    model,
    tokenizer,
    sequences: Sequence[str],
    batch_size: int = 8,
    prepend_id: int | None = None,
    device: torch.device | str | None = None,
) -> list[dict]:
    """Score DNA strings: ``[{"log_likelihood": nats, "tokens": n, "bits_per_token": b}, ...]``.

    The first token of each sequence has no prefix and is not scored unless
    ``prepend_id`` (e.g. a BOS/EOD id) is given, in which case every token is.
    """
    device = device or next(model.parameters()).device
    out: list[dict] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        encoded = [tokenizer.encode_window(s)[0] for s in chunk]  # with the run's class/separator tokens
        if prepend_id is not None:
            encoded = [np.concatenate(([prepend_id], e)) for e in encoded]
        length = max(len(e) for e in encoded)
        ids = np.full((len(encoded), length), tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), length), dtype=bool)
        for j, e in enumerate(encoded):
            ids[j, : len(e)] = e
            mask[j, : len(e)] = True
        ids_t = torch.from_numpy(ids).to(device)
        mask_t = torch.from_numpy(mask).to(device)
        ll = sequence_log_likelihood(model, ids_t, attention_mask=mask_t)
        for j, e in enumerate(encoded):
            n = max(len(e) - 1, 0)
            out.append({"log_likelihood": float(ll[j]), "tokens": n, "bits_per_token": float(-ll[j] / np.log(2) / max(n, 1))})
    return out


def _filter_logits(logits: torch.Tensor, top_k: int, allowed_ids: torch.Tensor | None) -> torch.Tensor:
    if allowed_ids is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[:, allowed_ids] = 0.0
        logits = logits + mask
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token: the top token always stays
    drop = before >= top_p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                allowed_ids: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from next-token logits [B, V]: allowed ids, top-k, then temperature and top-p."""
    logits = _filter_logits(logits.float(), top_k, allowed_ids)
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(_top_p(logits / temperature, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def supports_cache(model) -> bool:
    """Whether :func:`glmtrain.models.decode.decoding` covers every block of ``model``."""
    from glmtrain.models.decode import DecodeError, cached_mixers

    try:
        cached_mixers(model)
        return getattr(model, "causal", True)
    except DecodeError:
        return False


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    allowed_ids: Iterable[int] | torch.Tensor | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    max_context: int = 0,
    top_p: float = 1.0,
    cached: bool | None = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` after ``prompt_ids`` [B, P]; returns [B, P + max_new_tokens].

    ``temperature <= 0`` is greedy decoding (argmax); as temperature -> 0 sampling
    converges to it.  ``top_k`` > 0 keeps the k most likely tokens; ``top_p`` < 1
    keeps the nucleus of that much probability (after temperature);
    ``allowed_ids`` restricts the vocabulary (e.g. ``tokenizer.nucleotide_ids``
    for plain ACGT).  Once a row emits ``eos_id`` it keeps emitting it.
    ``max_context`` > 0 conditions on the last ``max_context`` tokens only (full recomputation).
    ``cached``: decode with per-mixer states (default: whenever the model supports it and
    ``max_context`` is 0); False recomputes the whole forward pass for every token.
    """
    _require_causal(model)
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError("prompt_ids must be [batch, length>=1]")
    allowed = None
    if allowed_ids is not None:
        allowed = torch.as_tensor(list(allowed_ids) if not torch.is_tensor(allowed_ids) else allowed_ids, dtype=torch.long, device=prompt_ids.device)
    if cached is None:
        cached = not max_context and supports_cache(model)
    elif cached and max_context:
        raise ValueError("cached decoding conditions on the whole prefix; max_context needs cached=False")
    ids = prompt_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with _eval_mode(model), (_cached(model, ids.shape[0], ids.shape[1] + max_new_tokens) if cached else nullcontext()):
        logits = model(ids)[:, -1] if cached and max_new_tokens else None  # prefill
        for i in range(max_new_tokens):
            if not cached:
                logits = model(ids[:, -max_context:] if max_context else ids)[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, allowed, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if cached and i + 1 < max_new_tokens:
                logits = model(nxt[:, None])[:, -1]
    return ids


def _cached(model, batch: int, max_len: int):
    from glmtrain.models.decode import decoding

    return decoding(model, batch, max_len)


def generate_dna(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """Convenience wrapper: DNA string in, DNA string out (ACGT only by default)."""
    device = next(model.parameters()).device
    body = tokenizer.encode(prompt)  # the class token if the model was trained with one; no separator: it continues
    if tokenizer.add_cls:
        body = np.concatenate(([tokenizer.cls_id], body))
    ids = torch.as_tensor(body, dtype=torch.long, device=device)[None]
    kwargs.setdefault("allowed_ids", tokenizer.nucleotide_ids.tolist())
    out = generate(model, ids, max_new_tokens, **kwargs)
    return tokenizer.decode(out[0].tolist())


__all__ = ["token_log_probs", "sequence_log_likelihood", "score_sequences", "generate", "generate_dna", "sample_next",
           "supports_cache"]
