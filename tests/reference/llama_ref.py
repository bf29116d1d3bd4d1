#!/usr/bin/env python3
"""Independent numpy reference for the burn LLaMA (tests/model.rs checks against its output).

Written without looking at the Rust code's choices: tensors are dequantized by the `gguf`
package, and RoPE is applied the llama.cpp way, rotating ADJACENT pairs (2i, 2i+1) on the
q/k weights as stored in the GGUF (the Rust side un-permutes q/k to Hugging Face order and
rotates halves instead; both must give the same logits). Computed in float64.

Writes tests/reference/smollm2_logits.json: for each prompt (token ids) the next-token logits'
top-20 (ids, values), argmax, sum, sum of squares and a strided sample of 50 values.
Also writes tests/reference/quant_blocks.json: raw blocks of every quant type the loader
supports and gguf's numpy dequantization of them (real blocks from the model where it has that
type, seeded random blocks with sane scales otherwise), and tests/reference/smollm2_nll.json:
the mean NLL per target token of one chat (its ids and target mask included), the independent
check of `backflow eval`'s reference NLL. `--blocks-only` / `--nll-only` write only that file.

Setup: python3 -m venv ~/.cache/backflow/venv-ref && ~/.cache/backflow/venv-ref/bin/pip install gguf numpy
Run:   ~/.cache/backflow/venv-ref/bin/python tests/reference/llama_ref.py [MODEL.gguf]
"""

import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.expanduser("~/.cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf")

# Token id prompts. <|im_start|>=1, <|im_end|>=2; the rest are ordinary vocabulary ids
# (ids of the chat template for "What is the capital of France?" as the tokenizer encodes it,
# see the PROMPTS note in tests/model.rs) and two arbitrary sequences.
PROMPTS = {
    "chatml_france": None,  # filled from the vocabulary below
    "short": [504, 3458, 282, 4649, 314],
    "single": [28],
    "long_mixed": [1, 4093, 198, 12345, 42, 42, 7, 900, 31000, 5, 17, 2, 198, 1, 520, 9531, 198]
    + list(range(1000, 1040)),
}


def field(r, key):
    f = r.fields[key]
    return f.contents()


def load(path):
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    assert arch == "llama", arch
    cfg = {
        "n_layers": int(field(r, "llama.block_count")),
        "hidden": int(field(r, "llama.embedding_length")),
        "n_heads": int(field(r, "llama.attention.head_count")),
        "n_kv": int(field(r, "llama.attention.head_count_kv")),
        "theta": float(field(r, "llama.rope.freq_base")),
        "eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
    }
    w = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        # numpy shape is (ne1, ne0) = (out, in) for matrices
        w[t.name] = np.asarray(a, dtype=np.float64).reshape([int(d) for d in reversed(t.shape)])
    tokens = field(r, "tokenizer.ggml.tokens")
    return r, cfg, w, tokens


def rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope_adjacent(x, theta):
    """x: (seq, heads, d). Rotate pairs (2i, 2i+1) by pos * theta^(-2i/d)."""
    seq, _, d = x.shape
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    ang = np.arange(seq, dtype=np.float64)[:, None] * inv[None, :]  # (seq, d/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * c - xo * s
    out[..., 1::2] = xe * s + xo * c
    return out


def forward(cfg, w, ids, all_positions=False):
    H, nh, nkv = cfg["hidden"], cfg["n_heads"], cfg["n_kv"]
    d = H // nh
    x = w["token_embd.weight"][ids]  # (seq, H)
    seq = len(ids)
    causal = np.triu(np.full((seq, seq), -np.inf), k=1)
    for l in range(cfg["n_layers"]):
        p = f"blk.{l}."
        h = rms(x, w[p + "attn_norm.weight"], cfg["eps"])
        q = (h @ w[p + "attn_q.weight"].T).reshape(seq, nh, d)
        k = (h @ w[p + "attn_k.weight"].T).reshape(seq, nkv, d)
        v = (h @ w[p + "attn_v.weight"].T).reshape(seq, nkv, d)
        q, k = rope_adjacent(q, cfg["theta"]), rope_adjacent(k, cfg["theta"])
        out = np.empty((seq, nh, d))
        for hh in range(nh):
            kv = hh // (nh // nkv)
            sc = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(d) + causal
            sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
            sc /= sc.sum(axis=-1, keepdims=True)
            out[:, hh, :] = sc @ v[:, kv, :]
        x = x + out.reshape(seq, H) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"], cfg["eps"])
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    if all_positions:
        return rms(x, w["output_norm.weight"], cfg["eps"]) @ head.T  # (seq, vocab)
    x = rms(x[-1], w["output_norm.weight"], cfg["eps"])
    return head @ x


