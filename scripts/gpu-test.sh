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
#   cargo test --release -p strata-kernels --no-run   # target/release/deps/cuda_vs_cpu-<hash>
#   cargo build --release                             # target/release/strata
#   scripts/gpu-test.sh --collect gpu-bin             # copies both into gpu-bin/
#   # copy gpu-bin/, scripts/gpu-test.sh and tests/fixtures/golden/ to the GPU machine, keeping
#   # this layout (or copy the whole repository without target/), then there:
#   scripts/gpu-test.sh gpu-bin
#
# Binaries built on an older glibc run on a newer one, not the reverse: the script checks.
# A test that skips (no usable GPU) counts as a failure here. Exit status: 0 when all passed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--collect" ]]; then
    dest="${2:?usage: scripts/gpu-test.sh --collect DIR}"
    mkdir -p "$dest"
    # The newest cuda_vs_cpu test binary (cargo keeps older hashes around).
    test_bin=$(ls -t target/release/deps/cuda_vs_cpu-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
    [[ -n "$test_bin" ]] || { echo "no test binary: run cargo test --release -p strata-kernels --no-run" >&2; exit 1; }
    [[ -x target/release/strata ]] || { echo "no strata binary: run cargo build --release" >&2; exit 1; }
    cp "$test_bin" "$dest/cuda_vs_cpu"
    att_bin=$(ls -t target/release/deps/cuda_attention-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
    [[ -n "$att_bin" ]] && cp "$att_bin" "$dest/cuda_attention"
    cp target/release/strata "$dest/strata"
    echo "copied $test_bin and target/release/strata to $dest/"
    exit 0
fi

bin="${1:-target/release}"
test_bin="$bin/cuda_vs_cpu"
[[ -x "$test_bin" ]] || test_bin=$(ls -t "$bin"/deps/cuda_vs_cpu-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
strata="$bin/strata"
[[ -x "$test_bin" && -x "$strata" ]] || { echo "need $bin/cuda_vs_cpu and $bin/strata (see the top of this script)" >&2; exit 1; }
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
need=$( (grep -ao 'GLIBC_2\.[0-9]*' "$strata" "$test_bin" || true) | cut -d: -f2 | sort -uV | tail -1)
echo "glibc: system $have, binaries need ${need#GLIBC_}"
if [[ "$have" != unknown ]] && [[ "$(printf '%s\n%s\n' "${need#GLIBC_}" "$have" | sort -V | tail -1)" != "$have" ]]; then
    fail "the binaries need glibc ${need#GLIBC_} but this system has $have: build on an older system"
fi

echo "== kernels: CUDA vs CPU reference"
log=$(mktemp)
if "$test_bin" --nocapture 2>&1 | tee "$log"; then
    if grep -q '^skipped:' "$log"; then fail "kernel tests skipped: $(grep -m1 '^skipped:' "$log")"; fi
else
    fail "kernel tests"
fi

echo "== decode attention: paged split-KV kernel vs the f64 reference and the CPU"
if [[ -x "$bin/cuda_attention" ]]; then
    if "$bin/cuda_attention" --nocapture 2>&1 | tee "$log"; then
        if grep -q '^skipped:' "$log"; then fail "attention tests skipped: $(grep -m1 '^skipped:' "$log")"; fi
    else
        fail "attention tests"
    fi
else
    fail "no $bin/cuda_attention (rebuild the tests and --collect again)"
fi

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
        ran=1
        for dev in cpu cuda; do
            "$strata" generate --model "$fx" --device "$dev" --ignore-eos --batch-size 4 \
                --input "$work/$name.in.jsonl" --output "$work/$name.$dev.jsonl" 2>"$work/$name.$dev.log" \
                || { cat "$work/$name.$dev.log"; fail "$name: generate --device $dev"; ran=0; }
        done
        [[ $ran -eq 1 ]] || continue
        python3 - "$fx/expected.json" "$work/$name.cpu.jsonl" "$work/$name.cuda.jsonl" "$name" <<'PY' || fail "$name: tokens differ"
import json, sys
want = [c["greedy_ids"] for c in json.load(open(sys.argv[1]))["cases"]]
def read(p):
    return {r["id"]: r.get("output_ids") for r in map(json.loads, open(p))}
cpu, cuda = read(sys.argv[2]), read(sys.argv[3])
ok = True
for i, w in enumerate(want):
    same = cuda.get(i) == cpu.get(i)
    golden = cuda.get(i) == w
    ok &= same and golden
    print(f"{sys.argv[4]} case {i}: {len(w)} tokens, cuda == cpu: {same}, cuda == transformers: {golden}")
sys.exit(0 if ok else 1)
PY
        grep -h '^note: computing on' "$work/$name.cuda.log" | head -1 || true
    done
    rm -rf "$work"
fi

echo "== $failures failure(s)"
[[ $failures -eq 0 ]]
