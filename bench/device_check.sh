#!/usr/bin/env bash
# The first run on a lent GPU machine, in steps of at most 4 minutes each (an H200), every one of
# which can run on its own and always reports:
#
#   bench/device_check.sh STEP [RESULTS_DIR]        STEP: build | test | bench | all
#                                                   RESULTS_DIR: default $OUT, else bench/out
#
#   build   environment (nvidia-smi, versions), carried wheels, the extension built in place for
#           sm_90 (FASTDISTILL_CUDA_ARCHS, default 90), an import check of every backend
#   test    the gpu-marked tests in three groups: the cuda backend, the triton backend (logit
#           level and features), linear_distill_loss (chunked and fused) on the GPU
#   bench   the static model (python -m fastdistill.bench.roofline --csv), then the GPU presets
#           of python -m fastdistill.bench with the model's predictions next to the measured
#           times (gpu-logits forward_kl and jsd, gpu-linear without torch.compile, gpu-feature),
#           then the calibration (measured / predicted per kernel family)
#   all     the three in order (about 12 minutes: more than one 600 s command; run the steps one
#           by one where a command has a time limit)
#
# A step that needs the extension builds it first when it is missing (unless a build already
# failed in RESULTS_DIR). A failed build is recorded and the Triton tests and benchmarks still
# run. Nothing stops at a failure: every item is recorded, passed / failed / skipped / timed out,
# in RESULTS_DIR/status.tsv, and RESULTS_DIR/summary.md is rewritten after every item (items a
# step had planned but did not reach are listed as such). Every item has its own log
# (RESULTS_DIR/<step>-<item>.log); the benchmarks write one CSV row per measured point as they go
# (RESULTS_DIR/bench-*/results.csv). The exit status is 1 if anything failed, else 0.
#
# For a machine with python3 (torch, triton, pytest, pybind11), nvcc and no network: nothing is
# downloaded. Wheels of missing packages can be carried in .whl/ (installed with --no-index into
# /tmp/site). PYTHON selects the interpreter (default python3); DEVICE_CHECK_STEP_SECONDS the
# time one step may take (default 230), which its items share.
set -uo pipefail
cd "$(dirname "$0")/.."

STEP="${1:-}"
case "$STEP" in
  build|test|bench|all) ;;
  *) echo "usage: bench/device_check.sh build|test|bench|all [RESULTS_DIR]" >&2; exit 2 ;;
esac
RESULTS="${2:-${OUT:-bench/out}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
PY="${PYTHON:-python3}"
STEP_SECONDS="${DEVICE_CHECK_STEP_SECONDS:-230}"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0                  # compiled Triton kernels, not the interpreter
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export FASTDISTILL_CUDA_ARCHS="${FASTDISTILL_CUDA_ARCHS:-90}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$RESULTS/status.tsv"
FAILED=0

# ---- recording ---------------------------------------------------------------------------------

# record STEP ITEM STATUS SECONDS DETAIL: one line of status.tsv (the last line of an item wins)
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(echo "$5" | tr '\t\n' '  ' | cut -c1-300)" \
    >>"$STATUS"
  case "$3" in failed|"timed out") FAILED=1 ;; esac
  summary
}

plan() {  # plan STEP ITEM...: items not reached unless recorded later
  local step="$1"; shift
  for item in "$@"; do record "$step" "$item" "not reached" 0 ""; done
}

summary() {
  "$PY" - "$STATUS" "$RESULTS/summary.md" <<'EOF' 2>/dev/null || cp "$STATUS" "$RESULTS/summary.md"
import sys, os, datetime, subprocess
status, out = sys.argv[1], sys.argv[2]
items = {}
for line in open(status):
    f = line.rstrip("\n").split("\t")
    if len(f) >= 5:
        items[(f[0], f[1])] = f[2:5]
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10).stdout.strip() or "unknown"
except Exception:
    commit = "unknown"
device = open(os.path.join(os.path.dirname(status), "device.txt")).read().strip() \
    if os.path.exists(os.path.join(os.path.dirname(status), "device.txt")) else "unknown"
counts = {}
for s, _, _ in items.values():
    counts[s] = counts.get(s, 0) + 1
lines = [f"# device check summary", "",
         f"{datetime.datetime.now().isoformat(timespec='seconds')} | commit {commit} | "
         f"device: {device}", "",
         "totals: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), "",
         "| step | item | status | seconds | detail |", "|---|---|---|---|---|"]
