"""MLM training throughput of glmtrain's NT-v2 against Hugging Face ``EsmForMaskedLM`` of the same dimensions.

    python scripts/bench_encoders.py                           # CPU: NT-v2-100M width, 4 layers, 128 tokens x 4, fp32
    python scripts/bench_encoders.py --seq 1024 --batch 32     # GPU (bf16 autocast): the issue's setting
    python scripts/bench_encoders.py --compile --attention flash_attn

Rows, measured side by side in one process (forward + backward + AdamW step, random 6-mer ids, 15 % of
positions scored):

* ``hf-esm``       -- ``transformers.EsmForMaskedLM`` with NT-v2-100M's dimensions (22 x 512, 16 heads,
  intermediate 2048, rotary, vocab 4,107, SDPA attention). Its MLP is ESM's Linear + GELU: HF cannot
  express NT-v2's gated MLP without NT's remote code, so this is the closest HF model.
* ``glmtrain-esm`` -- the same architecture in glmtrain (GELU MLP, biases): the like-for-like ratio.
* ``glmtrain-nt_v2`` -- glmtrain's NT-v2-100M as published (SwiGLU: 1.5x the MLP FLOPs of the rows above).

MFU = achieved FLOP/s / peak, with FLOPs per token = 6 N_non-embedding + 12 layers d L + 6 d vocab
(attention counted in full; the nanoGPT / torchtitan convention) and peak = a measured dense matmul
(bf16 8192^3 on GPU, fp32 2048^3 on CPU) unless --peak-tflops is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmtrain.models.transformer import Transformer, TransformerConfig  # noqa: E402
from glmtrain.tokenizers import build_tokenizer  # noqa: E402

DIMS = dict(d_model=512, n_layers=22, n_heads=16, ffn_dim=2048)  # InstaDeepAI/nucleotide-transformer-v2-100m-multi-species


def measured_peak(device: str) -> float:
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 10 if device == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(model: torch.nn.Module, layers: int, d: int, seq: int, vocab: int) -> float:
    n = sum(p.numel() for name, p in model.named_parameters()
            if not any(s in name for s in ("embed", "word_embeddings", "lm_head.decoder", "lm_head.weight")))
    return 6 * n + 12 * layers * d * seq + 6 * d * vocab


def glmtrain_model(kind: str, vocab_rows: int, attention: str, layers: int) -> Transformer:
    common = dict(DIMS, n_layers=layers, causal=False, norm="layernorm", norm_eps=1e-12, bias=True, position="rope",
                  tie_embeddings=False, head="mlm", gelu="exact", attention=attention)
    if kind == "nt_v2":
        cfg = TransformerConfig(**common, mlp="swiglu", mlp_bias=False)
    else:
        cfg = TransformerConfig(**common, mlp="gelu")
    return Transformer(cfg, vocab_rows)


def hf_model(n_tokens: int, layers: int):
    from transformers import EsmConfig, EsmForMaskedLM

    conf = EsmConfig(vocab_size=n_tokens, hidden_size=DIMS["d_model"], num_hidden_layers=layers,
                     num_attention_heads=DIMS["n_heads"], intermediate_size=DIMS["ffn_dim"], hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=2050, position_embedding_type="rotary",
                     pad_token_id=1, mask_token_id=2, layer_norm_eps=1e-12, tie_word_embeddings=False,
                     token_dropout=False, emb_layer_norm_before=False)
    conf._attn_implementation = "sdpa"
    return EsmForMaskedLM(conf)


def bench(name: str, model, forward, args, vocab: int, device: str, peak: float) -> dict:
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, 4100, (args.batch, args.seq), generator=g)
    scored = torch.rand(args.batch, args.seq, generator=g) < 0.15
    labels = x.masked_fill(~scored, -100).to(device)
    x = x.masked_fill(scored & (torch.rand(args.batch, args.seq, generator=g) < 0.8), 2).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    fn = torch.compile(forward) if args.compile else forward

    def step():
        with amp:
            logits = fn(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.batch * args.seq / dt
    fpt = flops_per_token(model, args.layers, DIMS["d_model"], args.seq, vocab)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    model.to("cpu")
    return {"name": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "tok_s": tok_s,
            "mfu": tok_s * fpt / peak, "peak_GiB": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default: 1024 on GPU, 128 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default: 32 on GPU, 4 on CPU)")
    ap.add_argument("--layers", type=int, default=None, help="default: 22 (NT-v2-100M) on GPU, 4 on CPU")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile every row")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "flash_attn"], help="glmtrain rows' attention")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (default: measured matmul)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.seq = args.seq or (1024 if gpu else 128)
    args.batch = args.batch or (32 if gpu else 4)
    args.steps = args.steps or (10 if gpu else 5)
    args.layers = args.layers or (DIMS["n_layers"] if gpu else 4)
    torch.manual_seed(0)
    tok = build_tokenizer({"kind": "kmer", "k": 6, "add_cls": True})
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak(args.device)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"{'bf16 autocast' if gpu else 'fp32'} seq={args.seq} batch={args.batch} layers={args.layers} "
          f"compile={args.compile} peak={peak / 1e12:.3g} TFLOP/s ({'given' if args.peak_tflops else 'measured matmul'})")
    rows = []
    hf = hf_model(tok.n_tokens, args.layers)
    rows.append(bench("hf-esm (EsmForMaskedLM)", hf, lambda x: hf(input_ids=x).logits, args, tok.n_tokens, args.device, peak))
    del hf
    for kind in ("esm", "nt_v2"):
        m = glmtrain_model(kind, tok.vocab_size, args.attention, args.layers)
        rows.append(bench(f"glmtrain-{kind}", m, m, args, tok.vocab_size, args.device, peak))
        del m
    base = rows[0]["tok_s"]
    print(f"{'row':<26}{'params(M)':>10}{'tokens/s':>12}{'MFU %':>8}{'x HF':>7}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['name']:<26}{r['params_M']:>10.1f}{r['tok_s']:>12.0f}{100 * r['mfu']:>8.1f}{r['tok_s'] / base:>7.2f}"
              f"{r['peak_GiB']:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
