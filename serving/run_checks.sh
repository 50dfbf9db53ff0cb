#!/usr/bin/env bash
# `make test-serving`: export a moefied model with `moefy export` (hf folder and GGUF) and check
# it in vLLM's CPU build and in llama.cpp against greedy transformers, timed against dense SmolLM2.
# Settings (environment; the Makefile passes its variables):
#   SERVING_OUT    results folder (default runs/serving): vllm.json, llamacpp.json, records
#   SERVING_MOE    moefied model folder to export (default runs/carved; built as `make demo`
#                  builds it when missing)
#   SERVING_ENGINES  engines to check (default "vllm llamacpp")
#   SERVING_EXPORT_ARGS  extra arguments for `moefy export` (default: --keep 0.25
#                  --eval-tokens 0: a quarter of the experts, no perplexity check)
# An engine that fails to install or to run is reported and the other still runs; the exit
# status is 1 when any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${SERVING_OUT:-runs/serving}
MOE=${SERVING_MOE:-runs/carved}
RUNS=${RUNS:-runs}
ENGINES=${SERVING_ENGINES:-vllm llamacpp}
MOEFY=.venv/bin/moefy
DEFAULT_EXPORT_ARGS="--keep 0.25 --eval-tokens 0"
read -r -a EXPORT_ARGS <<< "${SERVING_EXPORT_ARGS-$DEFAULT_EXPORT_ARGS}"

if ! "$MOEFY" export --help >/dev/null 2>&1; then
    echo "error: '$MOEFY export' is missing: this checkout has no export command, which" \
        "make test-serving needs to write the models it checks" >&2
    exit 2
fi
set -e
mkdir -p "$OUT"
DENSE=$(.venv/bin/python -c 'from moefy.models.load import SMOLLM2, cache_dir, load_model
load_model(SMOLLM2)
print(cache_dir() / "models" / SMOLLM2)')
if [[ ! -f $MOE/config.json ]]; then
    echo "== building the carved MoE $MOE (as make demo does)"
    [[ -d $RUNS/profile ]] || "$MOEFY" profile --model smollm2-135m --data bbc-news \
        --tokens 8192 --coactivation --out "$RUNS/profile" --overwrite
    "$MOEFY" convert --model smollm2-135m --expert-size 8 --shared 0.125 --method activation \
        --profile "$RUNS/profile" --router lstsq --data bbc-news --tokens 4096 --out "$MOE" \
        --overwrite
fi
echo "== exporting $MOE"
"$MOEFY" export --model "$MOE" --out "$OUT/export-hf" --format hf --dtype fp32 --overwrite \
    "${EXPORT_ARGS[@]}"
set +e

status=0
for engine in $ENGINES; do
    echo "== $engine"
    if ! serving/setup_venvs.sh "$engine"; then
        echo "error: $engine could not be installed (see the lines above)" >&2
        status=1
        continue
    fi
    case $engine in
        vllm)
            .venv-vllm/bin/python serving/check.py --engine vllm --model "$OUT/export-hf" \
                --dense "$DENSE" --out "$OUT" || status=1
            ;;
        llamacpp)
            "$MOEFY" export --model "$MOE" --out "$OUT/export-f32.gguf" --format gguf \
                --dtype fp32 --overwrite "${EXPORT_ARGS[@]}" || { status=1; continue; }
            [[ -f $OUT/dense-f32.gguf ]] || serving/hf_to_gguf.sh "$DENSE" "$OUT/dense-f32.gguf" f32 \
                || { status=1; continue; }
            .venv-llamacpp/bin/python serving/check.py --engine llamacpp \
                --model "$OUT/export-hf" --engine-model "$OUT/export-f32.gguf" \
                --dense "$DENSE" --dense-engine-model "$OUT/dense-f32.gguf" --out "$OUT" || status=1
            ;;
        *) echo "error: unknown engine '$engine': use vllm or llamacpp" >&2; status=1 ;;
    esac
done
echo "results: $OUT/vllm.json, $OUT/llamacpp.json"
exit $status
