#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script): formatting, lints, and every
# test of the workspace, with SmolLM2 fetched first so its tests run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/get-smollm2.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
STRATA_REQUIRE_SMOLLM2=1 cargo test --workspace --locked
