#!/usr/bin/env bash
# The one script a GPU session runs, from the repo root, on a machine with a CUDA GPU:
#   bash bench/gpu_check.sh [--quick]
# 1. installs carried wheels from .whl/ and slimmed ones from .carry/*.tar.xz (bench/slim_wheels.py), if any,
#    into /tmp/site (no network needed),
# 2. builds the CUDA extension kernels._C (csrc/) in place,
# 3. runs `pytest -m "gpu and not huge"` (4 xdist workers), then `pytest -m huge` (4+ GB tests, skipped on
#    CPU by default) one at a time,
# 4. runs every bench/gpu_*.py module (python -m bench.gpu_check) with baselines in the same process,
# 5. where ncu is on the PATH (GPU_NCU=0 skips it), profiles one launch of each kernel whose goal is
#    missed (bench/ncu_kernels.py: attention pointer/TMA loads at the Wan shape, Euler step, a copy),
# and writes under $OUT (default bench/results/gpu_<date>) six files: the results JSON (named by date
# and device), pytest_gpu.log, pytest_huge.log, bench.log, ncu.txt and logs.tgz (build, wheels, nvidia-smi,
# junit XML and each module's own JSON and log) -- few files, since the device tool returns at most eight.
# Time: build <= 45 s, tests <= GPU_TEST_TIMEOUT (150), huge tests <= GPU_HUGE_TIMEOUT (150; GPU_HUGE=0
# skips them), benchmarks <= GPU_BENCH_TIMEOUT (285, the modules share it, each at most GPU_MODULE_TIMEOUT =
# 90), ncu <= GPU_NCU_TIMEOUT (90): at most 12 minutes in all, more than one 10-minute device call, so a
# session runs tests and benchmarks in separate calls (GPU_BENCH=0, then GPU_TESTS=0). GPU_ONLY (e.g.
# attention,elementwise) limits the benchmark modules, GPU_TEST_K (e.g. attention) the tests (pytest -k),
# GPU_TESTS=0 skips them, GPU_BENCH=0 the benchmarks. The first H200 run
# took: wheels + build under 15 s, tests 120 s (4 xdist workers), modules 378 s, of which 100 s the data
# module timing out (it now skips at once without DALI; bench/results/20261126_nvidia-h200.md). The H100
# run at 23ee8ee: tests 150 s, attention + elementwise + attention_fp8 modules 260 s, ncu 31 s (457 s in
# all); models + trainer + models_hunyuan + data 185 s in a second call (bench/results/20261126_nvidia-h100.md).
# Where the tree has no .git, set WMSD_COMMIT to the commit it is (recorded in the JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""; [ "${1:-}" = "--quick" ] && QUICK="--quick"
OUT="${OUT:-bench/results/gpu_$(date -u +%Y%m%dT%H%M%S)}"
LOGS="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# a misspelt GPU_ONLY area is refused here, before the build and the tests spend device time
GPU_ONLY="${GPU_ONLY:-}"; GPU_ONLY="${GPU_ONLY// /}"
for area in ${GPU_ONLY//,/ }; do
  [ -f "bench/gpu_$area.py" ] || { echo "GPU_ONLY: no module bench/gpu_$area.py (areas: bench/gpu_check.py MODULES)"; exit 2; }
done
t0=$(date +%s)
step() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  step "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$LOGS/wheels.log" 2>&1
fi
for slim in .carry/*.tar.xz; do  # wheels slimmed to one GPU architecture (bench/slim_wheels.py), e.g. DALI
  [ -f "$slim" ] || continue
  step "installing $slim"
  $PY -m bench.slim_wheels install "$slim" --target /tmp/site >> "$LOGS/wheels.log" 2>&1 || step "  FAILED (wheels.log)"
done
# what an earlier call on this warm machine installed stays there
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$LOGS/nvidia_smi.csv" 2>&1

step "building kernels._C"
WMSD_BUILD_CUDA=1 timeout 45 $PY setup.py build_ext --inplace > "$LOGS/build_ext.log" 2>&1 \
  && step "build ok" || step "build FAILED (see build_ext.log in logs.tgz)"

if [ "${GPU_TESTS:-1}" = "1" ]; then
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_TEST_WORKERS:-4}"  # Triton compiles in parallel
SELECT=(); [ -n "${GPU_TEST_K:-}" ] && SELECT=(-k "$GPU_TEST_K")
# --continue-on-collection-errors: test modules that import diffusers (not in the image unless .whl is
# carried) fail to collect, and without xdist pytest then ran no test at all, the selected ones included.
# timeout sends SIGINT first: pytest then stops and still prints the failures so far and writes its XML
# (a plain kill lost both: on 2026-11-28 two failures of a run cut at its limit left no message)
pytest_run() {  # name seconds marker [pytest args]: tests into $OUT/<name>.log, XML into logs.tgz
  local name=$1 secs=$2 marker=$3; shift 3
  step "pytest -m '$marker' ($name, $secs s)"
  timeout -s INT -k 20 "$secs" $PY -m pytest -v "$@" -m "$marker" "${SELECT[@]}" -p no:cacheprovider \
    --timeout 120 --continue-on-collection-errors -rfE --junitxml "$LOGS/$name.xml" tests > "$OUT/$name.log" 2>&1
  step "pytest exit $? : $(tail -n 1 "$OUT/$name.log")"
}
pytest_run pytest_gpu "${GPU_TEST_TIMEOUT:-150}" "gpu and not huge" $XDIST
# the huge tests (4+ GB tensors, up to ~50 GB each) one at a time: four at once beside the others may not fit
[ "${GPU_HUGE:-1}" = "1" ] && pytest_run pytest_huge "${GPU_HUGE_TIMEOUT:-150}" "huge" -p no:xdist
fi

if [ "${GPU_BENCH:-1}" = "1" ]; then
step "benchmarks"
BENCH_S=${GPU_BENCH_TIMEOUT:-285}
ONLY=""; [ -n "${GPU_ONLY:-}" ] && ONLY="--only $GPU_ONLY"
timeout "$BENCH_S" $PY -m bench.gpu_check $QUICK $ONLY --out "$OUT" --work "$LOGS/modules" \
  --timeout "${GPU_MODULE_TIMEOUT:-90}" --budget $((BENCH_S - 10)) 2>&1 | tee "$OUT/bench.log"
fi
if command -v ncu > /dev/null && [ "${GPU_NCU:-1}" = "1" ]; then
  step "ncu (bench.ncu_kernels)"
  timeout "${GPU_NCU_TIMEOUT:-90}" ncu --profile-from-start off --nvtx \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section WarpStateStats $PY -m bench.ncu_kernels > "$OUT/ncu.txt" 2>&1
  step "ncu exit $? : $(grep -c 'Section: GPU Speed Of Light' "$OUT/ncu.txt") kernel reports"
fi
tar czf "$OUT/logs.tgz" -C "$LOGS" . && rm -rf "$LOGS"
step "done"
