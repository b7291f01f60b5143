#!/usr/bin/env bash
# One command that checks and benchmarks sparse_attn on a fresh GPU machine (docs/gpu.md):
#
#   bash bench/gpu/run.sh OUTDIR [--cpu] [--build] [--budget SECONDS]
#
# Stages, each under its own `timeout` inside one overall budget (default 500 s), so that a hung
# stage cannot eat the others' time; the summary table is printed even when stages fail:
#   env        versions, device, clocks                                  -> env.txt
#   build      a fresh copy of the tree built in a temporary folder,
#              CUDA kernels for sm_90a only, all cores                   -> build.log
#   tests      the whole test suite (CPU and CUDA via tests/conftest.py)  -> tests.log, tests.xml
#   bench      bench/gpu/bench_gpu.py: the specification's targets        -> bench.json, bench.log
#   memcheck, racecheck, synccheck
#              compute-sanitizer over bench/gpu/ops_smoke.py              -> sanitizer.log
#   summary    bench/gpu/summary.py                                       -> summary.txt
# (8 files in OUTDIR.) --cpu: no GPU needed; a test subset, small benchmark sizes, the smoke
# script without a sanitizer, and the prebuilt extension copied instead of a build (--build
# builds it, CPU only, a few minutes on 2 cores): every stage's code runs, as CI needs.
set -uo pipefail

usage() { echo "usage: bash bench/gpu/run.sh OUTDIR [--cpu] [--build] [--budget SECONDS]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$1; shift
MODE=gpu; BUILD=; BUDGET=${GPU_SCRIPT_BUDGET_S:-500}
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) MODE=cpu ;;
    --build) BUILD=1 ;;
    --budget) [[ $# -ge 2 ]] || usage; BUDGET=$2; shift ;;
    *) usage ;;
  esac
  shift
done
[[ $MODE == gpu ]] && BUILD=1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "cannot create $OUT" >&2; exit 2; }
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sparse_attn_gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/src
STAGES=$WORK/stages.tsv
: >"$STAGES"
START=$SECONDS
NPROC=$(nproc 2>/dev/null || echo 4)

left() { echo $((BUDGET - (SECONDS - START))); }

# stage NAME CAP KEEP LOG CMD...: run CMD with a time limit of min(CAP, time left - KEEP) seconds
# (KEEP: seconds kept back for the stages after it), appending its output to LOG; records the
# outcome in $STAGES. Returns CMD's status.
stage() {
  local name=$1 cap=$2 keep=$3 log=$4; shift 4
  local limit=$(($(left) - keep))
  ((limit > cap)) && limit=$cap
  if ((limit < 5)); then
    printf '%s\tskipped\t0\t%s\n' "$name" "no time left" >>"$STAGES"
    echo "== $name: skipped, no time left"
    return 125
  fi
  echo "== $name (limit ${limit} s, $(left) s left of ${BUDGET})"
  echo "== $name: $* (limit ${limit} s)" >>"$log"
  local t0=$SECONDS rc status
  # The stage runs in its own bash (its cd stays there); timeout ends its whole process group.
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "exit $rc, limit ${limit} s, log $(basename "$log")" >>"$STAGES"
  echo "== $name: $status (exit $rc) in $((SECONDS - t0)) s"
  return $rc
}

find_sanitizer() {
  command -v compute-sanitizer && return
  local nvcc_dir
  nvcc_dir=$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")
  for c in "$nvcc_dir/compute-sanitizer" "$nvcc_dir/../compute-sanitizer/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -x $c ]] && { echo "$c"; return; }
  done
  return 1
}

COMMIT=${GPU_SCRIPT_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}
DIRTY=$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l | tr -d ' ')
export GPU_SCRIPT_COMMIT=$COMMIT PYTHONUNBUFFERED=1

# --- env ------------------------------------------------------------------------------------------
env_info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  mode: $MODE  commit: $COMMIT (uncommitted changes: ${DIRTY:-?} files)"
  echo "host: $(uname -srm), $NPROC cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB RAM"}')"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "pytest", "xdist", "pytest_timeout", "pytest_benchmark", "triton", "flash_attn"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__})")
import torch
print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"L2 {p.L2_cache_size >> 20} MiB, {p.total_memory / 2**30:.0f} GiB")
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -2
  local san
  san=$(find_sanitizer) && echo "compute-sanitizer: $san $("$san" --version 2>/dev/null | tail -1)" || echo "compute-sanitizer: not found"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu,persistence_mode --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
}

# --- build ----------------------------------------------------------------------------------------
build() {
  set -o pipefail
  mkdir -p "$SRC"
  # A fresh copy without any build made elsewhere (no .so, no _build_info.py, no build/).
  (cd "$REPO" && tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./runs \
      --exclude=./shared --exclude=./bench/results --exclude=./.gl --exclude=./.whl \
      --exclude='*.so' --exclude=./sparse_attn/_build_info.py --exclude=__pycache__ -cf - .) |
    tar -C "$SRC" -xf - || return 1
  cd "$SRC" || return 1
  if [[ -z $BUILD ]]; then
    local built
    # Where `import sparse_attn` finds the package from the checkout (without importing torch).
    built=$(cd "$REPO" && "$PY" -c "import importlib.util as u; print(u.find_spec('sparse_attn').submodule_search_locations[0])") || return 1
    echo "cpu mode: copying the prebuilt extension from $built instead of building (--build to build)"
    cp "$built"/_C*.so "$built"/_build_info.py sparse_attn/ || return 1
  elif [[ $MODE == gpu ]]; then
    SPARSE_ATTN_CUDA=1 SPARSE_ATTN_CUDA_ARCHS=90a MAX_JOBS=$NPROC "$PY" setup.py build_ext --inplace || return 1
  else
    SPARSE_ATTN_CUDA=0 MAX_JOBS=$NPROC "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c "import sparse_attn, sparse_attn._build_info as b; print('built:', {k: getattr(b, k) for k in dir(b) if k.isupper()}); print('decode_attention:', hasattr(sparse_attn, 'decode_attention'))" || return 1
  if [[ $MODE == gpu ]]; then
    "$PY" -c "import sparse_attn; assert sparse_attn.cuda_kernels_built(), 'CUDA kernels not built'" || return 1
  fi
}

