#!/usr/bin/env bash
# The main job on the embedded default: the Python docs (530 real HTML pages, fetched once through
# apt-get and cached) packed as a real WARC/1.0 file, then segmented and deduplicated on 2 workers
# with progress shown. Outputs land in ${1:-demo-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-demo-out}"
cache="$(scripts/fetch-assets.sh pages)"
cargo build --release --bin backflow
bin=target/release/backflow
mkdir -p "$out"
[ -f "$out/python-docs.warc.gz" ] || "$bin" warc-pack "$cache/pages/python3.11" --out "$out/python-docs.warc.gz"
"$bin" segment "$out/python-docs.warc.gz" --out "$out/passages" -w 2
echo "passages: $out/passages/segment-*.jsonl   summary: $out/passages/summary.json"
