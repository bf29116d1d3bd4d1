#!/usr/bin/env bash
# The evaluation experiment of the README ("Does it align?"): the Humpback loop on real pages with
# SmolLM2-135M-Instruct, every forward model evaluated as it is trained, and the base model it
# started from, on the last EXP_HOLDOUT seed tasks (held out of every training): reference NLL,
# win rate against M_0 judged by Qwen2.5-Coder-1.5B (AlpacaEval's ranking prompt, both orders,
# verdict probabilities), selector precision/recall on a dev set built from the same held-out
# tasks; then the paper's ablation: seed + ALL candidates (uncurated) against seed + curated,
# both trained with the loop's settings and judged against M_0.
#
#   scripts/experiment.sh [OUT]
#     EXP_LIMIT           passages (96)
#     EXP_STEPS           optimizer steps of each forward training (16)
#     EXP_BACKWARD_STEPS  steps of M_yx, trained by `backflow train --backward` on the same seed
#                         pairs and given to the loop (default: EXP_STEPS, trained by the loop)
#     EXP_HOLDOUT         held-out seed tasks (35)
#     EXP_SEED            the seed file (default: the cached seed tasks; its last EXP_HOLDOUT
#                         tasks are held out)
#     EXP_RULE            judge rule (both)
#     EXP_ROUNDS          rounds (2; the ablation compares with the last one)
#     EXP_CURATE          extra curation flags of the loop, e.g. "--graded --threshold 3.5"
#     EXP_DEV_LIMIT       build the selector dev set from the first N held-out tasks (all)
#     BACKFLOW_BIN        a built backflow binary to use instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-experiment-out}"
limit="${EXP_LIMIT:-96}"
steps="${EXP_STEPS:-16}"
holdout="${EXP_HOLDOUT:-35}"
rule="${EXP_RULE:-both}"
rounds="${EXP_ROUNDS:-2}"
backward_steps="${EXP_BACKWARD_STEPS:-}"
read -r -a curate <<<"${EXP_CURATE:-}"
dev_limit=()
[ -z "${EXP_DEV_LIMIT:-}" ] || dev_limit=(--limit "$EXP_DEV_LIMIT")
cache="$(scripts/fetch-assets.sh pages model seed qwen15)"
seed="${EXP_SEED:-$cache/seed/seed_tasks.jsonl}"
if [ -n "${BACKFLOW_BIN:-}" ]; then
  bin="$BACKFLOW_BIN"
else
  cargo build --release --bin backflow
  bin=target/release/backflow
fi
base="$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf"
judge="$cache/model/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
mkdir -p "$out"
[ -f "$out/python-docs.warc.gz" ] || "$bin" warc-pack "$cache/pages/python3.11" --out "$out/python-docs.warc.gz"
# The held-out tasks (the seed's last $holdout) and a selector dev set from them: good = the human
# pairs; bad = mismatched outputs, truncated outputs and crawled passages.
tail -n "$holdout" "$seed" >"$out/heldout.jsonl"
[ -d "$out/segments" ] || "$bin" segment "$out/python-docs.warc.gz" --out "$out/segments" -q
"$bin" selector-devset --data "$out/heldout.jsonl" --passages "$out"/segments/segment-*.jsonl \
  --out "$out/dev.jsonl" "${dev_limit[@]}"
# A small backward model needs more steps than the forward ones to write questions (README,
# "Finetuning"): trained here on the seed pairs the loop trains on, and given to the loop.
backward=()
if [ -n "$backward_steps" ]; then
  total="$(grep -c . "$seed")"
  head -n "$((total - holdout))" "$seed" >"$out/train-seed.jsonl"
  time "$bin" train --model "$base" --data "$out/train-seed.jsonl" --out "$out/backward" --backward \
    --steps "$backward_steps" --batch-size 8 --max-len 256 --lora-rank 8 --seed 0 --eval-frac 0
  backward=(--backward-model "$out/backward")
fi
time "$bin" run humpback --corpus "$out/python-docs.warc.gz" --out "$out/loop" \
  --model "$base" --seed "$seed" --limit "$limit" --train-steps "$steps" \
  --rounds "$rounds" "${backward[@]}" "${curate[@]}" \
  --max-len 256 --max-chars 1500 -w 2 \
  --eval-holdout "$holdout" --judge "$judge" --judge-rule "$rule" --selector-dev "$out/dev.jsonl"
# The ablation: the same training from the base on seed (S_a) + every candidate of the run (S_w),
# uncurated, beside the loop's last model (M_2: seed + round 2's curated set), trained with its seed.
python3 - "$seed" "$out/loop" "$out/seed-plus-all.jsonl" "$holdout" <<'PY'
import glob, json, sys
seed, loop, dest, holdout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
S_A, S_W = "Answer in the style of an AI Assistant.", "Answer with knowledge from web search."
tasks = [json.loads(l) for l in open(seed)][:-holdout]
rows = []
for t in tasks:
    for i in t["instances"]:
        user = t["instruction"].strip() + ("\n\n" + i["input"].strip() if i["input"].strip() else "")
        rows.append([S_A, user, i["output"]])
for f in sorted(glob.glob(f"{loop}/candidates-*.jsonl")):
    for l in open(f):
        c = json.loads(l)
        rows.append([S_W, c["instruction"], c["output"]])
with open(dest, "w") as o:
    for s, u, a in rows:
        o.write(json.dumps({"messages": [{"role": "system", "content": s},
            {"role": "user", "content": u}, {"role": "assistant", "content": a}]}) + "\n")
print(f"{len(rows)} pairs -> {dest}", file=sys.stderr)
PY
time "$bin" train --model "$base" --data "$out/seed-plus-all.jsonl" --source untagged --out "$out/uncurated" \
  --steps "$steps" --batch-size 8 --max-len 256 --lora-rank 8 --seed "$rounds" --eval-frac 0
# Judged against M_0's own answers from the loop (same prompts, sampling and judge as the loop's
# models), so the figures sit beside the loop's.
time "$bin" eval --prompts "$out/heldout.jsonl" --out "$out/ablation" \
  --answers "M0=$out/loop/eval/answers-M0.jsonl" --model "uncurated=$out/uncurated" \
  --judge "$judge" --judge-rule "$rule" --max-tokens 128 --selector-dev "$out/dev.jsonl"
echo "loop: $out/loop/report.html   ablation: $out/ablation/eval.json"
