#!/usr/bin/env python3
"""Independent float64 NumPy re-implementation of the DeepSeek-V3 forward pass (spec sections 3-7), reading only the
fixture files in this directory (safetensors parsed by hand, FP8 decoded with a 256-entry table per spec 8.4, MLA in
the weight-absorbed form, interleaved-pair RoPE with YaRN computed from config.json). Checks every tensor of
tiny-{bf16,fp8}.ref.safetensors against it. No torch / transformers. Run by make_fixtures.py; also standalone:
    python tests/golden/check_independent.py
"""
import json, struct, math, sys, os
import numpy as np
G = os.path.dirname(os.path.abspath(__file__))

def read_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n)); data = f.read()
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__": continue
        a, b = v["data_offsets"]; raw = data[a:b]; shp = v["shape"]; dt = v["dtype"]
        if dt == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32).reshape(shp)
        elif dt == "F32": arr = np.frombuffer(raw, dtype="<f4").reshape(shp)
        elif dt == "I64": arr = np.frombuffer(raw, dtype="<i8").reshape(shp)
        elif dt == "F8_E4M3": arr = ("F8", np.frombuffer(raw, dtype=np.uint8).reshape(shp))
        else: raise ValueError(dt)
        out[k] = (dt, arr)
    return out

def lut():
    t = np.zeros(256)
    for b in range(256):
        s = -1.0 if b & 0x80 else 1.0; e = (b >> 3) & 15; m = b & 7
        if e == 0: v = 2.0 ** -6 * m / 8
        elif e == 15 and m == 7: v = float("nan")
        else: v = 2.0 ** (e - 7) * (1 + m / 8)
        t[b] = s * v
    return t
LUT = lut()

def load_ckpt(d):
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    raw = {}
    for f in files: raw.update(read_st(os.path.join(d, f)))
    W = {}; dts = {}
    for k, (dt, a) in raw.items():
        dts[k] = dt
        if k.endswith("_scale_inv"): continue
        if dt == "F8_E4M3":
            q = LUT[a[1]]; s = raw[k + "_scale_inv"][1].astype(np.float64)
            r = np.arange(q.shape[0]) // 128; c = np.arange(q.shape[1]) // 128
            W[k] = q * s[r][:, c]
        else: W[k] = a.astype(np.float64)
    return W, dts

cfg = json.load(open(os.path.join(G, "tiny-bf16", "config.json")))
Hd = cfg["hidden_size"]; nh = cfg["num_attention_heads"]; dn = cfg["qk_nope_head_dim"]; dr = cfg["qk_rope_head_dim"]
dv = cfg["v_head_dim"]; kvr = cfg["kv_lora_rank"]; E = cfg["n_routed_experts"]; G_ = cfg["n_group"]; TG = cfg["topk_group"]
K = cfg["num_experts_per_tok"]; rs = cfg["rope_scaling"]; theta = cfg["rope_theta"]; eps = cfg["rms_norm_eps"]

def inv_freq():
    dim = dr; base = theta; f = rs["factor"]; L0 = rs["original_max_position_embeddings"]
    fj = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    cd = lambda r: dim * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))
    low = max(math.floor(cd(rs["beta_fast"])), 0); high = min(math.ceil(cd(rs["beta_slow"])), dim - 1)
    if low == high: high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    return fj / f * ramp + fj * (1 - ramp)
IF = inv_freq()
ms = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1
SCALE = (dn + dr) ** -0.5 * ms * ms

def rms(x, w): return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
def rope(x, pos):  # x [..., T, dr] interleaved pairs
    ang = pos[:, None] * IF[None]; c, s = np.cos(ang), np.sin(ang)
    y = x.copy(); a, b = x[..., 0::2], x[..., 1::2]
    y[..., 0::2] = a * c - b * s; y[..., 1::2] = a * s + b * c; return y