def chatml_ids(tokens, turns):
    """ChatML ids of (role, text) turns, each closed by <|im_end|>\n; returns the ids and, per
    id, whether it is a target (the assistant's text and its <|im_end|>, as training masks)."""
    ids, target = [], []
    for role, text in turns:
        head = [1] + greedy_ids(tokens, role + "\n")
        body = greedy_ids(tokens, text) + [2]
        ids += head + body + greedy_ids(tokens, "\n")
        target += [False] * len(head) + [role == "assistant"] * len(body) + [False]
    return ids, target


def reference_nll(cfg, w, tokens):
    """The mean NLL per target token of one conversation (tests/reference/smollm2_nll.json)."""
    turns = [
        ("system", "Answer in the style of an AI Assistant."),
        ("user", "Name three primary colours."),
        ("assistant", "Red, yellow and blue are the three primary colours of paint."),
    ]
    ids, target = chatml_ids(tokens, turns)
    logits = forward(cfg, w, ids, all_positions=True)
    nll = []
    for t in range(1, len(ids)):
        if target[t]:
            row = logits[t - 1]
            m = row.max()
            lse = m + np.log(np.exp(row - m).sum())
            nll.append(lse - row[ids[t]])
    return {
        "note": "numpy float64 forward over the whole sequence; token t is predicted at t - 1",
        "ids": ids,
        "target": target,
        "tokens": len(nll),
        "nll": float(np.mean(nll)),
    }


