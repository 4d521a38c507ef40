"""Read QA data into `QASample`s: ZeroSearch/Search-R1 parquet files and plain JSONL.

Two layouts are understood:

* **parquet** in the Search-R1 / veRL schema, as ``huggingface-cli download --repo-type dataset
  sunhaonlp/ZeroSearch_dataset --local-dir ZeroSearch_dataset`` leaves it: columns ``data_source``,
  ``prompt`` (chat messages), ``ability``, ``reward_model`` (``{"style": "rule", "ground_truth":
  {"target": [answers...]}}``), ``extra_info`` (``{"split", "index", ...}``) and, in upstream's files,
  the FlashRAG columns ``id``, ``question`` and ``golden_answers``. Where ``question`` or
  ``golden_answers`` is missing they are recovered from ``extra_info`` / the prompt and from
  ``reward_model.ground_truth``.
* **JSONL**, one object per line: ``{"question": str, "answers": [str, ...]}`` (``golden_answers`` is
  accepted for ``answers``; ``id`` and ``data_source`` are optional).

Every row is checked; a malformed one raises `DataFormatError` naming the file, the row and the field.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

TEMPLATE_DIR = Path(__file__).parent / "templates"
POLICY_PROMPT_FILE = TEMPLATE_DIR / "policy_prompt.txt"
EXAMPLES_FILE = TEMPLATE_DIR / "policy_examples.jsonl"
QUESTION_MARKER = "Question:"  # the policy template ends with "Question: {question}"

HF_DOWNLOAD_HINT = (
    "huggingface-cli download --repo-type dataset sunhaonlp/ZeroSearch_dataset --local-dir ZeroSearch_dataset"
)
# A file named like a split (nq/test.jsonl) takes its data_source from its folder, otherwise from its stem.
_SPLIT_LIKE_STEMS = ("train", "dev", "test", "val", "valid", "validation", "eval")


@dataclass
class QASample:
    """One question with its reference answers and the policy prompt built for it."""

    question: str
    golden_answers: list[str]
    data_source: str
    prompt: list[dict]  # chat messages, [{"role": "user", "content": ...}]
    index: int
    extra_info: dict = field(default_factory=dict)


class DataFormatError(ValueError):
    """A QA file row that cannot be used; the message names file, row, field and the fix.

    Parquet rows are reported by their 0-based row index, JSONL rows by their 1-based line number.
    """

    def __init__(
        self, path: str | Path, field: str, problem: str, fix: str, row: int | None = None,
        line: int | None = None,
    ):
        self.path, self.field, self.problem, self.fix, self.row, self.line = (
            str(path), field, problem, fix, row, line,
        )
        if line is not None:
            where = f"line {line} (1-based JSONL line number)"
        elif row is not None:
            where = f"row {row} (0-based parquet row index)"
        else:
            where = "file"
        super().__init__(f"{self.path}: {where}, field `{field}`: {problem}. Fix: {fix}")

    def __reduce__(self):  # keeps the error picklable (Ray ships exceptions between processes)
        return (type(self), (self.path, self.field, self.problem, self.fix, self.row, self.line))


class DataNotFoundError(FileNotFoundError):
    """A data path (DATA_PATH, a split file) that does not exist; the message says where we looked and the fix."""


def check_prompt_lengths(samples: list[QASample], count_tokens, max_length: int, where: str) -> None:
    """Raise DataFormatError for the first sample whose prompt is longer than `max_length` tokens
    (`count_tokens(messages)` counts them as the rollout will), naming `where` (the data file) and the row."""
    for position, sample in enumerate(samples):
        n = count_tokens(sample.prompt)
        if n > max_length:
            raise DataFormatError(
                where, "prompt", f"the prompt of question {_short(sample.question, 60)} (sample {position}, index "
                f"{sample.index}) has {n} tokens, more than data.max_prompt_length={max_length}",
                "raise data.max_prompt_length, or shorten or drop that question")


@lru_cache(maxsize=1)
def _policy_template(name: str = "") -> str:
    path = (Path(name) if Path(name).is_file() else TEMPLATE_DIR / name) if name else POLICY_PROMPT_FILE
    if not path.is_file():
        choices = sorted(p.name for p in TEMPLATE_DIR.glob("*.txt"))
        raise FileNotFoundError(f"prompt template {path} not found; choose one of {choices}")
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def policy_examples() -> tuple[dict, ...]:
    """The pool of worked examples a template's `{example}` draws from (`templates/policy_examples.jsonl`):
    made-up general-knowledge questions, none from the bundled data."""
    with open(EXAMPLES_FILE, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def example_for(question: str, template: str = "") -> dict | None:
    """The worked example the prompt of `question` shows, or None when `template` has no `{example}`.

    Each question gets one example of the pool, fixed by a hash of its text, so no single example string
    sits in most prompts: a policy that copies its example is visible (`copy/*` metrics) and earns nothing
    for it (`rewards.copies_example`)."""
    if "{example}" not in _policy_template(template):
        return None
    pool = policy_examples()
    return pool[zlib.crc32(question.strip().encode("utf-8")) % len(pool)]


def render_example(example: dict) -> str:
    return (f"Question: {example['question']}\n<search> {example['query']} </search>\n"
            f"<information> {example['documents']} </information>\n<answer> {example['answer']} </answer>")


def build_prompt(question: str, template: str = "") -> list[dict]:
    """The policy prompt for `question`: one user message from `templates/policy_prompt.txt`
    (or `template`: a file of `templates/` by name, or a path). A `{example}` in the template becomes the
    question's worked example (`example_for`)."""
    text = _policy_template(template)
    example = example_for(question, template)
    if example is not None:
        text = text.replace("{example}", render_example(example))
    return [{"role": "user", "content": text.replace("{question}", question.strip())}]