def silu(x): return x / (1 + np.exp(-x))
def swiglu(x, p, W): return (silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T

def attn(x, p, W, pos):
    T = x.shape[0]
    q = rms(x @ W[p + "q_a_proj.weight"].T, W[p + "q_a_layernorm.weight"]) @ W[p + "q_b_proj.weight"].T
    q = q.reshape(T, nh, dn + dr).transpose(1, 0, 2)
    qn, qp = q[..., :dn], rope(q[..., dn:], pos)
    kv = x @ W[p + "kv_a_proj_with_mqa.weight"].T
    ckv = rms(kv[:, :kvr], W[p + "kv_a_layernorm.weight"]); kp = rope(kv[:, kvr:], pos)
    # absorbed form
    wkvb = W[p + "kv_b_proj.weight"].reshape(nh, dn + dv, kvr)
    wuk, wuv = wkvb[:, :dn], wkvb[:, dn:]
    qlat = np.einsum("htd,hdc->htc", qn, wuk)
    sc = (np.einsum("htc,sc->hts", qlat, ckv) + np.einsum("htd,sd->hts", qp, kp)) * SCALE
    sc = np.where(np.tril(np.ones((T, T), bool))[None], sc, -np.inf)
    P = np.exp(sc - sc.max(-1, keepdims=True)); P /= P.sum(-1, keepdims=True)
    olat = np.einsum("hts,sc->htc", P, ckv); o = np.einsum("htc,hvc->thv", olat, wuv).reshape(T, nh * dv)
    return o @ W[p + "o_proj.weight"].T

def moe(x, p, W):
    u = x @ W[p + "gate.weight"].T; s = 1 / (1 + np.exp(-u)); b = s + W[p + "gate.e_score_correction_bias"]
    gs = np.sort(b.reshape(-1, G_, E // G_), -1)[..., -2:].sum(-1)
    keep = np.zeros_like(gs, bool)
    for t in range(len(x)): keep[t, np.argsort(-gs[t], kind="stable")[:TG]] = True
    b = np.where(np.repeat(keep, E // G_, 1), b, -np.inf)
    idx = np.sort(np.argsort(-b, -1, kind="stable")[:, :K], -1)
    y = swiglu(x, p + "shared_experts.", W)
    for t in range(len(x)):
        wts = s[t, idx[t]]; wts = wts / wts.sum() * cfg["routed_scaling_factor"]
        for j, wj in zip(idx[t], wts): y[t] += wj * swiglu(x[t:t+1], p + f"experts.{j}.", W)[0]
    return y, u, idx

def block(h, i, W, pos, rec):
    p = f"model.layers.{i}."
    h = h + attn(rms(h, W[p + "input_layernorm.weight"]), p + "self_attn.", W, pos)
    x = rms(h, W[p + "post_attention_layernorm.weight"])
    if i < cfg["first_k_dense_replace"]: return h + swiglu(x, p + "mlp.", W)
    y, u, idx = moe(x, p + "mlp.", W); rec[i] = (u, idx); return h + y

def forward(ids, W):
    h = W["model.embed_tokens.weight"][ids]; pos = np.arange(len(ids), dtype=np.float64); rec = {}; hs = [h]
    for i in range(cfg["num_hidden_layers"]):
        h = block(h, i, W, pos, rec); hs.append(h)
    hn = rms(h, W["model.norm.weight"]); hs[-1] = hn
    return hn @ W["lm_head.weight"].T, np.stack(hs), rec

def mtp(hn, nxt, W):
    p = f"model.layers.{cfg['num_hidden_layers']}."
    e = W[p + "embed_tokens.weight"][nxt]; T = len(nxt)
    x = np.concatenate([rms(e, W[p + "enorm.weight"]), rms(hn[:T], W[p + "hnorm.weight"])], -1) @ W[p + "eh_proj.weight"].T
    y = block(x, cfg["num_hidden_layers"], W, np.arange(T, dtype=np.float64), {})
    return rms(y, W[p + "shared_head.norm.weight"]) @ W[p + "shared_head.head.weight"].T

TOL = 1e-4


def run(log=print):
    worst = 0.0
    for tag in ("tiny-bf16", "tiny-fp8"):
        W, dts = load_ckpt(os.path.join(G, tag))
        R = {k: v[1] for k, v in read_st(os.path.join(G, f"{tag}.ref.safetensors")).items()}
        ids = R["prompt_ids"]
        lg, hs, rec = forward(ids, W)
        d = {"logits": np.abs(lg - R["logits"]).max(), "hidden_states": np.abs(hs - R["hidden_states"]).max()}
        topk_ok = True
        for i in (2, 3):
            d[f"router_logits.{i}"] = np.abs(rec[i][0] - R[f"router_logits.{i}"]).max()
            topk_ok &= bool(np.array_equal(rec[i][1], R[f"topk_ids.{i}"]))
        ml = mtp(R["hidden_states"][-1].astype(np.float64), ids[1:], W)
        d["mtp_logits"] = np.abs(ml - R["mtp_logits"]).max()
        d["cached_logits"] = np.abs(lg - R["cached_logits"]).max()
        seq = list(ids); g = []; mg = []
        for _ in range(len(R["greedy_ids"])):
            l = forward(np.array(seq), W)[0][-1]; o = np.argsort(-l, kind="stable")
            g.append(int(o[0])); mg.append(l[o[0]] - l[o[1]]); seq.append(int(o[0]))
        d["greedy_margins"] = np.abs(np.array(mg) - R["greedy_margins"]).max()
        greedy_ok = g == R["greedy_ids"].tolist()
        log(f"[independent f64 numpy, {tag}: {len(dts)} tensors {sorted(set(dts.values()))}] max |d| vs refs: "
            + ", ".join(f"{k} {v:.2g}" for k, v in d.items()) + f"; topk_ids equal {topk_ok}; greedy_ids equal {greedy_ok}")
        worst = max(worst, max(d.values()))
        assert topk_ok and greedy_ok and worst < TOL, (tag, d, topk_ok, greedy_ok)
    return worst


if __name__ == "__main__":
    run()
