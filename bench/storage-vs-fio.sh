#!/usr/bin/env bash
# strata's storage backends next to fio on the same file, block size, queue depth and O_DIRECT:
# io_uring against fio --ioengine=io_uring --iodepth=QD (registered buffers and files, as ours),
# sync against fio --ioengine=psync --numjobs=QD (QD threads doing pread/pwrite, as ours).
#
#   bench/storage-vs-fio.sh [DIR]        # DIR on the disk to measure, default /tmp/strata-bench
#
# Settings through the environment (defaults in brackets): SIZE [1GiB], BS [256K,1M,2M],
# QD [1,4,16,32], PATTERNS [read,randread,write,randwrite], ENGINES [uring,sync],
# SECONDS_PER_CELL [0.5]. Needs fio (Debian: apt-get install -y fio). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-/tmp/strata-bench}
SIZE=${SIZE:-1GiB}
BS=${BS:-256K,1M,2M}
QD=${QD:-1,4,16,32}
PATTERNS=${PATTERNS:-read,randread,write,randwrite}
ENGINES=${ENGINES:-uring,sync}
SECONDS_PER_CELL=${SECONDS_PER_CELL:-0.5}

command -v fio >/dev/null || { echo "fio not found (Debian: apt-get install -y fio)" >&2; exit 1; }
cargo build --release --quiet -p strata-storage --example storage_bench
bench=./target/release/examples/storage_bench
file="$DIR/strata-bench.dat"
trap 'rm -f "$file"' EXIT
# Fill the file once (a tiny cell), then measure cell by cell, ours then fio's, so slow drifts of
# the disk (caches, burst credits) hit both alike.
"$bench" --dir "$DIR" --size "$SIZE" --bs 1M --qd 1 --patterns read --engines sync \
    --seconds 0.01 --format tsv --keep >/dev/null
size_bytes=$(stat -c %s "$file")
runtime_ms=$(awk -v s="$SECONDS_PER_CELL" 'BEGIN { printf "%d", s * 1000 }')
engine_names=${ENGINES//uring/io_uring}

echo "| engine | pattern | block | QD | strata GB/s | fio GB/s | strata / fio |"
echo "|---|---|---|---:|---:|---:|---:|"
for engine in ${engine_names//,/ }; do
for pattern in ${PATTERNS//,/ }; do
for bs_text in ${BS//,/ }; do
for qd in ${QD//,/ }; do
    line=$("$bench" --dir "$DIR" --size "$SIZE" --bs "$bs_text" --qd "$qd" --patterns "$pattern" \
        --engines "${engine#io_}" --seconds "$SECONDS_PER_CELL" --format tsv --keep --no-fill)
    if [ -z "$line" ]; then
        echo "| $engine | $pattern | $bs_text | $qd | skipped (engine unavailable) | | |"
        continue
    fi
    IFS=$'\t' read -r _ _ bs _ strata_gbps <<<"$line"
    case "$engine" in
        io_uring)
            fio_engine=(--ioengine=io_uring --iodepth="$qd" --fixedbufs --registerfiles
                --size="$size_bytes")
            ;;
        sync)
            # QD jobs, each on its own slice of the file (as our workers share one queue).
            per_job=$(( size_bytes / qd / bs * bs ))
            fio_engine=(--ioengine=psync --numjobs="$qd" --size="$per_job"
                --offset_increment="$per_job" --group_reporting)
            ;;
        *) continue ;;
    esac
    terse=$(fio --name=strata-vs-fio --filename="$file" --direct=1 --rw="$pattern" --bs="$bs" \
        --runtime="${runtime_ms}ms" --time_based "${fio_engine[@]}" --minimal)
    # Terse v3: field 7 is read bandwidth, field 48 write bandwidth, both KiB/s.
    case "$pattern" in *write) field=48 ;; *) field=7 ;; esac
    fio_gbps=$(awk -F';' -v f="$field" 'NR == 1 { printf "%.2f", $f * 1024 / 1e9 }' <<<"$terse")
    ratio=$(awk -v a="$strata_gbps" -v b="$fio_gbps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    printf '| %s | %s | %d KiB | %s | %.2f | %s | %s |\n' \
        "$engine" "$pattern" $(( bs / 1024 )) "$qd" "$strata_gbps" "$fio_gbps" "$ratio"
done; done; done; done
echo
echo "GB/s = 10^9 bytes/s; O_DIRECT; $SIZE file in $DIR; ${SECONDS_PER_CELL} s per cell and tool."
