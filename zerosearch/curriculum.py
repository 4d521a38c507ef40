"""Noise curriculum: how often the simulated search engine returns noisy (useless) documents.

ZeroSearch (arXiv 2505.04588, Sec. 3.3) raises the probability of a noisy search result over training
with an exponential schedule,

    p_i = p_s + (b ** (i / m) - 1) / (b - 1) * (p_e - p_s),

where i is the training step, m the number of steps over which it ramps, p_s/p_e the start and end
probabilities and b the base (4 in the paper). For b > 1 the ramp is slow at first and fast at the end.
After step m the probability stays at p_e.

The trainer counts steps as upstream does (its ``global_steps`` starts at 1): training step k = 1..m
uses p_k, so the first step trains slightly above p_s and the last one at p_e. i = 0 (p_s) is the
probability before any training, e.g. for ``zerosearch rollout`` at its default ``--step 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def noise_probability(step: int, total_steps: int, start: float, end: float, base: float = 4.0) -> float:
    """The probability of a noisy search result at ``step``; ``end`` for every step >= ``total_steps``."""
    _check_schedule(total_steps, start, end, base)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}; steps count from 0")
    if step >= total_steps:
        return float(end)
    frac = (base ** (step / total_steps) - 1.0) / (base - 1.0)
    return float(start + frac * (end - start))


@dataclass
class NoiseCurriculum:
    """The noise schedule as a stateful object the trainer advances once per training step.

    Resume is exact: ``load_state_dict(state_dict())`` gives back the same step, hence the same
    probabilities for every later step.
    """

    start: float
    """Probability of a noisy result at step 0 (paper: 0.0)."""
    end: float
    """Probability of a noisy result from step ``total_steps`` on (paper: 0.75)."""
    total_steps: int
    """Number of steps over which the probability ramps from ``start`` to ``end``."""
    base: float = 4.0
    """Base b of the exponential ramp; > 1 ramps slowly first, 0 < b < 1 ramps quickly first."""
    step: int = 0
    """The current training step (0 before the first); the trainer sets it to k while it trains step k."""

    def __post_init__(self) -> None:
        _check_schedule(self.total_steps, self.start, self.end, self.base)
        if self.step < 0:
            raise ValueError(f"NoiseCurriculum.step must be >= 0, got {self.step}; start from step=0")

    def probability(self) -> float:
        """Probability of a noisy search result at the current step."""
        return noise_probability(self.step, self.total_steps, self.start, self.end, self.base)

    def at(self, step: int) -> float:
        """Move to training step ``step`` (the trainer calls it as it starts step k) and return its probability."""
        if step < 0:
            raise ValueError(f"a training step is >= 0, got {step}")
        self.step = step
        return self.probability()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "start": self.start,
            "end": self.end,
            "total_steps": self.total_steps,
            "base": self.base,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step; the schedule saved in ``state`` must match this one."""
        for key in ("start", "end", "total_steps", "base"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint curriculum has {key}={state[key]!r} but the config has "
                    f"{key}={getattr(self, key)!r}; set the config back to {state[key]!r} to resume exactly"
                    + (f", or to train on past step {state[key]!r} at the end noise set search.curriculum_steps="
                       f"{state[key]!r}" if key == "total_steps" else "")
                )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"checkpoint curriculum step must be >= 0, got {step}")
        self.step = step

    def metrics(self) -> dict[str, float]:
        return {"curriculum/p_noisy": self.probability(), "curriculum/step": float(self.step)}


def curriculum_steps(cfg) -> int:
    """The steps the configured noise ramps over: `search.curriculum_steps`, or `trainer.total_steps` when 0."""
    return cfg.search.curriculum_steps or cfg.trainer.total_steps


def _check_schedule(total_steps: int, start: float, end: float, base: float) -> None:
    if total_steps <= 0:
        raise ValueError(
            f"total_steps must be > 0, got {total_steps}; set it to the number of steps the noise ramps over"
        )
    if base <= 0 or base == 1:
        raise ValueError(f"base must be > 0 and != 1, got {base}; the paper uses base=4.0")
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is a probability and must be in [0, 1], got {value}")
