"""Build the bundled demo dataset, zerosearch/data/default/{train,test}.parquet (for maintainers).

    .venv/bin/python scripts/build_default_data.py [--qa-dir /work/shared/data/qa] [--seed 0]

train = 1000 NQ-open (nq/test.jsonl) + 1000 HotpotQA distractor dev (hotpotqa/dev.jsonl)
        + the 2WikiMultiHopQA questions (2wiki_corpus_subset/dev.jsonl) not held out;
test  = 150 of those 2WikiMultiHopQA questions, none with a yes/no answer: the held-out set, which
        validation searches with BM25 over the bundled corpus, the Wikipedia paragraphs they were
        written from (corpus/hipporag_2wiki_corpus_6119.jsonl, copied byte for byte, gzipped).
NQ and HotpotQA draw only questions with a short reference answer (at most 5 words), so a small policy
has a chance; no question is in both splits. Deterministic: the same inputs and seed give the same
files. Questions and answers are copied unchanged; only the field layout changes (see
zerosearch/data/default/ATTRIBUTION.md).
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
from pathlib import Path

from zerosearch.data import QASample, default_corpus_path, default_data_dir, load_qa_file
from zerosearch.data.prepare import write_split

# (data_source, file under --qa-dir, train rows, test rows)
SOURCES = [("nq", "nq/test.jsonl", 1000, 0), ("hotpotqa", "hotpotqa/dev.jsonl", 1000, 0)]
MAX_ANSWER_WORDS = 5
# The held-out questions: answerable from CORPUS, searched with BM25 by validation.
HELDOUT_SOURCE, HELDOUT_FILE, HELDOUT_ROWS = "2wikimultihopqa", "2wiki_corpus_subset/dev.jsonl", 150
CORPUS_FILE = "corpus/hipporag_2wiki_corpus_6119.jsonl"


def _question_key(question: str) -> str:
    return re.sub(r"\s+", " ", question.lower()).strip().rstrip("?").strip()


def _short_answer(sample: QASample) -> bool:
    return min(len(a.split()) for a in sample.golden_answers) <= MAX_ANSWER_WORDS


def pick(samples: list[QASample], n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Disjoint seeded train/test picks from `samples`, short-answer questions first."""
    unique: dict[str, QASample] = {}
    for s in samples:
        unique.setdefault(_question_key(s.question), s)  # one sample per distinct question
    pool = list(unique.values())
    short = [s for s in pool if _short_answer(s)]
    longer = [s for s in pool if not _short_answer(s)]
    rng = random.Random(seed)
    rng.shuffle(short)
    rng.shuffle(longer)
    ranked = short + longer  # short answers first; longer ones only if short ones run out
    if len(ranked) < n_train + n_test:
        raise SystemExit(f"need {n_train + n_test} distinct questions, found {len(ranked)}")
    return ranked[:n_train], ranked[n_train : n_train + n_test]


def _yes_no(sample: QASample) -> bool:
    return {a.strip().lower() for a in sample.golden_answers} <= {"yes", "no"}


def pick_heldout(samples: list[QASample], n_test: int, seed: int) -> tuple[list, list]:
    """`n_test` seeded held-out questions without a yes/no answer (a guess scores half of those, search
    or not); every other distinct question goes to training."""
    unique: dict[str, QASample] = {}
    for s in samples:
        unique.setdefault(_question_key(s.question), s)
    pool = list(unique.values())
    candidates = [s for s in pool if not _yes_no(s)]
    rng = random.Random(seed)
    rng.shuffle(candidates)
    if len(candidates) < n_test:
        raise SystemExit(f"need {n_test} held-out questions without a yes/no answer, found {len(candidates)}")
    test = candidates[:n_test]
    held = {id(s) for s in test}
    return [s for s in pool if id(s) not in held], test


def write_corpus(source: Path, out: Path) -> None:
    """`source` gzipped byte for byte; mtime 0 and no file name in the header: reproducible bytes."""
    with open(source, "rb") as f_in, open(out, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f_out:
        f_out.write(f_in.read())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--qa-dir", type=Path, default=Path("/work/shared/data/qa"),
                        help="folder with nq/, hotpotqa/, 2wiki_corpus_subset/ and corpus/")
    parser.add_argument("--out", type=Path, default=default_data_dir())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train: list[QASample] = []
    test: list[QASample] = []
    for source, rel_path, n_train, n_test in SOURCES:
        samples = load_qa_file(args.qa_dir / rel_path, data_source=source)
        tr, te = pick(samples, n_train, n_test, args.seed)
        train += tr
        test += te
        print(f"{source}: {len(samples)} questions -> train {len(tr)}, test {len(te)}")
    samples = load_qa_file(args.qa_dir / HELDOUT_FILE, data_source=HELDOUT_SOURCE)
    tr, te = pick_heldout(samples, HELDOUT_ROWS, args.seed)
    train += tr
    test += te
    print(f"{HELDOUT_SOURCE}: {len(samples)} questions -> train {len(tr)}, test {len(te)}")
    keys = {_question_key(s.question) for s in train}
    assert not keys & {_question_key(s.question) for s in test}, "a held-out question is also in train"
    for split, rows in (("train", train), ("test", test)):
        path = write_split(rows, args.out, split)
        print(f"wrote {path} ({path.stat().st_size} bytes, {len(rows)} rows)")
    corpus = args.out / default_corpus_path().name
    write_corpus(args.qa_dir / CORPUS_FILE, corpus)
    print(f"wrote {corpus} ({corpus.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
