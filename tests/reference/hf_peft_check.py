#!/usr/bin/env python3
"""PEFT (a second implementation of LoRA) loads the adapter `backflow train` saves: the adapter
folder (adapter_config.json, adapter_model.safetensors with PEFT's tensor names) applied by
PeftModel onto the base, exported by `backflow export`, must give the same next-token logits as
transformers running backflow's own merge of that adapter (`backflow export --model ADAPTER`).
Any difference is in backflow's adapter writer (names, A/B orientation, alpha/r scaling, target
modules) or its merge. The adapter must also move the logits away from the base's, or the check
would prove nothing.

    tests/reference/hf_transformers_check.sh      # writes the folders, then runs this
    PY hf_peft_check.py BASE_HF_DIR ADAPTER_DIR MERGED_HF_DIR
"""

import json
import os
import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().numpy()


def main():
    base_dir, adapter_dir, merged_dir = sys.argv[1:4]
    prompts = json.load(open(os.path.join(HERE, "smollm2_logits.json")))["prompts"]
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    base = load(base_dir)
    base_logits = [last_logits(base, p["ids"]) for p in prompts]
    peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = load(merged_dir)
    worst, moved = 0.0, 0.0
    for p, plain in zip(prompts, base_logits):
        a, b = last_logits(peft, p["ids"]), last_logits(merged, p["ids"])
        diff = float(np.max(np.abs(a - b)))
        shift = float(np.max(np.abs(a - plain)))
        worst, moved = max(worst, diff), max(moved, shift)
        print(f"{p['name']:<28} PEFT vs backflow merge max |diff|: {diff:.2e}  "
              f"adapter shift from base: {shift:.2e}  argmax equal: {np.argmax(a) == np.argmax(b)}")
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    print(f"worst logit difference: {worst:.2e} (LoRA r={cfg['r']}, alpha={cfg['lora_alpha']}, "
          f"{len(cfg['target_modules'])} target modules); largest shift from the base: {moved:.2e}")
    if worst > 1e-3 or moved < 1e-2:
        sys.exit("MISMATCH" if worst > 1e-3 else "the adapter does not change the model")


if __name__ == "__main__":
    main()
