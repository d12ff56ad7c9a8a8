#!/usr/bin/env bash
# The one prepared check for a lent GPU (H100/H200 with torch+cu, triton, nvcc, pybind11, ninja,
# cmake; no network needed):
#
#     bash bench/gpu_check.sh             # on the GPU machine
#     bash bench/gpu_check.sh --dry-run   # anywhere: the control flow, with stand-ins (below)
#
# A GPU window is short (about 15 minutes, the machine's start included) and rare, so the
# stages run in the order of what they are worth, and every stage runs whatever an earlier one
# did; only a failed build stops the script (nothing after it could run):
#   0 env               nvidia-smi, versions (ninja, cmake and nvcc must be there); torch must see a CUDA device
#   1 build             pip install --no-build-isolation --no-deps -e . with all cores; the CUDA
#                       kernels must be in imaml_kernels._C
#   2 headline          the key figures, first: the Omniglot 5w1s meta-step (T=32), eager and as one
#                       CUDA graph (python -m bench.headline, each row in a fresh process), then one
#                       op family (CG: CUDA C++ and Triton) against float64 on CUDA; each half has
#                       its own limit (HEADLINE_S), so a hang in one leaves the other's numbers
#   3-7 benchmarks      bench cg / hvp / meta-step 20w1s / models / launches on cuda at paper shapes
#   8 GPU tests         python3 -m pytest -v tests/test_gpu.py (one line per test, so a cut run
#                       still shows which passed)
# The compile table (python -m bench compile, ptxas registers and spills) is CPU work: CI runs
# it (tests/test_compile.py) and bench/results/compile.md is committed; it is not run here.
#
# Time: every stage has its own limit (a stage that hangs is cut there: exit 124) and all of
# them share GPU_CHECK_BUDGET_S (default 470 s); the limits add up to the budget, no more. After
# each stage the report bench/results/gpu/gpu_check.md (machine, every stage's status, seconds
# and log tail, the targets) is rewritten and copied to $OUT with the logs, so a run that is cut
# short (the window ends, a kill) still leaves every number measured so far. Exit status: 0 when
# every stage passed, 1 otherwise (the build's own status when it failed).
#
# Dry run (CI: tests/test_gpu_check.py): every stage's command is replaced by a stand-in that
# passes (printing a fake headline), fails or hangs, as GPU_CHECK_DRY_PLAN says, e.g.
#   GPU_CHECK_DRY_PLAN="headline=fail bench-hvp=hang" bash bench/gpu_check.sh --dry-run
# (stages by their slug; default: all pass); a stand-in "probe" copies the report as it stands to
# probe-<slug>.md. Limits become GPU_CHECK_DRY_LIMIT_S (default 2 s); the report goes to
# GPU_CHECK_RESULTS (default: a new temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

if (( DRY )); then
  RESULTS=${GPU_CHECK_RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}
else
  RESULTS=${GPU_CHECK_RESULTS:-$ROOT/bench/results/gpu}
fi
LOGS=$RESULTS/logs
REPORT=$RESULTS/gpu_check.md
BUDGET=${GPU_CHECK_BUDGET_S:-470}
DRY_LIMIT=${GPU_CHECK_DRY_LIMIT_S:-2}
HEADLINE_S=${GPU_CHECK_HEADLINE_S:-60}  # each half of the headline stage
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
NAMES=() LIMITS=() KINDS=() CMDS=() STATUS=() SECS=() LOGFILES=()
CURRENT=-1 STAGE_PID="" STOPPED=""

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
slug() { local s; s=$(printf '%s' "$1" | tr -cs 'A-Za-z0-9' '-'); echo "${s%-}"; }

