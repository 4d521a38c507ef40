"""Does a policy read the documents, or answer "A or B" questions by position? The same questions both ways.

    .venv/bin/python scripts/position_check.py --models NAME=MODEL [NAME=MODEL ...] [--out runs/position]
        [--limit 100] [key=value ...]

It asks the held-out questions that `scripts/compare.py` and every training run validate on (the first `--limit`
of the bundled test split, `data.val_size`) as written, and those of the form "…, A or B?" whose gold answer is A
or B also with their options swapped ("…, B or A?"), with `zerosearch eval --method agent` and the real engine
(BM25 over the bundled corpus, greedy). A policy that reads its documents answers both orderings alike; one that
names the last option gets one of each pair right. In the bundled held-out set the gold answer is the last option
for 35 of 50 such questions, so F1 as written rewards the position guess; the mean of the two orderings does not.
The position-balanced F1 over all the held-out questions scores each "A or B" question by that mean.
MODEL: a model folder (`RUN/checkpoints/step_N/actor`, `RUN/warmstart`). A finished
evaluation (its `predictions.jsonl`) is read, not run again. Prints a markdown table, also written to
`OUT/position.md` (and `OUT/position.json`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "zerosearch" / "data" / "default" / "test.parquet"
HELDOUT, SWAPPED = "heldout", "swapped"


def write_questions(out: Path, limit: int) -> int:
    """OUT/questions/heldout.jsonl: the first `limit` held-out questions as written; OUT/questions/swapped.jsonl:
    those of the form "…, A or B?" whose gold answer is A or B, with the options swapped. Returns how many."""
    import pandas as pd

    from zerosearch.rollout.copying import swapped_question

    rows = {HELDOUT: [], SWAPPED: []}
    for question, golds in zip(*(pd.read_parquet(TEST).head(limit)[c] for c in ("question", "golden_answers"))):
        golds = [str(g) for g in golds]
        rows[HELDOUT].append({"question": question, "golden_answers": golds, "data_source": HELDOUT})
        if swapped := swapped_question(question, golds):
            rows[SWAPPED].append({"question": swapped, "golden_answers": golds, "data_source": SWAPPED})
    (out / "questions").mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        (out / "questions" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return len(rows[SWAPPED])


def evaluate(name: str, model: str, out: Path, extra: list[str]) -> list[dict]:
    eval_dir = out / name
    predictions = eval_dir / "predictions.jsonl"
    if not predictions.exists():
        cmd = [sys.executable, "-m", "zerosearch.cli", "eval", "--model", model, "--method", "agent", "--data",
               str(out / "questions" / f"{HELDOUT}.jsonl"), str(out / "questions" / f"{SWAPPED}.jsonl"),
               "--output", str(eval_dir), *extra]
        print("$", " ".join(cmd), flush=True)
        with open(out / f"{name}.log", "w") as log:
            if subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT):
                sys.exit(f"zerosearch eval failed; see {out / f'{name}.log'}")
    return [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]


def scores(rows: list[dict]) -> dict[str, float]:
    """`copying.position_scores` of one evaluation's predictions (as written, and swapped)."""
    from zerosearch.rollout.copying import position_scores

    return position_scores([r for r in rows if r["dataset"] == HELDOUT], [r for r in rows if r["dataset"] == SWAPPED])


def paired_table(base: str, rows: dict[str, list[dict]]) -> str:
    """Position-balanced F1 of each group of models (names `VARIANT-sSEED` group by VARIANT) against group `base`,
    question by question, with `paired.paired_difference`'s 95 % interval over questions and seeds."""
    import re

    from zerosearch.training.paired import cell, paired_difference, per_question_balanced

    groups: dict[str, list[dict]] = {}
    for name, preds in rows.items():
        balanced = per_question_balanced([r for r in preds if r["dataset"] == HELDOUT],
                                         [r for r in preds if r["dataset"] == SWAPPED])
        groups.setdefault(re.sub(r"-s\d+$", "", name), []).append(balanced)
    if base not in groups:
        sys.exit(f"--paired {base}: no model is named {base} or {base}-sN")
    lines = [f"| policy (seeds) | position-balanced F1 | − {base} (95 % interval) |", "|---|---|---|"]
    for name, runs in groups.items():
        mean = sum(f1 for run in runs for f1, _ in run.values()) / sum(len(run) for run in runs)
        d = "-" if name == base else cell(paired_difference(runs, groups[base]))
        lines.append(f"| {name} ({len(runs)}) | {mean:.3f} | {d} |")
    return "Question by question, position-balanced:\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="NAME=MODEL_FOLDER ...")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "position")
    parser.add_argument("--limit", type=int, default=100, help="the first N held-out questions (data.val_size)")
    parser.add_argument("--paired", metavar="BASE", help="also a table of each group of models (NAME-sSEED) against "
                        "group BASE, question by question, position-balanced, with 95 %% intervals")
    args, extra = parser.parse_known_args()
    if any("=" not in m for m in args.models):
        parser.error("--models takes NAME=MODEL_FOLDER items")
    # absolute paths: `zerosearch eval` runs in the repository root, wherever this script was started from
    models = {name: str(Path(model).resolve()) if Path(model).exists() else model
              for name, model in (m.split("=", 1) for m in args.models)}
    args.out = args.out.resolve()
    n = write_questions(args.out, args.limit)
    if not n:
        parser.error(f"none of the first {args.limit} held-out questions has the form \"..., A or B?\"; raise --limit")
    predictions = {name: evaluate(name, model, args.out, extra) for name, model in models.items()}
    results = {name: scores(rows) for name, rows in predictions.items()}
    head = ("| policy | \"A or B\": F1 as written | F1 options swapped | mean of both | answers naming the last option, "
            "as written / swapped | the same option both ways / rightly | all held-out: F1 as written | "
            "position-balanced F1 |")
    lines = [head, "|---" * 8 + "|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['f1_as_written']:.3f} | {s['f1_swapped']:.3f} | **{s['f1_pairs_balanced']:.3f}** | "
                     f"{s['last_option_as_written']:.0%} / {s['last_option_swapped']:.0%} | "
                     f"{s['same_option_share']:.0%} / {s['same_option_right_share']:.0%} | {s['f1']:.3f} | "
                     f"**{s['f1_balanced']:.3f}** |")
    table = (f"{args.limit} held-out questions as written, and the {n} \"A or B\" ones among them also with their "
             "options swapped:\n\n" + "\n".join(lines))
    if args.paired:
        table += "\n\n" + paired_table(args.paired, predictions)
    (args.out / "position.md").write_text(table + "\n")
    (args.out / "position.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
