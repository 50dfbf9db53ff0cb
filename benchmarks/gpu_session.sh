#!/usr/bin/env bash
# The GPU checks and figures (the bench's GPU goals) as one prepared run for a lent GPU machine (the device
# tool's `run`), using that machine's own python3, torch, triton and transformers: nothing is
# installed there (its image has everything moefy's GPU paths import; MOEFY_CACHE below spares
# platformdirs, which it lacks).
#
#   bash benchmarks/gpu_session.sh [STAGE ...]
#
# Stages, run in the order given (default: env check kernels splits goals):
#   env           GPU, driver and package versions
#   check         pytest -m gpu: the Triton kernels compiled on CUDA against float64 references,
#                 every verb and the CLI on CUDA, fp32 CUDA against the CPU
#   kernels       moefy bench --device cuda --only ffn --quick: Triton against cuBLAS, Llama-3-8B /
#                 70B shapes, batch 1 / 4 / 16, 0 to 90 % sparsity, the Llama-3-8B MLP block
#                 with TEAL thresholds and as 64 expert blocks
#   splits        benchmarks/gpu_kernel_splits.py: the threshold kernel's split count and
#                 pipelining depth against cuBLAS (the first H200 run found it flat in sparsity)
#   decode-small  decode of a random SmolLM2-135M-shaped model, dense / TEAL / MoE, CUDA graphs
#   decode-8b     the same for a random Llama-3-8B-shaped model (32 layers)
#   goals         the issue's speed goals against what this run's JSON holds (met / short /
#                 not measured): python -m moefy.bench.gpu_goals $OUT
# Each stage runs under its own time limit (seconds, override with LIMIT_<STAGE>, e.g.
# LIMIT_DECODE_8B=600) and writes its log (and JSON) to $OUT (the device tool's folder; else
# runs/gpu-session), so a stage cut off by its limit loses only itself. At most 8 files land in
# $OUT, what the device tool returns.
#
# On a 15-minute device budget (a machine's start takes one or two of them): first
# `bash benchmarks/gpu_session.sh` (timeout_s 540), then, on the still-warm machine,
# `bash benchmarks/gpu_session.sh decode-8b decode-small goals` (timeout_s 540). The second call
# finds $OUT emptied, so its goals line up only the decode goal: the first call's has the rest.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/runs/gpu-session}
export PYTHON=${PYTHON:-python3}
# absolute, so subprocesses started from other folders (torchrun, tests) import this checkout
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MOEFY_PROGRESS=lines MOEFY_CACHE=${MOEFY_CACHE:-/tmp/moefy-cache}
MOEFY=("$PYTHON" -m moefy.cli.main)

declare -A LIMIT=([env]=60 [check]=240 [kernels]=180 [splits]=120 [decode-small]=150 [decode-8b]=330 [goals]=30)

# run_stage NAME CMD...: CMD under NAME's limit, its output to $OUT/NAME.log, then the log's end.
run_stage() {
  local name=$1 var limit start rc
  shift
  var="LIMIT_${name//-/_}"
  var=${var^^}
  limit=${!var:-${LIMIT[$name]}}
  echo "=== $name (limit ${limit} s)"
  start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (time limit)')"
  tail -n "${TAIL_LINES:-60}" "$OUT/$name.log"
  echo
}

env_report() {
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not found"
  "$PYTHON" - <<'EOF'
import platform, torch, transformers
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "missing"
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, triton {triton_version}, CUDA available: {cuda}")
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"capability {p.major}.{p.minor}")
EOF
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env check kernels splits goals)
for stage in "${stages[@]}"; do
  if [ -z "${LIMIT[$stage]+set}" ]; then
    echo "gpu_session.sh: unknown stage '$stage': use env, check, kernels, splits, decode-small, decode-8b or goals" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
for stage in "${stages[@]}"; do
  case $stage in
    env) run_stage env bash -c "$(declare -f env_report); env_report" ;;
    check) run_stage check "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rfEs ;;
    kernels)
      run_stage kernels "${MOEFY[@]}" bench --device cuda --only ffn --quick \
        --out "$OUT/kernels.json" --overwrite ;;
    splits) run_stage splits "$PYTHON" benchmarks/gpu_kernel_splits.py --out "$OUT/splits.json" ;;
    decode-small)
      run_stage decode-small "${MOEFY[@]}" bench --device cuda --only decode --quick \
        --shape smollm2-135m --out "$OUT/decode-small.json" --overwrite ;;
    decode-8b)
      run_stage decode-8b "${MOEFY[@]}" bench --device cuda --only decode --quick \
        --shape llama3-8b --out "$OUT/decode-8b.json" --overwrite ;;
    goals) run_stage goals "$PYTHON" -m moefy.bench.gpu_goals "$OUT" ;;
  esac
done
