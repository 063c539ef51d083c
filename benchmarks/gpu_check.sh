#!/usr/bin/env bash
# The GPU check of sampleclr-scale, in one command on a fresh CUDA machine (under 8 minutes
# on one H200): a virtual environment with a CUDA build of torch, the tests marked `gpu`,
# and the GPU training benchmark (streamed vs device-resident bags, bf16, 1 worker).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR: default $OUT, else bench_out/gpu
#
# Writes into OUT_DIR: gpu_tests.log (pytest), ingest.json and train_gpu.json (the
# benchmarks' figures), gpu_check.log (everything else), summary.txt. Exits non-zero when
# there is no usable GPU, an install or a test fails, or the benchmark fails.
#
# Needs: the repository checkout (run from anywhere), Python 3.11+, an NVIDIA driver, and
# either the package registry or carried wheels.
# - Online: the venv (GPU_CHECK_VENV, default .venv-gpu) sees the system's packages, so a
#   CUDA torch already installed there is used as it is; otherwise `pip install torch`
#   takes the default index's CUDA build (TORCH_INDEX_URL to choose another, e.g.
#   https://download.pytorch.org/whl/cu128 for an older driver).
# - Offline, on a machine whose python3 holds a CUDA torch and the common scientific
#   packages: when GPU_CHECK_WHEELS (default: the checkout's .whl) holds the wheels of
#   benchmarks/gpu_wheels.sh, they are installed into a scratch folder on PYTHONPATH and
#   the package runs from the checkout. Ray is too large to carry, so this mode leaves
#   out the test marked ray and trains in-process (`bench train --in-process`).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${OUT:-$ROOT/bench_out/gpu}}"
mkdir -p "$RESULTS" && RESULTS="$(cd "$RESULTS" && pwd)" || exit 2
VENV="${GPU_CHECK_VENV:-$ROOT/.venv-gpu}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
OFFLINE=false
compgen -G "$WHEELS/*.whl" >/dev/null && OFFLINE=true
if $OFFLINE; then  # the python3 that holds a CUDA torch
  PYTHON="${PYTHON:-$(command -v python3)}"
else
  PYTHON="${PYTHON:-$(command -v python3.12 || command -v python3.11 || command -v python3)}"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOG="$RESULTS/gpu_check.log"
BENCH_CELLS="${GPU_CHECK_CELLS:-1000000}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$ROOT" || exit 2
start=$SECONDS

say() { echo "[gpu_check $((SECONDS - start))s] $*" | tee -a "$LOG"; }
fail() { say "FAILED: $*"; say "logs in $RESULTS"; exit 1; }

say "results in $RESULTS, venv $VENV, scratch $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1 \
  || say "nvidia-smi failed (continuing: torch decides)"

# --- install -----------------------------------------------------------------------------
if $OFFLINE; then
  say "offline: installing the wheels of $WHEELS for $PYTHON"
  PY="$PYTHON"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl >>"$LOG" 2>&1 || fail "pip install of $WHEELS"
  export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  export SAMPLECLR_TESTS_WITHOUT_S3=1  # moto (the local S3 server) is not carried
  CLI=("$PY" -m sampleclr_scale.cli)
  MARKERS="gpu and not ray"
  IN_PROCESS=(--in-process)
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1 \
    || fail "cannot create the venv with $PYTHON"
  PY="$VENV/bin/python"
  if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' >>"$LOG" 2>&1; then
    say "installing torch (CUDA build)"
    "$PY" -m pip install -q torch ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      >>"$LOG" 2>&1 || fail "pip install torch"
  fi
  say "installing sampleclr-scale[dev]"
  "$PY" -m pip install -q -e '.[dev]' >>"$LOG" 2>&1 || fail "pip install -e .[dev]"
  CLI=("$VENV/bin/sampleclr-scale")
  MARKERS="gpu"
  IN_PROCESS=()
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG" || fail "torch sees no CUDA GPU"
import sys, torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name() if ok else 'none'}")
sys.exit(0 if ok else 1)
EOF

# --- the benchmark's cohort, simulated and ingested while the tests run (CPU only) --------
say "simulating and ingesting a ${BENCH_CELLS}-cell cohort in the background"
"${CLI[@]}" bench ingest --cells "$BENCH_CELLS" --dim 50 --workdir "$WORK/ingest" \
  --json "$RESULTS/ingest.json" >"$WORK/ingest.log" 2>&1 &
ingest_pid=$!

# --- the tests marked gpu ----------------------------------------------------------------
say "running the tests marked $MARKERS"
"$PY" -m pytest -q -p no:cacheprovider -m "$MARKERS" -rs tests/test_gpu.py >"$RESULTS/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$RESULTS/gpu_tests.log" | tee -a "$LOG"
if [ "$tests_rc" -eq 0 ] && grep -qE "[0-9]+ skipped" "$RESULTS/gpu_tests.log"; then
  say "a test marked gpu was skipped on this machine"; tests_rc=1
fi

# --- the GPU training benchmark ----------------------------------------------------------
wait "$ingest_pid" || { cat "$WORK/ingest.log" >>"$LOG"; fail "bench ingest"; }
say "benchmark: bench train --use-gpu --resident never always"
"${CLI[@]}" bench train "${IN_PROCESS[@]}" --store "$WORK/ingest/store_${BENCH_CELLS}.zarr" \
  --workers 1 --use-gpu --resident never always --epochs 4 \
  --json "$RESULTS/train_gpu.json" >>"$LOG" 2>&1
bench_rc=$?

# --- summary -----------------------------------------------------------------------------
{
  echo "gpu_check: $((SECONDS - start)) s"
  echo "tests marked gpu: $([ "$tests_rc" -eq 0 ] && echo passed || echo "FAILED (rc $tests_rc)")"
  echo "  $(grep -E '[0-9]+ (passed|failed|error)' "$RESULTS/gpu_tests.log" | tail -n 1)"
  echo "benchmark: $([ "$bench_rc" -eq 0 ] && echo "done" || echo "FAILED (rc $bench_rc)")"
  [ "$bench_rc" -eq 0 ] && "$PY" - "$RESULTS/train_gpu.json" <<'EOF'
import json, sys
figures = json.load(open(sys.argv[1]))
print(f"  {figures['device']}, {figures['preset']} preset, B = {figures['batch_size']}, "
      f"m = {figures['cells_per_view']}")
for run in figures["runs"]:
    print(f"  resident {run['resident']:>6}: {run['donors_per_s']:>9,.1f} donors/s, step "
          f"{1000 * run['step_s']:.1f} ms, waiting {100 * run['waiting_for_data']:.1f} %, "
          f"peak GPU memory {run.get('gpu_peak_mb', float('nan')):,.0f} MB")
EOF
} | tee "$RESULTS/summary.txt" | tee -a "$LOG"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
