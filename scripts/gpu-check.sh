#!/usr/bin/env bash
# The model on an NVIDIA GPU, for a machine that has one but no Rust toolchain.
#
#   scripts/gpu-check.sh build   # here: builds the CUDA test and bench into target/gpu/ (stripped)
#   scripts/gpu-check.sh run     # there: runs them (carry target/gpu with the working tree)
#
# `build` needs no GPU and no CUDA toolkit (cubecl loads the driver and NVRTC at run time).
# `run` needs the NVIDIA driver and NVRTC (libnvrtc) on the GPU machine. It runs tests/cuda.rs
# (CUDA f32/f16/bf16 logits against flex on random weights of SmolLM2-135M's shape, batched and
# from the prefix cache), then the throughput bench on CUDA in each precision (random weights:
# a real checkpoint is too big to carry; throughput does not depend on the values).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu

case "${1:-}" in
build)
    mkdir -p "$out"
    # One cargo invocation for both binaries; --message-format gives their paths.
    cargo build --release --features cuda --test cuda --bench model_throughput \
        --message-format=json-render-diagnostics >"$out/build.json"
    python3 - "$out" <<'EOF'
import json, shutil, sys
out = sys.argv[1]
for line in open(f"{out}/build.json"):
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    name = msg["target"]["name"]
    if name in ("cuda", "model_throughput"):
        shutil.copy(msg["executable"], f"{out}/{name}")
        print(f"{out}/{name}")
EOF
    strip "$out/cuda" "$out/model_throughput"
    ls -l "$out/cuda" "$out/model_throughput"
    ;;
run)
    for bin in cuda model_throughput; do
        [[ -x "$out/$bin" ]] || { echo "no $out/$bin: run '$0 build' on the build machine" >&2; exit 1; }
    done
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$out/cuda" --nocapture
    for dtype in f32 f16 bf16; do
        BENCH_DTYPE=$dtype BENCH_BATCHES=${BENCH_BATCHES:-1,8,32,128} "$out/model_throughput"
    done
    ;;
*)
    sed -n '2,12p' "$0" >&2
    exit 2
    ;;
esac
