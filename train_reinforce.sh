#!/usr/bin/env bash
# REINFORCE training (upstream's algorithm.adv_estimator=reinforce: the outcome reward on every policy token, no
# baseline; REINFORCE++ is algorithm.adv_estimator=reinforce_plus_plus) with upstream ZeroSearch's interface,
# KEY VALUE pairs read by name in any order:
#   bash train_reinforce.sh NUM_GPUS_PER_NODE 4 MODEL_PATH Qwen/Qwen2.5-3B-Instruct DATA_PATH ZeroSearch_dataset \
#        TOTAL_STEPS 203 IP localhost SEARCH_MODE simulate_prompt SIMULATION_LLM Qwen/Qwen2.5-14B-Instruct \
#        START_THRESHOLD 0 END_THRESHOLD 0.5 [key=value ...] [--print-config]
# Keys: NUM_GPUS_PER_NODE MODEL_PATH DATA_PATH TOTAL_STEPS IP SEARCH_MODE SIMULATION_LLM START_THRESHOLD
#       END_THRESHOLD SEARCH_ENGINE MAX_TURNS TOPK. With no arguments: the embedded CPU default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m zerosearch.cli train --algo reinforce "$@"
