#!/usr/bin/env bash
# The arena issue's matrix: `python -m hybridkv.sim --compare splits` on chat, agent and
# docqa x gemma3-27b (SWA:full layers 5:1, window 1024) and gpt-oss-120b (1:1, window 128),
# every table into one file (default benchmarks/arena_sweep.txt).
#
#   benchmarks/arena_sweep.sh [FILE]      # from the repository root, ~6 min on 2 cores
#
# Sizes: each budget makes its workload memory-bound (the steps differ between SWA shares,
# so the split is the bottleneck) while a sweep of 11 runs stays within 2 minutes. Exit
# status: 0 when every run was clean, 1 otherwise (the tables still print).
set -uo pipefail

out=${1:-benchmarks/arena_sweep.txt}
# model  GiB  workload  requests
MATRIX=(
  "gemma3-27b   4    chat   80"
  "gemma3-27b   4    agent  80"
  "gemma3-27b   4    docqa  50"
  "gpt-oss-120b 0.5  chat   80"
  "gpt-oss-120b 0.5  agent  100"
  "gpt-oss-120b 0.5  docqa  50"
)

status=0
: >"$out"
echo "# hybridkv arena sweep, $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null)" |
  tee -a "$out"
for cell in "${MATRIX[@]}"; do
  read -r model gib workload requests <<<"$cell"
  printf '\n## %s, %s, %s GiB, %s requests\n' "$model" "$workload" "$gib" "$requests" | tee -a "$out"
  start=$SECONDS
  python -m hybridkv.sim --compare splits --model "$model" --memory "$gib" \
    --workload "$workload" --requests "$requests" --quiet 2>&1 | tee -a "$out"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "($((SECONDS - start)) s)" | tee -a "$out"
done
exit $status
