#!/usr/bin/env bash
# GPU tests: every CUDA kernel against the CPU reference, then `strata generate` on the GPU and on
# the CPU over the golden fixtures, which must give the same tokens (greedy) as each other and as
# Hugging Face transformers.
#
# The GPU machine needs an NVIDIA driver and the CUDA 13 libraries (libnvrtc, libcublas, e.g.
# from the CUDA toolkit under /usr/local/cuda) but no Rust toolchain: build on any x86_64 Linux
# machine (no CUDA needed there; the binaries load CUDA at run time), then copy.
#
#   # on the build machine, in this repository:
#   cargo test --release -p strata-kernels -p strata-runtime -p strata-tests --no-run  # GPU tests
#   cargo build --release                             # target/release/strata
#   scripts/gpu-test.sh --collect gpu-bin             # copies them into gpu-bin/
#   # copy gpu-bin/, scripts/gpu-test.sh and tests/fixtures/golden/ to the GPU machine, keeping
#   # this layout (or copy the whole repository without target/), then there:
#   scripts/gpu-test.sh gpu-bin
#
# Binaries built on an older glibc run on a newer one, not the reverse: the script checks.
# A test that skips (no usable GPU) counts as a failure here. Exit status: 0 when all passed.
set -euo pipefail
cd "$(dirname "$0")/.."

# GPU test binaries: kernel tests (strata-kernels), tier placement tests (strata-tests) and the
# runtime's unit tests that need a GPU (`binary:filter` runs only the tests the filter names).
TEST_BINS=(cuda_vs_cpu cuda_attention cuda_kvtier cuda_prefill gpu_tiers strata_runtime:kv::pin)

if [[ "${1:-}" == "--collect" ]]; then
    dest="${2:?usage: scripts/gpu-test.sh --collect DIR}"
    mkdir -p "$dest"
    [[ -x target/release/strata ]] || { echo "no strata binary: run cargo build --release" >&2; exit 1; }
    for t in "${TEST_BINS[@]%%:*}"; do
        # The newest build of each test (cargo keeps older hashes around).
        b=$(ls -t target/release/deps/"$t"-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
        [[ -n "$b" ]] || { echo "no $t test binary: run cargo test --release -p strata-kernels -p strata-runtime -p strata-tests --no-run" >&2; exit 1; }
        cp "$b" "$dest/$t"
    done
    cp target/release/strata "$dest/strata"
    echo "copied ${TEST_BINS[*]%%:*} and strata to $dest/"
    exit 0
fi

bin="${1:-target/release}"
strata="$bin/strata"
for t in "${TEST_BINS[@]%%:*}"; do
    [[ -x "$bin/$t" ]] || { echo "need $bin/$t (see the top of this script)" >&2; exit 1; }
done
[[ -x "$strata" ]] || { echo "need $bin/strata (see the top of this script)" >&2; exit 1; }
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

echo "== machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
else
    echo "nvidia-smi not found"
fi
have=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
have=${have:-unknown}
need=$( (grep -ao 'GLIBC_2\.[0-9]*' "$strata" "$bin/cuda_vs_cpu" || true) | cut -d: -f2 | sort -uV | tail -1)
echo "glibc: system $have, binaries need ${need#GLIBC_}"
if [[ "$have" != unknown ]] && [[ "$(printf '%s\n%s\n' "${need#GLIBC_}" "$have" | sort -V | tail -1)" != "$have" ]]; then
    fail "the binaries need glibc ${need#GLIBC_} but this system has $have: build on an older system"
fi

# Test binaries find the fixtures through STRATA_REPO (this repository, wherever it was copied).
export STRATA_REPO="$PWD"
log=$(mktemp)
for entry in "${TEST_BINS[@]}"; do
    t=${entry%%:*}
    filter=()
    [[ "$entry" == *:* ]] && filter=("${entry#*:}")
    echo "== $entry"
    if "$bin/$t" "${filter[@]}" --nocapture --test-threads 1 2>&1 | tee "$log"; then
        if grep -q '^skipped:' "$log"; then fail "$t skipped: $(grep -m1 '^skipped:' "$log")"; fi
    else
        fail "$t"
    fi
done

echo "== strata info"
"$strata" info || fail "strata info"

echo "== end to end: strata generate --device cuda vs --device cpu vs transformers"
if ! command -v python3 >/dev/null; then
    fail "python3 is needed to read the golden fixtures"
else
    work=$(mktemp -d)
    for fx in tests/fixtures/golden/*/; do
        name=$(basename "$fx")
        [[ -f "$fx/expected.json" ]] || continue
        python3 - "$fx/expected.json" "$work/$name.in.jsonl" <<'PY'
import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
with open(sys.argv[2], "w") as f:
    for i, c in enumerate(cases):
        f.write(json.dumps({"id": i, "input_ids": c["input_ids"],
                            "max_new_tokens": len(c["greedy_ids"])}) + "\n")
PY
        # cpu; cuda with every block in the GPU tier (f32 KV, the fixtures' precision); cuda
        # with a GPU tier of 20-40 blocks and a host tier of 12, so most KV spills to host memory and
        # on to disk.
        runs=(
            "cpu|--device cpu"
            "cuda|--device cuda --kv-dtype f32"
            "tiered|--device cuda --kv-dtype f32 --kv-block-tokens 4 --gpu-kv-mem 40KiB --prefill-chunk 16 --host-mem 48KiB --disk-dir $work/disk --disk-mem 64MiB --kv-recent-blocks 1"
        )
        ran=1
        for r in "${runs[@]}"; do
            tag=${r%%|*}
            # shellcheck disable=SC2086
            "$strata" generate --model "$fx" ${r#*|} --ignore-eos --batch-size 4 \
                --input "$work/$name.in.jsonl" --output "$work/$name.$tag.jsonl" \
                --stats-json "$work/$name.$tag.stats.json" 2>"$work/$name.$tag.log" \
                || { cat "$work/$name.$tag.log"; fail "$name: generate ($tag)"; ran=0; }
        done
        [[ $ran -eq 1 ]] || continue
        python3 - "$fx/expected.json" "$work" "$name" <<'PY' || fail "$name: tokens differ"
import json, sys
want = [c["greedy_ids"] for c in json.load(open(sys.argv[1]))["cases"]]
work, name = sys.argv[2], sys.argv[3]
def read(tag):
    return {r["id"]: r.get("output_ids") for r in map(json.loads, open(f"{work}/{name}.{tag}.jsonl"))}
cpu, cuda, tiered = read("cpu"), read("cuda"), read("tiered")
kv = json.load(open(f"{work}/{name}.tiered.stats.json"))["kv"]
ok = True
for i, w in enumerate(want):
    same = cuda.get(i) == cpu.get(i)
    golden = cuda.get(i) == w
    tier = tiered.get(i) == w
    ok &= same and golden and tier
    print(f"{name} case {i}: {len(w)} tokens, cuda == cpu: {same}, cuda == transformers: {golden}, "
          f"gpu+host+disk == transformers: {tier}")
print(f"{name} tiered run: gpu blocks {kv['gpu_blocks_peak']}/{kv['gpu_capacity_blocks']}, "
      f"{kv['gpu_spilled_blocks']} spilled to host, {kv['spilled_blocks']} to disk")
sys.exit(0 if ok else 1)
PY
        grep -h '^note: ' "$work/$name.tiered.log" | head -3 || true
    done
    rm -rf "$work"
fi

echo "== $failures failure(s)"
[[ $failures -eq 0 ]]
