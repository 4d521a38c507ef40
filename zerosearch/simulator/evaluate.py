"""`zerosearch simulator eval`: how close a simulator comes to the real engine on held-out searches.

The held-out file is `collect` output for questions not used to train (e.g. the test split). For each of
its searches every simulator is asked twice, once for useful and once for noisy documents, through the
same client training uses (`SimulatedSearch` against a vLLM / sglang server started here on a free
port and stopped afterwards). Per system:

* ``answer in useful``: share of useful results that contain a gold answer (higher is better);
* ``answer in noisy``: share of noisy results that (wrongly) contain one (lower is better);
* ``well-formed``: share of results with exactly k parseable documents;
* ``ROUGE-L``: of the result against the real engine's documents for the same query (words, LCS);
* ``words/doc``: mean document length.

The real engine's own row scores its documents the same way (one result per search, no kinds).
Each system's results go to ``OUT/<system>.jsonl`` as they come; a resumed run skips those.
"""

from __future__ import annotations

import json
import logging
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zerosearch.config import Config
from zerosearch.search import SearchRequest
from zerosearch.simulator.records import (
    answer_in_docs,
    append_records,
    cut_words,
    docs_from_text,
    docs_text,
    read_records,
    rouge_l,
)

logger = logging.getLogger("zerosearch.simulator")
KINDS = ("useful", "noisy")
COLUMNS = ("answer in useful ↑", "answer in noisy ↓", "well-formed", "ROUGE-L vs real", "words/doc", "results")


@dataclass
class Simulator:
    name: str
    mode: str
    """`prompt` or `sft`: which templates the requests are filled from."""
    model: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def score_result(docs: list[dict[str, str]], record: dict[str, Any], max_doc_words: int) -> dict[str, Any]:
    """The per-result numbers of one simulated (or real) result against its held-out record."""
    reference = docs_text(record["docs"], max_doc_words)
    words = [len(d["text"].split()) for d in docs]
    return {
        "answer_in": answer_in_docs(docs, record["golden_answers"]),
        "n_docs": len(docs),
        "well_formed": len(docs) == record["topk"],
        "rouge_l": rouge_l(docs_text(docs), reference) if docs else 0.0,
        "words_per_doc": sum(words) / len(words) if words else 0.0,
    }


def real_rows(records: list[dict[str, Any]], max_doc_words: int) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        docs = [{**d, "text": cut_words(d["text"], max_doc_words)} for d in r["docs"]]
        rows.append({"id": r["id"], "kind": "real", **score_result(docs, r, max_doc_words), "rouge_l": 1.0})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """One table row from per-result rows (`kind` useful / noisy / real)."""
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    useful = [r for r in rows if r["kind"] in ("useful", "real")]
    noisy = [r for r in rows if r["kind"] == "noisy"]
    return {
        "answer in useful ↑": mean([float(r["answer_in"]) for r in useful]),
        "answer in noisy ↓": mean([float(r["answer_in"]) for r in noisy]),
        "well-formed": mean([float(r["well_formed"]) for r in rows]),
        "ROUGE-L vs real": mean([r["rouge_l"] for r in rows]),
        "words/doc": mean([r["words_per_doc"] for r in rows]),
        "results": float(len(rows)),
    }


def simulate(cfg: Config, sim: Simulator, records: list[dict[str, Any]], out: Path, max_doc_words: int,
             chunk: int = 16) -> list[dict[str, Any]]:
    """Ask `sim` for both kinds of result for every record; rows appended to OUT/<name>.jsonl (resumable)."""
    from zerosearch.models import resolve_model_path
    from zerosearch.search.server import SimulationServer
    from zerosearch.search.simulated import SimulatedSearch

    path = out / f"{sim.name}.jsonl"
    done = {(r["id"], r["kind"]): r for r in read_records(path, ("id", "kind"))} if path.exists() else {}
    todo = [(r, kind) for r in records for kind in KINDS if (r["id"], kind) not in done]
    if todo:
        s, topk = cfg.search, records[0]["topk"]
        with ExitStack() as stack:
            server = SimulationServer(str(resolve_model_path(sim.model)), port=_free_port(), log_dir=out / "logs",
                                      served_model_name=sim.name, start_timeout_s=s.server_startup_timeout_s,
                                      quantization=s.server_quantization or None,
                                      **({"kv_cache_gib": s.server_kv_cache_gib} if s.server_kv_cache_gib else {}))
            stack.enter_context(server)
            logger.info("%s served at %s (started in %.1fs)", sim.name, server.url, server.startup_s)
            backend = stack.enter_context(SimulatedSearch(
                server.address, model=sim.name, mode=sim.mode, topk=topk, temperature=s.temperature,
                max_tokens=s.max_tokens, timeout_s=s.timeout_s, max_retries=s.max_retries, concurrency=s.concurrency))
            f = stack.enter_context(open(path, "a", encoding="utf-8"))
            bar = stack.enter_context(tqdm(total=2 * len(records), initial=len(done), desc=f"eval {sim.name}",
                                           unit="result"))
            for start in range(0, len(todo), chunk):
                batch = todo[start : start + chunk]
                results = backend.search([SearchRequest(query=r["query"], question=r["question"],
                                                        golden_answers=r["golden_answers"], noisy=kind == "noisy")
                                          for r, kind in batch])
                rows = []
                for (record, kind), result in zip(batch, results):
                    docs = docs_from_text(result.text, topk)
                    rows.append({"id": record["id"], "kind": kind, "text": result.text,
                                 **score_result(docs, record, max_doc_words)})
                append_records(f, rows)
                done.update({(row["id"], row["kind"]): row for row in rows})
                bar.update(len(rows))
    return [done[(r["id"], kind)] for r in records for kind in KINDS]


def render_table(table: dict[str, dict[str, float | None]], k: int) -> str:
    lines = [f"| system (k = {k}) | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in table.items():
        cells = []
        for col in COLUMNS:
            value = row[col]
            if value is None:
                cells.append("—")
            elif col == "results":
                cells.append(str(int(value)))
            elif col == "words/doc":
                cells.append(f"{value:.1f}")
            elif col == "ROUGE-L vs real":
                cells.append(f"{value:.3f}")
            else:
                cells.append(f"{100 * value:.1f} %")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(cfg: Config, data: str | Path, simulators: list[Simulator], out: str | Path, limit: int = 0,
             max_doc_words: int = 30) -> dict[str, Any]:
    """The table for the real engine and each simulator; writes OUT/results.json and OUT/results.md."""
    records = read_records(data, required=("id", "question", "golden_answers", "query", "docs", "topk"))
    records = [r for r in records if r["docs"]]
    if limit > 0:
        records = records[:limit]
    if not records:
        raise ValueError(f"{data} holds no searches with documents; collect held-out questions first")
    topks = {r["topk"] for r in records}
    if len(topks) > 1:
        raise ValueError(f"{data} mixes searches with top-k {sorted(topks)}; collect with one TOPK")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = {f"real engine ({records[0]['engine']})": summarise(real_rows(records, max_doc_words))}
    for sim in simulators:
        table[f"{sim.name}: {sim.model}"] = summarise(simulate(cfg, sim, records, out, max_doc_words))
    k = records[0]["topk"]
    markdown = render_table(table, k)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    summary = {"data": str(data), "searches": len(records), "topk": k, "max_doc_words": max_doc_words,
               "temperature": cfg.search.temperature, "max_tokens": cfg.search.max_tokens, "table": table}
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {**summary, "markdown": markdown}