for (step, item), (s, sec, detail) in items.items():
    detail = detail.replace("|", "/").strip()
    lines.append(f"| {step} | {item} | {s.upper() if s in ('failed', 'timed out') else s} | "
                 f"{sec} | {detail} |")
not_reached = [f"{st}: {it}" for (st, it), (s, _, _) in items.items() if s == "not reached"]
if not_reached:
    lines += ["", "not reached: " + "; ".join(not_reached)]
open(out, "w").write("\n".join(lines) + "\n")
EOF
}

STEP_START=0
remaining() { echo $((STEP_SECONDS - (SECONDS - STEP_START))); }

# run_item STEP ITEM CAP_SECONDS CMD...: runs CMD with a time limit (the smaller of CAP and what
# is left of the step), output to RESULTS/STEP-ITEM.log; records passed / failed / timed out.
# The detail is the last line of the log matching DETAIL_RE (default: the last line).
run_item() {
  local step="$1" item="$2" cap="$3"; shift 3
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  local log="$RESULTS/$step-$(echo "$item" | tr ' /():,' '______' | tr -s '_').log"
  if (( limit < 5 )); then
    record "$step" "$item" "not reached" 0 "the step's ${STEP_SECONDS}s were spent"
    return 1
  fi
  echo "==== $step: $item (limit ${limit}s) -> $log"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local detail
  detail=$(grep -E "${DETAIL_RE:-.}" "$log" | tail -n 1)
  tail -n 5 "$log"
  if (( rc == 124 || rc == 137 )); then
    record "$step" "$item" "timed out" $((SECONDS - t0)) "after ${limit}s; $detail"
  elif (( rc == 0 )); then
    record "$step" "$item" "passed" $((SECONDS - t0)) "$detail"
  else
    record "$step" "$item" "failed" $((SECONDS - t0)) "exit $rc; $detail"
  fi
  return $rc
}

