#!/usr/bin/env python3
"""Architecture variants of DeepSeek-V3 as transformers writes them, with transformers' logits.

Models that reuse DeepSeek-V3's modelling code change its sizes: other routed-expert counts and
groups (64 experts in one group and 6 active, as DeepSeek-V2-Lite-class models; 384 in one group
and 8 active, as Kimi-K2-class models), other head counts, no q LoRA, another number of leading
dense layers, plain RoPE. Each variant here is a tiny random model built by transformers'
`DeepseekV3ForCausalLM`, saved with `save_pretrained` in bf16 (the format fine-tunes ship), with
its float32 logits over a fixed prompt as the golden reference.

    python3 tests/golden/make_variants.py [--out tests/golden/variants]

Writes `<out>/<variant>/{config.json, model.safetensors}` and `<out>/<variant>.ref.safetensors`
(`prompt_ids` int64 [12], `logits` float32 [12, vocab]) and prints the versions used.
Deterministic for given torch/transformers versions (weights from a seeded generator, drawn in
sorted parameter-name order, rounded to bf16; the reference runs in float32 on those values).
"""

import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import CFG  # noqa: E402

SEED = 20261202
PROMPT = [683, 13, 615, 533, 2, 222, 561, 256, 453, 312, 692, 298]

# The golden tiny model's config (make_fixtures.CFG), as transformers' config takes it (no MTP
# layer, no `scoring_func`/`topk_method` keys), with one dense layer of three.
BASE = {k: v for k, v in CFG.items() if k not in ("num_nextn_predict_layers", "scoring_func", "topk_method")}
BASE.update(moe_intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1)

VARIANTS = {
    # 64 routed experts in one group, 6 active (DeepSeek-V2-Lite / Moonlight-class routing).
    "experts64-group1": dict(
        hidden_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        q_lora_rank=96,
        n_routed_experts=64,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=6,
    ),
    # 384 routed experts in one group, 8 active, 8 heads (Kimi-K2-class), narrower everything.
    "experts384-heads8": dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=384,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=8,
    ),
    # No q LoRA (q_proj straight from the hidden state), two leading dense layers, plain RoPE.
    "no-q-lora-plain-rope": dict(
        hidden_size=128,
        moe_intermediate_size=32,
        q_lora_rank=None,
        num_hidden_layers=3,
        first_k_dense_replace=2,
        rope_scaling=None,
    ),
}


def init_weights(model: torch.nn.Module):
    """Seeded, in sorted name order: embeddings N(0, 1), matrices N(0, 1/fan_in), norms
    1 + 0.1 N(0, 1), the routing bias 0.1 N(0, 1); then every value rounded to bf16."""
    g = torch.Generator().manual_seed(SEED)
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if "e_score_correction_bias" in n})
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if "e_score_correction_bias" in name:
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif p.dim() == 1:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            if "e_score_correction_bias" not in name:
                v = v.to(torch.bfloat16).to(torch.float32)
            p.copy_(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "variants"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    os.makedirs(args.out, exist_ok=True)
    for name, changes in VARIANTS.items():
        cfg = dict(BASE)
        cfg.update(changes)
        config = DeepseekV3Config(**cfg)
        config._attn_implementation = "eager"
        torch.manual_seed(SEED)
        model = DeepseekV3ForCausalLM(config).to(torch.float32).eval()
        init_weights(model)
        prompt = torch.tensor([PROMPT])
        with torch.no_grad():
            logits = model(prompt).logits[0].to(torch.float32).contiguous()
        out_dir = os.path.join(args.out, name)
        model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
        for extra in os.listdir(out_dir):
            if extra not in ("config.json", "model.safetensors"):
                os.remove(os.path.join(out_dir, extra))
        save_file(
            {"prompt_ids": prompt[0].to(torch.int64), "logits": logits},
            os.path.join(args.out, f"{name}.ref.safetensors"),
        )
        with open(os.path.join(out_dir, "config.json")) as f:
            written = json.load(f)
        from safetensors import safe_open

        with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
            keys = sorted(f.keys())
        print(
            f"{name}: {len(keys)} tensors (e.g. {[k for k in keys if 'experts' in k][:2]}), "
            f"config keys {sorted(written)[:6]}..., logits |max| {logits.abs().max():.3f}, "
            f"top-1 {logits.argmax(-1).tolist()}"
        )


if __name__ == "__main__":
    main()
