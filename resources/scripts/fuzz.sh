#!/usr/bin/env bash
# Runs the fuzz targets (cargo-fuzz, nightly) for a bounded time each; fails on a
# crash or a build failure.
# Usage: resources/scripts/fuzz.sh [SECONDS]   (default 30 per target)
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
secs="${1:-30}"
command -v cargo-fuzz >/dev/null || cargo install -j2 cargo-fuzz --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo +nightly fuzz list); do
  echo "== fuzz $target (${secs}s)"
  if ! cargo +nightly fuzz run "$target" -j1 -- -max_total_time="$secs" > "$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz $target failed (crash artifacts, if any, in fuzz/artifacts/$target/)"
    exit 1
  fi
  grep -E "^Done" "$log"
done
