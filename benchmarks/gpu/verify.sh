#!/usr/bin/env bash
# benchmarks/gpu/verify.sh: the GPU verification of ftkernels in one command, on a bare GPU
# machine (CUDA toolkit with nvcc and compute-sanitizer, Python with torch, Triton, pytest,
# pytest-benchmark, Transformers, PEFT; no network: other packages come with --site).
#
# The steps, in this order, with their shares of an 8-minute budget:
#   1 gpu        0.1 min  nvidia-smi lists a GPU and torch sees it. Without one nothing below means
#                         anything, so the run stops at once, before it writes anything.
#   2 site       0.1 min  --site DIR first on PYTHONPATH; which optional packages are present (a
#                         missing one turns tests and baselines into skips or collection errors).
#   3 build      1.7 min  pip install of this checkout into a temporary folder, the CUDA module for
#                         this GPU's compute capability only (SASS, every core): one architecture
#                         instead of the five of FTK_CUDA_ARCHITECTURES=all. lora_decode_fwd.cu is
#                         the longest file (~1 min for sm_90 on a busy core), the files compile in
#                         parallel. No CUDA module stops the run: every later step tests it.
#   4 doctor     0.3 min  ftk doctor --json: which backends load and pass their self-test, in
#                         seconds, before the long steps.
#   5 pytest     1.5 min  the 2,095 tests marked cuda, in four processes at once: the CUDA
#                         backend's (1,062) and three parts of the Triton ones (582, 342, 109),
#                         whose JIT compiles (one a kernel specialisation: blocksize, dtype, quant
#                         type) run one at a time in each process and are the slow part.
#   6 memcheck   0.7 min  sanitize_cases.py (one or two small cases per kernel family) under
#                         compute-sanitizer memcheck, each tensor its own allocation
#                         (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that an overrun leaves it.
#   7 racecheck  0.8 min  its racecheck subset (the kernels that share memory between threads),
#                         only ftkernels' kernels instrumented: racecheck is the slow tool.
#   8 bench      2.3 min  ftk bench --device cuda with a time budget, every op beside bitsandbytes
#                         and PEFT. Last: figures of a kernel that fails the steps above mean
#                         nothing, and the bench is the step that fits itself to the time left.
#   9 table      0.1 min  gpu_table.py: README's GPU table from the results folder.
# Total 7.6 min. The bench is the elastic step: any other step may run past its share into the
# bench's, down to a 45 s floor, and the bench takes what is left (time a step leaves unused goes
# to the later ones). A step still running at its limit is stopped (SIGINT, which makes pytest
# print its summary; SIGKILL 10 s later), logged as timed out, and the run goes on; a step with
# no time left is skipped. So a hang costs its step, not the run, and the run ends within the
# 8 minutes whatever happens.
#
# Results, flat, at most 8 files in --out: verify.log (each step, its command, wall time and
# outcome), build.log, doctor.json, pytest-cuda.txt, sanitizer.txt, bench.log (the suites' logs),
# report.md and report.json (ftk bench's report). Exit status: 0 when every step passed.
#
# shellcheck disable=SC2317  # the step_* functions are called by name, as "step_$name"
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: benchmarks/gpu/verify.sh [--site DIR] [--out DIR] [--dry-run]

Builds ftkernels for this machine's GPU and runs, in 8 minutes at most: ftk doctor, the tests
marked cuda, compute-sanitizer memcheck and racecheck on small cases of every CUDA kernel
family, and ftk bench on the GPU beside bitsandbytes and PEFT; then prints README's GPU table.

  --site DIR   a folder of unpacked Python packages (bitsandbytes, hypothesis, ...), put first on
               PYTHONPATH for every step
  --out DIR    the results folder (default: benchmarks/results/gpu-<date>); at most 8 files
  --dry-run    print each step, the command it runs and its share of the 8 minutes; needs no GPU
  -h, --help   this text

Environment: PYTHON (default python3) is the interpreter every step uses.
EOF
}

die() {
  printf 'verify.sh: %s\n' "$*" >&2
  exit 2
}

