"""`zerosearch eval`: EM / F1 of a policy over QA sets, with any search backend.

    zerosearch eval --model PATH --data FILE_OR_DIR [FILE_OR_DIR ...]
                    [--search wiki|google|simulate_prompt|simulate_sft] [--corpus FILE]
                    [--method agent|direct|rag] [--limit N] [--output DIR]
                    [--ip HOST:PORT] [--simulation-llm NAME] [--engine vllm|hf]
                    [--max-turns N] [--topk K] [--config cpu] [key=value ...]

Methods:

* ``agent`` — the multi-turn search agent of training (the same loop, greedy, one rollout per
  question), searching with ``--search``;
* ``direct`` — one generation from ``templates/direct_prompt.txt``, no search;
* ``rag`` — one retrieval for the question with ``--search``, its documents put into
  ``templates/rag_prompt.txt``, then one generation.

``--search`` defaults to the real engine of the config (``search.engine``: BM25 over the bundled
corpus for ``--config cpu``), as upstream evaluates. A simulated search is an oracle, not an
evaluation: the simulator writes its useful documents from the gold answer; the outputs say so
(``simulator_saw_answer`` in summary.json, a note under results.md). It starts (and afterwards stops) a
simulation server when nothing listens at ``--ip``, exactly as training does (``rollout.stack.build_rollout_stack``).

Output (``--output``, default ``runs/eval-<timestamp>``): ``predictions.jsonl`` (one row per
question), ``results.json`` / ``results.md`` (the table printed at the end: one row per dataset and
an unweighted Average row, as the paper reports), ``summary.json`` and the resolved ``config.yaml``.
Bad inputs (missing model, bad data row, missing corpus, unknown method) exit with status 2 and a
one-line message before any engine or server starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from zerosearch.cmdline import (
    EXIT_USAGE,
    EvalUsageError,
    _Parser,
    add_stack_args,
    build_config,
    keep_stdout_for_results,
    split_overrides,
)
from zerosearch.config import Config, save_config
from zerosearch.data import DataFormatError, QASample, load_qa_file, resolve_corpus, with_prompt_template

logger = logging.getLogger("zerosearch.eval")

METHODS = ("agent", "direct", "rag")
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DIRECT_PROMPT_FILE = TEMPLATE_DIR / "direct_prompt.txt"
RAG_PROMPT_FILE = TEMPLATE_DIR / "rag_prompt.txt"
QA_SUFFIXES = (".parquet", ".jsonl")

# The paper's display names, in the order of its tables; matched on the lower-cased name with
# everything but letters and digits removed.
DATASET_ORDER = ("NQ", "TriviaQA", "PopQA", "HotpotQA", "2WikiMultiHopQA", "MuSiQue", "Bamboogle")
_DATASET_PREFIXES = (
    ("2wiki", "2WikiMultiHopQA"),
    ("hotpot", "HotpotQA"),
    ("trivia", "TriviaQA"),
    ("popqa", "PopQA"),
    ("musique", "MuSiQue"),
    ("bamboogle", "Bamboogle"),
    ("naturalquestions", "NQ"),
    ("nq", "NQ"),
)
AVERAGE = "Average"
SIMULATOR_NOTE = ("Searched with the simulator, which writes its useful documents from the gold answer: these are "
                  "oracle scores, not held-out numbers. Evaluate with a real engine: --search wiki or google.")


# --------------------------------------------------------------------------------------------- datasets


def dataset_display_name(source: str) -> str:
    """A data source or file-derived name (`nq`, `2wiki_corpus_subset`, ...) -> the paper's name."""
    key = re.sub(r"[^a-z0-9]", "", source.lower())
    for prefix, name in _DATASET_PREFIXES:
        if key.startswith(prefix):
            return name
    return source


def _dataset_rank(name: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(name), "") if name in DATASET_ORDER else (len(DATASET_ORDER), name)


def _split_like(files: list[Path]) -> list[Path]:
    """Evaluation splits among QA files: `test*` files if any, else `dev*`; parquet wins over JSONL."""
    for prefix in ("test", "dev"):
        chosen = [f for f in files if f.stem.lower().startswith(prefix)]
        if chosen:
            stems = {f.stem for f in chosen if f.suffix == ".parquet"}
            return [f for f in chosen if f.suffix == ".parquet" or f.stem not in stems]
    return []


