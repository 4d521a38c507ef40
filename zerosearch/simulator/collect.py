"""`zerosearch simulator collect`: what a real search engine returns for the queries a policy writes.

For each question the policy (any model; the embedded default by default) runs the training agent loop
against the real engine (`wiki`: BM25 over `search.corpus`, or `google`), and every search it makes is
recorded with the engine's top-k documents. The question itself is searched too (a policy that searches
well asks it), so the data does not depend on how badly an untrained policy writes queries.

Records are appended, question by question, and flushed: an interrupted run resumes with the first
question that is not complete in the output file. A question is complete once its `source: question`
record, written last, is there.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zerosearch.config import Config
from zerosearch.data import QASample, resolve_corpus
from zerosearch.search import SearchBackend, SearchRequest, SearchResult
from zerosearch.search.google import API_KEY_ENV
from zerosearch.simulator.records import append_records, docs_from_text, read_records, write_records

logger = logging.getLogger("zerosearch.simulator")


class RecordingSearch:
    """A search backend that passes every batch on and keeps ``(request, result)`` pairs for `collect`."""

    def __init__(self, backend: SearchBackend) -> None:
        self.backend = backend
        self.name = backend.name
        self.calls: list[tuple[SearchRequest, SearchResult]] = []
        self._lock = threading.Lock()  # the agent loop searches from a thread pool

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        results = self.backend.search(requests)
        with self._lock:
            self.calls.extend(zip(requests, results))
        return results

    def take(self) -> list[tuple[SearchRequest, SearchResult]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls

    def stats(self) -> dict[str, float]:
        return self.backend.stats()

    def close(self) -> None:
        pass  # the backend is closed by whoever built it


@dataclass
class CollectSummary:
    questions: int
    skipped: int
    records: int
    policy_records: int


def question_id(split: str, sample: QASample) -> str:
    return f"{split}/{sample.index}"


def select_questions(samples: list[QASample], data_source: str, limit: int, offset: int = 0) -> list[QASample]:
    """Samples of `data_source` ("" = all), from `offset` on, at most `limit` (0 = all), one per question text."""
    chosen, seen = [], set()
    for sample in samples:
        if data_source and sample.data_source != data_source:
            continue
        if sample.question in seen:
            continue
        seen.add(sample.question)
        chosen.append(sample)
    chosen = chosen[offset:]
    return chosen[:limit] if limit > 0 else chosen


def completed_questions(out: Path) -> set[str]:
    """Question ids complete in `out`; rows of an incomplete question (a run cut off) are dropped from the file."""
    if not out.exists():
        return set()
    rows = read_records(out, required=("id", "qid", "source"))
    done = {r["qid"] for r in rows if r["source"] == "question"}
    kept = [r for r in rows if r["qid"] in done]
    if len(kept) != len(rows) or out.read_text(encoding="utf-8").count("\n") != len(rows):
        logger.info("dropping %d records of an interrupted question from %s", len(rows) - len(kept), out)
        write_records(out, kept)
    return done


def _record(qid: str, j: int, sample: QASample, query: str, source: str, engine: str, topk: int,
            result: SearchResult) -> dict:
    return {
        "id": f"{qid}#{j}", "qid": qid, "question": sample.question, "golden_answers": list(sample.golden_answers),
        "data_source": sample.data_source, "query": query, "source": source, "engine": engine, "topk": topk,
        "docs": docs_from_text(result.text, topk),
    }


def collect(cfg: Config, samples: list[QASample], out: str | Path, split: str, policy: bool = True,
            n: int = 1, chunk: int = 16) -> CollectSummary:
    """Append the records of `samples` not yet complete in `out` (`n` policy rollouts per question)."""
    from zerosearch.rollout.factory import build_engine, build_loop, start_search, train_sampling

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = completed_questions(out)
    todo = [s for s in samples if question_id(split, s) not in done]
    engine_name, topk = cfg.search.engine, cfg.search.topk
    if engine_name == "wiki" and not cfg.search.retriever_url:
        from zerosearch.search.bm25 import read_corpus

        read_corpus(resolve_corpus(cfg.search.corpus))  # a bad row fails here, before any model loads
    if engine_name == "google" and not os.environ.get(API_KEY_ENV):
        raise ValueError(f"collect --search google needs a SerpAPI key: `export {API_KEY_ENV}=<your key>`, "
                         "or collect with --search wiki over a JSONL corpus")
    summary = CollectSummary(questions=len(todo), skipped=len(samples) - len(todo), records=0, policy_records=0)
    if not todo:
        return summary
    with ExitStack() as stack:
        # The vLLM engine must exist before bm25s is imported (see ActorRolloutWorker): engine first.
        engine = build_engine(cfg, stack=stack) if policy else None
        backend = start_search(cfg, stack, log_dir=out.parent / "logs", mode=engine_name)
        recorder = RecordingSearch(backend)
        loop = build_loop(cfg, engine, recorder, stack) if engine is not None else None
        bar = stack.enter_context(tqdm(total=len(samples), initial=summary.skipped, desc="collect", unit="question"))
        f = stack.enter_context(open(out, "a", encoding="utf-8"))
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            if loop is not None:
                loop.run(batch, n, train_sampling(cfg), p_noisy=0.0, noise_seed=cfg.trainer.seed)
            by_question: dict[str, list[tuple[SearchRequest, SearchResult]]] = {}
            for request, result in recorder.take():
                by_question.setdefault(request.question, []).append((request, result))
            asked = backend.search([SearchRequest(query=s.question, question=s.question,
                                                  golden_answers=list(s.golden_answers)) for s in batch])
            for sample, own in zip(batch, asked):
                qid = question_id(split, sample)
                rows = [_record(qid, j + 1, sample, req.query, "policy", engine_name, topk, res)
                        for j, (req, res) in enumerate(by_question.get(sample.question, []))]
                rows.append(_record(qid, 0, sample, sample.question, "question", engine_name, topk, own))  # last: marks it complete
                append_records(f, rows)
                summary.records += len(rows)
                summary.policy_records += len(rows) - 1
                bar.update(1)
    return summary
