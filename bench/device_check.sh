#!/usr/bin/env bash
# Builds, tests and benchmarks fastdistill on a GPU machine, in one run of under ten minutes:
#
#   bench/device_check.sh [RESULTS_DIR]      (default: $OUT if set, else bench/out)
#
# For a machine with python3 (torch, triton, pytest, pybind11), nvcc and no network. Nothing is
# downloaded. Wheels of missing packages can be carried in .whl/ (pybind11, pytest,
# liger-kernel, pytest-benchmark, ...); when that folder holds any, they are installed with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# The extension is built in place for sm_90 only (FASTDISTILL_CUDA_ARCHS=90; setup.py needs ninja:
# the machine's, or a ninja wheel carried in .whl/). Then the gpu-marked tests run (cuda backend
# first, then triton), then bench/gpu_bench.py. A failing test run does not stop the
# benchmarks; the script exits non-zero if any step failed. RESULTS_DIR receives build.log,
# tests_cuda.log, tests_triton.log, bench.log, bench.json, bench.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-bench/out}}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0           # compiled Triton kernels, not the interpreter
export FASTDISTILL_CUDA_ARCHS=90
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
section() { echo; echo "==== $* [${SECONDS}s] ===="; }

section "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  || echo "nvidia-smi failed"
python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
EOF
command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"

section "carried wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  export PATH="/tmp/site/bin:$PATH"   # the carried wheels' programs (ninja)
  ls .whl
else
  echo "none (.whl/ is empty or missing)"
fi

section "build (sm_90)"
# the log holds ptxas's register / spill report of every kernel
if timeout 420 python3 setup.py build_ext --inplace >"$RESULTS/build.log" 2>&1; then
  grep -E "^\[fastdistill build\]" "$RESULTS/build.log" || true
  echo "kernels: $(grep -c 'Compiling entry function' "$RESULTS/build.log" || true)," \
       "with spills: $(grep -E '[1-9][0-9]* bytes spill' "$RESULTS/build.log" | wc -l)"
else
  echo "BUILD FAILED (tail of $RESULTS/build.log):"
  tail -n 40 "$RESULTS/build.log"
  exit 1
fi
python3 - <<'EOF'
import fastdistill as fd
from fastdistill.backends import _ext
assert _ext._C is not None, _ext.LOAD_ERROR
assert _ext._C.has_cuda, "fastdistill._C was built without CUDA kernels"
print("fastdistill", fd.__version__, "| cuda archs", _ext._C.cuda_archs, "|", fd.backends.summary())
EOF

section "gpu tests: cuda backend"
xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)
if ! timeout 240 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider "${xdist[@]}" \
    -k "cuda" tests >"$RESULTS/tests_cuda.log" 2>&1; then
  status=1
fi
tail -n 25 "$RESULTS/tests_cuda.log"

section "gpu tests: triton backend"
if ! timeout 180 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider "${xdist[@]}" \
    -k "not cuda" tests >"$RESULTS/tests_triton.log" 2>&1; then
  status=1
fi
tail -n 15 "$RESULTS/tests_triton.log"

section "benchmarks"
# python -m fastdistill.bench presets (fastdistill/bench/__main__.py): fastdistill's backends
# against torch eager, torch.compile and Liger-Kernel, each preset within its time budget
set -o pipefail
for preset in "gpu-logits:120:forward_kl" "gpu-logits:90:jsd" "gpu-linear:120:" "gpu-feature:60:"; do
  IFS=: read -r name budget div <<<"$preset"
  args=(--preset "$name" --budget "$budget" --out "$RESULTS/$name${div:+-$div}" --no-plot)
  [ -n "$div" ] && args+=(--divergence "$div")
  if ! timeout $((budget + 120)) python3 -m fastdistill.bench "${args[@]}" 2>&1 \
      | tee -a "$RESULTS/bench.log"; then
    status=1
  fi
  cp "$RESULTS/$name${div:+-$div}/results.csv" "$RESULTS/results_$name${div:+-$div}.csv" || true
done

section "done: status $status"
exit "$status"
