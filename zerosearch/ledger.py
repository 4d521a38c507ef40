"""What a run's searches cost, in queries, tokens, seconds and dollars.

ZeroSearch's headline is money (arXiv 2505.04588, Table 7): about 64,000 queries to SerpAPI cost $586.70, while
the GPUs serving a 14B simulation LLM for the same run cost $70.80. The ledger counts, per training step and for
the run, the simulated queries with their prompt and completion tokens and the simulator's busy wall time, the
real queries by engine, and prices them:

* ``api_equivalent_usd``: every query of the run (simulated or real) priced at the paid API's rate, what the run
  would have cost against Google (``api_usd_per_1k_queries``, default the paper's $586.70 / 64,000 queries);
* ``real_api_usd``: the queries that did go to a paid engine (``google``; BM25 over a local corpus is free);
* ``simulator_usd``: the simulator's busy wall time at ``simulator_usd_per_hour`` (a GPU-hour price on GPU);
* ``saved_usd``: the first minus the other two.

Pure arithmetic over the search backends' cumulative counters, with ``state_dict`` / ``load_state_dict`` so a
resumed run keeps its totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAPER_API_USD_PER_1K = 586.70 / 64.0
"""ZeroSearch's Google (SerpAPI) cost: $586.70 for about 64,000 queries, $9.17 per 1,000."""
PAID_ENGINES = frozenset({"google"})


@dataclass(frozen=True)
class Prices:
    api_usd_per_1k_queries: float = PAPER_API_USD_PER_1K
    simulator_usd_per_hour: float = 2.0

    def __post_init__(self) -> None:
        if self.api_usd_per_1k_queries < 0 or self.simulator_usd_per_hour < 0:
            raise ValueError(f"prices must be >= 0, got {self}")


@dataclass
class Usage:
    """Counts of one step, or of the run: what the prices multiply."""

    simulated_queries: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    simulator_s: float = 0.0
    """Wall time with at least one simulated query in flight."""
    real_queries: dict[str, float] = field(default_factory=dict)
    """Queries answered by a real engine, by engine name (`wiki`, `google`)."""

    def add(self, other: Usage) -> None:
        self.simulated_queries += other.simulated_queries
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.simulator_s += other.simulator_s
        for engine, n in other.real_queries.items():
            self.real_queries[engine] = self.real_queries.get(engine, 0.0) + n

    def costs(self, prices: Prices, prefix: str = "cost/") -> dict[str, float]:
        real = sum(self.real_queries.values())
        paid = sum(n for engine, n in self.real_queries.items() if engine in PAID_ENGINES)
        per_query = prices.api_usd_per_1k_queries / 1000.0
        api_equivalent = (self.simulated_queries + real) * per_query
        real_api = paid * per_query
        simulator = self.simulator_s / 3600.0 * prices.simulator_usd_per_hour
        out = {
            "simulated_queries": self.simulated_queries,
            "simulated_prompt_tokens": self.prompt_tokens,
            "simulated_completion_tokens": self.completion_tokens,
            "simulator_s": self.simulator_s,
            "real_queries": real,
            **{f"real_queries/{engine}": n for engine, n in sorted(self.real_queries.items())},
            "real_share": real / max(real + self.simulated_queries, 1.0),
            "api_equivalent_usd": api_equivalent,
            "real_api_usd": real_api,
            "simulator_usd": simulator,
            "saved_usd": api_equivalent - real_api - simulator,
        }
        return {prefix + key: float(value) for key, value in out.items()}


def usage_between(before: dict[str, float], after: dict[str, float]) -> Usage:
    """The usage between two readings of a backend's cumulative `stats()` (keys `search/...`)."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    real = {key.removeprefix("search/real_queries/"): delta(key) for key in after
            if key.startswith("search/real_queries/") and delta(key)}
    return Usage(
        simulated_queries=delta("search/simulated_queries"),
        prompt_tokens=delta("search/prompt_tokens"),
        completion_tokens=delta("search/completion_tokens"),
        simulator_s=delta("search/simulator_s"),
        real_queries=real,
    )


class Ledger:
    """The run's running totals; ``step(usage)`` adds one step and returns its metrics and the run's."""

    def __init__(self, prices: Prices) -> None:
        self.prices = prices
        self.total = Usage()

    def step(self, usage: Usage) -> dict[str, float]:
        self.total.add(usage)
        return usage.costs(self.prices) | self.total.costs(self.prices, prefix="cost_total/")

    def summary(self) -> dict[str, float]:
        """The run's totals, keyed without a prefix, for `summary.json`."""
        return self.total.costs(self.prices, prefix="")

    def state_dict(self) -> dict[str, Any]:
        t = self.total
        return {"simulated_queries": t.simulated_queries, "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens, "simulator_s": t.simulator_s,
                "real_queries": dict(t.real_queries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = Usage(**{**state, "real_queries": dict(state.get("real_queries", {}))})
