#!/usr/bin/env bash
# Everything a lent GPU should run, in one command, inside 10 minutes (step limits add up to 595 s):
#   the csrc build, CUDA tests, the AOT resource report, every bench at full size; JSON + a
#   markdown summary into $OUT.
# On the device machine (torch 2.11 cu130, triton, nvcc, ninja; no diffusers): put the diffusers
# wheel (and any other missing wheel: bench_step/profile_step need peft too) in .whl/ and name .whl
# in the run's carry; this script installs them into /tmp/site. Then, from the repo root:
#   bash bench/gpu_suite.sh
# SUITE=step bash bench/gpu_suite.sh runs only the training-step benches with longer limits
# (bench_step 120 s at 512 + 1024, profile_step 30 s, the memory modes 240 s): a second device call, as the full suite
# leaves them only 40 + 15 s (a 512x512 LeapAlign-vs-baseline pair and a short profile).
#
#   bash bench/gpu_suite.sh --dry-run
# runs every step of the full suite on this machine's CPU at toy size (a few kernel tests, the
# AOT report of one op for sm_90, tiny blocks and the tiny model, the torch backend in the block
# bench), with the same plumbing, logs and summary: proves the script before a GPU is had.
# $OUT defaults to a fresh temporary folder then. tests/test_bench_smoke.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
if [ $DRY = 1 ]; then
  OUT=${OUT:-$(mktemp -d -t gpu_suite_dry.XXXXXX)}
  DEV=cpu
  unset TRITON_INTERPRET LEAPALIGN_BACKEND
else
  OUT=${OUT:-bench/results/local}
  DEV=cuda
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # triton's default, stated (3.9 warns otherwise)
if [ $DRY = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  [ $DRY = 1 ] && limit=180  # a shared CPU: the dry run checks plumbing, not the GPU's time budget
  echo "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "exit $rc" >> "$OUT/$name.log"
  echo "$name $((SECONDS - t0)) s (limit $limit s)" >> "$OUT/times.txt"
  echo "   exit $rc ($(tail -n 2 "$OUT/$name.log" | head -n 1))"
  [ $rc -eq 0 ] || status=1
}
pick() { if [ $DRY = 1 ]; then echo "$2"; else echo "$1"; fi; }  # pick GPU_VALUE DRY_VALUE

