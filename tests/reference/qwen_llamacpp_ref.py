#!/usr/bin/env python3
"""llama.cpp's next-token logits and greedy continuations on the real Qwen2.5 GGUFs (the Q4_K_M
mixes: Q5_0, Q4_K, Q6_K, Q8_0, F32), the reference `tests/model.rs` checks backflow against
(`qwen_models_match_llamacpp`, skipped when the models are not fetched).

llama.cpp (llama-cpp-python 0.3.36, built from source) tokenizes each prompt in the model's own
chat template; its ids, the top-20 next-token logits and 16 greedy tokens are written, per model
file, to tests/reference/qwen_llamacpp.json. f32 KV cache, so that the difference left is
llama.cpp's quantized dot products (activations rounded to 8 bits per block) against backflow's
f32 arithmetic on the dequantized weights.

    scripts/fetch-assets.sh qwen05 qwen15 llamacpp
    ~/.cache/backflow/venv-llama/bin/python tests/reference/qwen_llamacpp_ref.py
"""

import json
import os
import sys

import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("BACKFLOW_CACHE", os.path.expanduser("~/.cache/backflow"))
MODELS = ["qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"]
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QUESTIONS = {
    "france": "What is the capital of France?",
    "code": "Write a Python function that returns the square of a number.",
    "judge": "Which is better, answer A: 'Paris' or answer B: 'Lyon', to the question "
    "'What is the capital of France?' Reply [[A]] or [[B]].",
}
GREEDY = 16


def chatml(question):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def main():
    out = {}
    for name in MODELS:
        path = os.path.join(CACHE, "model", name)
        if not os.path.exists(path):
            print(f"skipped {name}: not fetched", file=sys.stderr)
            continue
        llm = Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, n_threads=2,
                    type_k=0, type_v=0, verbose=False)
        prompts = []
        for key, q in QUESTIONS.items():
            ids = llm.tokenize(chatml(q).encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
            top = np.argsort(-logits)[:20]
            greedy = []
            for _ in range(GREEDY):
                nxt = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1])))
                greedy.append(nxt)
                if nxt in (llm.token_eos(), 151645):
                    break
                llm.eval([nxt])
            text = llm.detokenize(greedy).decode("utf-8", "replace")
            print(f"{name} {key}: {len(ids)} tokens, argmax {int(top[0])}, greedy {text!r}",
                  file=sys.stderr)
            prompts.append({
                "name": key,
                "ids": [int(i) for i in ids],
                "top20_ids": [int(i) for i in top],
                "top20_values": [float(logits[i]) for i in top],
                "greedy_ids": greedy,
                "greedy_text": text,
            })
        out[name] = {"prompts": prompts}
    with open(os.path.join(HERE, "qwen_llamacpp.json"), "w") as f:
        json.dump({"note": "llama.cpp via llama-cpp-python 0.3.36, f32 KV cache; see this script",
                   "models": out}, f, indent=1)


if __name__ == "__main__":
    main()
