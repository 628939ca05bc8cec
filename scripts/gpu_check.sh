#!/usr/bin/env bash
# scripts/gpu_check.sh: ember's one prepared run on a lent GPU machine (one H200, 16 cores, no network).
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)       # the device run
#   run(command="ONLY=<stages> DEADLINE=200 bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=230)  # one rerun
#   bash scripts/gpu_check.sh --rehearse                                          # here / CI: every stage on CPU
#
# Device-time plan: 15 minutes of device time per task, the machine's start, idle waits and every rerun
# included, so the run itself gets 8 minutes (DEADLINE 480 s) and a warm rerun keeps ~4 minutes:
#     ~1.5 min  the machine's start
#     call 1    DEADLINE 480 s (timeout_s 540): every stage below, in this priority order
#     call 2    at once, on the warm machine (build, Triton cache and tuned tiles kept): ONLY= the stage that
#               failed or was skipped for time, DEADLINE=200 (timeout_s 230); then give_back
# Expected times are estimates until the first device run measures them (its summary.md): correct the caps
# from it. Each stage gets min(its cap, time left); what does not fit is reported "skipped", so a slow
# build costs the last benchmarks, never the correctness stages.
#   stage          cap    expected on an H200   what it proves / a rerun targets
#   env             30 s     ~10 s   nvidia-smi, versions, `python3 -m ember info`, carried wheels
#   build          200 s   ~120 s   pip install -e . for the present arch only (9.0a), MAX_JOBS = all cores
#   smoke           90 s    ~45 s   scripts/gpu_smoke.py: every ember_C CUDA kernel, then every Triton launcher
#   memcheck        70 s    ~40 s   compute-sanitizer memcheck over the CUDA smoke (no caching allocator)
#   racecheck       50 s    ~25 s   racecheck on the reductions: 8-bit absmax, int8 quantize, bias colsum
#   pytest_cuda     90 s    ~50 s   tests -k "cuda-cuda or cuda_graph_capture or test_cuda_glue", xdist, timeouts
#   pytest_triton  150 s   ~100 s   tests -k "triton-cuda or test_triton_", EMBER_TRITON_AUTOTUNE=0 (one tile)
#   bench_act       60 s    ~40 s   activations, first (largest) shape, torch.compile included, NVML energy
#   bench_optim     60 s    ~40 s   AdamW and AdamW8bit over 1e9 fp32 parameters (the targets)
#   bench_int8      45 s    ~25 s   int8 W8A8 / W8A16 decode (M = 1, 16) and prefill (M = 2048)
#   bench_matmul    90 s    ~60 s   linear / linear_gelu / gated_mlp, small GPU shape set, tuner on, no compile
#   The expected times add up to ~555 s: bench_matmul is the stage most likely cut, and call 2's default.
#   On gVisor the sanitizers are "unavailable" (KINDS.md), which saves ~65 s.
#
# Options (environment): ONLY=stage,stage (names above; groups: sanitizer, pytest, bench), DEADLINE=seconds,
# RESULTS_DIR=folder (default bench/results/gpu/<date>_<device>/, in rehearsal a temp folder),
# PYTEST_WORKERS (12), PYTEST_TIMEOUT (per test, 180 s), VERBOSE=1 (stage output also on stdout),
# PYTHON (python3). Nothing is downloaded here and scripts/setup.sh is never run: missing Python packages
# travel as wheels in .whl/ (made by scripts/gpu_wheels.sh on a machine with a network) and are installed
# with pip --no-index --target into a temp folder put on PYTHONPATH.
#
# Output: one folder with every stage's log, the pytest JUnit XML, the bench CSV/markdown and summary.md
# (per stage: status, rc, time against its cap, the key line), ready to commit. When $OUT is set (the
# device tool) it also gets summary.md and gpu_results.tgz (the whole folder), refreshed after every
# stage, so a run cut off by the tool still returns what it has.
#
# --rehearse proves this script on a CPU (CI: 2 cores, no GPU, no nvidia-smi, no compute-sanitizer) in
# about 3 minutes: the same stages with --device cpu, tiny shapes, the Triton smoke under the
# interpreter, sanitizers reported "skipped", the build only checked (ember must already be importable),
# a small pytest subset, the quickest bench options.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REHEARSE=0
for arg in "$@"; do
  case $arg in
    --rehearse) REHEARSE=1 ;;
    -h|--help) sed -n '2,47p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 2)
