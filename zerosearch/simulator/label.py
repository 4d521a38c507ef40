"""`zerosearch simulator label`: mark each collected search useful or noisy, then balance the two classes.

* ``rule`` (default, no model): useful when a normalised gold answer appears, as whole words, in the
  documents (`records.answer_in_docs`, the test of Search-R1's retrieval score);
* ``llm``: a judge model behind any OpenAI-compatible server reads question, answer and documents and says
  whether the documents let one reach the answer (the paper used a large judge). Each call has a timeout
  and at most `max_retries` retries; then a JudgeError names the server.

Judgements are appended to ``OUT.judged.jsonl`` as they come (a resumed run skips those), then the
larger class is cut down, at random with a fixed seed, to the size of the smaller one (the paper trains
on both kinds of documents alike) and OUT is written in one step. Searches with fewer than `topk`
documents are left out: the simulator should learn to write exactly k.

Two optional cuts after the balance (not in upstream; docs/simulator.md): ``dedupe`` keeps one record per
distinct query and label (a policy sampled many times asks the same query again and again), ``only_options``
keeps the searches for one option of an "A or B" question (`rollout.copying.swap_options`), the data of a
second, short fine-tuning stage that teaches the simulator those entities' real pages.

``contrast`` (not in upstream; docs/simulator.md), before the balance and with the rule only: each search is
also written under the other label when the real engine's deeper results allow it, so that the same query
appears as useful *and* as noisy and only the label tells the two targets apart. A useful search gets a noisy
twin, the engine's first k documents among its top ``depth`` that hold no gold answer; a noisy search gets a
useful twin, its own k documents with the last one replaced by the first answer-bearing document of ranks
k+1..depth. Without twins the rule ties the label to the query (a query either finds the answer or does not),
and a small simulator learns query -> documents and ignores the label.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zerosearch.rewards import normalize_answer
from zerosearch.rollout.copying import swap_options
from zerosearch.simulator.records import (
    LABELS,
    answer_in_docs,
    append_records,
    docs_text,
    read_records,
    write_records,
)

logger = logging.getLogger("zerosearch.simulator")
JUDGE_TEMPLATE = resources.files("zerosearch.simulator") / "templates" / "judge.txt"


class JudgeError(RuntimeError):
    """The judge server did not answer; the message names it and says how to start one."""


@dataclass
class LabelSummary:
    judged: int
    counts: dict[str, int]
    dropped_short: int
    kept: dict[str, int] = field(default_factory=dict)
    twins: dict[str, int] = field(default_factory=dict)


def rule_label(record: dict[str, Any]) -> str:
    return "useful" if answer_in_docs(record["docs"], record["golden_answers"]) else "noisy"


class LLMJudge:
    """Asks a judge model whether the documents let one reach the answer ("yes" -> useful)."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 1.0, api_key: str = "EMPTY") -> None:
        import openai

        self.url, self.model = url.rstrip("/"), model
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.template = JUDGE_TEMPLATE.read_text(encoding="utf-8")
        self._client = openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=timeout_s)
        self._openai = openai

    def __call__(self, record: dict[str, Any]) -> str:
        prompt = self.template.format(question=record["question"], answer=" or ".join(record["golden_answers"]),
                                      documents=docs_text(record["docs"]))
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=8,
                )
                text = (reply.choices[0].message.content or "").strip().lower() if reply.choices else ""
                return "useful" if text.startswith("yes") else "noisy"
            except (self._openai.BadRequestError, self._openai.NotFoundError, self._openai.AuthenticationError) as exc:
                raise JudgeError(f"judge server {self.url} refused the request ({exc}); is {self.model!r} the model "
                                 f"it serves? See GET {self.url}/models") from None
            except self._openai.OpenAIError as exc:
                last = exc
                logger.warning("judge server %s: attempt %d of %d failed: %s", self.url, attempt + 1,
                               self.max_retries + 1, exc)
                if attempt < self.max_retries:
                    time.sleep(self.backoff_s * 2**attempt)
        raise JudgeError(
            f"judge server {self.url} did not answer after {self.max_retries + 1} attempts (last error: {last}); "
            f"start it (e.g. `zerosearch serve-sim --model {self.model} --port PORT`) or pass --judge-url"
        )

    def close(self) -> None:
        self._client.close()