def resolve_data_files(item: str | Path) -> list[Path]:
    """One `--data` item -> the QA files it names.

    A file is itself. A folder gives its `test*` files (else its `dev*` files, else every QA file in
    it); a folder with no QA file of its own gives the `test*`/`dev*` files of each sub-folder, so the
    root of a dataset collection (`nq/test.jsonl`, `hotpotqa/dev.jsonl`, ...) evaluates them all.
    """
    path = Path(item).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EvalUsageError(f"--data {item}: no such file or folder; give a .jsonl/.parquet QA file or a folder of them")
    own = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in QA_SUFFIXES)
    if own:
        return _split_like(own) or own
    nested = []
    for sub in sorted(d for d in path.iterdir() if d.is_dir()):
        nested += _split_like(sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in QA_SUFFIXES))
    if not nested:
        raise EvalUsageError(
            f"--data {item}: the folder holds no QA file (.jsonl/.parquet) and no sub-folder with a test*/dev* "
            "split; point --data at a file such as nq/test.jsonl or at a folder holding one"
        )
    return nested


def load_eval_samples(items: list[str], limit: int | None = None) -> list[QASample]:
    """Every question of the `--data` items, in the paper's dataset order, at most `limit` per dataset.

    Each sample's `data_source` becomes its dataset's display name. Errors are `EvalUsageError`s
    that name the file (and for a bad row, the row and field).
    """
    by_dataset: dict[str, list[QASample]] = {}
    for item in items:
        for path in resolve_data_files(item):
            try:
                samples = load_qa_file(path)
            except (DataFormatError, FileNotFoundError, ValueError) as e:
                raise EvalUsageError(str(e)) from None
            if not samples:
                raise EvalUsageError(f"{path}: holds no questions; give a QA file with at least one row")
            for sample in samples:
                name = dataset_display_name(sample.data_source)
                by_dataset.setdefault(name, []).append(dataclasses.replace(sample, data_source=name))
    out: list[QASample] = []
    for name in sorted(by_dataset, key=_dataset_rank):
        out += by_dataset[name][:limit] if limit is not None else by_dataset[name]
    return out


# ------------------------------------------------------------------------------------------ aggregation


