#!/usr/bin/env bash
# Real-run proof for `backflow train` (issue 4): SmolLM2-135M-Instruct (GGUF) with LoRA on the
# 175 Self-Instruct seed tasks, 20% held out; prints the held-out loss on output tokens before
# and after training (also stored in OUT/backflow.json), then generates from the adapter folder
# and trains the backward model M_yx on the reversed pairs.
# Takes several minutes on 2 CPU cores. Usage: tests/reference/train_seed_heldout.sh [OUT_ROOT]
set -euo pipefail
ROOT="${1:-/tmp/backflow-train-proof}"
MODEL="$HOME/.cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf"
SEED="$HOME/.cache/backflow/seed/seed_tasks.jsonl"
BIN="${BIN:-target/release/backflow}"
STEPS="${STEPS:-18}"
for f in "$MODEL" "$SEED"; do
  [ -e "$f" ] || { echo "skipped: $f is absent (scripts/fetch-assets.sh)"; exit 0; }
done
mkdir -p "$ROOT"
# Forward model M0 on seed pairs (tag S_a), LoRA r=8, 1 epoch of the 140 training examples.
RUST_LOG=info "$BIN" train --model "$MODEL" --data "$SEED" --out "$ROOT/m0-lora" \
  --lora-rank 8 --steps "$STEPS" --batch-size 8 --max-len 256 --eval-frac 0.2 --seed 1 --quiet
python3 -c "import json,sys; e=json.load(open(sys.argv[1]))['eval']; print('M0 held-out loss', e)" "$ROOT/m0-lora/backflow.json"
"$BIN" generate --model "$ROOT/m0-lora" --system "Answer in the style of an AI Assistant." \
  --prompt "Give three tips for staying focused while studying." --max-tokens 60
# Backward model M_yx on reversed seed pairs.
RUST_LOG=info "$BIN" train --model "$MODEL" --data "$SEED" --out "$ROOT/myx-lora" --backward \
  --lora-rank 8 --steps "$STEPS" --batch-size 8 --max-len 256 --eval-frac 0.2 --seed 1 --quiet
python3 -c "import json,sys; e=json.load(open(sys.argv[1]))['eval']; print('M_yx held-out loss', e)" "$ROOT/myx-lora/backflow.json"