T0=$(date +%s)
if [ $REHEARSE = 1 ]; then DEADLINE=${DEADLINE:-240}; else DEADLINE=${DEADLINE:-480}; fi
STAGES="env build smoke memcheck racecheck pytest_cuda pytest_triton bench_act bench_optim bench_int8 bench_matmul"
ONLY_ASKED=${ONLY:-}
ONLY=""
for s in ${ONLY_ASKED//,/ }; do  # stage names, or a group: sanitizer, pytest, bench
  case $s in
    sanitizer) ONLY="$ONLY memcheck racecheck" ;;
    pytest) ONLY="$ONLY pytest_cuda pytest_triton" ;;
    bench) ONLY="$ONLY bench_act bench_optim bench_int8 bench_matmul" ;;
    *) ONLY="$ONLY $s" ;;
  esac
done
ONLY=${ONLY# }
for s in $ONLY; do
  [[ " $STAGES " == *" $s "* ]] || { echo "gpu_check.sh: ONLY: unknown stage '$s'; stages: $STAGES" >&2; exit 2; }
done

# -- where results go --------------------------------------------------------------------------------
gpu_name() { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1; }
if [ $REHEARSE = 1 ]; then
  DEVICE_SLUG=cpu-rehearsal
  R=${RESULTS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ember-gpu-rehearse.XXXXXX")}
else
  name=$(gpu_name); name=${name:-unknown-gpu}
  DEVICE_SLUG=$(echo "${name#NVIDIA }" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
  R=${RESULTS_DIR:-bench/results/gpu/$(date -u +%Y-%m-%d_%H%M)_${DEVICE_SLUG}}
fi
mkdir -p "$R"
R=$(cd "$R" && pwd)
TABLE=$R/.stages.tsv
: > "$TABLE"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export EMBER_CACHE_DIR=${EMBER_CACHE_DIR:-${TMPDIR:-/tmp}/ember-gpu-cache}  # tuned tiles survive a warm rerun
# one heuristic Triton GEMM tile per problem (kernels/linear.py), not a dozen compiled and timed: tests and
# smoke; the matmul bench turns the tuner back on
export EMBER_TRITON_AUTOTUNE=0
if [ $REHEARSE = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the rehearsal is CPU-only even on a machine that has a GPU
  DEV=cpu
else
  DEV=cuda
fi

# -- stage bookkeeping -------------------------------------------------------------------------------
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - $(elapsed) )); }
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

record() {  # record NAME STATUS RC TOOK CAP KEYLINE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(echo "$6" | tr '\t|' '  ' | cut -c1-240)" >> "$TABLE"
  printf '[%4ss] %-14s %-11s rc=%-4s %4ss of %4ss  %s\n' "$(elapsed)" "$1" "$2" "$3" "$4" "$5" "$(echo "$6" | cut -c1-160)"
  write_summary
}

keyline() {  # the line of a log that says how a stage went
  local log=$1 pat=$2
  grep -aE "$pat" "$log" 2>/dev/null | tail -"${3:-1}" | sed "s|$R/||g" | tr '\n' ' ' | sed 's/ *$//'
}

# stage NAME CAP KEY_PATTERN FUNCTION: run FUNCTION (its output into NAME.log) under timeout, record it.
stage() {  # stage NAME CAP KEY_PATTERN FUNCTION [KEY_LINES]
  local name=$1 cap=$2 pat=$3 fn=$4 nkey=${5:-1} l c rc s took status key
  wanted "$name" || return 0
  l=$(left)
  if [ "$l" -lt 15 ]; then
    record "$name" "skipped" "-" 0 "$cap" "deadline: ${l}s left of DEADLINE=${DEADLINE}s"
    return 0
  fi
  c=$(( cap < l - 5 ? cap : l - 5 ))
  s=$(date +%s)
  echo "== $name (cap ${c}s) $(date -u +%H:%M:%S)" > "$R/$name.log"
  if [ "${VERBOSE:-0}" = 1 ]; then
    timeout -k 10 "$c" bash -c "$fn" 2>&1 | tee -a "$R/$name.log"
  else
    timeout -k 10 "$c" bash -c "$fn" >> "$R/$name.log" 2>&1
  fi
  rc=$?
  took=$(( $(date +%s) - s ))
  key=$(keyline "$R/$name.log" "$pat" "$nkey")
  if [ -f "$R/$name.status" ]; then  # the stage decided itself (skipped / unavailable), with a reason
    status=$(head -1 "$R/$name.status"); key="$(sed -n 2p "$R/$name.status") ${key}"; rm -f "$R/$name.status"
  elif [ $rc = 0 ]; then status=ok
  elif [ $rc = 124 ] || [ $rc = 137 ]; then status=TIMEOUT; key="cut at ${c}s; last: ${key:-$(tail -1 "$R/$name.log" | cut -c1-150)}"
  else status=FAIL; key=${key:-$(tail -1 "$R/$name.log" | cut -c1-150)}
  fi
  record "$name" "$status" "$rc" "$took" "$cap" "$key"
  return 0
}

write_summary() {
  local f=$R/summary.md
  {
    echo "# ember GPU check: ${GPU_TITLE:-$DEVICE_SLUG}"
    echo
    echo "- when: $(date -u +'%Y-%m-%d %H:%M UTC'); mode: $([ $REHEARSE = 1 ] && echo 'rehearsal (CPU)' || echo device)"
    echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo ' + uncommitted changes')"
    echo "- ONLY: ${ONLY:-all stages}; DEADLINE ${DEADLINE} s; elapsed $(elapsed) s; ${NPROC} cores"
    echo
    echo "| stage | status | rc | took / cap | key line |"
    echo "|---|---|---|---|---|"
    while IFS=$'\t' read -r n st rc took cap key; do
      echo "| $n | $st | $rc | ${took} / ${cap} s | ${key//|//} |"
    done < "$TABLE"
    local fails
    fails=$(cd "$R" && grep -ahE '^(FAILED|ERROR) |^(BAD|ERR) |^=+ ?(Invalid|Race|Error)|^[=]+ +(ERROR|WARN)' -- *.log 2>/dev/null | cut -c1-200 | head -40)
    if [ -n "$fails" ]; then
      echo; echo "## Failures (first 40 lines)"; echo; echo '```'; echo "$fails"; echo '```'
    fi
    echo; echo "## Files"; echo
    (cd "$R" && find . -type f ! -name '.*' ! -name 'summary.md*' | sed 's|^\./||' | sort | sed 's/^/- /')
  } > "$f.tmp" && mv "$f.tmp" "$f"
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # the device tool returns only $OUT (8 files, 2 folders deep)
    cp "$f" "$OUT/summary.md" 2>/dev/null
    tar czf "$OUT/gpu_results.tgz.tmp" -C "$(dirname "$R")" "$(basename "$R")" 2>/dev/null &&
      mv "$OUT/gpu_results.tgz.tmp" "$OUT/gpu_results.tgz"
  fi
}

