"""``SEARCH_MODE simulate_self``: the policy is its own search simulator (SSRL, arXiv 2508.10874).

No second server: when the policy searches, the agent loop submits the simulator's prompt (the same
``simulate_prompt_{useful,noisy}.txt`` templates, the same useful/noisy draw from the curriculum) to the
policy's own engine, as one more request next to the trajectories, and the documents it writes come back as
the ``<information>`` observation, masked out of the loss like any other. The documents are written with the
policy's current weights, so the simulator changes as the policy trains, as in SSRL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zerosearch.rollout.engines import Generation, SamplingSpec
from zerosearch.search import SearchError, SearchRequest, SearchResult
from zerosearch.search.base import SearchStats
from zerosearch.search.simulated import fill_template, load_templates, normalize_docs


class SelfSimulation:
    """The search backend of ``simulate_self``: it holds the templates and counters; the agent loop runs it."""

    name = "simulate_self"

    def __init__(self, topk: int = 5, temperature: float = 0.8, max_tokens: int = 512,
                 template_dir: str | Path | None = None) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk, self.temperature, self.max_tokens = topk, temperature, max_tokens
        self.templates = load_templates("prompt", template_dir)
        self._stats = SearchStats(role="self")

    def prompt_ids(self, tokenizer, request: SearchRequest) -> list[int]:
        """The simulator's chat (empty system message, the filled template as the user turn), as token ids."""
        from zerosearch.rollout.loop import encode_prompt

        text = fill_template(self.templates[bool(request.noisy)], request, self.topk, "prompt")
        return encode_prompt(tokenizer, [{"role": "system", "content": ""}, {"role": "user", "content": text}])

    def sampling(self, seed: int | None) -> SamplingSpec:
        return SamplingSpec(temperature=self.temperature, max_tokens=self.max_tokens, stop=[], seed=seed)

    def submitted(self) -> None:
        """The loop handed one simulator prompt to the engine; `result` ends it (`search/self_search_s`: the wall
        time with one in flight, shared with the rollouts' own generation)."""
        self._stats.begin()

    def result(self, request: SearchRequest, generation: Generation, prompt_tokens: int) -> SearchResult:
        """What the policy's engine wrote, parsed into documents as the served simulator's reply is."""
        self._stats.end()
        self._stats.add("search/queries")
        self._stats.add("search/prompt_tokens", prompt_tokens)
        self._stats.add("search/completion_tokens", len(generation.token_ids))
        return SearchResult(text=normalize_docs(generation.text, self.topk), noisy=bool(request.noisy), engine=self.name,
                            prompt_tokens=prompt_tokens, completion_tokens=len(generation.token_ids))

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        raise SearchError("simulate_self writes documents with the policy's own engine inside the agent loop "
                          "(zerosearch/rollout/loop.py); it cannot answer a search outside it")

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()

    def close(self) -> None:
        pass


def build(**options: Any) -> SelfSimulation:
    return SelfSimulation(**options)
