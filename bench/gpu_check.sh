#!/usr/bin/env bash
# The one prepared check for a lent GPU (H100/H200 with torch+cu, triton, nvcc, pybind11, ninja,
# cmake; no network needed):
#
#     bash bench/gpu_check.sh
#
# Stages, each timed, run in this order; the script stops at the first one that fails, printing
# its name and exit code, and writes the report either way:
#   0 env               nvidia-smi, versions; torch must see a CUDA device
#   1 build             pip install --no-build-isolation --no-deps -e . with all cores; the CUDA
#                       kernels must be in imaml_kernels._C
#   2 selfcheck         python3 -m imaml_kernels.selfcheck
#   3 compile table     python3 -m bench compile
#   4 GPU tests         python3 -m pytest -q tests/test_gpu.py (+ tests/test_compile.py if present)
#   5 benchmarks        bench cg / hvp / meta-step (5w1s with the one-CUDA-graph row, 20w1s) on
#                       cuda at paper shapes, bench launches, bench models (user models: package
#                       plans vs a per-task loop vs torchopt, 2 rounds); every row of a comparison
#                       runs in its own fresh processes (bench/fresh.py)
#   6 report            bench/results/gpu/gpu_check.md (machine header, per-stage status and
#                       seconds, every stage's tables), logs in bench/results/gpu/logs/; both
#                       copied to $OUT when it is set
#
# Budget: 8 minutes on an H100/H200. Every stage has its own time limit and all of them share
# GPU_CHECK_BUDGET_S (default 470 s): a stage that would run past it is stopped (exit 124).
# Triton kernels run compiled (TRITON_INTERPRET=0), never in the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
RESULTS=${GPU_CHECK_RESULTS:-$ROOT/bench/results/gpu}
LOGS=$RESULTS/logs
REPORT=$RESULTS/gpu_check.md
BUDGET=${GPU_CHECK_BUDGET_S:-470}
mkdir -p "$LOGS" || exit 1
rm -f "$LOGS"/*.log

export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
IMAML_BUILD_JOBS=$(nproc)
export IMAML_BUILD_JOBS
export PATH="$CUDA_HOME/bin:$PATH"
unset TRITON_INTERPRET IMAML_BACKEND
export TRITON_INTERPRET=0

T0=$(date +%s)
NAMES=() STATUS=() SECS=() CMDS=() KINDS=() LOGFILES=()
FAILED=""
FINISHED=0

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# stage NAME LIMIT_S KIND CMD: run CMD (one string, bash -eo pipefail: any failing line fails
# the stage) under a time limit;
# KIND says how its log enters the report: raw (markdown tables as printed), text (fenced tail),
# quiet (fenced tail; not echoed to the terminal either).
stage() {
  local name=$1 limit=$2 kind=$3 cmd=$4
  local i=${#NAMES[@]} slug log left start rc ms status=""
  slug=$(printf '%s' "$name" | tr -cs 'A-Za-z0-9' '-')
  log=$LOGS/$(printf '%02d' "$i")-${slug%-}.log
  left=$(( BUDGET - ($(date +%s) - T0) ))
  echo
  echo "=== [$i] $name (limit ${limit}s, ${left}s of the budget left): $cmd"
  if (( left < 5 )); then
    echo "budget of ${BUDGET}s used up before this stage" > "$log"
    rc=124 ms=0 status="NOT STARTED: the ${BUDGET}s budget is used up (exit 124)"
  else
    (( limit > left )) && limit=$left
    start=$(now_ms)
    if [[ $kind == quiet ]]; then
      timeout -k 10 "$limit" bash -eo pipefail -c "$cmd" > "$log" 2>&1
      rc=$?
    else
      timeout -k 10 "$limit" bash -eo pipefail -c "$cmd" 2>&1 | tee "$log"
      rc=${PIPESTATUS[0]}
    fi
    ms=$(( $(now_ms) - start ))
  fi
  [[ -z $status ]] && case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${limit}s (exit $rc)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  NAMES+=("$name") STATUS+=("$status") SECS+=("$(printf '%d.%d' $(( ms / 1000 )) $(( ms % 1000 / 100 )))")
  CMDS+=("$cmd") KINDS+=("$kind") LOGFILES+=("$log")
  echo "=== [$i] $name: $status in ${SECS[-1]} s"
  if (( rc != 0 )); then
    FAILED="stage '$name' $status"
    if [[ $kind == quiet ]]; then
      echo "--- last 40 lines of $log:"
      tail -n 40 "$log"
    fi
    if grep -q "invalid choice" "$log"; then
      echo "gpu_check: '$cmd': the subcommand is missing from bench/__main__.py"
    fi
    echo "gpu_check: $FAILED; stopping (log: $log)"
    finish
    exit "$rc"
  fi
}

fenced_tail() {  # fenced_tail N FILE
  echo '```text'
  tail -n "$1" "$2"
  echo '```'
}

stage_log() {  # stage_log NAME: the log of stage NAME if it passed
  local i
  for i in "${!NAMES[@]}"; do
    [[ ${NAMES[i]} == "$1" && ${STATUS[i]} == ok ]] && echo "${LOGFILES[i]}"
  done
  return 0
}

targets() {  # the GPU targets, read off the benchmark logs
  local log ms name
  log=$(stage_log "bench meta-step 5w1s")
  ms=""
  [[ -n $log ]] && ms=$(sed -n 's/.*one CUDA graph: \([0-9.]*\) ms.*/\1/p' "$log" | head -n 1)
  if [[ -n $ms ]]; then
    echo "- meta-step, Omniglot 5-way 1-shot, T=32, one CUDA graph: **$ms ms** (target <= 10 ms:" \
      "$(awk -v m="$ms" 'BEGIN { print (m <= 10) ? "met" : "MISSED" }'))"
  else
    echo "- meta-step, Omniglot 5-way 1-shot, T=32, one CUDA graph: not measured (target <= 10 ms)"
  fi
  for name in "bench cg" "bench hvp" "bench meta-step 5w1s" "bench meta-step 20w1s" "bench launches" "bench models"; do
    log=$(stage_log "$name")
    [[ -n $log ]] && grep -i 'target' "$log" | sed "s/^/- $name: /"
  done
  return 0
}

