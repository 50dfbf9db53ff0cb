#!/usr/bin/env bash
# Routers fitted end to end against routers fitted to the experts' norms, on one harness.
# 1. train-routers: mlp routers fitted to the true expert norms (ListNet, 2 rounds);
# 2. finetune --train routers --straight-through: the same routers trained further by the
#    model's own loss (language model + KL to the model with every expert), the model frozen;
# 3. one sweep per folder: oracle and mlp router at 50 / 25 / 12.5 % of experts and dynamic k at
#    tau 0.9 / 0.8, perplexity on 4,096 BBC News evaluation tokens (the experts are the same in
#    both folders, so the oracle rows must agree).
# Needs a moefied, routed folder, by default the MoE-aware fine-tuned one that
#   bash benchmarks/moe_aware.sh
# makes. Run: bash benchmarks/router_e2e.sh [routed-folder] [dense-model]
set -euo pipefail
MOEFY=${MOEFY:-.venv/bin/moefy}
ROUTED=${1:-runs/moe-aware/trained}
DENSE=${2:-runs/relu}
OUT=${OUT:-runs/router-e2e}
HIDDEN=${HIDDEN:-256}
TOKENS=${TOKENS:-65536}
E2E_TOKENS=${E2E_TOKENS:-32768}
TEMPERATURE=${TEMPERATURE:-0.5}
ROUTER_LOSS=${ROUTER_LOSS:-1}
LR=${LR:-1e-3}
NAME=${NAME:-e2e}  # folder of the end-to-end routers (another NAME tries other settings)
mkdir -p "$OUT"
if [ ! -d "$OUT/listnet" ]; then  # the norm-fitted routers once; rerun reuses them
  "$MOEFY" train-routers --model "$ROUTED" --data bbc-news --router mlp --hidden "$HIDDEN" \
    --tokens "$TOKENS" --rounds 2 --eval-tokens 4096 --keep 0.5,0.25,0.125 --taus 0.9,0.8 \
    --oracle --out "$OUT/listnet" --results "$OUT/listnet-results.json"
fi
"$MOEFY" finetune --model "$OUT/listnet" --data bbc-news --keep 0.25 --distill 1 \
  --train routers --straight-through "$TEMPERATURE" --router-loss "$ROUTER_LOSS" --lr "$LR" \
  --reg none --train-tokens "$E2E_TOKENS" --tokens 262144 --eval-tokens 4096 \
  --checkpoint-every 16 --out "$OUT/$NAME"
for name in listnet "$NAME"; do
  [ -f "$OUT/sweep-$name/rows.json" ] && continue  # swept already
  "$MOEFY" sweep --model "$DENSE" --data bbc-news --methods dense,moe-oracle,moe-mlp,moe-dynk \
    --levels 0.5,0.25,0.125 --level moe-dynk=0.9,0.8 --tokens 4096 --tasks perplexity \
    --moe "$OUT/$name" --routed "$OUT/$name" --out "$OUT/sweep-$name"
done