def aggregate(rows: list[dict]) -> list[dict]:
    """Prediction rows -> one metrics row per dataset (paper order) plus the unweighted Average row.

    Each input row has `dataset`, `em`, `f1` (0..1), `num_searches` and `prediction` (None = no
    answer). Output rows: `dataset`, `em`, `f1`, `answer_rate` (percent, as the paper reports),
    `searches` (mean per question) and `n`. The Average row is the mean of the dataset rows
    (each dataset counts once, whatever its size); its `n` is the total number of questions.
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["dataset"], []).append(row)
    table = []
    for name in sorted(groups, key=_dataset_rank):
        group = groups[name]
        n = len(group)
        table.append({
            "dataset": name,
            "em": 100.0 * sum(r["em"] for r in group) / n,
            "f1": 100.0 * sum(r["f1"] for r in group) / n,
            "searches": sum(r["num_searches"] for r in group) / n,
            "answer_rate": 100.0 * sum(r["prediction"] is not None for r in group) / n,
            "n": n,
        })
    if table:
        mean = {k: sum(r[k] for r in table) / len(table) for k in ("em", "f1", "searches", "answer_rate")}
        table.append({"dataset": AVERAGE, **mean, "n": sum(r["n"] for r in table)})
    return table


def format_table(rows: list[dict]) -> str:
    """`aggregate` rows as a markdown table."""
    lines = [
        "| Dataset | EM | F1 | Searches/q | Answer rate (%) | N |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"**{r['dataset']}**" if r["dataset"] == AVERAGE else r["dataset"]
        lines.append(
            f"| {name} | {r['em']:.2f} | {r['f1']:.2f} | {r['searches']:.2f} | {r['answer_rate']:.1f} | {r['n']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- arguments, config


def _parse_eval_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    words, overrides = split_overrides(argv)
    parser = _Parser(prog="zerosearch eval", description="EM/F1 of a policy over QA sets with a search backend.")
    add_stack_args(parser, search_default="search.engine")
    parser.add_argument("--data", nargs="+", required=True,
                        help="QA files (.jsonl/.parquet) or folders (their test*/dev* files)")
    parser.add_argument("--method", default="agent", choices=METHODS,
                        help="agent: multi-turn search; direct: no search; rag: one retrieval, then answer")
    parser.add_argument("--limit", type=int, help="at most N questions per dataset")
    parser.add_argument("--output", help="output folder (default: runs/eval-<timestamp>)")
    args = parser.parse_args(words)
    if args.limit is not None and args.limit < 1:
        raise EvalUsageError(f"--limit {args.limit}: must be >= 1 (leave it out for every question)")
    return args, overrides


# ------------------------------------------------------------------------------------------------ run


def _fill(template_file: Path, **fields: str) -> str:
    text = template_file.read_text(encoding="utf-8")
    for key, value in fields.items():
        text = text.replace("{" + key + "}", value)
    return text


def direct_prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": _fill(DIRECT_PROMPT_FILE, question=question)}]


def rag_prompt(question: str, documents: str) -> list[dict]:
    return [{"role": "user", "content": _fill(RAG_PROMPT_FILE, question=question, documents=documents)}]


def retrieve_for_questions(search, samples: list[QASample], tokenizer, max_tokens: int,
                           batch: int) -> list[str]:
    """One search per question (the question is the query), documents cut to `max_tokens` tokens."""
    from tqdm import tqdm

    from zerosearch.search import SearchRequest

    texts: list[str] = []
    with tqdm(total=len(samples), desc="retrieve", unit="q") as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            requests = [SearchRequest(query=s.question, question=s.question,
                                      golden_answers=list(s.golden_answers), noisy=False) for s in chunk]
            for result in search.search(requests):
                ids = tokenizer.encode(result.text, add_special_tokens=False)
                texts.append(tokenizer.decode(ids[:max_tokens]) if len(ids) > max_tokens else result.text)
            bar.update(len(chunk))
    return texts


class NoSearch:
    """The backend of `--method direct`: the loop never searches (max_turns 0), so a call is a bug."""

    name = "none"

    def search(self, requests):
        raise RuntimeError("direct evaluation must not search; this is a bug in zerosearch.eval")

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def run_eval(cfg: Config, samples: list[QASample], method: str, out_dir: Path) -> tuple[list[dict], dict]:
    """Answer every sample greedily with `method`; returns prediction rows and run statistics."""
    from tqdm import tqdm

    from zerosearch.rollout.factory import loop_settings, val_sampling
    from zerosearch.rollout.stack import build_rollout_stack

    sampling = val_sampling(cfg)
    if sampling.greedy:  # greedy needs no seed; without one the HF engine batches all requests together
        sampling = dataclasses.replace(sampling, seed=None)
    settings = loop_settings(cfg)
    if method != "agent":  # one generation, whose search (if any) is never executed
        settings = dataclasses.replace(settings, rollout=dataclasses.replace(settings.rollout, max_turns=0))
        sampling = dataclasses.replace(sampling, stop=["</answer>"])
    with build_rollout_stack(cfg, search=NoSearch() if method == "direct" else None, settings=settings,
                             start_servers=True, log_dir=out_dir / "logs") as rollout:
        timings = dict(rollout.timings_s)
        if method == "direct":
            samples = [dataclasses.replace(s, prompt=direct_prompt(s.question)) for s in samples]
        elif method == "rag":
            t0 = time.perf_counter()
            docs = retrieve_for_questions(rollout.search, samples, rollout.engine.tokenizer,
                                          cfg.rollout.max_obs_length, batch=cfg.search.concurrency)
            timings["retrieve_s"] = time.perf_counter() - t0
            samples = [dataclasses.replace(s, prompt=rag_prompt(s.question, d)) for s, d in zip(samples, docs)]
        t0 = time.perf_counter()
        with tqdm(total=len(samples), desc=f"eval {method}", unit="q") as bar:
            trajs, stats = rollout.loop.run(samples, 1, sampling, p_noisy=0.0, noise_seed=cfg.trainer.seed,
                                            progress=bar)
        timings["generate_s"] = time.perf_counter() - t0
        search_stats = rollout.search.stats()
    rows = [_prediction_row(sample, traj, method) for sample, traj in zip(samples, trajs)]
    return rows, {"timings_s": timings, "rollout_stats": stats.metrics(), "search_stats": search_stats}


def _prediction_row(sample: QASample, traj, method: str) -> dict:
    """One line of predictions.jsonl: the question, the answer, its scores and how it was found."""
    from zerosearch.rewards import extract_answer, retrieval_hit

    if method != "agent" and traj.answer is None:
        traj.answer = extract_answer(traj.response_text)  # the policy's own tokens only
    score = traj.score()
    return {
        "dataset": sample.data_source,
        "question": sample.question,
        "golden_answers": list(sample.golden_answers),
        "prediction": traj.answer,
        "em": score["em"],
        "f1": score["f1"],
        "num_searches": {"agent": traj.num_searches, "rag": 1, "direct": 0}[method],
        "retrieval_hit": retrieval_hit(traj.documents, sample.golden_answers) if method == "agent" else None,
        "queries": traj.queries,
        "finish_reason": traj.finish_reason,
        "response": traj.response_text,
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_outputs(out_dir: Path, rows: list[dict], table: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp.replace(out_dir / "predictions.jsonl")
    _write_json(out_dir / "results.json", table)
    note = f"\n{SIMULATOR_NOTE}\n" if summary.get("simulator_saw_answer") else ""
    (out_dir / "results.md").write_text(format_table(table) + "\n" + note, encoding="utf-8")
    _write_json(out_dir / "summary.json", summary)


def eval_main(argv: list[str]) -> int:
    keep_stdout_for_results()
    try:
        args, overrides = _parse_eval_args(argv)
        cfg = build_config(args, overrides, uses_search=args.method != "direct", search_default="search.engine")
        samples = load_eval_samples(args.data, args.limit)
        if args.method == "agent":  # the prompt the policy was trained with
            samples = with_prompt_template(samples, cfg.data.prompt_template)
    except EvalUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0)

    out_dir = Path(args.output or Path(cfg.trainer.output_dir) / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    datasets = sorted({s.data_source for s in samples}, key=_dataset_rank)
    logger.info("evaluating %s (%s, search %s) on %d questions of %s", cfg.model.path, args.method,
                "none" if args.method == "direct" else cfg.search.mode, len(samples), ", ".join(datasets))

    started = time.perf_counter()
    rows, run_stats = run_eval(cfg, samples, args.method, out_dir)
    table = aggregate(rows)
    from zerosearch.rollout.factory import describe_search

    searched = args.method != "direct"
    summary = {
        "method": args.method,
        "model": cfg.model.path,
        "search": cfg.search.mode if searched else "none",
        "search_backend": describe_search(cfg, cfg.search.mode) if searched else None,
        # the simulator writes its useful documents from the gold answer: an oracle score, not an evaluation
        "simulator_saw_answer": searched and cfg.search.mode.startswith("simulate"),
        "corpus": resolve_corpus(cfg.search.corpus) if cfg.search.mode == "wiki" and searched else None,
        "engine": cfg.rollout.engine,
        "max_turns": cfg.rollout.max_turns if args.method == "agent" else 0,
        "data": list(args.data),
        "limit": args.limit,
        "datasets": table[:-1],
        "average": table[-1],
        "num_questions": len(rows),
        "wall_s": time.perf_counter() - started,
        **run_stats,
    }
    write_outputs(out_dir, rows, table, summary)
    print(format_table(table))
    if summary["simulator_saw_answer"]:
        print(f"\n{SIMULATOR_NOTE}")
    print(f"\nwrote {out_dir}/predictions.jsonl, results.md, results.json, summary.json "
          f"({summary['wall_s']:.1f}s)")
    return 0
