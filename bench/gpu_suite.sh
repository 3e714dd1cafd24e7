#!/usr/bin/env bash
# Everything a lent GPU should run, in one command, inside 10 minutes (step limits add up to 600 s):
#   CUDA tests, the csrc build, every bench at full size; JSON + a markdown summary into $OUT.
# On the device machine (torch 2.11 cu130, triton, nvcc, ninja; no diffusers): put the diffusers
# wheel (and any other missing wheel: bench_step/profile_step need peft too) in .whl/ and name .whl
# in the run's carry; this script installs them into /tmp/site. Then, from the repo root:
#   bash bench/gpu_suite.sh
# SUITE=step bash bench/gpu_suite.sh runs only the training-step benches with longer limits
# (bench_step 120 s at 512 + 1024, profile_step 30 s): a second device call, as the full suite
# leaves them only 45 + 15 s (a 512x512 LeapAlign-vs-baseline pair and a short profile).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc ($(tail -n 1 "$OUT/$name.log"))"
  [ $rc -eq 0 ] || status=1
}

{
  echo "# GPU suite"
  echo
  echo "- date: $(date -u +%FT%TZ)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  python3 -c "import torch, triton; print(f'- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
  python3 -c "import importlib.util as u; print('- attention: ' + ('flash-attn' if u.find_spec('flash_attn') else 'torch SDPA (flash-attn not installed)'))"
} > "$OUT/summary.md"

SUITE=${SUITE:-all}
if [ "$SUITE" = step ]; then
  # 5. one whole training iteration per method x policy at FLUX.1-dev size; 6. its profile
  step bench_step 120 python3 bench/bench_step.py --device cuda --out "$OUT" --res 1024 512 \
    --methods leapalign refl draft-lv drtune full --policies lean baseline none full --iters 2 --budget-s 100
  [ -f "$OUT/step_cuda.md" ] && { echo; cat "$OUT/step_cuda.md"; } >> "$OUT/summary.md"
  step profile_step 30 python3 bench/profile_step.py --device cuda --out "$OUT" --res 512 --steps 25
  [ -f "$OUT/profile_cuda.md" ] && { echo; head -n 45 "$OUT/profile_cuda.md"; } >> "$OUT/summary.md"
  { echo; echo "## Steps"; for f in "$OUT"/*.log; do echo "- $(basename "$f" .log): $(tail -n 1 "$f")"; done; } >> "$OUT/summary.md"
  cat "$OUT/summary.md"
  exit $status
fi

# 1. csrc: JIT build with ninja (the same sources setup.py builds)
step csrc_build 150 python3 -c "from kernels import _csrc; _csrc.load(); print(_csrc.status())"
# 2. CUDA tests: every op on every backend vs its reference, the csrc ops, the engine's GPU tests
step kernel_tests 120 python3 -m pytest -q tests/kernels -p no:cacheprovider
step engine_gpu_tests 60 python3 -m pytest -q -m gpu tests --ignore=tests/kernels -p no:cacheprovider
# 3. kernel benchmarks at Flux-dev sizes
step bench_kernels 150 python3 -m pytest bench/bench_kernels.py -q -p no:cacheprovider --benchmark-enable \
  --benchmark-json="$OUT/bench_kernels.json"
[ -f "$OUT/bench_kernels.json" ] && python3 bench/summarize_kernels.py "$OUT/bench_kernels.json" >> "$OUT/summary.md"
# 4. one double + one single block per backward policy (none / full / lean / checkpointed diffusers)
step bench_block 60 python3 bench/bench_block.py --device cuda --out "$OUT"
[ -f "$OUT/block_cuda.md" ] && { echo; cat "$OUT/block_cuda.md"; } >> "$OUT/summary.md"
# 5. one whole training iteration (bench/bench_step.py), cut to fit: leapalign lean vs the
#    diffusers-checkpointed baseline at 512x512, one timed iteration (SUITE=step runs the full set)
step bench_step 45 python3 bench/bench_step.py --device cuda --out "$OUT" --res 512 --methods leapalign \
  --policies lean baseline --iters 1 --t-check 0 --budget-s 30
[ -f "$OUT/step_cuda.md" ] && { echo; cat "$OUT/step_cuda.md"; } >> "$OUT/summary.md"
# 6. torch.profiler trace + top kernels of one leapalign iteration (full size, 512x512, short rollout)
step profile_step 15 python3 bench/profile_step.py --device cuda --out "$OUT" --res 512 --steps 4 --rows 20
[ -f "$OUT/profile_cuda.md" ] && { echo; head -n 35 "$OUT/profile_cuda.md"; } >> "$OUT/summary.md"

{
  echo
  echo "## Steps"
  for f in "$OUT"/*.log; do echo "- $(basename "$f" .log): $(tail -n 1 "$f")"; done
} >> "$OUT/summary.md"
cat "$OUT/summary.md"
exit $status