def default_data_dir() -> Path:
    """The bundled demo dataset: `train.parquet` (NQ, HotpotQA, 2WikiMultiHopQA), `test.parquet` (held-out
    2WikiMultiHopQA questions) and the passage corpus those can be answered from."""
    return Path(__file__).parent / "default"


def default_corpus_path() -> Path:
    """The bundled passage corpus (`search.corpus: default`): the Wikipedia paragraphs behind the bundled
    2WikiMultiHopQA questions, gzipped JSONL."""
    return default_data_dir() / "hipporag_2wiki_corpus_6119.jsonl.gz"


def resolve_corpus(corpus: str | Path) -> str:
    """A `search.corpus` value as a path: `default` is the bundled corpus, anything else is itself."""
    return str(default_corpus_path()) if str(corpus) == "default" else str(corpus)


# --------------------------------------------------------------------------------------------- checks


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_question(value: Any, path: Path, field_name: str, **where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(
            path, field_name, f"got {_short(value)}", f"expected a non-empty string in `{field_name}`",
            **where,
        )
    return value.strip()


def _check_answers(value: Any, path: Path, field_name: str, allow_str: bool = False, **where) -> list[str]:
    if allow_str and isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(a, str) and a.strip() for a in value)
    ):
        raise DataFormatError(
            path, field_name, f"got {_short(value)}",
            f'expected a non-empty list of strings in `{field_name}`, e.g. ["Paris"]', **where,
        )
    return list(value)


def _check_prompt(value: Any, path: Path, **where) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok:
        raise DataFormatError(
            path, "prompt", f"got {_short(value)}",
            'expected a non-empty list of {"role": str, "content": str} chat messages in `prompt`', **where,
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _source_from_path(path: Path) -> str:
    stem = path.stem.lower()
    if stem.startswith(_SPLIT_LIKE_STEMS) and path.parent.name:
        return path.parent.name
    return path.stem


# ---------------------------------------------------------------------------------------------- JSONL


def _load_jsonl(path: Path, data_source: str | None) -> list[QASample]:
    default_source = data_source or _source_from_path(path)
    samples: list[QASample] = []
    with path.open("rb") as fh:  # bytes: a decoding error can then name its line
        for line_no, raw in enumerate(fh, start=1):
            where = {"line": line_no}
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    path, "(line)", f"not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)",
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)", **where,
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    path, "(line)", f"not valid JSON ({exc.msg} at column {exc.colno})",
                    'write one JSON object per line, e.g. {"question": "...", "answers": ["..."]}', **where,
                ) from None
            except RecursionError:
                raise DataFormatError(
                    path, "(line)", "JSON nested too deeply to read",
                    'write one flat JSON object per line, e.g. {"question": "...", "answers": ["..."]}', **where,
                ) from None
            if not isinstance(obj, dict):
                raise DataFormatError(
                    path, "(line)", f"expected a JSON object, got {type(obj).__name__}",
                    'write one JSON object per line, e.g. {"question": "...", "answers": ["..."]}', **where,
                )
            question = _check_question(obj.get("question"), path, "question", **where)
            answers_key = "answers" if "answers" in obj or "golden_answers" not in obj else "golden_answers"
            answers = _check_answers(obj.get(answers_key), path, answers_key, **where)
            extra: dict = {"index": len(samples)}
            if obj.get("id") is not None:
                extra["id"] = str(obj["id"])
            source = obj.get("data_source")
            if source is not None and not isinstance(source, str):
                raise DataFormatError(path, "data_source", f"got {_short(source)}",
                                      "expected a string in `data_source` or leave it out", **where)
            samples.append(QASample(
                question=question,
                golden_answers=answers,
                data_source=source or default_source,
                prompt=build_prompt(question),
                index=len(samples),
                extra_info=extra,
            ))
    if not samples:
        raise DataFormatError(path, "(file)", "the file holds no rows",
                              'write one {"question": ..., "answers": [...]} object per line')
    return samples


# -------------------------------------------------------------------------------------------- parquet


