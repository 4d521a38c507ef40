"""`zerosearch rollout`: one batch of multi-turn rollouts written as JSONL, for users and checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from zerosearch.config import Config
from zerosearch.curriculum import curriculum_steps, noise_probability
from zerosearch.data import load_samples
from zerosearch.rollout.factory import train_sampling
from zerosearch.rollout.loop import loop_metrics
from zerosearch.rollout.stack import build_rollout_stack

logger = logging.getLogger("zerosearch.rollout")


def run_rollout_command(cfg: Config, out: str, num_prompts: int, split: str, step: int = 0) -> int:
    samples = load_samples(cfg, split)[:num_prompts]
    s = cfg.search
    p_noisy = noise_probability(step, curriculum_steps(cfg), s.start_threshold, s.end_threshold, s.curriculum_base)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with build_rollout_stack(cfg, start_servers=True, log_dir=out_path.parent / "logs") as rollout:
        with tqdm(total=len(samples) * cfg.rollout.n, desc="rollout", unit="traj") as bar:
            trajs, stats = rollout.loop.run(samples, cfg.rollout.n, train_sampling(cfg), p_noisy, cfg.trainer.seed,
                                            progress=bar)
        search_stats = rollout.search.stats()
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for traj in trajs:
            record = traj.to_record()
            record.update(traj.score())
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    metrics = {**loop_metrics(trajs), **stats.metrics(), **search_stats, "curriculum/p_noisy": p_noisy}
    print(f"wrote {len(trajs)} trajectories to {out_path}")
    for key, value in metrics.items():
        print(f"  {key:34s} {value:.4g}")
    return 0
