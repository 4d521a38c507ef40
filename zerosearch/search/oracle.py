"""`oracle_wiki`: a diagnostic stand-in for a *perfect* simulation LLM, made of real passages.

ZeroSearch's simulator is told the gold answer and writes *useful* documents (that hold it) or *noisy* ones (that
do not). A 135M simulator does that badly: its useful lists hold a gold answer about a third of the time
(docs/results.md). This backend asks what RL would learn from a simulator that never fails, with text as real as
the held-out engine's: BM25 over the same corpus, where

* a useful request gets the query's top-k passages with the best passage that holds a gold answer put first
  (searched for with the query and the answer, then the query alone); when the corpus has none, the top-k as they are;
* a noisy request gets the query's best passages that hold no gold answer.

It is told the answer, like the simulator, so it is for training only: never a held-out engine (the config refuses
it for `search.engine`). Not part of upstream; docs/differences.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zerosearch.rewards import retrieval_hit
from zerosearch.search.base import SearchRequest, SearchResult, register_backend
from zerosearch.search.bm25 import BM25Search, passages_to_string

CANDIDATES = 8
"""How many passages per query (per answer query) the choice looks through, as a multiple of top-k."""


class OracleWikiSearch(BM25Search):
    name = "oracle_wiki"

    def _useful(self, request: SearchRequest, hits: list[dict[str, str]]) -> list[dict[str, str]]:
        answer_queries = [f"{request.query} {a}" for a in request.golden_answers]
        answer_hits = [d for row in self.retrieve(answer_queries, self.topk * CANDIDATES) for d, _ in row]
        best = next((d for d in [*answer_hits, *hits] if retrieval_hit([d["contents"]], request.golden_answers)), None)
        if best is None:
            return hits[: self.topk]
        return [best, *[d for d in hits if d is not best]][: self.topk]

    def _noisy(self, request: SearchRequest, hits: list[dict[str, str]]) -> list[dict[str, str]]:
        return [d for d in hits if not retrieval_hit([d["contents"]], request.golden_answers)][: self.topk]

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        if not requests:
            return []
        self._stats.add("search/queries", len(requests))
        with self._stats.in_flight(len(requests)):
            pools = self.retrieve([r.query for r in requests], self.topk * CANDIDATES)
            results = []
            for request, pool in zip(requests, pools):
                hits = [d for d, _ in pool]
                docs = self._noisy(request, hits) if request.noisy else self._useful(request, hits)
                results.append(SearchResult(text=passages_to_string(docs), noisy=bool(request.noisy),
                                            engine=self.name))
        return results


@register_backend("oracle_wiki")
def _build_oracle(corpus: str | Path | None = None, topk: int = 5, **options: Any) -> OracleWikiSearch:
    if not corpus:
        raise ValueError("oracle_wiki search needs corpus=PATH (a JSONL passage corpus, searched with BM25)")
    from zerosearch.data import resolve_corpus

    return OracleWikiSearch(resolve_corpus(corpus), topk=topk, **options)
