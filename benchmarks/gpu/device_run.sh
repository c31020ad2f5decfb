#!/usr/bin/env bash
# The one prepared run on the GPU machine (benchmarks/gpu/README.md), after receive_part.sh has received every part:
# install onnxruntime-gpu from the parts into $WORK/site and lowbit as a symlinked package into $WORK/pkg (no index,
# no pip), check that the CUDA execution provider runs, build random-weight checkpoints, convert them, compare CUDA
# with the CPU (parity.py) and benchmark CUDA against transformers + torch (gpu_bench.py). Everything lands in $OUT:
# log.txt (all output), phases.txt (phase, exit code, seconds), env.json, parity.jsonl, bench.jsonl, bench.md.
#
# Environment: OUT (required), LOWBIT_GPU_WORK (/tmp/lowbit-gpu), LOWBIT_GPU_PYTHON (python3),
# LOWBIT_GPU_MODELS ("tiny smollm2-135m llama-3.2-1b"), LOWBIT_GPU_8B=1 (adds llama-3.1-8b: benchmark only, minutes),
# LOWBIT_GPU_SCHEMES ("q0f16 w4a16 q4f16_1", target ort), LOWBIT_GPU_TRT_MODELS ("tiny smollm2-135m": also q0f16
# --target tensorrt), LOWBIT_GPU_DEADLINE (480: seconds after which no phase runs on), LOWBIT_GPU_DRY_RUN=1 (stop after
# the install and the import check: no GPU needed), LOWBIT_GPU_PROVIDER=cpu (a rehearsal on a machine without a GPU:
# no install, this python's own onnxruntime, everything else as on the GPU but on the CPU provider),
# LOWBIT_GPU_BENCH_ARGS (more gpu_bench.py options, e.g. "--repeats 1").
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
: "${OUT:?set OUT}"
WORK=${LOWBIT_GPU_WORK:-/tmp/lowbit-gpu}
PY=${LOWBIT_GPU_PYTHON:-python3}
MODELS=${LOWBIT_GPU_MODELS:-tiny smollm2-135m llama-3.2-1b}
SCHEMES=${LOWBIT_GPU_SCHEMES:-q0f16 w4a16 q4f16_1}
TRT_MODELS=${LOWBIT_GPU_TRT_MODELS:-tiny smollm2-135m}
DEADLINE=${LOWBIT_GPU_DEADLINE:-480}
PROVIDER=${LOWBIT_GPU_PROVIDER:-cuda}
GPU=$REPO/benchmarks/gpu
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
[ "${LOWBIT_GPU_8B:-0}" = 1 ] && MODELS="$MODELS llama-3.1-8b"
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)

# phase NAME CMD...: run CMD (a command under `timeout`, or a function, which is given $LEFT) with what is left of the
# deadline; its exit code and seconds go to phases.txt
phase() {
  local name=$1 t0=$SECONDS rc
  shift
  LEFT=$((DEADLINE - SECONDS))
  if [ "$LEFT" -lt 15 ]; then
    echo "=== $name: SKIPPED, out of time"; echo "$name skipped 0" >> "$OUT/phases.txt"; return 1
  fi
  echo "=== $name (${SECONDS}s in, ${LEFT}s left): $*"
  if declare -F "$1" > /dev/null; then "$@"; else timeout --kill-after=10 "$LEFT" "$@"; fi
  rc=$?
  echo "=== $name: exit $rc, $((SECONDS - t0))s"
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/phases.txt"
  return $rc
}

# convert HF OUT ARGS...: lowbit convert into $WORK/onnx/OUT, its output in $WORK/logs/convert-OUT.log (tail shown)
convert() {
  local log=$WORK/logs/convert-$2.log rc
  mkdir -p "$WORK/logs"
  timeout --kill-after=10 "$LEFT" "$PY" -m lowbit convert "$WORK/hf/$1" -o "$WORK/onnx/$2" "${@:3}" --overwrite \
    > "$log" 2>&1
  rc=$?
  tail -n $([ $rc = 0 ] && echo 1 || echo 20) "$log"
  return $rc
}

install_ort() {
  "$PY" "$GPU/parts.py" install "$WORK/site" || return 1
  # onnxruntime.preload_dlls() looks for nvidia/*/lib beside the onnxruntime package: link pip's nvidia folder there
  local nv
  nv=$("$PY" -c "import nvidia, os; print(os.pathsep.join(p for p in nvidia.__path__ if '$WORK' not in p))" \
       2>/dev/null | cut -d: -f1)
  if [ -n "$nv" ] && [ ! -e "$WORK/site/nvidia" ]; then ln -s "$nv" "$WORK/site/nvidia"; fi
  echo "pip's nvidia packages: ${nv:-none}"
}

