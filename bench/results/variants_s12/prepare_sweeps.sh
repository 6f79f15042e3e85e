#!/usr/bin/env bash
# Copies the patches of the next session's sweeps (README.md, "Suggested order") into
# carry/sweep_a, carry/sweep_l2, carry/sweep_b and carry/sweep_b2, numbered in build order, and prints the command
# each device call runs (with carry: ["carry"]). Run from the repository root.
set -euo pipefail
here=bench/results/variants_s12
s11=bench/results/variants_s11/next
[ -d "$here" ] && [ -d "$s11" ] || { echo "run from the repository root" >&2; exit 2; }

fill() {  # directory, patches in build order
  local dir=$1; shift
  rm -rf "$dir"; mkdir -p "$dir"
  local i=1
  for p in "$@"; do
    git apply --check "$p" || { echo "$p does not apply to this tree" >&2; exit 1; }
    cp "$p" "$dir/${i}_$(basename "$p" | sed 's/^[0-9]*_//')"
    i=$((i + 1))
  done
}

fill carry/sweep_a "$here/d/1_ws_rope_ring.patch" "$s11/a/1_ws_producer_warps.patch" \
  "$here/j/1_ws_rope_ring_producer_warps.patch" "$here/c/1_ws_plan_len.patch" \
  "$here/c/2_pdl_combine.patch" "$here/h/1_all_s12.patch"
fill carry/sweep_l2 "$here/g/1_ws_rope_ring_d512_tile32.patch" "$here/h/1_all_s12.patch"
fill carry/sweep_b "$here/e/1_ws_quant_one_term_p.patch" "$here/f/1_ws_rope_ring_one_term_p.patch" \
  "$s11/a/4_ws_dequant_batched.patch" "$s11/a/5_ws_dequant_batched4_regs.patch"
# these change traits.h: every file rebuilds (~100 s each), hence a call of their own
fill carry/sweep_b2 "$s11/b/1_ws_fp8_keys.patch" "$s11/b/2_ws_dequant_batched_fp8_keys.patch" \
  "$here/i/1_all_s12_fp8_keys.patch"
ls carry/sweep_a carry/sweep_l2 carry/sweep_b carry/sweep_b2

common="--repeat 10 --no-baselines --shapes 32x16384,8x8192,1x4096"
cat <<EOF

Call A:  SWEEP_DIR=/tmp/sweep_a SWEEP_PACK=1 SWEEP_RESTORE=0 bash bench/sweep_variants.sh carry/sweep_a --models llama3 $common --formats bf16/bf16,int8/bf16
Call A2: SWEEP_DIR=/tmp/sweep_l2 SWEEP_PACK=1 SWEEP_RESTORE=0 bash bench/sweep_variants.sh carry/sweep_l2 --models llama2 $common --formats bf16/bf16
Call B:  SWEEP_DIR=/tmp/sweep_b SWEEP_PACK=1 SWEEP_RESTORE=0 bash bench/sweep_variants.sh carry/sweep_b --models llama3 $common --formats int8/bf16,int4/bf16
Call B2: SWEEP_DIR=/tmp/sweep_b2 SWEEP_PACK=1 SWEEP_RESTORE=0 bash bench/sweep_variants.sh carry/sweep_b2 --models llama3 $common --formats int4/fp8,int8/bf16
Tests in a snapshot: cd /tmp/sweep_X/NAME && OMP_NUM_THREADS=1 python3 -m pytest python_tests/test_ops_mla_decode.py -m gpu -n 8 -q -k "warpspec or choice or split or plan or graph"
EOF
