#!/usr/bin/env bash
# llama.cpp loads the GGUF files backflow writes (issue 16): `backflow export --format gguf` of the
# SmolLM2 Q4_1 file in f16 and q8_0, and of a LoRA adapter trained on it (merged), checked in
# llama.cpp (llama-cpp-python) against the numpy reference's logits and backflow's own greedy
# text (gguf_export_check.py). A script rather than a test: llama.cpp builds from source in
# several minutes (scripts/fetch-assets.sh llamacpp).
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMA_PY="${LLAMA_PY:-$HOME/.cache/backflow/venv-llama/bin/python}"
cache="$(scripts/fetch-assets.sh model seed llamacpp)"
gguf="$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf"
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
cargo build --release --bin backflow
bf=target/release/backflow
"$bf" export --model "$gguf" --out "$out/smol-f16.gguf" --outtype f16
"$bf" export --model "$gguf" --out "$out/smol-q8_0.gguf" --outtype q8_0
# A LoRA adapter that moves the model: a high learning rate, a few steps.
"$bf" train --model "$gguf" --data "$cache/seed/seed_tasks.jsonl" --out "$out/lora" \
  --lora-rank 8 --steps 3 --lr 1e-2 --batch-size 2 --max-len 64 --quiet
"$bf" export --model "$out/lora" --out "$out/lora-f16.gguf"
"$LLAMA_PY" tests/reference/gguf_export_check.py "$bf" "$out/smol-f16.gguf" "$out/smol-q8_0.gguf" \
  "$out/lora-f16.gguf"
