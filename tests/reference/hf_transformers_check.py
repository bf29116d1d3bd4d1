#!/usr/bin/env python3
"""A second implementation loads what `backflow train` saves: Hugging Face transformers (CPU
torch, both from PyPI) opens a full-finetuning checkpoint folder written by backflow
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json) and must give the same
next-token logits as the independent numpy forward pass over the GGUF it came from
(tests/reference/smollm2_logits.json, see llama_ref.py), and the same token ids as the reference
tokenizer (tests/reference/smollm2_tokens.json).

The checkpoint is trained with learning rate 0, so its weights are the GGUF's, dequantized and
written by backflow: any difference is in backflow's writer (tensor names, the q/k layout,
config.json, the tied head, the tokenizer), which is what this checks.

    tests/reference/hf_transformers_check.sh      # trains the folder, then runs this
    PY hf_transformers_check.py CHECKPOINT_DIR
"""

import json
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ckpt = sys.argv[1]
    ref = json.load(open(os.path.join(HERE, "smollm2_logits.json")))
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    model.eval()
    worst = 0.0
    for p in ref["prompts"]:
        ids = torch.tensor([p["ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1].double().numpy()
        diff = float(np.max(np.abs(logits[p["top20_ids"]] - np.array(p["top20_values"]))))
        sample = logits[:: p["sample_stride"]][: len(p["sample"])]
        diff = max(diff, float(np.max(np.abs(sample - np.array(p["sample"])))))
        argmax_ok = int(np.argmax(logits)) == p["argmax"]
        worst = max(worst, diff)
        print(f"{p['name']:<28} max |diff| (top-20 and sampled logits): {diff:.2e}  argmax equal: {argmax_ok}")
        if not argmax_ok:
            sys.exit(f"argmax differs on {p['name']}")
    print(f"worst logit difference: {worst:.2e} ({model.config.model_type}, {sum(t.numel() for t in model.parameters())} parameters)")

    tok = AutoTokenizer.from_pretrained(ckpt)
    cases = json.load(open(os.path.join(HERE, "smollm2_tokens.json")))
    cases = cases["cases"] if isinstance(cases, dict) else cases
    # transformers recognizes special tokens in text (as `ids_parse_special` of the reference).
    same = sum(
        tok.encode(c["text"], add_special_tokens=False) == c["ids_parse_special"] for c in cases
    )
    print(f"tokenizer.json through transformers: {same}/{len(cases)} texts tokenized as the reference")
    if worst > 1e-3 or same != len(cases):
        sys.exit("MISMATCH")


if __name__ == "__main__":
    main()
