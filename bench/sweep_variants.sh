#!/usr/bin/env bash
# Which of several kernel changes is faster, before one lands: builds a copy of the working tree
# per patch (applied with `git apply`, all builds in parallel) and runs the decode benchmark on
# each copy and on the unpatched tree, one after another. The JSON of each goes to
# $OUT/variants/<patch name>/decode_h200.json (the unpatched tree: .../base/).
# Usage, from the repository root (the unpatched tree is built first if it is not):
#   bash bench/sweep_variants.sh PATCH_DIR [bench_mla_decode.py arguments]
# e.g. bash bench/sweep_variants.sh carry/variants --targets --models llama2,llama3 --repeat 5
# SWEEP_PACK=1 packs $OUT/variants into $OUT/variants.tar.gz at the end.
set -uo pipefail
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: bash bench/sweep_variants.sh PATCH_DIR [bench_mla_decode.py arguments]" >&2
  exit 2
fi
patch_dir=$(cd "$1" && pwd); shift
OUT=${OUT:-bench/results}
root=$PWD
case $OUT in /*) ;; *) OUT=$root/$OUT ;; esac
work=${SWEEP_DIR:-/tmp/mla_ext_variants}
patches=("$patch_dir"/*.patch)
[ -e "${patches[0]}" ] || { echo "no *.patch in $patch_dir" >&2; exit 2; }
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} PYTHONUNBUFFERED=1
jobs_each=$(( $(nproc) / (${#patches[@]} + 1) )); [ "$jobs_each" -ge 1 ] || jobs_each=1
rm -rf "$work"; mkdir -p "$work" "$OUT/variants"
names=()
apply_patch() { if command -v git > /dev/null; then git apply "$1"; else patch -p1 < "$1"; fi; }
for p in "${patches[@]}"; do
  name=$(basename "$p" .patch); names+=("$name")
  mkdir -p "$work/$name"
  # the source tree without its build outputs and carried data
  tar -C "$root" --exclude=./build --exclude=./carry --exclude=./.venv --exclude='*.so' -cf - . |
    tar -C "$work/$name" -xf -
  (cd "$work/$name" && apply_patch "$p" && MAX_JOBS=$jobs_each python3 setup.py build_ext --inplace \
     > "$OUT/variants/$name.build.log" 2>&1; echo "build $name: exit $?") &
done
# the unpatched tree too, unless it is built already
if ! ls "$root"/mla_ext/_C*.so > /dev/null 2>&1; then
  (MAX_JOBS=$jobs_each python3 setup.py build_ext --inplace > "$OUT/variants/base.build.log" 2>&1
   echo "build base: exit $?") &
fi
wait
run_bench() {  # name, tree
  mkdir -p "$OUT/variants/$1"
  (cd "$2" && PYTHONPATH=$2 python3 bench/bench_mla_decode.py --out "$OUT/variants/$1" "${@:3}") \
    > "$OUT/variants/$1.bench.log" 2>&1
  echo "bench $1: exit $?"; grep " us " "$OUT/variants/$1.bench.log" | tail -n 60  # the result rows
}
run_bench base "$root" "$@"
for name in "${names[@]}"; do run_bench "$name" "$work/$name" "$@"; done
# The device tool brings back only a few files per call: everything in one archive.
if [ -n "${SWEEP_PACK:-}" ]; then
  tar -C "$OUT" -czf "$OUT/variants.tar.gz" variants && rm -rf "$OUT/variants"
  echo "packed $OUT/variants.tar.gz"
fi