# --- tests ----------------------------------------------------------------------------------------
tests() {
  cd "$SRC" || return 1
  local args=(-q -rfE -p no:cacheprovider --junitxml="$OUT/tests.xml" -o junit_family=xunit1)
  if [[ $MODE == cpu ]]; then
    # A quick subset (the whole suite is CI's own job); GPU_SCRIPT_TESTS overrides it.
    read -r -a selection <<<"${GPU_SCRIPT_TESTS:-tests/test_kv_copy.py -k bad}"
  else
    # tests/test_gpu_script.py runs this script's --cpu mode: nothing of the GPU, a minute lost.
    read -r -a selection <<<"${GPU_SCRIPT_TESTS:-tests --ignore=tests/test_gpu_script.py}"
    # The suite is CPU-heavy (trainer, replay): spread it over the cores, one GPU shared.
    "$PY" -c "import xdist" 2>/dev/null && args+=(-n "$((NPROC >= 16 ? 6 : 2))")
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout=120)
    export OMP_NUM_THREADS=2
  fi
  PYTHONPATH=$SRC "$PY" -m pytest "${selection[@]}" "${args[@]}"
}

# --- sanitizer ------------------------------------------------------------------------------------
sanitize() {
  local tool=$1
  cd "$SRC" || return 1
  local san
  san=$(find_sanitizer) || { echo "compute-sanitizer not found"; return 1; }
  # Without the caching allocator every tensor is its own allocation, so an access past a
  # tensor's end is outside any allocation and memcheck sees it. Only our kernels are checked.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --kernel-name kns=sparse_attn \
    --error-exitcode 3 --print-limit 30 "$PY" bench/gpu/ops_smoke.py --device cuda
}

smoke_cpu() {
  cd "$SRC" && "$PY" bench/gpu/ops_smoke.py --device cpu
}

# --- bench ----------------------------------------------------------------------------------------
bench() {
  local limit=$1
  cd "$SRC" || return 1
  local args=(--out "$OUT/bench.json" --deadline-s "$((limit - 10))")
  [[ $MODE == cpu ]] && args+=(--cpu)
  "$PY" bench/gpu/bench_gpu.py "${args[@]}"
}

export -f env_info build tests sanitize find_sanitizer smoke_cpu bench
export MODE BUILD REPO OUT PY SRC NPROC COMMIT DIRTY

echo "sparse_attn GPU check: mode $MODE, budget $BUDGET s, output $OUT, commit $COMMIT"
# Seconds kept back for later stages: the benchmarks (most of the figures) and the summary.
SUMMARY_KEEP=15
BENCH_KEEP=150
[[ $MODE == cpu ]] && BENCH_KEEP=30
stage env 30 "$((BENCH_KEEP + SUMMARY_KEEP))" "$OUT/env.txt" env_info
if stage build 240 "$((BENCH_KEEP + SUMMARY_KEEP))" "$OUT/build.log" build; then
  stage tests 170 "$((BENCH_KEEP + SUMMARY_KEEP))" "$OUT/tests.log" tests
  # The sanitizers get what the benchmarks leave, from at least this much.
  SANITIZER_KEEP=$([[ $MODE == gpu ]] && echo 90 || echo 10)
  BENCH_LIMIT=$(($(left) - SANITIZER_KEEP - SUMMARY_KEEP))
  ((BENCH_LIMIT > 240)) && BENCH_LIMIT=240
  stage bench "$BENCH_LIMIT" "$SUMMARY_KEEP" "$OUT/bench.log" bench "$BENCH_LIMIT"
  if [[ $MODE == gpu ]]; then
    stage memcheck 60 "$SUMMARY_KEEP" "$OUT/sanitizer.log" sanitize memcheck
    stage racecheck 90 "$SUMMARY_KEEP" "$OUT/sanitizer.log" sanitize racecheck
    stage synccheck 45 "$SUMMARY_KEEP" "$OUT/sanitizer.log" sanitize synccheck
  else
    stage ops_smoke 60 "$SUMMARY_KEEP" "$OUT/sanitizer.log" smoke_cpu
  fi
else
  echo "build failed: tests, benchmarks and sanitizers skipped (see build.log)"
fi

printf 'total\t-\t%s\t%s\n' $((SECONDS - START)) "budget ${BUDGET} s" >>"$STAGES"
# The summary needs only the standard library; without python, the stage table alone.
timeout 30 "$PY" "$REPO/bench/gpu/summary.py" "$OUT" "$STAGES" || {
  echo "summary.py failed; stages:"; column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
}
# Exit status: 0 when every stage ran and passed.
awk -F '\t' '$2 != "ok" && $2 != "-" {bad = 1} END {exit bad}' "$STAGES"
