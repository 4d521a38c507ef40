"""The JSONL records the simulator pipeline passes from step to step, and what is computed from them.

A collected record (one search)::

    {"id": "train/12#0", "qid": "train/12", "question": ..., "golden_answers": [...], "data_source": ...,
     "query": ..., "source": "question" | "policy", "engine": "wiki", "topk": 3,
     "docs": [{"title": ..., "text": ...}, ...]}          # the real engine's documents, best first

`label` adds ``"label": "useful" | "noisy"`` and ``"judge"`` (``rule`` or the judge model's name).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zerosearch.rewards import normalize_answer, retrieval_hit
from zerosearch.search.base import NO_INFORMATION, format_docs
from zerosearch.search.simulated import parse_docs

LABELS = ("useful", "noisy")
# One line of `format_docs`: "Doc 3(Title: Foo (film)) text" or "Doc 3: text".
_DOC_LINE = re.compile(r"^Doc (\d+)(?:\(Title: (.*?)\) |: ?)(.*)$")


class RecordError(ValueError):
    """A pipeline file that cannot be read; the message names the file and line and says how to fix it."""


def read_records(path: str | Path, required: Iterable[str] = ("id",)) -> list[dict[str, Any]]:
    """All records of a JSONL file. A torn last line (a run killed while writing) is dropped, so a
    resumed step redoes that record; a bad line elsewhere is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path} not found; it is written by the previous step (see `zerosearch simulator --help`)")
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):  # no newline after it: the write was cut off
                break
            raise RecordError(f"{path}:{lineno}: not valid JSON ({exc.msg}); was the file edited by hand?") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise RecordError(f"{path}:{lineno}: record lacks {missing}; expected the output of the previous step")
        records.append(row)
    return records


def append_records(f, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows to an open file and flush them to disk, so an interrupted step loses none of them."""
    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    f.flush()
    os.fsync(f.fileno())


def write_records(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with `rows` in one step (a temp file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        append_records(f, rows)
    tmp.replace(path)


def docs_from_text(text: str, topk: int) -> list[dict[str, str]]:
    """A search result's text (``Doc 1(Title: t) body`` lines) -> ``[{"title", "text"}]``, at most `topk`.

    Lines in `format_docs`' own format are split exactly (a real document that mentions "Document 2:"
    stays whole); any other text goes through the simulator's tolerant `parse_docs`.
    """
    if not text.strip() or text.strip() == NO_INFORMATION:
        return []
    lines = [line for line in text.split("\n") if line.strip()]
    matches = [_DOC_LINE.match(line) for line in lines]
    if all(matches) and [int(m.group(1)) for m in matches] == list(range(1, len(matches) + 1)):  # type: ignore[union-attr]
        docs = [{"title": (m.group(2) or "").strip(), "text": m.group(3).strip()} for m in matches]  # type: ignore[union-attr]
    else:
        docs = [{"title": t, "text": b} for t, b in parse_docs(text, topk)]
    return [d for d in docs if d["text"]][:topk]


def cut_words(text: str, max_words: int) -> str:
    """The first `max_words` words of `text` (all of it for 0)."""
    words = text.split()
    return " ".join(words[:max_words] if max_words > 0 else words)


def docs_text(docs: list[dict[str, str]], max_doc_words: int = 0) -> str:
    """Documents as the policy sees them from a real engine: ``Doc 1(Title: t) body`` lines, each body cut to
    `max_doc_words` words (0: whole). The fine-tuned simulator learns to write exactly this."""
    return format_docs([(d.get("title", ""), cut_words(d["text"], max_doc_words)) for d in docs])


def answer_in_docs(docs: list[dict[str, str]], golden_answers: list[str]) -> bool:
    """Whether a normalised gold answer appears, as whole words, in a document's title or text."""
    return bool(docs) and retrieval_hit([f"{d.get('title', '')} {d['text']}" for d in docs], golden_answers)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts over SQuAD-normalised words (longest common subsequence, beta = 1)."""
    a, b = normalize_answer(candidate).split(), normalize_answer(reference).split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)
