#!/usr/bin/env bash
# The planner's predictions against measured runs: each workload runs `strata generate --policy
# auto` (the planner's choice for it, on the given hardware profile) and the decode step the
# planner predicted is printed beside the one measured, with the tiers the policy put weights
# and KV in. This is how bench/RESULTS.md's "predicted vs measured decode step" tables are made.
#
#   bench/predicted-vs-measured.sh STRATA_BIN OUT_DIR PROFILE DISK_DIR [WORKLOADS] [-- extra flags]
#
# PROFILE: a hardware profile (`strata calibrate --disk-dir DISK_DIR --profile PROFILE` writes
# one; it is made first when missing). DISK_DIR: scratch space for the disk tiers (KV and
# weights; tens of GiB for the disk workloads). WORKLOADS: comma-separated names from the list
# below (default: all). Extra flags go to every `strata generate`. To try the script without a
# GPU: `-- --device cpu --model synthetic:tiny-long` with PROMPT_DIV=16 in the environment
# (prompts 16× shorter); `--gpu-mem` is then left out.
#
# Workloads (synthetic:llama-3-8b, random prompts of ids below 500, 16 new tokens, greedy, no EOS):
#   W1  1 × 2048                       GPU only
#   W2  16 × 2048                      GPU only
#   W3  64 × 2048                      GPU only
#   W4  16 × 2048, GPU 12 GiB, host 64 GiB      half the weights and most KV in host memory
#   W5  8 × 4096,  GPU 20 GiB, host 64 GiB      weights and KV partly in host memory
#   W6  16 × 4096, GPU 24 GiB, host 64 GiB      weights and KV partly in host memory
#   W7  4 × 4096,  GPU 18 GiB, host 2 GiB, disk KV spilled to disk
#   D1  8 × 2048,  GPU 10 GiB, host 4 GiB, disk weights that fit neither GPU nor host on disk
#   LC1 1 × 8160,  GPU 24 GiB, host 64 GiB      long context on one GPU
# Writes OUT_DIR/<name>.stats.json and OUT_DIR/<name>.log, and prints a Markdown table.
set -euo pipefail
usage="usage: bench/predicted-vs-measured.sh STRATA_BIN OUT_DIR PROFILE DISK_DIR [WORKLOADS] [-- flags]"
strata="${1:?$usage}"
out="${2:?$usage}"
profile="${3:?$usage}"
disk="${4:?$usage}"
only="${5:-}"
shift $(( $# < 5 ? $# : 5 ))
[[ "${1:-}" == "--" ]] && shift
extra=("$@")
python="${PYTHON:-python3}"
mkdir -p "$out" "$disk"
[[ "$only" == "--" ]] && only=""

# name | batch | prompt | flags
workloads=(
    "W1|1|2048|"
    "W2|16|2048|"
    "W3|64|2048|"
    "W4|16|2048|--gpu-mem 12GiB --host-mem 64GiB"
    "W5|8|4096|--gpu-mem 20GiB --host-mem 64GiB"
    "W6|16|4096|--gpu-mem 24GiB --host-mem 64GiB"
    "W7|4|4096|--gpu-mem 18GiB --host-mem 2GiB --disk-dir $disk --disk-mem 40GiB"
    "D1|8|2048|--gpu-mem 10GiB --host-mem 4GiB --disk-dir $disk --disk-mem 40GiB"
    "LC1|1|8160|--gpu-mem 24GiB --host-mem 64GiB"
)

if [[ ! -f "$profile" ]]; then
    echo "== no profile at $profile: calibrating"
    "$strata" calibrate --disk-dir "$disk" --profile "$profile"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# Defaults, each left out when the extra flags give it.
base=()
for d in "--model synthetic:llama-3-8b" "--device cuda" "--gpu-gemm rounded" "--policy auto"; do
    [[ " ${extra[*]} " == *" ${d%% *} "* ]] || base+=($d)
done
ran=()
for w in "${workloads[@]}"; do
    IFS='|' read -r name batch prompt flags <<< "$w"
    prompt=$(( prompt / ${PROMPT_DIV:-1} ))
    if [[ " ${extra[*]} " == *" --device cpu "* ]]; then
        flags=$(sed -E 's/--gpu-mem [^ ]+//' <<< "$flags")
    fi
    if [[ -n "$only" ]] && [[ ",$only," != *",$name,"* ]]; then
        continue
    fi
    "$python" - "$batch" "$prompt" > "$out/$name.prompts.jsonl" <<'PY'
import json, random, sys
b, n = map(int, sys.argv[1:3])
rng = random.Random(n * 1000 + b)
for i in range(b):
    print(json.dumps({"id": i, "input_ids": [rng.randrange(3, 500) for _ in range(n)]}))
PY
    rm -f "$out/$name.jsonl"
    echo "== $name: batch $batch, prompt $prompt ${flags}"
    # shellcheck disable=SC2086 # flags is a list of words
    if "$strata" generate "${base[@]}" --profile "$profile" --ignore-eos \
        --max-new-tokens 16 --batch-size "$batch" --input "$out/$name.prompts.jsonl" \
        --output "$out/$name.jsonl" --stats-json "$out/$name.stats.json" $flags "${extra[@]}" \
        > "$out/$name.log" 2>&1; then
        grep -E "^(policy check|done):" "$out/$name.log" || true
        ran+=("$name")
    else
        echo "$name failed; the end of $out/$name.log:"
        tail -5 "$out/$name.log"
    fi
done

[[ ${#ran[@]} -gt 0 ]] || { echo "no workload ran" >&2; exit 1; }
"$python" - "$out" "${ran[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]

def tiers(p):
    w, c = p["weights"], p["kv"]["cold"]
    pct = lambda x: f"{100 * x:.0f}"
    return (f"weights {pct(w['gpu'])}/{pct(w['host'])}/{pct(w['disk'])}, "
            f"cold KV {pct(c['gpu'])}/{pct(c['host'])}/{pct(c['disk'])}")

print("| workload | batch × prompt | weights and cold KV, % GPU/host/disk | predicted ms | "
      "measured ms | measured / predicted | median step / predicted | bound by (predicted) | "
      "measured / lower bound | prefill measured / predicted s |")
print("|---|---|---|---:|---:|---:|---:|---|---:|---:|")
for n in names:
    s = json.load(open(f"{out}/{n}.stats.json"))
    c = s.get("policy_check")
    if not c:
        print(f"| {n} | – | no policy check in the stats | | | | | | | |")
        continue
    shape = f"{s['batch_size']} × {s['prompt_tokens'] // max(1, s['items_ok'])}"
    print(f"| {n} | {shape} | {tiers(c['policy'])} | {1e3 * c['predicted_decode_step_s']:.2f} | "
          f"{1e3 * c['measured_decode_step_s']:.2f} | {c['decode_step_ratio']:.2f} | "
          f"{c.get('decode_step_median_ratio', float('nan')):.2f} | "
          f"{c['predicted_bound_by']} | {c['decode_step_over_lower_bound']:.2f} | "
          f"{c['measured_prefill_s']:.3f} / {c['predicted_prefill_s']:.3f} "
          f"({c['prefill_ratio']:.2f}) |")
PY
