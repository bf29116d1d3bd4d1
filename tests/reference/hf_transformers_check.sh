#!/usr/bin/env bash
# Second implementations load what backflow writes (issue 4):
#  1. transformers loads the HF folder `backflow export` writes from the GGUF, and the folder
#     `backflow train --full` writes (learning rate 0: the GGUF's weights), and gives the numpy
#     reference's logits and the reference tokenizer's ids (hf_transformers_check.py);
#  2. PEFT applies the adapter `backflow train` writes onto the exported base and gives the
#     logits of backflow's merge of it (hf_peft_check.py).
# Needs CPU torch, transformers and peft from PyPI in $PY's environment, e.g.
#   python3 -m venv ~/.cache/backflow/venv-torch
#   ~/.cache/backflow/venv-torch/bin/pip install torch==2.5.1 transformers==4.46.3 peft==0.13.2
# (PyPI's Linux torch wheel pulls its CUDA libraries too, ~3 GB; it runs on CPU here.)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-$HOME/.cache/backflow/venv-torch/bin/python}"
cache="$(scripts/fetch-assets.sh model seed)"
gguf="$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf"
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
cargo build --release --bin backflow
bf=target/release/backflow
"$bf" export --model "$gguf" --out "$out/base"
echo "== transformers on backflow export of the GGUF"
"$PY" tests/reference/hf_transformers_check.py "$out/base"
"$bf" train --model "$gguf" --data "$cache/seed/seed_tasks.jsonl" --out "$out/full" --full \
  --steps 1 --lr 0 --lr-end 0 --batch-size 1 --max-len 64 --quiet
echo "== transformers on backflow train --full (learning rate 0)"
"$PY" tests/reference/hf_transformers_check.py "$out/full"
# A LoRA adapter that moves the model: a high learning rate, a few steps.
"$bf" train --model "$gguf" --data "$cache/seed/seed_tasks.jsonl" --out "$out/lora" \
  --lora-rank 8 --steps 3 --lr 1e-2 --batch-size 2 --max-len 64 --quiet
"$bf" export --model "$out/lora" --out "$out/merged"
echo "== PEFT on the adapter of backflow train, against backflow's merge"
"$PY" tests/reference/hf_peft_check.py "$out/base" "$out/lora" "$out/merged"