def greedy_ids(tokens, text):
    """Longest-match tokenization over the byte-level vocabulary (a valid id sequence; the
    Rust test only needs ids, not the canonical BPE split)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    s = text.replace(" ", "\u0120").replace("\n", "\u010a")
    out, i = [], 0
    while i < len(s):
        for j in range(min(len(s), i + 16), i, -1):
            if s[i:j] in vocab:
                out.append(vocab[s[i:j]])
                i = j
                break
        else:
            raise ValueError(f"cannot tokenize at {s[i:]!r}")
    return out


def quant_blocks(reader):
    rng = np.random.default_rng(1234)
    out = {}
    by_type = {}
    for t in reader.tensors:
        by_type.setdefault(t.tensor_type, t)
    types = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    for qt in types:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
        n_blocks = 4 if block_size == 256 else 16
        if qt in by_type:
            t = by_type[qt]
            raw = np.asarray(t.data).view(np.uint8).reshape(-1)[: n_blocks * type_size].copy()
            source = "model:" + t.name
        else:
            raw = rng.integers(0, 256, size=n_blocks * type_size, dtype=np.uint8)
            blocks = raw.reshape(n_blocks, type_size)
            f16 = lambda v: np.array(v, dtype=np.float16).view(np.uint8)
            half = lambda lo, hi: np.array(rng.uniform(lo, hi, n_blocks), dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
            if qt in (Q.Q4_0, Q.Q8_0, Q.Q5_0):
                blocks[:, 0:2] = f16(rng.uniform(-0.05, 0.05, n_blocks))[:, None].view(np.uint8).reshape(n_blocks, 2)
            elif qt == Q.Q5_1:
                blocks[:, 0:2] = half(0.001, 0.05)
                blocks[:, 2:4] = half(-0.5, 0.5)
            elif qt == Q.Q2_K:
                blocks[:, 80:82] = half(0.001, 0.02)
                blocks[:, 82:84] = half(0.001, 0.02)
            elif qt == Q.Q3_K:
                blocks[:, 108:110] = half(-0.01, 0.01)
            elif qt == Q.Q5_K:
                blocks[:, 0:2] = half(0.001, 0.02)
                blocks[:, 2:4] = half(0.001, 0.02)
            elif qt == Q.Q4_K:
                blocks[:, 0:2] = np.array(rng.uniform(0.001, 0.02, n_blocks), dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
                blocks[:, 2:4] = np.array(rng.uniform(0.001, 0.02, n_blocks), dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
            elif qt == Q.Q6_K:
                blocks[:, 208:210] = np.array(rng.uniform(-0.01, 0.01, n_blocks), dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
            elif qt == Q.F16:
                blocks[:] = np.array(rng.normal(0, 2, n_blocks), dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
            elif qt == Q.BF16:
                v = np.array(rng.normal(0, 2, n_blocks), dtype=np.float32).view(np.uint32) >> 16
                blocks[:] = v.astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
            raw = blocks.reshape(-1)
            source = "random"
        if block_size == 1:
            n_elems = n_blocks
            vals = gguf.quants.dequantize(raw.reshape(1, -1), qt).reshape(-1)
        else:
            n_elems = n_blocks * block_size
            vals = gguf.quants.dequantize(raw.reshape(1, -1), qt).reshape(-1)
        assert vals.size == n_elems, (qt, vals.size, n_elems)
        out[qt.name] = {
            "source": source,
            "n": int(n_elems),
            "hex": raw.tobytes().hex(),
            "values": [float(v) for v in np.asarray(vals, dtype=np.float32)],
        }
    return out


def main():
    args = [a for a in sys.argv[1:] if a not in ("--blocks-only", "--nll-only")]
    path = args[0] if args else MODEL
    reader, cfg, w, tokens = load(path)
    if "--nll-only" in sys.argv:
        with open(os.path.join(HERE, "smollm2_nll.json"), "w") as f:
            json.dump(reference_nll(cfg, w, tokens), f)
        return
    if "--blocks-only" in sys.argv:
        # Only tests/reference/quant_blocks.json (the forward pass takes minutes).
        with open(os.path.join(HERE, "quant_blocks.json"), "w") as f:
            json.dump(quant_blocks(reader), f)
        return
    france = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = []
    for i, part in enumerate(france.split("<|im_start|>")):
        if i > 0:
            ids.append(1)
        for j, sub in enumerate(part.split("<|im_end|>")):
            if j > 0:
                ids.append(2)
            if sub:
                ids.extend(greedy_ids(tokens, sub))
    PROMPTS["chatml_france"] = ids
    results = []
    for name, ids in PROMPTS.items():
        logits = forward(cfg, w, ids)
        top = np.argsort(-logits)[:20]
        results.append(
            {
                "name": name,
                "ids": [int(i) for i in ids],
                "top20_ids": [int(i) for i in top],
                "top20_values": [float(logits[i]) for i in top],
                "argmax": int(np.argmax(logits)),
                "sum": float(logits.sum()),
                "sum_sq": float((logits * logits).sum()),
                "sample_stride": 997,
                "sample": [float(v) for v in logits[::997]],
            }
        )
        print(name, len(ids), "argmax", int(np.argmax(logits)), repr(tokens[int(np.argmax(logits))]), file=sys.stderr)
    doc = {
        "model": os.path.basename(path),
        "note": "numpy float64 forward, adjacent-pair RoPE on GGUF q/k order; see llama_ref.py",
        "prompts": results,
    }
    with open(os.path.join(HERE, "smollm2_logits.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(HERE, "quant_blocks.json"), "w") as f:
        json.dump(quant_blocks(reader), f)
    with open(os.path.join(HERE, "smollm2_nll.json"), "w") as f:
        json.dump(reference_nll(cfg, w, tokens), f)


if __name__ == "__main__":
    main()