def _question_from_prompt(prompt: list[dict]) -> str | None:
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users:
        return None
    text = users[-1]
    if QUESTION_MARKER in text:
        text = text.rsplit(QUESTION_MARKER, 1)[1]
    return text.strip() or None


def _ground_truth(row: dict) -> Any:
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        return None
    truth = reward_model.get("ground_truth")
    if isinstance(truth, dict):
        return truth.get("target")
    return truth  # some veRL datasets store the answer(s) directly


def _parquet_row(row: dict, i: int, path: Path, default_source: str) -> QASample:
    where = {"row": i}
    extra = row.get("extra_info")
    extra = dict(extra) if isinstance(extra, dict) else {}

    prompt = _check_prompt(row["prompt"], path, **where) if row.get("prompt") is not None else None

    if row.get("question") is not None:
        question = _check_question(row["question"], path, "question", **where)
    elif isinstance(extra.get("question"), str) and extra["question"].strip():
        question = extra["question"].strip()
    elif prompt is not None and _question_from_prompt(prompt):
        question = _question_from_prompt(prompt)
    else:
        raise DataFormatError(
            path, "question", "no question in `question`, `extra_info.question` or the prompt",
            "add a `question` column (upstream's files have one) or a user message ending in "
            f"'{QUESTION_MARKER} ...' in `prompt`", **where,
        )

    if row.get("golden_answers") is not None:
        answers = _check_answers(row["golden_answers"], path, "golden_answers", **where)
    else:
        answers = _check_answers(
            _ground_truth(row), path, "reward_model.ground_truth.target", allow_str=True, **where
        )

    source = row.get("data_source")
    if source is not None and not isinstance(source, str):
        raise DataFormatError(path, "data_source", f"got {_short(source)}",
                              "expected a string in `data_source`", **where)
    index = extra.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        index = i
    if row.get("id") is not None and "id" not in extra:
        extra["id"] = str(row["id"])
    return QASample(
        question=question,
        golden_answers=answers,
        data_source=source or default_source,
        prompt=prompt if prompt is not None else build_prompt(question),
        index=index,
        extra_info=extra,
    )


def _load_parquet(path: Path, data_source: str | None) -> list[QASample]:
    # to_pylist() yields plain lists and dicts (no numpy arrays, unlike pandas' object columns).
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataFormatError(path, "(file)", f"not a readable parquet file ({first[:200]})",
                              "rewrite it with `zerosearch prepare-data`, or download it again") from None
    if not rows:
        raise DataFormatError(path, "(file)", "the file holds no rows", "add rows, or point data.path at another file")
    default_source = data_source or _source_from_path(path)
    samples = [_parquet_row(row, i, path, default_source) for i, row in enumerate(rows)]
    if data_source is not None:
        for s in samples:
            s.data_source = data_source
    return samples


# ----------------------------------------------------------------------------------------- public API


def load_qa_file(path: str | Path, data_source: str | None = None) -> list[QASample]:
    """Read a `.parquet` (Search-R1/ZeroSearch schema) or `.jsonl` QA file into samples.

    `data_source` overrides the file's own (for JSONL without one: the folder name when the file is
    named like a split, e.g. `nq/test.jsonl` -> "nq", else the file stem).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"QA file not found: {path}. Download ZeroSearch's data with `{HF_DOWNLOAD_HINT}`, "
            "or convert your own JSONL with `zerosearch prepare-data --input FILE --out DIR`."
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _load_parquet(path, data_source)
    if suffix == ".jsonl":
        return _load_jsonl(path, data_source)
    raise DataFormatError(
        path, "(file)", f"unknown QA file type {path.suffix!r}",
        'use .parquet (Search-R1/ZeroSearch schema) or .jsonl (one {"question": ..., "answers": [...]} object per line)',
    )


def load_split(data_path: str | Path | None, split: str) -> list[QASample]:
    """Samples of `split` from a data folder (`{split}.parquet`, else `{split}.jsonl`) or a file.

    `data_path` "default" or None means the bundled dataset (`default_data_dir()`).
    """
    if data_path is None or str(data_path) == "default":
        data_path = default_data_dir()
    data_path = Path(data_path)
    if data_path.is_file():
        return load_qa_file(data_path)
    candidates = [data_path / f"{split}.parquet", data_path / f"{split}.jsonl"]
    for candidate in candidates:
        if candidate.is_file():
            return load_qa_file(candidate)
    looked = ", ".join(str(c) for c in candidates)
    state = "folder" if data_path.is_dir() else "path (does not exist)"
    raise DataNotFoundError(
        f"no {split!r} split in data {state} {data_path}: looked for {looked}. Point data_path at a "
        f"folder holding {split}.parquet or {split}.jsonl, or at one file; use 'default' for the bundled "
        f"demo data; get ZeroSearch's data with `{HF_DOWNLOAD_HINT}`."
    )
