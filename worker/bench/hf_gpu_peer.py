"""The GPU peer for dsv3's H200 benchmark: Hugging Face transformers' DeepseekV3 (bf16, random weights made on the
GPU) at full DeepSeek-V3 widths, timed with CUDA events (2 warm-up runs, median of --reps).

  moe_layer  one MoE decoder layer (`model.model.layers[0]` called directly, no embedding/head): decode steps at each
             batch with a filled KV cache, and a prefill of --prefill tokens at batch 1 (fresh cache).
  slice5     DeepseekV3ForCausalLM with 5 layers (3 dense + 2 MoE), embedding and lm_head: decode steps at each batch.
  mla_prefill  one layer's causal prefill attention in the naive MLA form alone (128 heads, query/key 192, value 128,
             bf16, --prefill tokens): torch's scaled_dot_product_attention on each backend that takes the shapes;
             the fastest is reported.

The cache is filled with random tensors (`DynamicCache.update`), not by a prefill; its shapes are probed from one
real step, so they follow whatever the installed transformers caches (5.x: the compressed MLA latents, 4.x: per-head
K/V). Per batch the context is the largest of 4096/1024/256 whose cache plus the per-layer decompressed K/V that
transformers builds on every step fits in --kv-budget-gb; after an OOM the next smaller context is tried. Each timed
step is followed by cutting the cache back to its context. MoE experts run through transformers' default experts
implementation (5.x: grouped_mm) unless --experts names another (eager = the per-expert Python loop).

    python3 worker/bench/hf_gpu_peer.py --out hf-gpu.json [--configs moe_layer,slice5] [--batches 1,8,64,256]
    python3 worker/bench/hf_gpu_peer.py --tiny --out /tmp/tiny.json    # small widths; runs on CPU without a GPU

Writes a JSON list of {config, phase: decode|prefill, batch, ctx, ms, experts[, tokens]} or {..., error: "oom"}."""

import argparse
import gc
import json
import statistics
import time

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

FULL = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=163840, rms_norm_eps=1e-6,
)
TINY = dict(FULL, vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
YARN = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=1.0)
CONFIGS = {"moe_layer": dict(num_hidden_layers=1, first_k_dense_replace=0),
           "slice5": dict(num_hidden_layers=5, first_k_dense_replace=3)}
OOM = (torch.cuda.OutOfMemoryError, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") \
    else (torch.cuda.OutOfMemoryError,)


def make_config(dims, layers, experts):
    kw = dict(dims, **layers, attn_implementation="sdpa", tie_word_embeddings=False)
    if experts != "default":
        kw["experts_implementation"] = experts
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x: one `rope_parameters` dict holding rope_theta too
        cfg = DeepseekV3Config(**kw, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, **YARN))
        rope = cfg.rope_parameters
    else:  # 4.x: `rope_scaling` + `rope_theta`
        cfg = DeepseekV3Config(**kw, rope_theta=10000.0, rope_scaling=dict(type="yarn", **YARN))
        rope = cfg.rope_scaling
    assert rope.get("rope_type", rope.get("type")) == "yarn" and rope["factor"] == 40.0, rope
    return cfg


