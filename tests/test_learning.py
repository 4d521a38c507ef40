"""Reward goes up: a few steps of real training on a task small enough for CI, as prime-rl's `test_reward_goes_up`.

The embedded SmolLM2-135M-Instruct answers yes/no questions; the reward is 1 when its reply starts with "yes".
The steps are the trainer's own: rollouts through the agent loop and the rollout engine, the driver's GRPO
advantages, the actor's clipped update, and the weight push into the engine, so each step's update must reach
the next step's rollouts. A wrong sign, a broken mask, log-probs of the wrong tokens or a push that never lands
keep the rate flat; the same run at a learning rate of 1e-9 is the control, so the test can fail.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import embedded_dir

from zerosearch.config import load_config
from zerosearch.data.qa import QASample

pytestmark = pytest.mark.slow

THINGS = ["a cat", "the sun", "a river", "an apple", "a violin", "a mountain", "a train", "the moon"]
KINDS = ["a planet", "a fruit", "an animal", "a vehicle"]


def _samples() -> list[QASample]:
    questions = [f"Is {t} {k}?" for t, k in zip(THINGS, KINDS * 2)]
    return [QASample(question=q, golden_answers=["yes"], data_source="toy", index=i, extra_info={},
                     prompt=[{"role": "user", "content": f"Answer with one word, yes or no. {q}"}])
            for i, q in enumerate(questions)]


def _yes_rates(tmp_path, lr: float, steps: int) -> list[float]:
    from zerosearch.training.driver import compute_advantages
    from zerosearch.training.workers import ActorRolloutWorker

    cfg = load_config("cpu", [
        "rollout.engine=hf", "rollout.max_turns=0", "rollout.n=4", "rollout.temperature=1.0",
        "rollout.max_response_length=4", "model.gradient_checkpointing=false", "search.mode=simulate_prompt",
        "search.start_server=never", "search.ip=127.0.0.1:9", "trainer.test_freq=0", f"trainer.output_dir={tmp_path}",
        f"actor.lr={lr}", "actor.lr_warmup_steps_ratio=0", "actor.ppo_mini_batch_size=32", "actor.micro_batch_size=16",
        f"trainer.total_steps={steps}",
    ])
    worker = ActorRolloutWorker(cfg)
    rates = []
    try:
        for step in range(1, steps + 1):
            trajs, _ = worker.rollout(_samples(), 0.0, step)
            reward = torch.tensor([float(t.response_text.strip().lower().startswith("yes")) for t in trajs])
            rates.append(float(reward.mean()))
            advantages, _, _ = compute_advantages(cfg, trajs, reward, None, None, None)
            worker.update(trajs, advantages, None, None, step)
            worker.sync_weights()
    finally:
        worker.close()
    return rates


def test_reward_goes_up(tmp_path):
    if embedded_dir() is None:
        pytest.skip("the embedded model is not built; run `zerosearch fetch-model`")
    learned = _yes_rates(tmp_path / "learn", lr=5e-5, steps=4)
    control = _yes_rates(tmp_path / "control", lr=1e-9, steps=4)  # the config refuses a rate of 0
    print(json.dumps({"learned": learned, "control": control}))
    assert learned[0] < 0.8  # room to rise
    assert sum(learned[-2:]) / 2 - learned[0] > 0.15, learned
    assert sum(learned[-2:]) / 2 > sum(control[-2:]) / 2 + 0.15, (learned, control)
