#!/usr/bin/env bash
# llama.cpp's converter loads what backflow writes (issue 4): `backflow export` writes the GGUF's
# weights as an HF folder, llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist)
# turns it into an f32 GGUF, and llama.cpp (llama-cpp-python) gives the numpy reference's logits
# on it (llamacpp_convert_check.py).
# Needs: scripts/fetch-assets.sh converter llamacpp; the converter's Python packages (torch,
# transformers, sentencepiece) in $PY's environment, e.g. the torch venv of
# hf_transformers_check.sh plus `~/.cache/backflow/venv-torch/bin/pip install sentencepiece`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-$HOME/.cache/backflow/venv-torch/bin/python}"
LLAMA_PY="${LLAMA_PY:-$HOME/.cache/backflow/venv-llama/bin/python}"
cache="$(scripts/fetch-assets.sh model converter)"
conv="$cache/llamacpp-converter"
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
cargo build --release --bin backflow
target/release/backflow export --model "$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$out/hf"
PYTHONPATH="$conv/gguf-py" "$PY" "$conv/convert_hf_to_gguf.py" "$out/hf" \
  --outfile "$out/converted.gguf" --outtype f32 2>&1 | grep -E "^(ERROR|WARNING)|successfully" || true
[ -s "$out/converted.gguf" ] || { echo "the converter wrote nothing" >&2; exit 1; }
"$LLAMA_PY" tests/reference/llamacpp_convert_check.py "$out/converted.gguf"