@torch.no_grad()
def build(cfg, dev):
    """Random bf16 weights allocated and filled on `dev` (the model is laid out on the meta device first)."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    model.to(torch.bfloat16)
    keep = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())  # e.g. e_score_correction_bias
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if any(k in name for k in keep):
            t.data = t.data.float()
    model.to_empty(device=dev)
    for p in model.parameters():
        p.normal_(0.0, 0.02)
    for m in model.modules():
        if isinstance(m, DeepseekV3RMSNorm):
            m.weight.fill_(1.0)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.01)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(dev)  # inv_freq is not a weight: recompute it
    return model.eval()


def new_cache(cfg):
    try:
        return DynamicCache(config=cfg)
    except TypeError:
        return DynamicCache()


def cached(cache, i):
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def trim(cache, ctx):
    """Cut every layer back to `ctx` tokens so repeated steps see the same context (no-op on old cache APIs)."""
    for layer in getattr(cache, "layers", ()):
        layer.keys, layer.values = layer.keys[..., :ctx, :], layer.values[..., :ctx, :]


def stepper(name, model, batch, dev):
    """A function (cache, pos) -> output for one forward of `batch` sequences of pos.shape[1] tokens."""
    if name == "moe_layer":
        layer, rotary = model.model.layers[0], model.model.rotary_emb

        def step(cache, pos):
            h = torch.randn(batch, pos.shape[1], model.config.hidden_size, device=dev, dtype=torch.bfloat16)
            return layer(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                         position_embeddings=rotary(h, pos))
    else:
        def step(cache, pos):
            ids = torch.randint(0, model.config.vocab_size, (batch, pos.shape[1]), device=dev)
            return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return step


def median_ms(fn, reps, dev):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_config(name, args, dims, dev, out):
    cfg = make_config(dims, CONFIGS[name], args.experts)
    model = build(cfg, dev)
    experts = getattr(model.config, "_experts_implementation", None) or "eager"
    base = dict(config=name, experts=experts)
    # Probe the cache layout with one real 1-token step: per-layer shapes and bytes per cached token.
    probe = new_cache(cfg)
    stepper(name, model, 1, dev)(probe, torch.zeros(1, 1, dtype=torch.long, device=dev))
    shapes = [tuple(t.shape for t in cached(probe, i)) for i in range(cfg.num_hidden_layers)]
    dtype = cached(probe, 0)[0].dtype
    cache_tok = sum(k.numel() + v.numel() for k, v in (cached(probe, i) for i in range(len(shapes)))) * 2
    del probe
    h = cfg.num_attention_heads  # kv_b_proj output + assembled K (+ a V copy) + fp32 scores, for one layer
    per_tok = cache_tok + h * 2 * (2 * cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + 2 * cfg.v_head_dim) + h * 8
    print(f"[{name}] experts={experts} cache per layer {shapes[0]}, {per_tok / 1024:.1f} KiB/token with transients")
    for batch in args.batches:
        fits = [c for c in args.ctxs if batch * c * per_tok <= args.kv_budget_gb * 1e9] or args.ctxs[-1:]
        for ctx in args.ctxs[args.ctxs.index(fits[0]):]:
            rec = dict(base, phase="decode", batch=batch, ctx=ctx)
            cache = step = None
            try:
                cache = new_cache(cfg)
                for i, (ks, vs) in enumerate(shapes):
                    cache.update(torch.randn(batch, ks[1], ctx, ks[3], device=dev, dtype=dtype),
                                 torch.randn(batch, vs[1], ctx, vs[3], device=dev, dtype=dtype), i)
                step, pos = stepper(name, model, batch, dev), torch.full((batch, 1), ctx, device=dev)
                rec["ms"] = round(median_ms(lambda: (step(cache, pos), trim(cache, ctx)), args.reps, dev), 3)
            except OOM:
                rec["error"] = "oom"
            out.append(rec)
            del cache, step
            free()
            if "ms" in rec:
                break
    if name == "moe_layer" and not args.skip_prefill:
        rec = dict(base, phase="prefill", batch=1, ctx=0, tokens=args.prefill)
        try:
            step, pos = stepper(name, model, 1, dev), torch.arange(args.prefill, device=dev)[None]
            rec["ms"] = round(median_ms(lambda: step(new_cache(cfg), pos), args.reps, dev), 3)
        except OOM:
            rec["error"] = "oom"
        out.append(rec)
    del model
    free()


def run_attention(args, dims, dev, out):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    heads, qk = dims["num_attention_heads"], dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]
    n, vdim = args.prefill, dims["v_head_dim"]
    q = torch.randn(1, heads, n, qk, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, heads, n, qk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, heads, n, vdim, device=dev, dtype=torch.bfloat16)
    best = None
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                               args.reps, dev)
        except (RuntimeError, *OOM) as e:
            print(f"[mla_prefill] {backend.name}: not run ({str(e).splitlines()[0][:100]})")
            free()
            continue
        print(f"[mla_prefill] {backend.name}: {ms:.3f} ms")
        if best is None or ms < best[0]:
            best = (ms, backend.name.lower())
    rec = dict(config="mla_prefill", phase="prefill", batch=1, ctx=0, tokens=n)
    if best:
        rec.update(ms=round(best[0], 3), backend=best[1])
    else:
        rec["error"] = "no backend"
    out.append(rec)
    del q, k, v
    free()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="moe_layer,slice5")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--prefill", type=int, default=None, help="prefill tokens (4096; 128 with --tiny)")
    ap.add_argument("--kv-budget-gb", type=float, default=60.0)
    ap.add_argument("--experts", default="default", help="default | grouped_mm | batched_mm | eager")
    ap.add_argument("--tiny", action="store_true", help="small widths, context 64; CPU when no GPU")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.ctxs = [64] if args.tiny else [4096, 1024, 256]
    args.prefill = args.prefill or (128 if args.tiny else 4096)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.tiny:
        raise SystemExit("no GPU: full widths need one (use --tiny for a CPU smoke test)")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {name}, bf16, sdpa")
    out = []
    with torch.inference_mode():
        for cname in args.configs.split(","):
            try:
                if cname == "mla_prefill":
                    run_attention(args, TINY if args.tiny else FULL, dev, out)
                    continue
                run_config(cname, args, TINY if args.tiny else FULL, dev, out)
            except OOM:
                out.append(dict(config=cname, error="oom"))
                free()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{'config':<10} {'phase':<8} {'batch':>5} {'ctx':>5} {'ms':>10} {'tok/s':>10}")
    for r in out:
        ms = r.get("ms")
        tok_s = f"{r['batch'] * r.get('tokens', 1) * 1e3 / ms:.1f}" if ms else r.get("error", "")
        print(f"{r['config']:<10} {r.get('phase', '-'):<8} {r.get('batch', '-'):>5} {r.get('ctx', '-'):>5} "
              f"{ms if ms else '-':>10} {tok_s:>10}")


if __name__ == "__main__":
    main()
