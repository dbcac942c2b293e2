#!/bin/bash
# Nsight Compute counters of the fused-attention kernels, one launch per CASE:OP, as one table
# (benchmarks/profile_attention.py says why and what the columns are).
#
#   bash benchmarks/profile_attention.sh [--out DIR] CASE:OP ...    e.g. tf65520:fwd full32760:fwd bc32760:jvp
#
# CASE is one of benchmarks/attention_ab.py's, OP fwd, jvp or bwd. Runs this checkout's kernels (JIT-built,
# MEGATRON_RCM_JIT_BUILD=1); needs a CUDA GPU whose counters ncu can read. DIR keeps the raw CSV and the
# details page of each report (default /tmp/profile_attention).
set -euo pipefail
out=/tmp/profile_attention
if [ "${1:-}" = "--out" ]; then out=$2; shift 2; fi
[ $# -ge 1 ] || { echo "profile_attention.sh: give at least one CASE:OP (e.g. tf65520:fwd)" >&2; exit 2; }
command -v ncu >/dev/null || { echo "profile_attention.sh: ncu (Nsight Compute) is not on the PATH" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export MEGATRON_RCM_JIT_BUILD=1
python3 -c "import megatron_rcm.ops.fused_attention as f; assert f._C is not None" \
  || { echo "profile_attention.sh: the fused extension did not build" >&2; exit 2; }
raws=()
for spec in "$@"; do
  case=${spec%%:*}; op=${spec#*:}
  kernel=fwd_kernel; [ "$op" = bwd ] && kernel=bwd_kernel
  rep="$out/$case-$op"
  # The third launch: the first two warm the caches and the allocator.
  ncu --clock-control none --set full --metrics sm__cycles_active.avg,sm__cycles_active.max,dram__bytes_read.sum \
      -k "regex:$kernel" --launch-skip 2 --launch-count 1 -f -o "$rep" \
      python3 "$here/profile_attention.py" launch --case "$case" --op "$op" > "$rep.log" 2>&1 \
    || { echo "profile_attention.sh: ncu failed on $spec ($rep.log):" >&2; tail -5 "$rep.log" >&2; continue; }
  ncu --import "$rep.ncu-rep" --page raw --csv --print-units base > "$rep.raw.csv"
  ncu --import "$rep.ncu-rep" --page details > "$rep.details.txt"
  raws+=("$rep.raw.csv")
done
[ ${#raws[@]} -gt 0 ] || exit 1
python3 "$here/profile_attention.py" table "${raws[@]}"
