#!/usr/bin/env bash
# transformers (a second implementation) loads the HF folder `backflow train --full` writes and
# gives the numpy reference's logits and the reference tokenizer's ids: see hf_transformers_check.py.
# Needs CPU torch and transformers from PyPI in $PY's environment, e.g.
#   python3 -m venv ~/.cache/backflow/venv-torch
#   ~/.cache/backflow/venv-torch/bin/pip install torch==2.5.1 transformers==4.46.3
# (PyPI's Linux torch wheel pulls its CUDA libraries too, ~3 GB; it runs on CPU here.)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-$HOME/.cache/backflow/venv-torch/bin/python}"
cache="$(scripts/fetch-assets.sh model seed)"
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
cargo build --release --bin backflow
# Learning rate 0: the saved weights are the GGUF's, as backflow dequantizes and writes them.
target/release/backflow train --model "$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --data "$cache/seed/seed_tasks.jsonl" --out "$out/full" --full --steps 1 --lr 0 --lr-end 0 \
  --batch-size 1 --max-len 64 --quiet
ls "$out/full"
"$PY" tests/reference/hf_transformers_check.py "$out/full"