# plan NAME LIMIT_S KIND CMD: one stage. CMD runs as one string under bash -eo pipefail (any
# failing line fails the stage). KIND says how its log enters the report: raw (markdown tables
# as printed), text (fenced tail), quiet (fenced tail; only 15 lines echoed to the terminal).
plan() {
  local i=${#NAMES[@]}
  NAMES+=("$1") LIMITS+=("$2") KINDS+=("$3") CMDS+=("$4") STATUS+=("not reached") SECS+=("-")
  LOGFILES+=("$LOGS/$(printf '%02d' "$i")-$(slug "$1").log")
}

# --------------------------------------------------------------------------- the stages, in order

# shellcheck disable=SC2016  # the stage commands expand in their own shell
plan "env" 20 text 'nvidia-smi || echo "nvidia-smi failed (exit $?)"
python3 -c "
import sys, torch, triton
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"| triton\", triton.__version__)
assert torch.cuda.is_available(), \"torch sees no CUDA device\"
p = torch.cuda.get_device_properties(0)
print(p.name, \"| sm_%d%d |\" % (p.major, p.minor), p.multi_processor_count, \"SMs |\", p.total_memory >> 20, \"MiB\")
"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
cmake --version | head -n 1
v=$(ninja --version)  # an assignment fails the stage when ninja is missing (an echo never would)
echo "ninja $v"'

plan "build" 90 quiet 'python3 -m pip install --no-build-isolation --no-deps -v -e .
python3 -c "
from imaml_kernels import _ext
assert _ext.HAS_EXT, _ext.EXT_ERROR
assert _ext.HAS_CUDA_EXT, \"imaml_kernels._C was built without its CUDA kernels (nvcc under CUDA_HOME?)\"
print(\"imaml_kernels._C with CUDA kernels:\", _ext._C.__file__)
"'

# Two halves, each under its own limit; the stage fails when either does, after both ran.
plan "headline" $(( 2 * HEADLINE_S - 10 )) raw "timeout -k 5 $HEADLINE_S python3 -m bench.headline || rc=\$?
echo
echo '## Headline: one op family (CG, CUDA C++ and Triton) against float64 on CUDA'
echo
timeout -k 5 $(( HEADLINE_S - 15 )) python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py \\
  -k 'float64_reference and cg_' 2>&1 | sed 's/^/    /' || rc=\$?
exit \${rc:-0}"

plan "bench cg" 25 raw 'python3 -m bench cg --device cuda'
plan "bench hvp" 35 raw 'python3 -m bench hvp --device cuda'
plan "bench meta-step 20w1s" 40 raw 'python3 -m bench meta-step --device cuda --way 20 --tasks 16 --inner-steps 25 --no-serial'
plan "bench models" 50 raw 'python3 -m bench models --device cuda --rounds 2'
plan "bench launches" 20 raw 'python3 -m bench launches'
plan "GPU tests" 80 text 'python3 -m pytest -v -p no:cacheprovider -rfEs --durations=10 tests/test_gpu.py'

LIMITS_SUM=0
for l in "${LIMITS[@]}"; do LIMITS_SUM=$(( LIMITS_SUM + l )); done

# --------------------------------------------------------------------------- dry run

# The stand-in of stage NAME: what GPU_CHECK_DRY_PLAN says for its slug (pass by default).
stand_in() {
  local name=$1 s what=pass item
  s=$(slug "$name")
  for item in ${GPU_CHECK_DRY_PLAN:-}; do
    [[ ${item%%=*} == "$s" ]] && what=${item#*=}
  done
  printf 'echo "[dry run] stand-in (%s) for stage %s"\n' "$what" "$name"
  case $what in
    pass) [[ $s == headline ]] && printf '%s\n' 'echo "fused engine: 0.050 s / meta-step"' \
                                   'echo "one CUDA graph: 9.50 ms / meta-step (5.26x the eager engine)"' ;;
    fail) echo 'echo "stand-in failure" >&2; exit 3' ;;
    hang) echo 'sleep 100000' ;;
    probe) printf 'cp "%s" "%s/probe-%s.md"\n' "$REPORT" "$RESULTS" "$s" ;;
    *) echo "gpu_check: unknown dry-run behaviour '$what' for stage $s" >&2; exit 2 ;;
  esac
  return 0
}

# --------------------------------------------------------------------------- report

fenced_tail() {  # fenced_tail N FILE
  echo '```text'
  tail -n "$1" "$2" 2>/dev/null
  echo '```'
}

