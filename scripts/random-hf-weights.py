#!/usr/bin/env python3
"""Random weights for a Hugging Face LLaMA folder: the model without its checkpoint.

    python3 scripts/random-hf-weights.py SRC DST [--seed N] [--dtype f32|bf16]

SRC holds `config.json` and the tokenizer files (`backflow export --model FILE.gguf --out SRC`
writes them; only those small files are read). DST gets copies of them and a `model.safetensors`
of random weights of that shape (uniform with standard deviation 0.02, norms at 1), in the
tensor names `backflow` and transformers read. For the GPU checks (`scripts/gpu-check.sh`): a
real checkpoint is too big to travel to the GPU machine, its config and tokenizer are not, and
throughput does not depend on the values. Needs numpy (written here, so safetensors need not
be installed).
"""

import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np


def shapes(cfg):
    """(name, shape, is_norm) for every tensor of a LLaMA/Qwen2 config.json."""
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    d = cfg.get("head_dim", h // heads)
    ffn = cfg["intermediate_size"]
    vocab = cfg["vocab_size"]
    bias = cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2"
    out = [("model.embed_tokens.weight", (vocab, h), False), ("model.norm.weight", (h,), True)]
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, h), False))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), True),
            (p + "post_attention_layernorm.weight", (h,), True),
            (p + "self_attn.q_proj.weight", (heads * d, h), False),
            (p + "self_attn.k_proj.weight", (kv * d, h), False),
            (p + "self_attn.v_proj.weight", (kv * d, h), False),
            (p + "self_attn.o_proj.weight", (h, heads * d), False),
            (p + "mlp.gate_proj.weight", (ffn, h), False),
            (p + "mlp.up_proj.weight", (ffn, h), False),
            (p + "mlp.down_proj.weight", (h, ffn), False),
        ]
        if bias:
            out += [
                (p + "self_attn.q_proj.bias", (heads * d,), False),
                (p + "self_attn.k_proj.bias", (kv * d,), False),
                (p + "self_attn.v_proj.bias", (kv * d,), False),
            ]
    return out


def to_bf16(a):
    """f32 -> bf16 bits, rounded to nearest even."""
    bits = a.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()

    cfg = json.loads((args.src / "config.json").read_text())
    args.dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (args.src / name).exists():
            shutil.copy(args.src / name, args.dst / name)

    rng = np.random.default_rng(args.seed)
    a = 0.02 * np.sqrt(3.0)
    header, blobs, offset = {}, [], 0
    width = 4 if args.dtype == "f32" else 2
    for name, shape, norm in shapes(cfg):
        n = int(np.prod(shape))
        x = np.ones(n, np.float32) if norm else rng.uniform(-a, a, n).astype(np.float32)
        blob = (x if args.dtype == "f32" else to_bf16(x)).tobytes()
        assert len(blob) == n * width
        header[name] = {
            "dtype": "F32" if args.dtype == "f32" else "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    meta = json.dumps(header, separators=(",", ":")).encode()
    meta += b" " * (-len(meta) % 8)  # the data starts 8-byte aligned
    with open(args.dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(meta)))
        f.write(meta)
        for blob in blobs:
            f.write(blob)
    print(f"wrote {args.dst} ({len(header)} tensors, {offset / 1e6:.1f} MB {args.dtype}, random)")


if __name__ == "__main__":
    main()
