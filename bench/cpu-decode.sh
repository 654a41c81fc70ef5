#!/usr/bin/env bash
# CPU decode throughput through `strata generate --stats-json`, until `strata bench` exists.
# Usage: bench/cpu-decode.sh MODEL BATCH PROMPT_LEN GEN_LEN [extra strata flags...]
# Prompts are BATCH items of PROMPT_LEN token ids (so models without a tokenizer work too);
# --ignore-eos makes every item generate exactly GEN_LEN tokens. Prints the run summary.
set -euo pipefail
model=$1 batch=$2 prompt_len=$3 gen_len=$4
shift 4
cd "$(dirname "$0")/.."
strata=${STRATA:-./target/release/strata}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$batch" "$prompt_len" > "$work/in.jsonl" <<'PY'
import json, sys
batch, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(batch):
    print(json.dumps({"id": i, "input_ids": [(17 * i + 31 * j) % 400 + 50 for j in range(n)]}))
PY
"$strata" generate --model "$model" --input "$work/in.jsonl" --output "$work/out.jsonl" \
  --batch-size "$batch" --max-new-tokens "$gen_len" --ignore-eos --stats-json "$work/stats.json" "$@"
cat "$work/stats.json"