link_lowbit() {
  # lowbit without pip: the package-dir mapping of pyproject.toml as symlinks (lowbit/ plus converter, runtime,
  # custom_ops as its subpackages); commands run from $WORK so the checkout's own lowbit/ never shadows it
  rm -rf "$WORK/pkg" && mkdir -p "$WORK/pkg/lowbit"
  local f
  for f in "$REPO"/lowbit/*; do ln -s "$f" "$WORK/pkg/lowbit/"; done
  for f in converter runtime custom_ops; do ln -s "$REPO/$f" "$WORK/pkg/lowbit/$f"; done
}

declare -A FOLDERS  # model -> its converted folders (parity.py and gpu_bench.py take them)

# prepare MODEL: the random-weight checkpoint, then each scheme's conversion (and q0f16 --target tensorrt)
prepare() {
  local m=$1 s
  phase "model-$m" "$PY" "$GPU/../random_model.py" "$m" "$WORK/hf/$m" || return 1
  for s in $SCHEMES; do
    phase "convert-$m-$s" convert "$m" "$m-$s" --scheme "$s" --target ort && FOLDERS[$m]+=" $WORK/onnx/$m-$s"
  done
  if [[ " $TRT_MODELS " == *" $m "* ]] \
      && phase "convert-$m-q0f16-trt" convert "$m" "$m-q0f16-trt" --scheme q0f16 --target tensorrt; then
    FOLDERS[$m]+=" $WORK/onnx/$m-q0f16-trt"
  fi
}

# parity_model MODEL: its folders on CUDA against the CPU (not the 8B model: its CPU side alone takes minutes)
parity_model() {
  local m=$1
  [ "$m" = llama-3.1-8b ] || [ -z "${FOLDERS[$m]:-}" ] && return 0
  # shellcheck disable=SC2086  # the folder list splits on spaces
  phase "parity-$m" "$PY" "$GPU/parity.py" ${FOLDERS[$m]} --provider "$PROVIDER" --jsonl "$OUT/parity.jsonl"
}

# bench_model MODEL: its folders on CUDA, then transformers + torch on its checkpoint (not for the tiny model)
bench_model() {
  local m=$1
  [ "$m" = tiny ] || [ -z "${FOLDERS[$m]:-}" ] && return 0
  # shellcheck disable=SC2086  # the folder list splits on spaces
  phase "bench-$m" "$PY" "$GPU/gpu_bench.py" ${FOLDERS[$m]} --anchor "$WORK/hf/$m" --provider "$PROVIDER" \
    ${LOWBIT_GPU_BENCH_ARGS:-} --jsonl "$OUT/bench.jsonl" --markdown "$OUT/bench.md"
}

main() {
  echo "device_run.sh: $(date -u +%FT%TZ) repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?))"
  echo "work $WORK, out $OUT, python $("$PY" --version 2>&1), $(nproc) cores, models: $MODELS; schemes: $SCHEMES"
  if [ "$PROVIDER" = cuda ]; then
    phase install install_ort || { echo "FAILED: onnxruntime-gpu is not installed (see above)"; return 2; }
  fi
  link_lowbit
  export PYTHONPATH="$WORK/site:$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
  local libs  # every nvidia/*/lib of pip's CUDA packages, for the CUDA EP's own dlopen in processes that do not preload
  libs=$("$PY" -c "import glob, os, nvidia; print(':'.join(dict.fromkeys(os.path.realpath(d) for p in nvidia.__path__
                   for d in sorted(glob.glob(os.path.join(p, '*', 'lib'))))))" 2>/dev/null)
  echo "LD_LIBRARY_PATH += ${libs:-nothing}"
  export LD_LIBRARY_PATH="${libs:+$libs:}${LD_LIBRARY_PATH:-}"
  cd "$WORK" || return 2
  if [ "${LOWBIT_GPU_DRY_RUN:-0}" = 1 ] || [ "$PROVIDER" = cpu ]; then
    phase check "$PY" "$GPU/check_cuda.py" "$OUT/env.json" --dry-run "--$PROVIDER" || return 3
    [ "$PROVIDER" = cpu ] || return 0
  else phase check "$PY" "$GPU/check_cuda.py" "$OUT/env.json" || {
    echo "FAILED: the CUDA execution provider does not run here; env.json says why (no model was built)"; return 3; }
  fi

  # order: what is quick and most telling first, so that the deadline, if it comes, cuts the least: parity of the
  # small models (a minute), the benchmarks, then parity of the larger ones (their CPU side is the slow part)
  local m small="tiny smollm2-135m"
  for m in $MODELS; do [ "$m" = llama-3.1-8b ] || prepare "$m"; done
  for m in $MODELS; do [[ " $small " != *" $m "* ]] || parity_model "$m"; done
  for m in $MODELS; do [ "$m" = llama-3.1-8b ] || bench_model "$m"; done
  for m in $MODELS; do [[ " $small " == *" $m "* ]] || parity_model "$m"; done
  if [[ " $MODELS " == *" llama-3.1-8b "* ]]; then prepare llama-3.1-8b && bench_model llama-3.1-8b; fi
  du -sh "$WORK"/onnx/* 2>/dev/null
  nvidia-smi 2>/dev/null | head -20
  echo "device_run.sh done in ${SECONDS}s; phases:"; cat "$OUT/phases.txt"
}

main 2>&1 | tee -a "$OUT/log.txt"