PYTHON=${PYTHON:-python3}
SITE=""
OUT=""
DRY=0
while (($#)); do
  case $1 in
    --site)
      (($# >= 2)) || die "--site needs a directory"
      [[ -d $2 ]] || die "--site: '$2' is not a directory"
      SITE=$(cd "$2" && pwd)
      shift 2
      ;;
    --out)
      (($# >= 2)) || die "--out needs a directory"
      [[ ! -e $2 || -d $2 ]] || die "--out: '$2' exists and is not a directory"
      OUT=$2
      shift 2
      ;;
    --dry-run)
      DRY=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $OUT && $OUT != /* ]] && OUT=$PWD/$OUT # relative to where the command was given
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || die "cannot enter the checkout at $ROOT"
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
HERE=benchmarks/gpu

STEPS=(gpu site build doctor pytest memcheck racecheck bench table)
declare -A SHARE_S=([gpu]=5 [site]=5 [build]=100 [doctor]=20 [pytest]=90 [memcheck]=40 [racecheck]=50 [bench]=140 [table]=5)
declare -A TITLE=(
  [gpu]="a GPU, seen by nvidia-smi and torch"
  [site]="--site on PYTHONPATH, the optional packages"
  [build]="build and install, CUDA module for this GPU only"
  [doctor]="ftk doctor"
  [pytest]="the tests marked cuda"
  [memcheck]="compute-sanitizer memcheck, every case"
  [racecheck]="compute-sanitizer racecheck, the shared-memory cases"
  [bench]="ftk bench on the GPU, with a time budget"
  [table]="README's GPU table"
)
BUDGET_S=480
BENCH_MIN_S=45 # the least the bench keeps when earlier steps run over their shares
KILL_AFTER_S=10
MIN_STEP_S=10 # a step with less time than this left is skipped (the table always runs)

# ---- logging and running ------------------------------------------------------------------
LOG=""
PENDING=() # lines logged before the results folder exists (it is made once a GPU is found)
log() {
  printf '%s\n' "$*"
  if [[ -n $LOG ]]; then printf '%s\n' "$*" >>"$LOG"; else PENDING+=("$*"); fi
}

words() { # the command as one line, quoting the words that need it
  local w out="" plain='^[][A-Za-z0-9_./:=,+@%<>-]+$'
  for w in "$@"; do
    if [[ $w =~ $plain ]]; then out+=" $w"; else out+=" '$w'"; fi
  done
  printf '%s' "${out# }"
}

PIDS=()
on_signal() {
  log "verify.sh: interrupted; stopping the running step"
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  wait
  exit 130
}
trap on_signal INT TERM

# start LIMIT FILE CMD...: CMD in the background, its output appended to FILE, stopped LIMIT
# seconds later; its pid in STARTED. With --dry-run it only prints CMD.
start() {
  local limit=$1 file=$2
  shift 2
  if ((DRY)); then
    printf '    $ %s\n' "$(words "$@")"
    STARTED=""
    return 0
  fi
  log "\$ $(words "$@")"
  timeout --signal=INT --kill-after="$KILL_AFTER_S" "$limit" "$@" >>"$file" 2>&1 &
  STARTED=$!
  PIDS+=("$STARTED")
}

finish() { # finish PID: its exit status (0 for the dry run's empty pid)
  [[ -z $1 ]] && return 0
  wait "$1"
}

# run LIMIT FILE CMD...: start and wait; with FILE = the log, the output is also printed.
run() {
  local limit=$1 file=$2
  shift 2
  local dest=$file
  [[ $file == "$LOG" && -n $LOG ]] && dest=$TMPD/step.out && : >"$dest"
  start "$limit" "$dest" "$@"
  finish "$STARTED"
  local rc=$?
  if [[ $dest != "$file" ]]; then
    cat "$dest"
    cat "$dest" >>"$LOG"
  fi
  return "$rc"
}

tail_into_log() { # the last lines of a step's own file, indented, into the log
  [[ -f $1 ]] || return 0
  log "    ... the last lines of $(basename "$1"):"
  local line
  while IFS= read -r line; do log "    $line"; done < <(tail -n "${2:-8}" "$1")
}

# ---- the steps (each takes the seconds it may run; a non-zero status is a failure) ----------
step_gpu() {
  if ((DRY)); then
    start 0 - nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
    start 0 - "$PYTHON" "$HERE/inventory.py" gpu
    return 0
  fi
  local info
  if ! command -v nvidia-smi >/dev/null 2>&1 ||
    ! info=$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null) ||
    [[ -z $info ]]; then
    printf '%s\n' "verify.sh: no GPU found (no nvidia-smi, or it lists none); this script builds ftkernels' CUDA module and runs its GPU tests, sanitizers and benchmarks on an NVIDIA GPU (--dry-run shows the steps without one)" >&2
    exit 1
  fi
  log "nvidia-smi: $info"
  CAP=$(printf '%s\n' "$info" | head -n 1 | cut -d, -f2 | tr -d ' ')
  [[ $CAP =~ ^[0-9]+\.[0-9]+$ ]] || {
    printf 'verify.sh: nvidia-smi gave no compute capability (%s)\n' "$info" >&2
    exit 1
  }
  ARCH=${CAP/./}
  local torch_gpu
  if ! torch_gpu=$("$PYTHON" "$HERE/inventory.py" gpu 2>&1); then
    printf 'verify.sh: nvidia-smi lists a GPU but torch does not see it: %s\n' "$torch_gpu" >&2
    exit 1
  fi
  log "$torch_gpu"
}

step_site() {
  export PYTHONPATH="$TMPD/site${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}" # the build's folder first
  if ((DRY)); then printf '    PYTHONPATH=%s\n' "$PYTHONPATH"; else log "PYTHONPATH=$PYTHONPATH"; fi
  run "$1" "$LOG" "$PYTHON" "$HERE/inventory.py" packages
}

step_build() {
  run "$1" "$OUT/build.log" env FTK_CUDA=ON FTK_CUDA_ARCHITECTURES="${ARCH}-real" CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" \
    "$PYTHON" -m pip install -v --no-index --no-deps --no-build-isolation --disable-pip-version-check \
    --target "$TMPD/site" .
  local rc=$?
  tail_into_log "$OUT/build.log" 6
  ((DRY)) && return 0
  ((rc == 0)) || return "$rc"
  if ! compgen -G "$TMPD/site/ftkernels/_ftk_cuda*.so" >/dev/null; then
    log "the build has no CUDA module (_ftk_cuda); build.log says why"
    return 1
  fi
  run 60 "$LOG" "$PYTHON" "$HERE/inventory.py" built "$TMPD/site"
}

step_doctor() {
  run "$1" "$LOG" env -u FTK_BACKEND "$PYTHON" -m ftkernels.apps.cli doctor --json "$OUT/doctor.json"
}

step_pytest() {
  local common=(env -u FTK_BACKEND "$PYTHON" -m pytest -q -p no:cacheprovider -rfE --durations=8)
  local names=("cuda backend and the rest" "triton: test_nf4 dequantize" "triton: test_nf4 the rest" "triton: other files")
  local args=(
    "-m|cuda and not triton|tests/"
    "-m|cuda and triton|-k|dequantize|tests/test_nf4.py"
    "-m|cuda and triton|-k|not dequantize|tests/test_nf4.py"
    "-m|cuda and triton|--ignore=tests/test_nf4.py|tests/"
  )
  local i pids=() rcs=() rc=0 extra
  for i in "${!args[@]}"; do
    IFS='|' read -r -a extra <<<"${args[$i]}"
    ((DRY)) || printf '==== pytest part %d: %s (%s)\n' "$((i + 1))" "${names[$i]}" "$(words "${extra[@]}")" >"$TMPD/pytest-$i.txt"
    start "$1" "$TMPD/pytest-$i.txt" "${common[@]}" "${extra[@]}"
    pids+=("$STARTED")
  done
  for i in "${!pids[@]}"; do
    finish "${pids[$i]}"
    rcs+=("$?")
  done
  ((DRY)) && return 0
  : >"$OUT/pytest-cuda.txt"
  for i in "${!args[@]}"; do
    cat "$TMPD/pytest-$i.txt" >>"$OUT/pytest-cuda.txt"
    printf '==== pytest part %d exit status %d\n\n' "$((i + 1))" "${rcs[$i]}" >>"$OUT/pytest-cuda.txt"
    log "    part $((i + 1)) (${names[$i]}): exit ${rcs[$i]}; $(grep -E '^[= ]*[0-9]+ [a-z]+.* in [0-9.]+s' "$TMPD/pytest-$i.txt" | tail -n 1)"
    ((rcs[i] == 0)) || rc=${rcs[$i]}
  done
  return "$rc"
}

sanitizer() { # compute-sanitizer: on PATH, else in the CUDA toolkit (CUDA_HOME, next to nvcc)
  local p
  for p in "$(command -v compute-sanitizer)" "${CUDA_HOME:-${CUDA_PATH:-}}/bin/compute-sanitizer" \
    "$(dirname "$(readlink -f "$(command -v nvcc)" 2>/dev/null)" 2>/dev/null)/compute-sanitizer"; do
    [[ -n $p && -x $p && ! -d $p ]] && printf '%s' "$p" && return 0
  done
  printf 'compute-sanitizer'
}

# sanitize TOOL LIMIT ARGS...: sanitize_cases.py under compute-sanitizer's TOOL; ARGS go to the tool.
sanitize() {
  local tool=$1 limit=$2 cs
  shift 2
  cs=$(sanitizer)
  ((DRY)) || printf '\n==== %s\n' "$tool" >>"$OUT/sanitizer.txt"
  if ((!DRY)) && ! command -v "$cs" >/dev/null 2>&1; then
    log "compute-sanitizer not found (on PATH, in \$CUDA_HOME/bin or next to nvcc)"
    return 127
  fi
  run "$limit" "$OUT/sanitizer.txt" env FTK_BACKEND=cuda "$@"
  local rc=$?
  tail_into_log "$OUT/sanitizer.txt" 4
  return "$rc"
}

# Options of both tools: CUDA API errors are not reported (torch and its libraries probe driver
# entry points that do not exist, which would count as errors; ftkernels' launchers check every
# CUDA call themselves and raise, which fails the case); no limit on the wait for Python and
# torch to start; every process.
SANITIZER_OPTS=(--error-exitcode 1 --print-limit 50 --report-api-errors no --launch-timeout 0 --target-processes all)

step_memcheck() {
  sanitize memcheck "$1" PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(sanitizer)" --tool memcheck "${SANITIZER_OPTS[@]}" \
    "$PYTHON" "$HERE/sanitize_cases.py" --device cuda
}

step_racecheck() {
  sanitize racecheck "$1" "$(sanitizer)" --tool racecheck "${SANITIZER_OPTS[@]}" --kernel-name kns=ftk \
    "$PYTHON" "$HERE/sanitize_cases.py" --device cuda --subset racecheck
}

step_bench() {
  # ftk bench's own budget leaves room for a suite killed GRACE_S (20 s) past its deadline and
  # for the report, so that the bench ends before its limit stops it without one.
  local budget=$(($1 - 35))
  ((budget < 10)) && budget=10
  run "$1" "$OUT/bench.log" env -u FTK_BACKEND "$PYTHON" -m ftkernels.apps.cli bench --device cuda \
    --budget "$budget" --out "$TMPD/bench"
  local rc=$? f
  ((DRY)) && return 0
  for f in report.md report.json; do
    [[ -f $TMPD/bench/$f ]] && cp "$TMPD/bench/$f" "$OUT/$f"
  done
  for f in "$TMPD"/bench/raw/*.log; do
    [[ -f $f ]] && printf '\n==== %s\n' "$(basename "$f")" >>"$OUT/bench.log" && cat "$f" >>"$OUT/bench.log"
  done
  log "    report.md: $(grep -c '^| \*\*' "$OUT/report.md" 2>/dev/null || echo 0) rows of ours"
  return "$rc"
}

step_table() {
  run "$1" "$LOG" "$PYTHON" "$HERE/gpu_table.py" "$OUT"
}

# ---- the run --------------------------------------------------------------------------------
minutes() { awk -v s="$1" 'BEGIN { printf "%.1f", s / 60 }'; }
TOTAL_S=0
for name in "${STEPS[@]}"; do TOTAL_S=$((TOTAL_S + SHARE_S[$name])); done
ARCH="<compute capability, e.g. 90>"
NPROC=$(nproc 2>/dev/null || echo 1)

if ((DRY)); then
  TMPD="<temporary folder>"
  printf 'verify.sh --dry-run: %d steps, each with its share of the %s-minute budget and its commands\n' \
    "${#STEPS[@]}" "$(minutes "$BUDGET_S")"
  printf '(results would go to %s)\n' "$OUT"
  for i in "${!STEPS[@]}"; do
    name=${STEPS[$i]}
    printf 'step %d/%d %-9s %s min  %s\n' "$((i + 1))" "${#STEPS[@]}" "$name" "$(minutes "${SHARE_S[$name]}")" "${TITLE[$name]}"
    "step_$name" "${SHARE_S[$name]}"
  done
  printf 'total: %s min of the %s-minute budget\n' "$(minutes "$TOTAL_S")" "$(minutes "$BUDGET_S")"
  exit 0
fi

# limit_s I: the seconds step I may run, now: until the later steps would no longer fit in the
# total (the bench counted at its floor, as it fits itself to what it is given).
limit_s() {
  local j later=0
  for ((j = $1 + 1; j < ${#STEPS[@]}; j++)); do
    if [[ ${STEPS[$j]} == bench ]]; then later=$((later + BENCH_MIN_S)); else later=$((later + SHARE_S[${STEPS[$j]}])); fi
  done
  printf '%d' $((TOTAL_S - later - (SECONDS - T0)))
}

T0=$SECONDS
TMPD=$(mktemp -d -t ftk-verify.XXXXXX) || die "mktemp failed"
trap 'rm -rf "$TMPD"' EXIT
FAILED=()

for i in "${!STEPS[@]}"; do
  name=${STEPS[$i]}
  left=$(limit_s "$i")
  [[ $name == table ]] && ((left < MIN_STEP_S)) && left=$MIN_STEP_S
  log ">> step $((i + 1))/${#STEPS[@]} $name: ${TITLE[$name]} (share $(minutes "${SHARE_S[$name]}") min, ${left} s left)"
  t=$SECONDS
  if ((left < MIN_STEP_S)); then
    rc=-1
  else
    "step_$name" "$left"
    rc=$?
  fi
  took=$((SECONDS - t))
  if ((rc == -1)); then
    status="skipped (no time left)"
  elif ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status="TIMED OUT after ${left} s"
  else
    status="FAILED (exit $rc)"
  fi
  ((rc == 0)) || FAILED+=("$name")
  log "== step $((i + 1))/${#STEPS[@]} $name: $status ($took s)"
  if [[ $name == gpu ]]; then # a GPU is there: the results folder may now be made
    mkdir -p "$OUT" || die "--out: cannot make '$OUT'"
    OUT=$(cd "$OUT" && pwd)
    LOG=$OUT/verify.log
    : >"$LOG"
    for f in build.log doctor.json pytest-cuda.txt sanitizer.txt bench.log report.md report.json; do rm -f "${OUT:?}/$f"; done
    {
      printf 'verify.sh %s, checkout %s, %s cores\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')" "$NPROC"
      printf '%s\n' "${PENDING[@]}"
    } >>"$LOG"
  fi
  if [[ $name == build && $rc != 0 ]]; then
    log "verify.sh: the CUDA module did not build; every later step needs it, so the run stops here"
    exit 1
  fi
done

if ((${#FAILED[@]})); then
  log "verify.sh: FAILED: ${FAILED[*]} ($(minutes $((SECONDS - T0))) min; results in $OUT)"
  exit 1
fi
log "verify.sh: all ${#STEPS[@]} steps ok in $(minutes $((SECONDS - T0))) min; results in $OUT"