report() {
  local i total c gpu
  total=$(( $(date +%s) - T0 ))
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "\`bash bench/gpu_check.sh\` (budget ${BUDGET} s; took ${total} s)."
  echo
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null) \
    || gpu="nvidia-smi failed"
  echo "- GPU: ${gpu//$'\n'/; } (name, memory, driver, max SM clock, power limit)"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
  echo "- $(timeout 60 python3 -c 'import sys, torch; import triton
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")' 2>/dev/null || echo 'python3/torch/triton: version query failed')"
  echo "- nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | grep -m1 release | sed 's/.*release //' || echo 'not found')"
  if git rev-parse --short HEAD > /dev/null 2>&1; then
    echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  else
    echo "- commit: not a git checkout"
  fi
  echo "- TRITON_INTERPRET=$TRITON_INTERPRET, IMAML_BUILD_JOBS=$IMAML_BUILD_JOBS, CUDA_HOME=$CUDA_HOME"
  echo
  if [[ -n $FAILED ]]; then
    echo "**Result: $FAILED**; the stages after it did not run."
  else
    echo "**Result: every stage passed.**"
  fi
  echo
  echo "| # | stage | status | seconds | command |"
  echo "|---|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    c=${CMDS[i]%%$'\n'*}
    [[ $c != "${CMDS[i]}" ]] && c+=" ..."
    echo "| $i | ${NAMES[i]} | ${STATUS[i]} | ${SECS[i]} | \`${c//|/\\|}\` |"
  done
  echo
  echo "## Targets"
  echo
  targets
  for i in "${!NAMES[@]}"; do
    echo
    echo "## $i. ${NAMES[i]}: ${STATUS[i]}"
    echo
    if [[ ${STATUS[i]} != ok ]]; then
      fenced_tail 80 "${LOGFILES[i]}"
    elif [[ ${KINDS[i]} == raw ]]; then
      cat "${LOGFILES[i]}"
    elif [[ ${KINDS[i]} == quiet ]]; then
      fenced_tail 15 "${LOGFILES[i]}"
    else
      fenced_tail 60 "${LOGFILES[i]}"
    fi
  done
}

finish() {
  local i
  (( FINISHED )) && return
  FINISHED=1
  report > "$REPORT" 2>&1
  if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT/gpu_check_logs" && cp "$REPORT" "$OUT/" && cp "$LOGS"/*.log "$OUT/gpu_check_logs/" 2>/dev/null
  fi
  echo
  echo "=== summary (report: $REPORT${OUT:+, copied to $OUT})"
  for i in "${!NAMES[@]}"; do
    printf '%-28s %-34s %8s s\n' "${NAMES[i]}" "${STATUS[i]}" "${SECS[i]}"
  done
  echo "total: $(( $(date +%s) - T0 )) s of the ${BUDGET} s budget${FAILED:+; $FAILED}"
}
trap finish EXIT
trap 'FAILED="interrupted"; exit 130' INT TERM

# --------------------------------------------------------------------------- stages

# shellcheck disable=SC2016  # the stage commands expand in their own shell
stage "env" 60 text 'nvidia-smi || echo "nvidia-smi failed (exit $?)"
python3 -c "
import sys, torch, triton
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"| triton\", triton.__version__)
assert torch.cuda.is_available(), \"torch sees no CUDA device\"
p = torch.cuda.get_device_properties(0)
print(p.name, \"| sm_%d%d |\" % (p.major, p.minor), p.multi_processor_count, \"SMs |\", p.total_memory >> 20, \"MiB\")
"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
cmake --version | head -n 1
echo "ninja $(ninja --version)"'

stage "build" 240 quiet 'python3 -m pip install --no-build-isolation --no-deps -v -e .
python3 -c "
from imaml_kernels import _ext
assert _ext.HAS_EXT, _ext.EXT_ERROR
assert _ext.HAS_CUDA_EXT, \"imaml_kernels._C was built without its CUDA kernels (nvcc under CUDA_HOME?)\"
print(\"imaml_kernels._C with CUDA kernels:\", _ext._C.__file__)
"'

stage "selfcheck" 120 raw 'python3 -m imaml_kernels.selfcheck'

stage "compile table" 150 raw 'python3 -m bench compile'

GPU_TESTS="tests/test_gpu.py"
[[ -f tests/test_compile.py ]] && GPU_TESTS+=" tests/test_compile.py"
stage "GPU tests" 240 text "python3 -m pytest -q -rfEs --durations=15 $GPU_TESTS"

stage "bench cg" 90 raw 'python3 -m bench cg --device cuda'
stage "bench hvp" 150 raw 'python3 -m bench hvp --device cuda'
stage "bench meta-step 5w1s" 150 raw 'python3 -m bench meta-step --device cuda'
stage "bench meta-step 20w1s" 120 raw 'python3 -m bench meta-step --device cuda --way 20 --tasks 16 --inner-steps 25 --no-serial'
stage "bench launches" 90 raw 'python3 -m bench launches'
stage "bench models" 150 raw 'python3 -m bench models --device cuda --rounds 2'

finish
