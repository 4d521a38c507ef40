"""Workload W1, TRL's side: the same single-turn GRPO workload as scripts/bench/w1.py, with TRL's
GRPOTrainer and its default generation (transformers `generate`), fp32, on the CPU.

    .venv/bin/pip install -e ".[bench]"     # trl 1.16.0
    .venv/bin/python scripts/bench/w1_trl.py [--steps 5]

Ends with one line: RESULT trl_seconds_per_step=... (median of steps 2-5)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[2]
NQ = REPO.parent / "shared" / "data" / "qa" / "nq" / "test.jsonl"
PROMPT = "Answer the question. Put the final answer inside <answer> and </answer>. Question: {question}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nq", default=str(NQ))
    args = parser.parse_args()

    import psutil
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from zerosearch.models import resolve_model_path
    from zerosearch.rewards import extract_answer, f1_score

    rows = [json.loads(line) for line in Path(args.nq).read_text().splitlines()][:8]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT.format(question=r["question"])}],
                               "answers": r["answers"]} for r in rows])

    def f1_reward(completions, answers, **_):
        return [f1_score(extract_answer(c[0]["content"] if isinstance(c, list) else c), a)
                for c, a in zip(completions, answers)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.peak = [], None, 0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            self.peak = max(self.peak, psutil.Process().memory_info().rss)
            print(f"step {len(self.times)}: {self.times[-1]:.1f}s", flush=True)

    path = resolve_model_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="zs-w1-trl-"), per_device_train_batch_size=32, num_generations=4,
        gradient_accumulation_steps=1, max_completion_length=128, temperature=1.0, learning_rate=1e-6, beta=0.001,
        max_steps=args.steps, logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        seed=1, dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=f1_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    median = statistics.median(timer.times[1:5])
    print(f"peak RSS {timer.peak / 2**30:.2f} GiB")
    print(f"machine: {machine()}")
    print(f"RESULT trl_seconds_per_step={median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
