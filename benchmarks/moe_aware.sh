#!/usr/bin/env bash
# MoE-aware fine-tuning (routers in the loop, efficiency term) against the same moefied model
# before it, scored on one harness: oracle and mlp router at 50 / 25 / 12.5 % of experts and
# dynamic k at tau 0.9 / 0.8, perplexity on 4,096 BBC News evaluation tokens, each ratio against
# the dense model the experts came from.
# Needs a routed folder (moefy train-routers), by default the ReLU-trained one that
#   bash benchmarks/relu_moefication.sh runs/relu
# makes. Run: bash benchmarks/moe_aware.sh [routed-folder] [dense-model]
# (EFFICIENCY=0.5 ROUTER_LR=3e-4 OUT=runs/moe-aware gives the first run of the README table)
set -euo pipefail
MOEFY=${MOEFY:-.venv/bin/moefy}
ROUTED=${1:-runs/relu-compare/trained-routed}
DENSE=${2:-runs/relu}
OUT=${OUT:-runs/moe-aware}
TRAIN_TOKENS=${TRAIN_TOKENS:-65536}
EFFICIENCY=${EFFICIENCY:-2}
ROUTER_LR=${ROUTER_LR:-3e-3}
"$MOEFY" finetune --model "$ROUTED" --data bbc-news --keep 0.25 --distill 1 \
  --efficiency "$EFFICIENCY" --router-lr "$ROUTER_LR" --reg none --lr 3e-4 \
  --train-tokens "$TRAIN_TOKENS" \
  --tokens 262144 --eval-tokens 4096 --checkpoint-every 16 --out "$OUT/trained"
for name in before after; do
  model=$ROUTED
  [ "$name" = after ] && model=$OUT/trained
  "$MOEFY" sweep --model "$DENSE" --data bbc-news --methods dense,moe-oracle,moe-mlp,moe-dynk \
    --levels 0.5,0.25,0.125 --level moe-dynk=0.9,0.8 --tokens 4096 --tasks perplexity \
    --moe "$model" --routed "$model" --out "$OUT/sweep-$name"
done
