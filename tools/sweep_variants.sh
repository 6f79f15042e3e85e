#!/usr/bin/env bash
# Which of several kernel changes is faster, before one lands. The tree is built first (if it is
# not), then each patch in turn is applied to it (`git apply`, or `patch -p1`), rebuilt
# incrementally (ninja recompiles only what the patch touches: tens of seconds, not a full build),
# snapshotted with its extension into $SWEEP_DIR/<patch name>, and reverted. Then the decode
# benchmark runs on the unpatched tree's snapshot and on each variant's, one after another; the
# JSON of each goes to $OUT/variants/<patch name>/decode_h200.json (the unpatched tree:
# .../base/). A patch that does not apply or build is reported and skipped.
# Usage, from the repository root:
#   bash tools/sweep_variants.sh PATCH_DIR [bench_mla_decode.py arguments]
# e.g. bash tools/sweep_variants.sh carry/variants --targets --models llama2,llama3 --repeat 5
# SWEEP_PACK=1 packs $OUT/variants into $OUT/variants.tar.gz at the end. The snapshots stay in
# $SWEEP_DIR (default /tmp/mla_ext_variants) for tests: cd there and run pytest. At the end the tree
# is rebuilt as it was (SWEEP_RESTORE=0: not).
set -uo pipefail
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: bash tools/sweep_variants.sh PATCH_DIR [bench_mla_decode.py arguments]" >&2
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
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
rm -rf "$work"; mkdir -p "$work" "$OUT/variants"

build() {  # log name: an incremental build of the tree as it is now
  local t0=$SECONDS
  python3 setup.py build_ext --inplace > "$OUT/variants/$1.build.log" 2>&1
  local rc=$?
  echo "build $1: exit $rc after $((SECONDS - t0)) s"
  return $rc
}
apply_patch() {  # patch file, then -R to revert
  if command -v git > /dev/null; then git apply "${@:2}" "$1"; else patch -p1 "${@:2}" < "$1"; fi
}
snapshot() {  # name: the source tree with its built extension, without build outputs or data
  mkdir -p "$work/$1"
  tar -C "$root" --exclude=./build --exclude=./carry --exclude=./.venv -cf - . |
    tar -C "$work/$1" -xf -
}

build base || exit 1
snapshot base  # benchmarked from the snapshot: the tree itself is rebuilt per variant
names=()
for p in "${patches[@]}"; do
  name=$(basename "$p" .patch)
  if ! apply_patch "$p"; then
    echo "patch $name does not apply: skipped"
    continue
  fi
  build "$name" && { snapshot "$name"; names+=("$name"); }
  apply_patch "$p" -R || { echo "could not revert $name" >&2; exit 1; }
done

run_bench() {  # name, tree
  mkdir -p "$OUT/variants/$1"
  (cd "$2" && PYTHONPATH=$2 python3 bench/bench_mla_decode.py --out "$OUT/variants/$1" "${@:3}") \
    > "$OUT/variants/$1.bench.log" 2>&1
  echo "bench $1: exit $?"; grep " us " "$OUT/variants/$1.bench.log" | tail -n 60  # the result rows
}
run_bench base "$work/base" "$@"
for name in "${names[@]}"; do run_bench "$name" "$work/$name" "$@"; done
# Everything in one archive (a remote machine may return only a few files per command).
if [ -n "${SWEEP_PACK:-}" ]; then
  tar -C "$OUT" -czf "$OUT/variants.tar.gz" variants && rm -rf "$OUT/variants"
  echo "packed $OUT/variants.tar.gz"
fi
# The tree's extension is the last variant's until rebuilt (SWEEP_RESTORE=0 skips it when nothing
# runs in the tree afterwards: a patch to a widely included header makes it a full build).
if [ "${SWEEP_RESTORE:-1}" != 0 ]; then build base_again || exit 1; fi