targets() {  # the GPU targets, read off the stages' logs (the headline's even when its other half failed)
  local i ms=""
  for i in "${!NAMES[@]}"; do
    [[ ${NAMES[i]} == headline && ${STATUS[i]} != "not reached" ]] && \
      ms=$(sed -n 's/.*one CUDA graph: \([0-9.]*\) ms.*/\1/p' "${LOGFILES[i]}" 2>/dev/null | head -n 1)
  done
  if [[ -n $ms ]]; then
    echo "- meta-step, Omniglot 5-way 1-shot, T=32, one CUDA graph: **$ms ms** (target <= 10 ms:" \
      "$(awk -v m="$ms" 'BEGIN { print (m <= 10) ? "met" : "MISSED" }'))"
  else
    echo "- meta-step, Omniglot 5-way 1-shot, T=32, one CUDA graph: not measured (target <= 10 ms)"
  fi
  for i in "${!NAMES[@]}"; do
    [[ ${NAMES[i]} == bench* && ${STATUS[i]} == ok ]] && grep -i 'target' "${LOGFILES[i]}" | sed "s/^/- ${NAMES[i]}: /"
  done
  return 0
}

machine() {
  local gpu
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null) \
    || gpu="nvidia-smi failed"
  echo "- GPU: ${gpu//$'\n'/; } (name, memory, driver, max SM clock, power limit)"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
  if (( DRY )); then
    echo "- python/torch/triton: not queried (dry run)"
  else
    echo "- $(timeout 60 python3 -c 'import sys, torch; import triton
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")' 2>/dev/null || echo 'python3/torch/triton: version query failed')"
  fi
  echo "- nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | grep -m1 release | sed 's/.*release //' || echo 'not found')"
  if git rev-parse --short HEAD > /dev/null 2>&1; then
    echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  fi
  echo "- TRITON_INTERPRET=$TRITON_INTERPRET, IMAML_BUILD_JOBS=$IMAML_BUILD_JOBS, CUDA_HOME=$CUDA_HOME"
}

