"""Training-step benchmark: seconds per phase of the CPU default (GRPO, multi-turn, simulated search)
for a fixed workload, and weight sync as a share of the step (goal <= 2 %).

    .venv/bin/python scripts/bench/step.py [--steps 4] [--warmstart DIR] [key=value ...]

With the CPU default's warm-start on, each run first builds it (~7 min); `--warmstart DIR` starts from one
already built (`zerosearch warmstart --out DIR`, or a run's `warmstart/` folder) instead.

Ends with one line: RESULT step_s=... sync_s=... sync_share=...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import machine, print_phase_table, step_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmstart", help="an already warm-started policy folder to train from")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from zerosearch.config import load_config
    from zerosearch.training.driver import run_dir_for, train

    work = Path(tempfile.mkdtemp(prefix="zs-step-"))
    overrides = {
        "trainer.total_steps": args.steps, "trainer.test_freq": 0, "trainer.val_before_train": False,
        "trainer.save_freq": 0, "trainer.final_checkpoint": False, "trainer.output_dir": work,
        "trainer.experiment_name": "step", "trainer.logger": "[jsonl]", "trainer.resume": "never",
        "search.ip": "127.0.0.1:6019",
    }
    if args.warmstart:
        overrides.update({"model.path": args.warmstart, "warmstart.enabled": False})
    cfg = load_config("cpu", [f"{k}={v}" for k, v in overrides.items()] + args.overrides)
    summary = train(cfg)
    medians = print_phase_table(step_rows(run_dir_for(cfg)), "CPU default GRPO step, seconds per phase:")
    step_s, sync_s = medians["timing/step_s"], medians["timing/sync_s"]
    print(f"peak RSS {summary['peak_rss_gib']:.2f} GiB")
    print(f"machine: {machine()}")
    print(f"RESULT step_s={step_s:.2f} sync_s={sync_s:.3f} sync_share={sync_s / step_s:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
