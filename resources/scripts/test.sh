#!/usr/bin/env bash
# Every check CI runs, in order: formatting, clippy (-D warnings), build, all tests
# (unit tests and the integration tests that run real KVM guests). Tests that cannot
# run on this host say why; their reasons are listed at the end.
# Usage: resources/scripts/test.sh        (from anywhere in the checkout)
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs="${MOSAIC_JOBS:-2}"
export MOSAIC_SKIP_LOG="${MOSAIC_SKIP_LOG:-$PWD/target/test-skips.log}"
mkdir -p "$(dirname "$MOSAIC_SKIP_LOG")"
: > "$MOSAIC_SKIP_LOG"

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy -j"$jobs" --workspace --all-targets --release -- -D warnings
echo "== build"
cargo build -j"$jobs" --workspace --release
echo "== tests"
cargo test -j"$jobs" --workspace --release
echo "== skipped tests: $(wc -l < "$MOSAIC_SKIP_LOG")"
sort "$MOSAIC_SKIP_LOG" | uniq -c
