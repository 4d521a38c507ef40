"""The search-backend protocol, its request/result types, and the registry that picks one by name.

Every backend takes a whole batch of queries at once (``search(requests)``), keeps all of them in
flight together (bounded by a concurrency limit), and returns one :class:`SearchResult` per request,
in request order, whose ``text`` is already formatted for the policy (``Doc 1(Title: …) …`` lines,
as Search-R1's ``_passages2string`` writes them).

Modes (``build_search_backend(mode, **options)``):

==================  =============================================  ==========================
mode                backend                                        upstream spelling
==================  =============================================  ==========================
``simulate_prompt`` simulation LLM, few-shot prompt (base model)   ``SEARCH_MODE simulate_prompt``
``simulate_sft``    simulation LLM fine-tuned to write documents   ``SEARCH_MODE simulate_sft``
``wiki``            BM25 over a local corpus, or a Search-R1       ``SEARCH_ENGINE wiki``
                    ``/retrieve`` server
``google``          SerpAPI (needs ``SER_API_KEY``)                ``SEARCH_MODE google`` /
                                                                   ``SEARCH_ENGINE google``
==================  =============================================  ==========================

Names are matched case-insensitively and ``-`` counts as ``_``; ``simulate`` / ``simulated``
stand for ``simulate_prompt`` and ``sft`` / ``prompt`` for the two simulation modes.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from zerosearch.registry import Registry

NO_INFORMATION = "No information available."


class SearchError(RuntimeError):
    """A search backend could not answer; the message says which server/file and how to fix it."""


class MalformedReply(ValueError):
    """A server answered, but not with what the protocol promises (an HTML page, no choices, no content,
    a reply over the size cap); retried like a failed request."""


@dataclass
class SearchRequest:
    """One ``<search>`` call of the policy.

    ``noisy`` is drawn by the agent loop per query from p_noisy(step) and only matters to the
    simulated backends (useful vs noisy documents); ``None`` means useful. Real backends ignore it.
    """

    query: str
    question: str = ""
    golden_answers: list[str] = field(default_factory=list)
    noisy: bool | None = None
    hold_answer: bool = False
    """Useful documents written without the gold answer (`search.two_hop`: a first hop); only the prompt-mode
    simulator reads it."""


@dataclass
class SearchResult:
    """The documents for one request, formatted for the policy, plus what they cost."""

    text: str
    noisy: bool | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine: str = ""
    """The backend that wrote it (`simulate_prompt`, `wiki`, ...; hybrid search mixes them)."""
    confidence: float | None = None
    """A simulator's confidence in what it wrote, the geometric mean of its token probabilities (None: not asked)."""


@runtime_checkable
class SearchBackend(Protocol):
    name: str

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        """Answer all requests (in flight together); results in request order."""
        ...

    def stats(self) -> dict[str, float]:
        """Cumulative counters: ``search/queries``, ``search/prompt_tokens``, ``search/completion_tokens``,
        ``search/retries``, ``search/errors``, ``search/max_in_flight``."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# registry

# mode -> module whose import registers it (lazy: importing this package imports no backend)
BACKENDS = Registry("search mode", aliases={
    "simulate": "simulate_prompt",
    "simulated": "simulate_prompt",
    "prompt": "simulate_prompt",
    "sft": "simulate_sft",
    "bm25": "wiki",
    "local": "wiki",
    "serpapi": "google",
})
BACKENDS.lazy("simulate_prompt", "zerosearch.search.simulated")
BACKENDS.lazy("simulate_sft", "zerosearch.search.simulated")
BACKENDS.lazy("wiki", "zerosearch.search.retriever")
BACKENDS.lazy("google", "zerosearch.search.google")
BACKENDS.lazy("oracle_wiki", "zerosearch.search.oracle")
BACKENDS.lazy("hybrid", "zerosearch.search.hybrid:HybridSearch")
BACKENDS.lazy("simulate_self", "zerosearch.rollout.self_search:SelfSimulation")


def register_backend(name: str) -> Callable[[Callable[..., SearchBackend]], Callable[..., SearchBackend]]:
    """Decorator: register a backend factory (a class or function taking keyword options) under ``name``."""
    return BACKENDS.register(name)


def search_modes() -> list[str]:
    """The valid mode names, sorted."""
    return BACKENDS.names()


def canonical_mode(mode: str) -> str:
    """Map upstream's SEARCH_MODE / SEARCH_ENGINE spellings (and a few aliases) to a registered mode."""
    key = BACKENDS.resolve(mode)
    if key is None:
        raise ValueError(
            f"unknown search mode {mode!r}; valid modes: {', '.join(search_modes())} "
            "(upstream SEARCH_MODE simulate_prompt|simulate_sft|google and SEARCH_ENGINE wiki|google "
            "are accepted as they are)"
        )
    return key


