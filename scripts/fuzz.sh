#!/usr/bin/env bash
# Fuzzes backflow's parsers of untrusted input (WARC, HTML, JSONL, GGUF and safetensors headers)
# with cargo-fuzz (libFuzzer), each for a set time, from seeds made of the real test files, and
# prints a table: executions, corpus size and findings per target. Not part of CI.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET (default 600)] [TARGET...]
#
# Needs the nightly toolchain (rustup) and cargo-fuzz (`cargo +nightly install cargo-fuzz`), and
# the assets (scripts/fetch-assets.sh pages model seed). Findings land in fuzz/artifacts/TARGET/;
# reproduce one with `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(warc html jsonl gguf safetensors)
cache=${BACKFLOW_CACHE:-$HOME/.cache/backflow}
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked

# Seeds: the real files the tests use, cut small (libFuzzer mutates small inputs fastest).
seeds=fuzz/seeds
mkdir -p "$seeds"/{warc,html,jsonl,gguf,safetensors}
pages=$(find "$cache/pages/python3.11/library" -name '*.html' | sort | head -40)
i=0
for p in $pages; do
  head -c 16384 "$p" > "$seeds/html/page$i.html"
  i=$((i + 1))
done
cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/pages"
for p in $(echo "$pages" | head -3); do cp "$p" "$tmp/pages/"; done
./target/release/backflow warc-pack "$tmp/pages" --out "$tmp/pack.warc" >/dev/null
./target/release/backflow warc-pack "$tmp/pages" --out "$tmp/pack.warc.gz" >/dev/null
head -c 32768 "$tmp/pack.warc" > "$seeds/warc/pack.warc"
head -c 32768 "$tmp/pack.warc.gz" > "$seeds/warc/pack.warc.gz"
head -n 20 "$cache/seed/seed_tasks.jsonl" > "$seeds/jsonl/seed_tasks.jsonl"
head -c 65536 "$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf" > "$seeds/gguf/smollm2-head.gguf"
"$cache/venv/bin/python" - "$seeds" <<'PY'
import json, struct, sys
import numpy as np
import gguf
seeds = sys.argv[1]
# A whole small GGUF: the metadata a LLaMA needs and two tiny tensors (F32 and Q8_0).
w = gguf.GGUFWriter(f"{seeds}/gguf/tiny.gguf", "llama")
w.add_context_length(32); w.add_embedding_length(32); w.add_block_count(1)
w.add_feed_forward_length(64); w.add_head_count(2); w.add_head_count_kv(1)
w.add_layer_norm_rms_eps(1e-5)
w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
w.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 1000)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
# A safetensors file: an 8-byte header length, a JSON header, the data.
data = np.arange(8, dtype=np.float32).tobytes() + np.ones(16 * 8, dtype=np.float16).tobytes()
header = {"model.norm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
          "model.embed_tokens.weight": {"dtype": "F16", "shape": [16, 8], "data_offsets": [32, 288]}}
h = json.dumps(header).encode()
with open(f"{seeds}/safetensors/tiny.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + data)
PY

# Built once (address sanitizer, debug assertions, overflow checks), then each binary is run
# directly: editing the tree while the fuzzers run does not rebuild anything under them.
cargo +nightly fuzz build
bin=fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release
printf '%-12s %8s %12s %10s %8s %s\n' target seconds executions exec/s corpus findings  # seconds: 'stopped' at a finding
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="fuzz/artifacts/$t/last-run.log"
  # -rss_limit_mb: an allocation the input does not justify is a finding too.
  "$bin/$t" "fuzz/corpus/$t" "$seeds/$t" \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || true
  # "Done N runs in S second(s)" when it ran its time; after a finding, the last status line.
  done_line=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
  if [ -n "$done_line" ]; then
    runs=$(echo "$done_line" | awk '{print $2}')
    ran=$(echo "$done_line" | awk '{print $5}')
    rate=$(( runs / (ran > 0 ? ran : 1) ))
  else
    runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    ran="stopped"
    rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -1 | awk '{print $2}' || true)
  fi
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  findings=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
  printf '%-12s %8s %12s %10s %8s %s\n' "$t" "$ran" "${runs:-0}" "${rate:-0}" "$corpus" "$findings"
done