has_gpu() {
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

extension_built() { compgen -G "fastdistill/_C*.so" >/dev/null; }

# ---- steps -------------------------------------------------------------------------------------

export PY
ENV_REPORT='
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  || echo "nvidia-smi: not available"
"$PY" -c "import sys, torch; print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| cuda\", torch.version.cuda, \"| device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
"$PY" -c "import triton; print(\"triton\", triton.__version__)" || echo "triton: missing"
if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"; fi
echo "carried wheels: $(ls .whl 2>/dev/null | tr "\n" " ")"'

step_build() {
  STEP_START=$SECONDS
  plan build "environment" "extension (sm_${FASTDISTILL_CUDA_ARCHS})" "import check"
  run_item build "environment" 30 bash -c "$ENV_REPORT"
  # the ptxas report of every kernel (registers, spills) stays in the log
  # at most 200 s, leaving time for the import check (30 s, or a third of a short step)
  local left reserve cap
  left=$(remaining); reserve=$(( left / 3 < 30 ? left / 3 : 30 ))
  cap=$(( left - reserve )); cap=$(( cap > 200 ? 200 : cap ))
  DETAIL_RE="^\[fastdistill build\]|error|Error" run_item build "extension (sm_${FASTDISTILL_CUDA_ARCHS})" "$cap" \
    "$PY" setup.py build_ext --inplace
  if [ $? -ne 0 ]; then
    echo "the build failed: the Triton tests and benchmarks still run (see the summary)"
  fi
  DETAIL_RE="^fastdistill" run_item build "import check" 40 "$PY" -c '
import fastdistill as fd
from fastdistill.backends import _ext
import fastdistill.kernels.distill, fastdistill.kernels.linear
print("extension:", "loaded" if _ext._C is not None else f"missing ({_ext.LOAD_ERROR})",
      "| cuda kernels:", getattr(_ext._C, "has_cuda", False),
      "| archs:", getattr(_ext._C, "cuda_archs", None))
print("fastdistill", fd.__version__, "| backends:", fd.backends.summary())'
}

ensure_build() {  # for test and bench run on their own
  if extension_built; then return 0; fi
  if grep -qP "^build\textension[^\t]*\t(failed|timed out)" "$STATUS" 2>/dev/null; then
    echo "the extension is missing and its build failed earlier: going on without it"
    return 0
  fi
  DETAIL_RE="^\[fastdistill build\]|error|Error" run_item "$1" "build the extension first" 150 \
    "$PY" setup.py build_ext --inplace
}

step_test() {
  STEP_START=$SECONDS
  local groups=("gpu tests: cuda backend" "gpu tests: triton backend (logits, features)"
                "gpu tests: linear_distill_loss (chunked, fused)")
  plan test "${groups[@]}"
  ensure_build test
  local xdist=() pyt=("$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider)
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  if ! has_gpu; then
    local n
    n=$("${pyt[@]}" --collect-only tests 2>/dev/null | grep -cE "::")
    for g in "${groups[@]}"; do
      record test "$g" skipped 0 "no CUDA device ($n gpu-marked tests collected, none run)"
    done
    return 0
  fi
  DETAIL_RE="passed|failed|error|skipped" run_item test "${groups[0]}" 70 \
    "${pyt[@]}" "${xdist[@]}" -k "cuda and not linear" tests/test_gpu_backends.py
  DETAIL_RE="passed|failed|error|skipped" run_item test "${groups[1]}" 100 \
    "${pyt[@]}" "${xdist[@]}" -k "not cuda" tests/test_gpu_backends.py
  DETAIL_RE="passed|failed|error|skipped" run_item test "${groups[2]}" 90 \
    "${pyt[@]}" "${xdist[@]}" tests/test_linear.py
}

step_bench() {
  STEP_START=$SECONDS
  local presets=("model: roofline sm_90" "gpu-logits forward_kl" "gpu-logits jsd"
                 "gpu-linear (no torch.compile)" "gpu-feature" "calibration")
  plan bench "${presets[@]}"
  ensure_build bench
  local model="$RESULTS/roofline.csv" jobs
  jobs=$(nproc 2>/dev/null || echo 2); jobs=$(( jobs > 8 ? 8 : jobs ))
  DETAIL_RE="^csv:|Error" run_item bench "${presets[0]}" 60 \
    "$PY" -m fastdistill.bench.roofline --arch 90 --csv "$model" --jobs "$jobs"
  if ! has_gpu; then
    for p in "${presets[@]:1:4}"; do record bench "$p" skipped 0 "no CUDA device"; done
    record bench "${presets[5]}" skipped 0 "no measured times"
    return 0
  fi
  local pred=()
  [ -s "$model" ] && pred=(--predicted "$model")
  # name budget(s) args...: points not started within the budget are reported as skipped
  bench_preset() {
    local name="$1" budget="$2" out="$3"; shift 3
    DETAIL_RE="^\[|copy bandwidth" run_item bench "$name" $((budget + 25)) \
      "$PY" -m fastdistill.bench --no-plot --budget "$budget" --out "$RESULTS/$out" "${pred[@]}" "$@"
  }
  bench_preset "${presets[1]}" 45 bench-gpu-logits-forward_kl --preset gpu-logits --divergence forward_kl
  bench_preset "${presets[2]}" 30 bench-gpu-logits-jsd --preset gpu-logits --divergence jsd
  bench_preset "${presets[3]}" 45 bench-gpu-linear --preset gpu-linear --exclude torch-compile
  bench_preset "${presets[4]}" 20 bench-gpu-feature --preset gpu-feature
  local results=()
  for f in "$RESULTS"/bench-*/results.csv; do [ -s "$f" ] && results+=("$f"); done
  if [ -s "$model" ] && [ ${#results[@]} -gt 0 ]; then
    DETAIL_RE="factor|no measured" run_item bench "${presets[5]}" 30 bash -c \
      "'$PY' -m fastdistill.bench.roofline --model '$model' --calibrate ${results[*]} | tee '$RESULTS/calibration.md'"
  else
    record bench "${presets[5]}" skipped 0 "no model or no measured points"
  fi
}

# ---- main --------------------------------------------------------------------------------------

{ nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 \
    || echo "no CUDA device"; } >"$RESULTS/device.txt"
[ -s "$RESULTS/device.txt" ] || echo "no CUDA device (nvidia-smi not available)" >"$RESULTS/device.txt"
touch "$STATUS"
# carried wheels (.whl/*.whl), installed once into /tmp/site for every step
if compgen -G ".whl/*.whl" >/dev/null; then
  [ -e /tmp/site/.carried ] || { "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >"$RESULTS/wheels.log" 2>&1 \
      && touch /tmp/site/.carried; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  export PATH="/tmp/site/bin:$PATH"   # the carried wheels' programs (setup.py needs ninja)
fi
case "$STEP" in
  build) step_build ;;
  test) step_test ;;
  bench) step_bench ;;
  all) step_build; step_test; step_bench ;;
esac
summary
echo
cat "$RESULTS/summary.md"
exit "$FAILED"
