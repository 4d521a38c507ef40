"""The trainer's two model passes on W1-shaped batches, under different settings, side by side in one process.

The reference's log-probs (`ReferenceWorker.compute_log_probs`) and the actor's update (`ActorRolloutWorker.update`:
forward, backward and AdamW step) on 32 trajectories of SmolLM2-135M-Instruct shaped like W1's (groups of 4
sharing a 40-70 token prompt, a 128-token response, every response token carrying loss). No Ray and no rollout engine: the workers'
own methods run in this process, so a setting's effect on the two passes is seen without the rest of the step.
Each setting is timed `--reps` times, interleaved with the others, and the median is printed.

    .venv/bin/python scripts/bench/passes.py [--reps 3] [--settings NAME ...]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from common import machine
from w1 import W1_TRAINING

# name -> overrides of configs/cpu.yaml on top of W1's training settings (scripts/bench/w1.py)
SETTINGS = {
    "w1 (micro 4 x 1024 tokens)": [],
    "w1, each trajectory in its own row": ["actor.share_prompts=false"],
    "micro 8 x 2048 tokens": ["actor.micro_batch_size=8", "actor.micro_batch_tokens=2048"],
    "micro 16 x 4096 tokens": ["actor.micro_batch_size=16", "actor.micro_batch_tokens=4096"],
    "reference in bf16": ["model.ref_dtype=bfloat16"],
    "micro 8 x 2048, reference in bf16": ["actor.micro_batch_size=8", "actor.micro_batch_tokens=2048",
                                          "model.ref_dtype=bfloat16"],
}
W1 = [f"{k}={v}" for k, v in W1_TRAINING.items()]


def trajectories(n: int = 32, seed: int = 0):
    from zerosearch.rollout.trajectory import Trajectory

    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 4 == 0:  # a group of 4 rollouts shares its prompt, as in W1
            prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(40, 70))]
        response = [rng.randrange(100, 40000) for _ in range(128)]
        out.append(Trajectory(uid=i, group=i // 4, question="q", golden_answers=["a"], prompt_ids=prompt,
                              response_ids=response, loss_mask=[1] * len(response)))
    return out


def workers(overrides: list[str]):
    import torch

    from zerosearch.config import load_config
    from zerosearch.training.workers import ActorRolloutWorker, ReferenceWorker, _ModelWorker

    cfg = load_config("cpu", W1 + overrides)
    ref = ReferenceWorker(cfg)
    actor = object.__new__(ActorRolloutWorker)  # the update path only: no rollout engine
    _ModelWorker.__init__(actor, cfg)
    actor.optimizer = torch.optim.AdamW(actor.net.parameters(), lr=cfg.actor.lr, weight_decay=cfg.actor.weight_decay)
    actor.scheduler = torch.optim.lr_scheduler.LambdaLR(actor.optimizer, lambda _: 1.0)
    return ref, actor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    import torch

    trajs = trajectories()
    adv = torch.randn(len(trajs), 128)
    built = {name: workers(SETTINGS[name]) for name in args.settings}
    times: dict[str, dict[str, list[float]]] = {name: {"ref": [], "update": []} for name in args.settings}
    for rep in range(args.reps + 1):  # the first round warms the kernels up and is not counted
        for name, (ref, actor) in built.items():
            t0 = time.perf_counter()
            ref_lp = ref.compute_log_probs(trajs)
            t1 = time.perf_counter()
            actor.update(trajs, adv, ref_lp, None, step=rep)
            t2 = time.perf_counter()
            if rep:
                times[name]["ref"].append(t1 - t0)
                times[name]["update"].append(t2 - t1)
            print(f"round {rep} {name}: reference {t1 - t0:.2f} s, update {t2 - t1:.2f} s", file=sys.stderr, flush=True)
    print(f"machine: {machine()}")
    print(f"\nmedian seconds over {args.reps} rounds, 32 trajectories of 40-70 + 128 tokens")
    print("| setting | reference log-probs | actor update | sum |")
    print("|---|---|---|---|")
    for name, t in times.items():
        r, u = statistics.median(t["ref"]), statistics.median(t["update"])
        print(f"| {name} | {r:.2f} | {u:.2f} | {r + u:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
