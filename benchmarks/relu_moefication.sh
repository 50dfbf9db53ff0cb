#!/usr/bin/env bash
# MoEfication before and after sparsity-raising training: the same pipeline (16k-token profile,
# 64 co-activation experts, mlp routers on 8k tokens, oracle and router at 50 / 25 / 12.5 % of
# experts on 4k evaluation tokens) on SmolLM2-135M and on a model trained by
#   moefy finetune --relufy ... --out runs/relu
# Each perplexity ratio is against that model's own dense perplexity (every expert running).
# Run: bash benchmarks/relu_moefication.sh [runs/relu]
set -euo pipefail
MOEFY=${MOEFY:-.venv/bin/moefy}
TRAINED=${1:-runs/relu}
OUT=${OUT:-runs/relu-compare}
mkdir -p "$OUT"
for name in base trained; do
  model=smollm2-135m
  [ "$name" = trained ] && model=$TRAINED
  "$MOEFY" profile --model "$model" --data bbc-news --tokens 16384 --coactivation \
    --out "$OUT/$name-profile" --overwrite
  "$MOEFY" convert --model "$model" --experts 64 --method coactivation \
    --profile "$OUT/$name-profile" --out "$OUT/$name-moe" --overwrite
  "$MOEFY" train-routers --model "$OUT/$name-moe" --data bbc-news --router mlp --tokens 8192 \
    --eval-tokens 4096 --keep 0.5,0.25,0.125 --oracle --out "$OUT/$name-routed" --overwrite \
    --results "$OUT/$name-results.json"
done
