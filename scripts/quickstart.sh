#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct, builds strata, and answers the bundled prompts
# (examples/prompts.jsonl) with the model's chat template. Results go to out/answers.jsonl;
# running it again continues (--resume) instead of overwriting what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/get-smollm2.sh
cargo build --release --locked
mkdir -p out
./target/release/strata generate \
  --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --input examples/prompts.jsonl \
  --output out/answers.jsonl \
  --chat --max-new-tokens 96 --resume \
  --stats-json out/stats.json
echo
echo "answers (out/answers.jsonl):"
python3 - <<'PY' 2>/dev/null || cat out/answers.jsonl
import json
for line in open("out/answers.jsonl"):
    r = json.loads(line)
    print("[%s] %s" % (r["id"], r.get("text", r.get("error"))))
PY