MACHINE=""
report() {
  local i c passed=0 failed=() done=0
  for i in "${!NAMES[@]}"; do
    [[ ${STATUS[i]} == ok ]] && passed=$(( passed + 1 ))
    [[ ${STATUS[i]} != ok && ${STATUS[i]} != "not reached" && ${STATUS[i]} != running* ]] && failed+=("${NAMES[i]}")
    [[ ${STATUS[i]} != "not reached" ]] && done=$(( done + 1 ))
  done
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)$( (( DRY )) && echo ' (DRY RUN: stand-ins, no GPU)')"
  echo
  echo "\`bash bench/gpu_check.sh$( (( DRY )) && echo ' --dry-run')\`: $(( $(date +%s) - T0 )) s so far of the ${BUDGET} s" \
    "budget (the stage limits add up to ${LIMITS_SUM} s). The headline comes first; every stage runs past" \
    "a failure (only a failed build stops the run); the compile table is CI's (bench/results/compile.md)."
  echo
  echo "$MACHINE"
  echo
  local list=""
  (( ${#failed[@]} )) && printf -v list '%s, ' "${failed[@]}"
  echo "**Result: $passed of ${#NAMES[@]} stages passed${list:+; not passed: ${list%, }}$(
    [[ -n $STOPPED ]] && echo "; $STOPPED")$( (( done < ${#NAMES[@]} )) && echo "; $(( ${#NAMES[@]} - done )) not reached").**"
  echo
  echo "| # | stage | status | seconds | limit (s) | command |"
  echo "|---|---|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    c=${CMDS[i]%%$'\n'*}
    [[ $c != "${CMDS[i]}" ]] && c+=" ..."
    echo "| $i | ${NAMES[i]} | ${STATUS[i]} | ${SECS[i]} | ${LIMITS[i]} | \`${c//|/\\|}\` |"
  done
  echo
  echo "## Targets"
  echo
  targets
  for i in "${!NAMES[@]}"; do
    [[ ${STATUS[i]} == "not reached" ]] && continue
    echo
    echo "## $i. ${NAMES[i]}: ${STATUS[i]}"
    echo
    if [[ ${STATUS[i]} != ok ]]; then
      fenced_tail 80 "${LOGFILES[i]}"
    elif [[ ${KINDS[i]} == raw ]]; then
      cat "${LOGFILES[i]}"
    else
      fenced_tail "$( [[ ${KINDS[i]} == quiet ]] && echo 15 || echo 60)" "${LOGFILES[i]}"
    fi
  done
}

# The report as it stands, written and copied to $OUT (with the logs): after every stage.
save() {
  report > "$REPORT.tmp" 2>&1 && mv "$REPORT.tmp" "$REPORT"
  if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT/gpu_check_logs" && cp "$REPORT" "$OUT/" && cp "$LOGS"/*.log "$OUT/gpu_check_logs/" 2>/dev/null
  fi
  return 0
}

summary() {
  local i
  echo
  echo "=== summary (report: $REPORT${OUT:+, copied to $OUT})"
  for i in "${!NAMES[@]}"; do
    printf '%-24s %-44s %8s s\n' "${NAMES[i]}" "${STATUS[i]}" "${SECS[i]}"
  done
  echo "total: $(( $(date +%s) - T0 )) s of the ${BUDGET} s budget"
}

# A signal (the window closing, ^C): the running stage is stopped and marked, the report saved.
on_signal() {
  trap - INT TERM
  [[ -n $STAGE_PID ]] && kill -TERM "$STAGE_PID" 2>/dev/null
  (( CURRENT >= 0 )) && STATUS[CURRENT]="INTERRUPTED (signal $1)"
  STOPPED="interrupted by signal $1"
  save
  summary
  exit 130
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# --------------------------------------------------------------------------- running

# run_stage I: stage I under its limit (cut by the budget), its log written, its status set.
# The command runs in the background (`wait` lets a signal through at once); `timeout` puts it
# in a process group of its own and stops all of it.
run_stage() {
  local i=$1 limit=${LIMITS[$1]} cmd=${CMDS[$1]} log=${LOGFILES[$1]} left start rc kill_after=10
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( DRY )); then
    cmd=$(stand_in "${NAMES[i]}") || exit 2
    limit=$DRY_LIMIT kill_after=1
  fi
  echo
  echo "=== [$i] ${NAMES[i]} (limit ${limit}s, ${left}s of the budget left): ${CMDS[i]%%$'\n'*}"
  if (( left < 5 )); then
    echo "the ${BUDGET}s budget was used up before this stage" > "$log"
    STATUS[i]="NOT STARTED: the ${BUDGET}s budget is used up" SECS[i]=0
    return
  fi
  (( limit > left )) && limit=$left
  CURRENT=$i STATUS[i]="running (cut at ${limit}s)"
  save
  start=$(now_ms)
  timeout -k "$kill_after" "$limit" bash -eo pipefail -c "$cmd" > "$log" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID"
  rc=$?
  STAGE_PID=""
  local ms=$(( $(now_ms) - start ))
  SECS[i]="$(( ms / 1000 )).$(( ms % 1000 / 100 ))"
  case $rc in
    0) STATUS[i]=ok ;;
    124|137) STATUS[i]="TIMED OUT after ${limit}s (exit $rc)" ;;
    *) STATUS[i]="FAILED (exit $rc)" ;;
  esac
  tail -n "$( [[ ${KINDS[i]} == quiet || $rc != 0 ]] && echo 15 || echo 40)" "$log"
  grep -q "invalid choice" "$log" && echo "gpu_check: a subcommand of '${CMDS[i]%%$'\n'*}' is missing from bench/__main__.py"
  echo "=== [$i] ${NAMES[i]}: ${STATUS[i]} in ${SECS[i]} s"
  return "$rc"
}

echo "gpu_check: ${#NAMES[@]} stages, limits adding up to ${LIMITS_SUM} s of the ${BUDGET} s budget$( (( DRY )) && echo "; DRY RUN, report in $RESULTS")"
(( LIMITS_SUM > BUDGET )) && echo "gpu_check: WARNING: the stage limits exceed the budget; the last stages may not start"
MACHINE=$(machine)
save
EXIT=0
for i in "${!NAMES[@]}"; do
  run_stage "$i"
  rc=$?
  CURRENT=-1
  if (( rc != 0 )); then
    EXIT=1
    if [[ ${NAMES[i]} == build ]]; then
      STOPPED="stopped after the failed build"
      EXIT=$rc
      save
      break
    fi
  fi
  save
done
summary
exit "$EXIT"