export R PY DEV NPROC REHEARSE ROOT

# -- the stages --------------------------------------------------------------------------------------
# Each is a bash function run by `bash -c` under timeout (exported below); it may write NAME.status
# (first line: status, second: reason) to report "skipped" or "unavailable" instead of ok/FAIL.
st_env() {
  echo "## host"; uname -a; nproc; date -u
  echo "## nvidia-smi"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.mem,power.limit --format=csv
  else echo "nvidia-smi: not found (no NVIDIA driver here)"; fi
  echo "## nvcc"; (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc: not found"
  echo "## compute-sanitizer"; (command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1) || echo "compute-sanitizer: not found"
  echo "## wheels"
  if ls .whl/*.whl >/dev/null 2>&1; then
    ls -la .whl/
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WHEEL_SITE" .whl/*.whl \
      && echo "installed $(ls .whl/*.whl | wc -l) wheels into $WHEEL_SITE" || echo "wheel install FAILED"
  else
    echo "no .whl/ folder: nothing carried (make it with: bash scripts/gpu_wheels.sh)"
  fi
  local missing=""
  for mod in $(bash scripts/gpu_wheels.sh --modules); do
    $PY -c "import $mod" 2>/dev/null || missing="$missing $mod"
  done
  echo "wanted test/bench packages missing here:${missing:- none}"
  echo "## python"
  $PY - <<'EOF'
import sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"VERSIONS python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, {gpu}")
EOF
  echo "## python3 -m ember info"
  $PY -m ember info || echo "(ember not importable yet: the build stage installs it)"
}

st_build() {
  if [ "$REHEARSE" = 1 ]; then
    # never pip install on the rehearsal machine: prove that ember and its extension import instead
    $PY -c "import ember, ember._C; print('ember importable from', ember.__file__)" &&
      printf 'skipped\nrehearsal: no build, ember already importable\n' > "$R/build.status"
    return
  fi
  local arch
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  [ -z "$arch" ] && arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  [ "$arch" = 9.0 ] && arch=9.0a  # Hopper: wgmma / setmaxnreg need the sm_90a target
  echo "EMBER_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC"
  EMBER_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . &&
    $PY -c "import ember._C as c; assert c.with_cuda(), 'ember._C was built without CUDA'; print('BUILT ember._C with CUDA for', '$arch')"
}

st_smoke() {
  local tiny="" rc=0
  [ "$REHEARSE" = 1 ] && tiny=--tiny
  # CUDA C++ (or, in rehearsal, C++ CPU) kernels first: they take no JIT time
  $PY scripts/gpu_smoke.py --device "$DEV" --backend "$([ "$DEV" = cuda ] && echo cuda || echo cpu)" $tiny || rc=1
  $PY scripts/gpu_smoke.py --device "$DEV" --backend triton $tiny || rc=1
  return $rc
}

# Whether compute-sanitizer works here: gVisor refuses the device ("Device not supported"), which is
# "unavailable", not a failure of ember. A 10-line CUDA program answers in seconds.
sanitizer_ready() {
  local stage=$1 probe=${TMPDIR:-/tmp}/ember_sanitizer_probe
  if [ "$REHEARSE" = 1 ]; then printf 'skipped\nrehearsal: no GPU\n' > "$R/$stage.status"; return 1; fi
  if ! command -v compute-sanitizer >/dev/null; then
    printf 'unavailable\ncompute-sanitizer not on PATH\n' > "$R/$stage.status"; return 1
  fi
  if [ ! -x "$probe" ]; then
    printf '%s\n' '#include <cstdio>' \
      '__global__ void fill(float* p, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) p[i] = i; }' \
      'int main() { float* p; if (cudaMalloc(&p, 1000 * sizeof(float)) != cudaSuccess) return 2;' \
      '  fill<<<4, 256>>>(p, 1000); return cudaDeviceSynchronize() == cudaSuccess ? 0 : 3; }' > "$probe.cu"
    nvcc -o "$probe" "$probe.cu" || { printf 'unavailable\nnvcc could not build the probe\n' > "$R/$stage.status"; return 1; }
  fi
  local out
  out=$(timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$probe" 2>&1)
  echo "probe: $(echo "$out" | tail -2 | tr '\n' ' ')"
  if ! echo "$out" | grep -q "ERROR SUMMARY: 0 errors"; then
    printf 'unavailable\nsanitizer refused a clean probe: %s\n' "$(echo "$out" | grep -m1 -iE 'not supported|error' | cut -c1-120)" > "$R/$stage.status"
    return 1
  fi
}

san_filter() {  # ember's CUDA kernels only (namespace ember); the others run uninstrumented, faster
  compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name" && echo "--kernel-name kns=ember"
}

st_memcheck() {
  sanitizer_ready memcheck || return 0
  # no caching allocator: every tensor is its own cudaMalloc, so a write past its end is caught
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck $(san_filter) --print-limit 20 --error-exitcode 9 \
    $PY scripts/gpu_smoke.py --device cuda --backend cuda
}

st_racecheck() {
  sanitizer_ready racecheck || return 0
  local rc=0 only=quantize,adamw8bit,linear_bwd
  # shared-memory hazards in the reductions: 8-bit absmax per block, per-token absmax, bias column sums
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck $(san_filter) --print-limit 20 --error-exitcode 9 \
    $PY scripts/gpu_smoke.py --device cuda --backend cuda --only $only || rc=1
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --print-limit 20 --error-exitcode 9 \
    $PY scripts/gpu_smoke.py --device cuda --backend triton --only $only || rc=1
  return $rc
}

run_pytest() {  # run_pytest NAME -k EXPR
  local name=$1; shift
  local workers=${PYTEST_WORKERS:-12}
  [ "$REHEARSE" = 1 ] && workers=${PYTEST_WORKERS:-2}
  $PY -m pytest tests -q -p no:cacheprovider -n "$workers" --timeout "${PYTEST_TIMEOUT:-180}" -rfE \
    --junitxml="$R/$name.xml" "$@"
}

st_pytest_cuda() {
  if [ "$REHEARSE" = 1 ]; then  # the C++ CPU backend of one op family: the same flags, seconds of work
    run_pytest pytest_cuda -k "cpu-cpu and test_gated and test_forward_backward"
  else
    run_pytest pytest_cuda -k "cuda-cuda or cuda_graph_capture or test_cuda_glue"
  fi
}

st_pytest_triton() {
  if [ "$REHEARSE" = 1 ]; then
    run_pytest pytest_triton -k "triton-cpu and test_activation and test_forward_backward and fp32"
  else
    run_pytest pytest_triton -k "triton-cuda or test_triton_"
  fi
}

bench() {  # bench ARGS...: python -m ember bench on this stage's device, into the results folder
  if [ "$REHEARSE" = 1 ]; then
    $PY -m ember bench --device cpu --quick --no-compile --out "$R/bench" "$@"
  else
    $PY -m ember bench --device cuda --out "$R/bench" "$@"
  fi
}

st_bench_act() {
  if [ "$REHEARSE" = 1 ]; then bench --suites activations --ops silu swiglu; else bench --suites activations --quick; fi
}

st_bench_optim() {  # 1e9 fp32 parameters on a GPU (the suite's --sizes large); the ops that carry targets
  if [ "$REHEARSE" = 1 ]; then bench --suites optim --dtype fp32 --ops AdamW AdamW8bit
  else bench --suites optim --dtype fp32 --sizes large --ops AdamW AdamW8bit; fi
}

st_bench_int8() {  # decode (M = 1, 16) and prefill (M = 2048)
  if [ "$REHEARSE" = 1 ]; then bench --suites int8; else bench --suites int8 --sizes small; fi
}

st_bench_matmul() {  # the tuner on: these are the numbers to report (torch.compile max-autotune would take tens of minutes)
  local rc=0
  if [ "$REHEARSE" = 1 ]; then EMBER_TRITON_AUTOTUNE=1 bench --suites matmul --ops linear_gelu || rc=$?
  else EMBER_TRITON_AUTOTUNE=1 bench --suites matmul --sizes small --no-compile || rc=$?; fi
  [ -f "$EMBER_CACHE_DIR/linear_configs.json" ] && cp "$EMBER_CACHE_DIR/linear_configs.json" "$R/bench/triton_linear_configs.json"
  return $rc
}

WHEEL_SITE=${TMPDIR:-/tmp}/ember-gpu-site
export WHEEL_SITE EMBER_CACHE_DIR
[ -d "$WHEEL_SITE" ] && export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
export -f st_env st_build st_smoke sanitizer_ready san_filter st_memcheck st_racecheck run_pytest st_pytest_cuda \
  st_pytest_triton bench st_bench_act st_bench_optim st_bench_int8 st_bench_matmul

if [ $REHEARSE = 1 ]; then GPU_TITLE="CPU rehearsal ($(uname -m), $NPROC cores)"
else g=$(gpu_name); GPU_TITLE="${g:-no GPU found by nvidia-smi} ($NPROC cores)"; fi
echo "gpu_check: $GPU_TITLE; results in $R; DEADLINE ${DEADLINE}s; ONLY=${ONLY:-all}"
write_summary

PAT_PYTEST='(passed|failed|error|no tests ran|skipped).* in [0-9.]+s'
stage env 30 '^VERSIONS|missing here' st_env
# the wheels land in WHEEL_SITE during env; later stages see them
[ -d "$WHEEL_SITE" ] && export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
stage build 200 '^BUILT|Successfully installed|error:|ember importable' st_build
stage smoke 90 '^SMOKE' st_smoke 2
stage memcheck 70 'ERROR SUMMARY|^SMOKE|^probe' st_memcheck 2
stage racecheck 50 'RACECHECK SUMMARY|ERROR SUMMARY' st_racecheck 2
stage pytest_cuda 90 "$PAT_PYTEST" st_pytest_cuda
stage pytest_triton 150 "$PAT_PYTEST" st_pytest_triton
PAT_BENCH='ember bench: wrote|cases on|: (WRONG|ERROR):'
stage bench_act 60 "$PAT_BENCH" st_bench_act
stage bench_optim 60 "$PAT_BENCH" st_bench_optim
stage bench_int8 45 "$PAT_BENCH" st_bench_int8
stage bench_matmul 90 "$PAT_BENCH" st_bench_matmul

write_summary
echo "== summary ($R/summary.md)"
cut -f1-5 "$TABLE" | column -t 2>/dev/null || cut -f1-5 "$TABLE"
grep -q $'\t\(FAIL\|TIMEOUT\)\t' "$TABLE" && { echo "== failures"; sed -n '/^## Failures/,/^## Files/p' "$R/summary.md" | head -45; exit 1; }
exit 0