def balance(records: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Both classes cut to the size of the smaller one (a seeded random choice), in input order."""
    by_label = {label: [r for r in records if r["label"] == label] for label in LABELS}
    n = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    keep = {id(r) for label in LABELS for r in rng.sample(by_label[label], n)}
    return [r for r in records if id(r) in keep]


def dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first record of each distinct (query, label); the query lower-cased and stripped."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for r in records:
        key = (r["query"].lower().strip(), r["label"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def is_option_search(record: dict[str, Any]) -> bool:
    """The query is one option of the record's "A or B" question, as the question writes it (normalised)."""
    options = swap_options(record["question"])
    return options is not None and normalize_answer(record["query"]) in {normalize_answer(o) for o in options[1:]}


def contrast_twins(records: list[dict[str, Any]], retrieve: Callable[[list[str], int], list[list[dict[str, str]]]],
                   depth: int) -> list[dict[str, Any]]:
    """The other label's twin of each rule-labelled record, where the top `depth` documents of
    ``retrieve(queries, depth)`` (title and text dicts, best first) allow one; ids get a ``~twin`` suffix."""
    twins = []
    ranked = retrieve([r["query"] for r in records], depth) if records else []
    for record, docs in zip(records, ranked):
        k, answers = record["topk"], record["golden_answers"]
        has = [answer_in_docs([d], answers) for d in docs]
        if record["label"] == "useful":
            new = [d for d, h in zip(docs, has) if not h][:k]
            if len(new) < k:
                continue
        else:
            extra = next((d for d, h in list(zip(docs, has))[k:] if h), None)
            if extra is None:
                continue
            new = [*record["docs"][:k - 1], extra]
        other = "noisy" if record["label"] == "useful" else "useful"
        twins.append({**record, "id": f"{record['id']}~twin", "docs": new, "label": other, "judge": "rule-twin"})
    return twins


def bm25_retrieve(corpus: str | Path) -> Callable[[list[str], int], list[list[dict[str, str]]]]:
    """`contrast_twins`' retrieve over a JSONL corpus with the `wiki` engine's BM25 (titles split off)."""
    from zerosearch.search.bm25 import BM25Search, split_title

    engine = BM25Search(corpus)

    def retrieve(queries: list[str], depth: int) -> list[list[dict[str, str]]]:
        return [[dict(zip(("title", "text"), split_title(d["contents"]))) for d, _ in row]
                for row in engine.retrieve(queries, topk=depth)]

    return retrieve


def label(data: str | Path, out: str | Path, judge: LLMJudge | None = None, seed: int = 0,
          workers: int = 8, unique: bool = False, only_options: bool = False,
          contrast: Callable[[list[str], int], list[list[dict[str, str]]]] | None = None,
          contrast_depth: int = 30) -> LabelSummary:
    """Label the records of `data` (resuming from OUT.judged.jsonl) and write the balanced set to `out`."""
    if contrast is not None and judge is not None:
        raise ValueError("contrast twins are labelled by the rule; use them with the rule judge only")
    out = Path(out)
    records = read_records(data, required=("id", "question", "golden_answers", "query", "docs", "topk"))
    repeated = len(records) - len({r["id"] for r in records})
    if repeated:
        logger.warning("%s: %d records share an id with an earlier one (files of two collect runs joined?); "
                       "each id is judged once and its last record is the one kept", data, repeated)
    full = [r for r in records if len(r["docs"]) >= r["topk"]]
    cache_path = out.with_name(out.name + ".judged.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    judged = {r["id"]: r for r in read_records(cache_path, ("id", "label"))} if cache_path.exists() else {}
    todo = [r for r in full if r["id"] not in judged]
    name = judge.model if judge is not None else "rule"
    with open(cache_path, "a", encoding="utf-8") as f, \
            tqdm(total=len(full), initial=len(full) - len(todo), desc="label", unit="record") as bar:
        def one(record: dict[str, Any]) -> dict[str, Any]:
            return {**record, "label": judge(record) if judge is not None else rule_label(record), "judge": name}

        if judge is None:
            results = map(one, todo)
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            results = pool.map(one, todo)
        try:
            for row in results:
                judged[row["id"]] = row
                append_records(f, [row])
                bar.update(1)
        finally:
            if judge is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    labelled = [judged[r["id"]] for r in full]
    counts = Counter(r["label"] for r in labelled)
    summary = LabelSummary(judged=len(todo), counts={k: counts.get(k, 0) for k in LABELS},
                           dropped_short=len(records) - len(full))
    if contrast is not None:
        twins = contrast_twins(labelled, contrast, contrast_depth)
        summary.twins = {k: sum(t["label"] == k for t in twins) for k in LABELS}
        labelled = labelled + twins
    kept = balance(labelled, seed)
    if unique:
        kept = dedupe(kept)
    if only_options:
        kept = [r for r in kept if is_option_search(r)]
    summary.kept = {k: sum(r["label"] == k for r in kept) for k in LABELS}
    write_records(out, kept)
    return summary
