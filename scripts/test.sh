#!/usr/bin/env bash
# The test command (README, .ci/run): fetches the real assets once (cached), then runs every test
# in release mode (one build serves tests, benches and the main job).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh pages model seed tokvec chromium openai datasets s3 >/dev/null
export BACKFLOW_REQUIRE_ASSETS=1
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --release --no-fail-fast "$@"
else
  exec cargo test --release --no-fail-fast "$@"
fi
