#!/usr/bin/env python3
"""llama.cpp loads the GGUF files `backflow export --format gguf` writes, and computes with them
what backflow computes:

1. next-token logits on the reference prompts (tests/reference/smollm2_logits.json, the
   independent numpy reference over the original Q4_1 file) within the rounding of the export's
   weight type, and the same argmax;
2. the same greedy text as `backflow generate` on the same exported file, from text (so
   llama.cpp tokenizes with the tokenizer metadata the export wrote);
3. for an exported adapter (`--adapter-gguf`), only (2): its logits are not the reference's.

    tests/reference/gguf_export_check.sh        # exports, then runs this
    PY gguf_export_check.py BACKFLOW_BIN REF_GGUF_F16 REF_GGUF_Q8_0 [ADAPTER_GGUF]
"""

import os
import subprocess
import sys

from llamacpp_convert_check import open_llama, worst_reference_diff

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give three tips for staying healthy.",
]
# Max |logit difference| against the f64 reference of the Q4_1 weights (logits span ~30). f16
# rounds each weight by up to 2^-11 of itself; q8_0 by up to 1/254 of its block's largest, and
# llama.cpp quantizes the activations to 8 bits for it as well (on the original Q4_1 file itself
# llama.cpp is 0.66 off the reference for that reason). Measured on 2026-11-30: f16 0.023,
# q8_0 0.67.
TOLERANCE = {"f16": 0.1, "q8_0": 1.0}


def check_logits(llm, kind):
    worst = worst_reference_diff(llm, f"llama.cpp on the {kind} export")
    if worst > TOLERANCE[kind]:
        sys.exit(f"{kind}: logits off by {worst:.3f} (tolerance {TOLERANCE[kind]})")


def check_greedy(llm, bf, path, name, dtype):
    """backflow computes as llama.cpp does for the file's type: f16 weights in f32 arithmetic
    (`--dtype f32`), q8_0 weights in 8-bit products with the activations quantized to 8-bit blocks
    (`--dtype native`). Across the two, near-ties flip: "What is the capital of France?" starts
    "The capital" in f32 and "L'Étoile" with 8-bit activations, in both programs."""
    for prompt in PROMPTS:
        want = subprocess.run(
            [bf, "generate", "--model", path, "--prompt", prompt, "--max-tokens", "48",
             "--dtype", dtype], check=True, capture_output=True, text=True).stdout
        llm.reset()
        got = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0.0,
            top_k=1)["choices"][0]["message"]["content"]
        same = got.strip() == want.strip()
        print(f"  greedy {prompt[:40]!r:<44} same text: {same}")
        if not same:
            sys.exit(f"{name}: greedy text differs\n  llama.cpp: {got!r}\n  backflow:  {want!r}")


def main():
    bf, f16, q8 = sys.argv[1:4]
    for kind, path, dtype in [("f16", f16, "f32"), ("q8_0", q8, "native")]:
        print(f"== llama.cpp on backflow's {kind} export ({os.path.getsize(path) / 1e6:.0f} MB)")
        llm = open_llama(path)
        check_logits(llm, kind)
        check_greedy(llm, bf, path, kind, dtype)
    if len(sys.argv) > 4:
        print("== llama.cpp on backflow's export of a trained adapter (merged, f16)")
        check_greedy(open_llama(sys.argv[4]), bf, sys.argv[4], "adapter", "f32")
    print("OK")


if __name__ == "__main__":
    main()