{
  echo "# GPU suite$( [ $DRY = 1 ] && echo ' (dry run: CPU, toy sizes)')"
  echo
  echo "- date: $(date -u +%FT%TZ)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  python3 -c "import torch, triton; print(f'- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
  python3 -c "import importlib.util as u; print('- attention: ' + ('flash-attn' if u.find_spec('flash_attn') else 'torch SDPA (flash-attn not installed)'))"
} > "$OUT/summary.md"

SUITE=${SUITE:-all}
if [ "$SUITE" = step ] && [ $DRY = 0 ]; then
  # 5. one whole training iteration per method x policy at FLUX.1-dev size; 6. its profile
  step bench_step 120 python3 bench/bench_step.py --device cuda --out "$OUT" --res 1024 512 \
    --methods leapalign refl draft-lv drtune full --policies lean baseline none full --iters 2 --budget-s 100
  [ -f "$OUT/step_cuda.md" ] && { echo; cat "$OUT/step_cuda.md"; } >> "$OUT/summary.md"
  step profile_step 30 python3 bench/profile_step.py --device cuda --out "$OUT" --res 512 --steps 25
  [ -f "$OUT/profile_cuda.md" ] && { echo; head -n 45 "$OUT/profile_cuda.md"; } >> "$OUT/summary.md"
  # 7. the memory modes (fp8 base, block swap) against the baseline, LeapAlign LoRA + HPSv2.1's
  #    architecture: peak, time per iteration, host -> device bytes
  step bench_modes 240 python3 bench/bench_step.py --device cuda --out "$OUT" --res 1024 512 \
    --modes lean full fp8 fp8+swap --iters 2
  [ -f "$OUT/modes_cuda.md" ] && { echo; cat "$OUT/modes_cuda.md"; } >> "$OUT/summary.md"
  { echo; echo "## Steps"; for f in "$OUT"/*.log; do echo "- $(basename "$f" .log): $(tail -n 1 "$f")"; done; } >> "$OUT/summary.md"
  cat "$OUT/summary.md"
  exit $status
fi

# 1. csrc: JIT build with ninja (the same sources setup.py builds); dry run: the loader's status line
if [ $DRY = 1 ]; then
  step csrc_build 60 python3 -c "from kernels import _csrc; print(_csrc.status())"
else
  step csrc_build 130 python3 -c "from kernels import _csrc; _csrc.load(); print(_csrc.status())"
fi
# 2. CUDA tests: every op on every backend vs its reference, the csrc ops, the engine's GPU tests
step kernel_tests 120 python3 -m pytest -q -p no:cacheprovider $(pick tests/kernels tests/kernels/test_gelu_tanh.py)
# (dry run: the marker selection on one light file; every test it picks is skipped on a CPU)
step engine_gpu_tests 60 python3 -m pytest -q -m gpu -p no:cacheprovider \
  $(pick "tests --ignore=tests/kernels" tests/kernels/test_gelu_tanh.py)
# 3. every Triton kernel compiled for sm_90 / sm_80: registers, spills, smem, ideal times (the
#    installed triton; the csrc section is CPU work, left to bench/results/triton_aot.md)
step aot_kernels 40 python3 bench/aot_kernels.py --out "$OUT" --no-csrc \
  $(pick "--jobs 12" "--toy --targets sm_90 --only gelu --jobs 1")
[ -f "$OUT/triton_aot.md" ] && { echo; head -n 9 "$OUT/triton_aot.md" | tail -n +3; } >> "$OUT/summary.md"
# 4. kernel benchmarks at Flux-dev sizes
KSEL=$(pick "" "leap_connect and fwd and triton")
step bench_kernels 130 python3 -m pytest bench/bench_kernels.py -q -p no:cacheprovider --benchmark-enable \
  --benchmark-json="$OUT/bench_kernels.json" ${KSEL:+-k "$KSEL"}
[ -f "$OUT/bench_kernels.json" ] && python3 bench/summarize_kernels.py "$OUT/bench_kernels.json" >> "$OUT/summary.md"
# 5. one double + one single block per backward policy (none / full / lean / checkpointed diffusers)
if [ $DRY = 1 ]; then
  step bench_block 60 env TRITON_INTERPRET=1 python3 bench/bench_block.py --device cpu --out "$OUT" \
    --heads 2 --head-dim 32 --tokens-img 16 --tokens-txt 8 --repeats 1 --warmup 0 --backend torch
else
  step bench_block 60 python3 bench/bench_block.py --device cuda --out "$OUT"
fi
[ -f "$OUT/block_$DEV.md" ] && { echo; cat "$OUT/block_$DEV.md"; } >> "$OUT/summary.md"
# 6. one whole training iteration (bench/bench_step.py), cut to fit: leapalign lean vs the
#    diffusers-checkpointed baseline at 512x512, one timed iteration (SUITE=step runs the full set)
step bench_step 40 python3 bench/bench_step.py --device $DEV --out "$OUT" --methods leapalign \
  --policies lean baseline --iters 1 --t-check 0 --budget-s 25 \
  $(pick "--res 512" "--res 64 --real --tiny --steps 2")
STEP_MD=$(pick step_cuda.md step_cpu_tiny.md)
[ -f "$OUT/$STEP_MD" ] && { echo; cat "$OUT/$STEP_MD"; } >> "$OUT/summary.md"
# 7. torch.profiler trace + top kernels of one leapalign iteration (full size, 512x512, short rollout)
step profile_step 15 python3 bench/profile_step.py --device $DEV --out "$OUT" $(pick "--res 512 --steps 4" "--steps 2") --rows 20
[ -f "$OUT/profile_$DEV.md" ] && { echo; head -n 35 "$OUT/profile_$DEV.md"; } >> "$OUT/summary.md"

{
  echo
  echo "## Steps"
  for f in "$OUT"/*.log; do echo "- $(basename "$f" .log): $(tail -n 1 "$f")"; done
  echo
  echo "## Step times"
  sed 's/^/- /' "$OUT/times.txt"
} >> "$OUT/summary.md"
cat "$OUT/summary.md"
echo "outputs in $OUT"
exit $status
