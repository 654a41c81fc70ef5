#!/usr/bin/env bash
# End-to-end GPU-resident generation: strata vs Hugging Face transformers on the same GPU, same
# shapes (synthetic:llama-3-8b, random bf16 weights, prompts of random token ids, greedy, a fixed
# number of new tokens, no EOS).
#
#   bench/gpu-e2e.sh STRATA_BIN OUT_DIR [BATCHES] [PROMPT_LEN] [GEN_LEN] [-- extra strata flags]
#
# Defaults: batches 1,16,64, prompt 2048, 128 new tokens; strata runs with --gpu-gemm rounded
# (one bf16 rounding of each GEMM input, the precision a bf16 PyTorch model computes in).
# Metrics, the same for both sides (see bench/torch/hf_generate.py):
#   prefill tok/s = prompt tokens / prefill seconds
#   decode tok/s  = tokens after each sequence's first / decode seconds
#   e2e tok/s     = generated tokens / (prefill + decode seconds)   (model loading excluded)
# Writes OUT_DIR/strata-b<B>.stats.json, OUT_DIR/hf.json and prints a comparison table.
set -euo pipefail
strata="${1:?usage: bench/gpu-e2e.sh STRATA_BIN OUT_DIR [BATCHES] [PROMPT_LEN] [GEN_LEN]}"
out="${2:?usage: bench/gpu-e2e.sh STRATA_BIN OUT_DIR ...}"
batches="${3:-1,16,64}"
prompt_len="${4:-2048}"
gen_len="${5:-128}"
shift $(( $# < 5 ? $# : 5 ))
[[ "${1:-}" == "--" ]] && shift
extra=("$@")
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

IFS=, read -ra bs <<< "$batches"
for b in "${bs[@]}"; do
    "$python" - "$b" "$prompt_len" "$gen_len" > "$out/prompts-b$b.jsonl" <<'PY'
import json, random, sys
b, n, g = map(int, sys.argv[1:4])
rng = random.Random(b)
for i in range(b):
    print(json.dumps({"id": i, "input_ids": [rng.randrange(1000, 120000) for _ in range(n)],
                      "max_new_tokens": g}))
PY
    rm -f "$out/strata-b$b.jsonl"
    echo "== strata, batch $b"
    "$strata" generate --model synthetic:llama-3-8b --device cuda --gpu-gemm rounded \
        --batch-size "$b" --ignore-eos --input "$out/prompts-b$b.jsonl" \
        --output "$out/strata-b$b.jsonl" --stats-json "$out/strata-b$b.stats.json" "${extra[@]}" \
        2>&1 | tail -5
done

echo "== Hugging Face transformers"
"$python" "$here/torch/hf_generate.py" --batches "$batches" --prompt-len "$prompt_len" \
    --gen-len "$gen_len" --json "$out/hf.json"

"$python" - "$out" "$batches" "$gen_len" <<'PY'
import json, sys
out, batches, gen = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3])
hf = {r["batch"]: r for r in json.load(open(f"{out}/hf.json"))["results"]}
print("| batch | strata prefill tok/s | HF prefill | ratio | strata decode tok/s | HF decode | ratio | strata e2e tok/s | HF e2e | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for b in batches:
    s = json.load(open(f"{out}/strata-b{b}.stats.json"))
    e2e = s["generated_tokens"] / (s["prefill_seconds"] + s["decode_seconds"])
    h = hf[b]
    row = [(s["prefill_tokens_per_s"], h["prefill_tok_s"]), (s["decode_tokens_per_s"], h["decode_tok_s"]),
           (e2e, h["e2e_tok_s"])]
    cells = " | ".join(f"{a:.1f} | {c:.1f} | {a / c:.2f}x" for a, c in row)
    print(f"| {b} | {cells} |")
PY