def build_search_backend(mode: str, **options: Any) -> SearchBackend:
    """Build the backend for ``mode`` with its keyword ``options``.

    ``simulate_prompt`` / ``simulate_sft``: ``servers``, ``model`` and the options of
    :class:`~zerosearch.search.simulated.SimulatedSearch` (``mode`` is implied).
    ``wiki``: ``corpus=PATH`` (in-process BM25) or ``retriever_url=URL`` (a Search-R1 ``/retrieve``
    server), plus ``topk``. ``google``: ``topk`` (and ``api_key``, default env ``SER_API_KEY``).
    Raises ValueError listing the valid modes for an unknown name.
    """
    return BACKENDS.load(canonical_mode(mode))(**options)


# ---------------------------------------------------------------------------------------------
# helpers shared by the backends


class SearchStats:
    """Thread-safe cumulative counters, plus the in-flight gauge whose maximum is reported.

    ``role`` names what the queries were, for the cost ledger (`zerosearch/ledger.py`): "simulated" adds
    ``search/simulated_queries`` and ``search/simulator_s`` (wall time with a query in flight); "self" (the
    policy simulates, ``simulate_self``) adds ``search/simulated_queries`` and ``search/self_search_s``, which
    no simulator price applies to; a real engine's name adds ``search/real_queries/<name>``.
    """

    def __init__(self, role: str = "") -> None:
        self.role = role
        self._lock = threading.Lock()
        self._counts = {
            "search/queries": 0.0,
            "search/prompt_tokens": 0.0,
            "search/completion_tokens": 0.0,
            "search/retries": 0.0,
            "search/errors": 0.0,
            "search/max_in_flight": 0.0,
            "search/busy_s": 0.0,
        }
        self._in_flight = 0
        self._busy_since = 0.0

    def add(self, key: str, value: float = 1.0) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + value

    def begin(self, n: int = 1) -> None:
        """`n` requests went out (`in_flight` for a request that ends elsewhere: call `end` when it does)."""
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += n
            if self._in_flight > self._counts["search/max_in_flight"]:
                self._counts["search/max_in_flight"] = float(self._in_flight)

    def end(self, n: int = 1) -> None:
        with self._lock:
            self._in_flight -= n
            if self._in_flight == 0:
                self._counts["search/busy_s"] += time.perf_counter() - self._busy_since

    @contextmanager
    def in_flight(self, n: int = 1):
        self.begin(n)
        try:
            yield
        finally:
            self.end(n)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._counts)
        if self.role == "simulated":
            out["search/simulated_queries"] = out["search/queries"]
            out["search/simulator_s"] = out["search/busy_s"]
        elif self.role == "self":  # simulated by the policy's own engine: no simulator to pay for
            out["search/simulated_queries"] = out["search/queries"]
            out["search/self_search_s"] = out["search/busy_s"]
        elif self.role:
            out[f"search/real_queries/{self.role}"] = out["search/queries"]
        return out


def merge_search_stats(parts) -> dict[str, float]:
    """Counters of several search clients (`SearchStats.as_dict` each) as one: summed, except the peaks
    (``search/max_*``), which take the largest."""
    out: dict[str, float] = {}
    for stats in parts:
        for key, value in stats.items():
            out[key] = max(out.get(key, 0.0), value) if key.startswith("search/max") else out.get(key, 0.0) + value
    return out


def is_loopback(url_or_host: str) -> bool:
    """Whether a URL or host names this machine (127.0.0.0/8, ::1, localhost).

    Clients of such a server must not go through ``HTTP_PROXY``: the simulator's prompts hold the gold
    answers, and a proxy would see them (and fail for a server only this machine can reach). Create their
    httpx clients with ``trust_env=not is_loopback(url)``.
    """
    host = urlsplit(url_or_host).hostname if "//" in url_or_host else url_or_host.strip("[]")
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_timeout(timeout_s: float, what: str = "timeout_s") -> float:
    """A finite, positive timeout, else ValueError: an infinite one would hang the run on a dead server."""
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {timeout_s}")
    return timeout_s


def format_docs(docs: list[tuple[str, str]]) -> str:
    """``[(title, text), …]`` -> ``Doc 1(Title: t) text`` lines (``Doc 1: text`` when there is no title)."""
    lines = []
    for i, (title, text) in enumerate(docs, start=1):
        lines.append(f"Doc {i}(Title: {title}) {text}" if title else f"Doc {i}: {text}")
    return "\n".join(lines) if lines else NO_INFORMATION
