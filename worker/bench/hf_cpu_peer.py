"""The peer for `dsv3-worker bench` on CPU: Hugging Face transformers' DeepseekV3ForCausalLM
(fp32, KV cache on) on the same shapes, same thread count, same prompt length and batch sizes.

    python worker/bench/hf_cpu_peer.py --threads 2 [--model tests/golden/tiny-bf16]

Prints a markdown table; BENCHMARKS.md keeps it next to dsv3's figures from the same session."""

import argparse
import json
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

SMALL = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    first_k_dense_replace=1, moe_layer_freq=1, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384,
    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_group=8,
    topk_group=4, num_experts_per_tok=6, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)


def measure(model, vocab, batch, prompt_len, steps):
    ids = torch.randint(2, vocab - 24, (batch, prompt_len))
    with torch.no_grad():
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    times.sort()
    step = times[len(times) // 2]
    return batch * prompt_len / prefill, batch / step, step * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="tests/golden/tiny-bf16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiny = DeepseekV3ForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    small = DeepseekV3ForCausalLM(DeepseekV3Config(**SMALL)).float().eval()
    print(f"transformers on CPU, {args.threads} threads, fp32 compute, KV cache on\n")
    print("| model | batch | prefill tok/s | decode tok/s | decode step ms |")
    print("|---|---:|---:|---:|---:|")
    for name, model, vocab in [("tiny (bf16 weights)", tiny, 1024), ("small (same shapes)", small, 32000)]:
        for batch in (1, 16):
            p, d, ms = measure(model, vocab, batch, args.prompt_len, args.decode_steps)
            print(f"| {name} | {batch} | {p:.1f} | {d:.1f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
