#!/usr/bin/env bash
# The model on an NVIDIA GPU, for a machine that has one but no Rust toolchain.
#
#   scripts/gpu-check.sh build   # here: builds the CUDA test, bench and CLI into target/gpu/
#                                #   (GPU_FEATURES: the cargo features, `cuda` by default; e.g.
#                                #   `cuda-fusion` or `cuda-fusion,cuda-autotune`, see Cargo.toml)
#   scripts/gpu-check.sh run     # there: runs them (carry target/gpu/*.xz and target/gpu/smollm2,
#                                #   target/gpu/seed_tasks.jsonl with the working tree)
#
# `build` needs no GPU and no CUDA toolkit (cubecl loads the driver and NVRTC at run time). With
# SmolLM2-135M-Instruct and the seed in ~/.cache/backflow (scripts/fetch-assets.sh model seed) it
# also puts the model's config and tokenizer (not its weights) and the seed pairs in target/gpu.
#
# `run` needs the NVIDIA driver and NVRTC (libnvrtc) on the GPU machine. Its stages (GPU_STAGES,
# `1,2,3,4,5` by default), each under its own time limit (GPU_STAGE_S, 240 s) so that one slow
# stage leaves the others:
# 1. tests/cuda.rs: CUDA f32/f16/bf16 logits against flex on random weights of SmolLM2-135M's
#    shape, batched and from the prefix cache;
# 2. the throughput bench on CUDA in each precision on that shape (random weights: a real
#    checkpoint is too big to carry; throughput does not depend on the values);
# 3. random weights of Llama-3-8B's shape in bf16: decode against the memory-bandwidth roofline
#    (the bench's `weights GB/s` beside the device-to-device copy rate measured in stage 5);
# 4. the loop-efficiency check (issue 13): `backflow run rate` over every seed pair with random
#    weights of SmolLM2's shape (scripts/random-hf-weights.py, with the real tokenizer), then the
#    bench at the loop's prompt length, batch 16 and 32; the run's summary.json goes to $OUT;
# 5. the device-to-device copy rate (PyTorch, when present).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu

case "${1:-}" in
build)
    mkdir -p "$out"
    # One cargo invocation for the three binaries; --message-format gives their paths.
    cargo build --release --features "${GPU_FEATURES:-cuda}" --test cuda --bench model_throughput --bin backflow \
        --message-format=json-render-diagnostics >"$out/build.json"
    python3 - "$out" <<'EOF'
import json, shutil, sys
out = sys.argv[1]
for line in open(f"{out}/build.json"):
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    name = msg["target"]["name"]
    if name in ("cuda", "model_throughput", "backflow"):
        shutil.copy(msg["executable"], f"{out}/{name}")
        print(f"{out}/{name}")
EOF
    strip "$out/cuda" "$out/model_throughput" "$out/backflow"
    # The three stripped binaries are ~90 MB, over what travels to the GPU machine (64 MiB):
    # they travel xz-compressed and `run` unpacks them.
    for bin in cuda model_throughput backflow; do
        xz -T0 -6 -f -k "$out/$bin"
    done
    cache=${BACKFLOW_CACHE:-$HOME/.cache/backflow}
    gguf=$cache/model/SmolLM2-135M-Instruct.Q4_1.gguf
    if [[ -f $gguf && -f $cache/seed/seed_tasks.jsonl ]]; then
        # The export runs on the host (no device touched); only its small files travel.
        tmp=$(mktemp -d)
        "$out/backflow" export --model "$gguf" --out "$tmp/hf" >/dev/null
        mkdir -p "$out/smollm2"
        cp "$tmp/hf/config.json" "$tmp/hf/tokenizer.json" "$tmp/hf/tokenizer_config.json" "$out/smollm2/"
        rm -rf "$tmp"
        cp "$cache/seed/seed_tasks.jsonl" "$out/"
    else
        echo "no $gguf or seed: the loop-efficiency stage will be skipped" >&2
    fi
    ls -l "$out"
    ;;
run)
    for bin in cuda model_throughput backflow; do
        if [[ -f $out/$bin.xz && ! -x $out/$bin ]]; then
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$out/$bin.xz" "$out/$bin"
            chmod +x "$out/$bin"
        fi
    done
    for bin in cuda model_throughput; do
        [[ -x "$out/$bin" ]] || { echo "no $out/$bin: run '$0 build' on the build machine" >&2; exit 1; }
    done
    limit=${GPU_STAGE_S:-240}
    # Best of two runs per batch size: cubecl compiles its kernels on a shape's first call
    # (and autotunes them with cuda-autotune), which would otherwise land in the first run.
    export BENCH_REPEAT=${BENCH_REPEAT:-2}
    results=${OUT:-$out}
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    status=0
    stages=",${GPU_STAGES:-1,2,3,4,5},"
    stage() { [[ $stages == *",$1,"* ]] && echo "== $1. ${*:2}"; }
    if stage 1 tests/cuda.rs; then
        timeout "$limit" "$out/cuda" --nocapture || status=$?
    fi
    if stage 2 SmolLM2-135M shape, each precision; then
        for dtype in f32 f16 bf16; do
            BENCH_SHAPE=smollm2-135m BENCH_DTYPE=$dtype BENCH_BATCHES=${BENCH_BATCHES:-1,8,32,128} \
                timeout "$limit" "$out/model_throughput" || status=$?
        done
    fi
    if stage 3 Llama-3-8B shape, bf16; then
        BENCH_SHAPE=llama3-8b BENCH_DTYPE=bf16 BENCH_BATCHES=${BENCH_8B_BATCHES:-1,8,32} \
            timeout "$limit" "$out/model_throughput" || status=$?
    fi
    if ! stage 4 run rate over the seed, then the bench at its prompt length; then
        :
    elif [[ -x $out/backflow && -f $out/smollm2/config.json && -f $out/seed_tasks.jsonl ]]; then
        model=$(mktemp -d)/smollm2-random
        if python3 scripts/random-hf-weights.py "$out/smollm2" "$model"; then
            rated=$(mktemp -d)
            begin=$(date +%s%N)
            timeout "$limit" "$out/backflow" run rate --data "$out/seed_tasks.jsonl" \
                --model "$model" --out "$rated" -w 2 || status=$?
            echo "run rate wall: $((($(date +%s%N) - begin) / 1000000)) ms"
            cp "$rated/summary.json" "$results/rate-summary.json" || true
            BENCH_SHAPE=smollm2-135m BENCH_BATCHES=16,32 BENCH_PROMPT=512 BENCH_NEW=64 \
                timeout "$limit" "$out/model_throughput" || status=$?
        else
            status=1
        fi
    else
        echo "skipped: no $out/backflow, $out/smollm2 or $out/seed_tasks.jsonl"
    fi
    stage 5 device-to-device copy && python3 - <<'EOF' || true
import torch
n = 1 << 30  # 1 GiB per buffer, well over the L2
a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    b.copy_(a)
end.record()
torch.cuda.synchronize()
s = start.elapsed_time(end) / 1000 / 20
print(f"device-to-device copy: {2 * n / s / 1e9:.0f} GB/s (read + write)")
EOF
    exit "$status"
    ;;
*)
    sed -n '2,26p' "$0" >&2
    exit 2
    ;;
esac
