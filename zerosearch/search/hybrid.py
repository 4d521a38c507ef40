"""Hybrid search (``SEARCH_MODE hybrid``): the simulator by default, a real engine for some queries.

The ZeroSearch write-ups name it as the next step: "combining simulated retrieval with sparse real API calls
when confidence falls below certain thresholds". A query goes to the real engine (``search.engine``: BM25 or
Google) instead of the simulator when

* it is drawn for it: each query with probability ``real_share`` (a seeded draw per query), or
* the simulator was unsure of what it wrote: the confidence of a simulated result, the geometric mean of its
  token probabilities (``exp`` of the mean token log-prob the OpenAI API returns), is below ``min_confidence``;
  the simulated documents are then replaced by the real engine's;

and only while the budget lasts: at most ``max_real_per_step`` real queries between two ``begin_step`` calls
and ``max_real_per_run`` over the run (-1: no limit). A query the budget refuses keeps the simulator's
documents. Every result names the engine that wrote it (``SearchResult.engine``); the counters
``search/real_queries/<engine>``, ``search/simulated_queries`` and ``search/hybrid_*`` give the real share
per step (the cost ledger, ``zerosearch/ledger.py``).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, replace

from zerosearch.search.base import SearchBackend, SearchRequest, SearchResult, merge_search_stats


@dataclass
class Budget:
    """Real queries left this step and this run (-1: no limit); thread-safe."""

    per_step: int = -1
    per_run: int = -1

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.used_step = 0
        self.used_run = 0

    def begin_step(self) -> None:
        with self._lock:
            self.used_step = 0

    def take(self) -> bool:
        """Spend one real query if the budget allows it."""
        with self._lock:
            if 0 <= self.per_step <= self.used_step or 0 <= self.per_run <= self.used_run:
                return False
            self.used_step += 1
            self.used_run += 1
            return True


class HybridSearch:
    """Routes each request to ``simulated`` or ``real`` (two backends) as the module docstring says."""

    name = "hybrid"

    def __init__(self, simulated: SearchBackend, real: SearchBackend, real_share: float = 0.0,
                 min_confidence: float = 0.0, max_real_per_step: int = -1, max_real_per_run: int = -1,
                 seed: int = 0) -> None:
        if not 0.0 <= real_share <= 1.0 or not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"real_share and min_confidence are in [0, 1], got {real_share} and {min_confidence}")
        self.simulated, self.real = simulated, real
        self.real_share, self.min_confidence = real_share, min_confidence
        self.budget = Budget(max_real_per_step, max_real_per_run)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts = {"search/hybrid_drawn": 0.0, "search/hybrid_low_confidence": 0.0,
                        "search/hybrid_refused": 0.0}

    def begin_step(self) -> None:
        """A new training step: the per-step budget starts again."""
        self.budget.begin_step()

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        to_real, to_sim = [], []
        for i in range(len(requests)):  # draw, then ask the budget, one request at a time
            (to_real if self._draw() and self._take("search/hybrid_drawn") else to_sim).append(i)
        results: list[SearchResult | None] = [None] * len(requests)
        for i, result in zip(to_sim, self.simulated.search([requests[i] for i in to_sim]) if to_sim else []):
            results[i] = result
        unsure = []
        for i in to_sim:
            confidence = results[i].confidence
            if (self.min_confidence > 0 and confidence is not None and confidence < self.min_confidence
                    and self._take("search/hybrid_low_confidence")):
                unsure.append(i)
        real_ids = to_real + unsure
        if real_ids:
            for i, result in zip(real_ids, self.real.search([replace(requests[i], noisy=None) for i in real_ids])):
                results[i] = result
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, float]:
        out = merge_search_stats([self.simulated.stats(), self.real.stats()])
        with self._lock:
            return out | self._counts

    def close(self) -> None:
        try:
            self.simulated.close()
        finally:
            self.real.close()

    def _draw(self) -> bool:
        if self.real_share <= 0:
            return False
        with self._lock:
            return self._rng.random() < self.real_share

    def _take(self, reason: str) -> bool:
        granted = self.budget.take()
        with self._lock:
            self._counts[reason if granted else "search/hybrid_refused"] += 1
        return granted
