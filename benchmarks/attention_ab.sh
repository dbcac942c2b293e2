#!/bin/bash
# A/B of fused-attention kernel versions in one GPU session (benchmarks/attention_ab.py says why).
#
#   bash benchmarks/attention_ab.sh [--rounds N] NAME=DIR NAME=DIR ...
#
# Each DIR holds a version's megatron_rcm/ and csrc/: "." for this checkout, or an export such as
#   git archive REV megatron_rcm csrc | tar -x -C DIR
# (made where git is, and carried to the GPU machine). The first NAME is the base: the others' outputs are
# compared with its own, and only its runs time the cuDNN / flash SDPA peers. Needs a CUDA GPU and nvcc.
set -euo pipefail
rounds=2
if [ "${1:-}" = "--rounds" ]; then rounds=$2; shift 2; fi
[ $# -ge 2 ] || { echo "attention_ab.sh: give at least two NAME=DIR versions (the first is the base)" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
work=${AB_WORK:-/tmp/attention_ab}
mkdir -p "$work/out"; : > "$work/log"
names=()
for spec in "$@"; do
  name=${spec%%=*}; dir=${spec#*=}
  [ -d "$dir/megatron_rcm" ] && [ -d "$dir/csrc" ] || { echo "attention_ab.sh: $dir has no megatron_rcm/ and csrc/ ($spec)" >&2; exit 2; }
  mkdir -p "$work/$name"; rm -rf "$work/$name/megatron_rcm" "$work/$name/csrc"
  cp -r "$dir/megatron_rcm" "$dir/csrc" "$work/$name/"
  rm -f "$work/$name"/megatron_rcm/_fused_attention_C*.so  # each tree JIT-builds its own kernels
  names+=("$name")
done
tree_env() { echo "PYTHONPATH=$work/$1:${PYTHONPATH:-} TORCH_EXTENSIONS_DIR=$work/$1/ext MEGATRON_RCM_JIT_BUILD=1"; }
start=$(date +%s)
for name in "${names[@]}"; do
  (cd "$work/$name" && env $(tree_env "$name") python3 -c "import megatron_rcm.ops.fused_attention as f; assert f._C is not None; print('built')" \
     > "$work/$name.build" 2>&1) &
done
wait
for name in "${names[@]}"; do
  grep -q "^built$" "$work/$name.build" || { echo "attention_ab.sh: the fused extension of $name did not build (a CUDA GPU and nvcc are needed): $work/$name.build" >&2; exit 2; }
done
echo "built ${#names[@]} trees in $(( $(date +%s) - start )) s"
for round in $(seq "$rounds"); do
  for name in "${names[@]}"; do
    peers=(); [ "$name" = "${names[0]}" ] && peers=(--peers)
    (cd "$work/$name" && env $(tree_env "$name") python3 "$here/attention_ab.py" run "$name" "$work/out" "${peers[@]}" 2>&1 \
       | grep "^ROW" >> "$work/log") || echo "run of $name (round $round) failed"
  done
done
others=$(IFS=,; echo "${names[*]:1}")
python3 "$here/attention_ab.py" compare "$work/out" "${names[0]}" "$others" "$work/log"
