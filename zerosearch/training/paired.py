"""Paired differences between runs on the same held-out questions, with a bootstrap interval.

Every run of `scripts/compare.py` validates on the same questions, so two variants (or a run after and before
training) can be compared question by question. The interval resamples both the questions and each variant's
seeds (a two-level bootstrap), so a difference that one lucky seed makes does not look certain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zerosearch.rollout.copying import answer_in_question, balanced_f1


def val_files(run_dir: Path) -> tuple[Path, Path] | None:
    """(before, after): a run's first and last validation rollouts (`val_rollouts/val_step_N.jsonl`)."""
    files = sorted((run_dir / "val_rollouts").glob("val_step_*.jsonl"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return (files[0], files[-1]) if len(files) >= 2 else None


def per_question_f1(path: Path) -> dict[str, tuple[float, bool]]:
    """question -> (F1, whether the question names its answer) of one validation file (one greedy row each)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["question"]] = (float(row["f1"]), answer_in_question(row["question"], row["golden_answers"]))
    return out


def per_question_balanced(written: list[dict], swapped: list[dict]) -> dict[str, tuple[float, bool]]:
    """question -> (position-balanced F1, whether the question names its answer), from rows `{"question",
    "golden_answers", "f1"}` of the held-out questions as written and of the "A or B" ones swapped
    (`scripts/position_check.py`'s predictions, or a run's `val_step_N` and `val_swapped_step_N` rollouts); the
    F1 is `copying.balanced_f1`'s."""
    named = {r["question"]: answer_in_question(r["question"], r["golden_answers"]) for r in written}
    return {q: (float(f1), named[q]) for q, f1 in balanced_f1(written, swapped).items()}


def per_question_balanced_file(path: Path) -> dict[str, tuple[float, bool]] | None:
    """`per_question_balanced` of one validation step: `val_step_N.jsonl` and, beside it, the swapped "A or B"
    questions of `val_swapped_step_N.jsonl` (`trainer.val_swap_options`); None when that run did not ask them."""
    swapped = path.with_name(path.name.replace("val_step_", "val_swapped_step_", 1))
    if not swapped.exists():
        return None

    def rows(p: Path) -> list[dict]:
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    return per_question_balanced(rows(path), rows(swapped))


def _matrix(runs: list[dict[str, tuple[float, bool]]], questions: list[str]) -> np.ndarray:
    """[seeds, questions] F1."""
    return np.array([[run[q][0] for q in questions] for run in runs], dtype=np.float64)


def paired_difference(a: list[dict[str, tuple[float, bool]]], b: list[dict[str, tuple[float, bool]]],
                      subset: str = "all", paired_seeds: bool = False, reps: int = 10000,
                      seed: int = 0) -> dict[str, float]:
    """Mean F1 of `a` minus mean F1 of `b` (each a list of per-seed `per_question_f1` results) over the
    questions they share (`subset`: all, named or open), with a 95 % two-level bootstrap interval: each
    replicate draws the questions and each side's seeds with replacement. `paired_seeds`: a[i] and b[i] are the
    same run (after and before), so one draw of seeds serves both sides."""
    if not a or not b:
        raise ValueError("paired_difference needs at least one run on each side")
    if paired_seeds and len(a) != len(b):
        raise ValueError("paired_seeds needs the same runs on both sides")
    shared = set.intersection(*(set(r) for r in a + b))
    if any(len(r) != len(shared) for r in a + b):
        raise ValueError("the runs were validated on different questions; a paired difference needs the same ones")
    questions = sorted(q for q in shared if subset == "all" or a[0][q][1] == (subset == "named"))
    if not questions:
        raise ValueError(f"no {subset} questions")
    A, B = _matrix(a, questions), _matrix(b, questions)
    rng = np.random.default_rng(seed)
    q = rng.integers(len(questions), size=(reps, len(questions)))
    ia = rng.integers(len(a), size=(reps, len(a)))
    ib = ia if paired_seeds else rng.integers(len(b), size=(reps, len(b)))
    # replicate r: the mean over its drawn seeds of each drawn question, then over the drawn questions
    da = np.stack([A[ia[r]][:, q[r]].mean() for r in range(reps)])
    db = np.stack([B[ib[r]][:, q[r]].mean() for r in range(reps)])
    lo, hi = np.percentile(da - db, [2.5, 97.5])
    return {"diff": float(A.mean() - B.mean()), "lo": float(lo), "hi": float(hi), "questions": len(questions),
            "runs": (len(a), len(b))}


def cell(d: dict[str, float]) -> str:
    """A difference and its interval as one table cell: `+0.072 [-0.007, +0.156]`."""
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
