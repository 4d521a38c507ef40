"""The paper's comparison in miniature: the same training budget, the same held-out questions, real search.

    .venv/bin/python scripts/compare.py [--variants NAME ...] [--seeds 1 2 3] [--out runs/compare]
        [--warmstart RUN/warmstart | RUN-s{seed}/warmstart] [--read-only] [key=value ...]

Every trained variant is `zerosearch train --config cpu` with its overrides (and the extra `key=value`s given
here, e.g. `trainer.total_steps=24`); each validates with greedy rollouts through BM25 over the bundled corpus on
the bundled held-out 2WikiMultiHopQA questions, before and after training (`summary.json`). The untrained rows are
`zerosearch eval` on the same questions. A finished run (its `summary.json` exists) is read, not run again, so
the script can be stopped and started. It prints two markdown tables, written to `OUT/comparison.md` (every run's
numbers in `OUT/comparison.json`): each variant's mean and spread over the seeds, and its held-out F1 differences
question by question (after − before, and against real-engine and no-search RL on the seeds both have, seed s
against seed s) with 95 % bootstrap intervals over the questions and the seeds (`training/paired.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (what it is, overrides of configs/cpu.yaml)
TRAINED = {
    # the same warm-start questions, answered without the search turn (`warmstart.search=false`)
    "rl_no_search": ("RL without search (direct answers only)", ["rollout.max_turns=0", "warmstart.search=false"]),
    "rl_real": ("RL against the real engine (Search-R1 style, BM25)", ["search.mode=wiki"]),
    "rl_sim_prompt": ("RL against the prompt-mode simulator (the main job)", []),
    "rl_sim_sft": ("RL against the fine-tuned simulator (docs/simulator.md)",
                   ["search.mode=simulate_sft", "search.simulation_llm=runs/simulator/sim-smollm2"]),
    "fixed_noise": ("ablation: fixed noise 0.25 instead of the 0 -> 0.5 curriculum",
                    ["search.start_threshold=0.25", "search.end_threshold=0.25"]),
    "mask_off": ("ablation: retrieved tokens carry loss", ["algorithm.mask_retrieved_tokens=false"]),
    # not a row of the paper: what RL learns from a simulator that never fails (zerosearch/search/oracle.py)
    "rl_oracle": ("diagnostic: RL against a perfect simulator (the corpus's passages, told the answer)",
                  ["search.mode=oracle_wiki"]),
}
UNTRAINED = {
    "untrained_direct": ("untrained: direct answer", "direct"),
    "untrained_rag": ("untrained: one search with the question (RAG)", "rag"),
    "untrained_agent": ("untrained: agent loop", "agent"),
}
COLUMNS = [("f1", "F1"), ("f1_answer_named", "F1 named"), ("f1_answer_open", "F1 open"),
           ("searches", "searches/q"), ("retrieval_hit", "retrieval hit"), ("answer_rate", "answer rate")]


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"failed with status {code}; see {log}")


def trained(name: str, seed: int, out: Path, extra: list[str], warmstart: str = "", read_only: bool = False) -> dict | None:
    run_dir = out / f"{name}-s{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists() and read_only:
        return None
    if not summary.exists():
        # every variant but the one without search starts from the same warm-start when one is given
        # ("{seed}" in the path picks each seed's own warm-start, e.g. RUN-s{seed}/warmstart; other braces stay)
        path = warmstart.replace("{seed}", str(seed))
        reuse = [f"model.path={path}", "warmstart.enabled=false"] if warmstart and name != "rl_no_search" else []
        overrides = [*TRAINED[name][1], *reuse, f"trainer.seed={seed}", f"trainer.output_dir={out}",
                     f"trainer.experiment_name={run_dir.name}", *extra]
        run([sys.executable, "-m", "zerosearch.cli", "train", "--algo", "grpo", *overrides], out / f"{run_dir.name}.log")
    s = json.loads(summary.read_text())
    return {"before": {k: s.get(f"heldout_{k}_before") for k, _ in COLUMNS},
            "after": {k: s.get(f"heldout_{k}_after") for k, _ in COLUMNS}}


def untrained(name: str, out: Path, extra: list[str]) -> dict:
    """`zerosearch eval` of the untrained policy on the validation questions of the trained runs."""
    from zerosearch.config import load_config
    from zerosearch.training.summary import untrained_scores

    cfg = load_config("cpu", extra)
    eval_dir = out / name
    if not (eval_dir / "predictions.jsonl").exists():
        run([sys.executable, "-m", "zerosearch.cli", "eval", "--model", cfg.model.path, "--data",
             str(ROOT / "zerosearch/data/default/test.parquet"), "--method", UNTRAINED[name][1],
             "--limit", str(cfg.data.val_size), "--output", str(eval_dir), *extra], out / f"{name}.log")
    m = untrained_scores(eval_dir / "predictions.jsonl")
    keys = {"f1": "val/f1", "f1_answer_named": "val_named/f1", "f1_answer_open": "val_open/f1",
            "searches": "val/searches_per_traj", "answer_rate": "val/answer_rate"}
    after = {name: m.get(key) for name, key in keys.items()}
    after["retrieval_hit"] = m.get("val/retrieval_hit") if UNTRAINED[name][1] == "agent" else None
    return {"after": after}


def cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired_table(results: dict[str, list[dict]], out: Path, seeds: list[int]) -> str:
    """Each trained variant's held-out F1 after minus before, and minus the real-engine and no-search variants,
    question by question with a 95 % bootstrap interval over questions and seeds (`training/paired.py`)."""
    from zerosearch.training.paired import (
        cell,
        paired_difference,
        per_question_balanced_file,
        per_question_f1,
        val_files,
    )

    runs: dict[str, dict[int, tuple[dict, dict]]] = {}  # name -> seed -> (before, after)
    balanced: dict[str, list[tuple[dict, dict]] | None] = {}
    for name in results:
        if name in TRAINED:
            files = {seed: f for seed in seeds if (f := val_files(out / f"{name}-s{seed}"))}
            runs[name] = {seed: (per_question_f1(f[0]), per_question_f1(f[1])) for seed, f in files.items()}
            pairs = [(per_question_balanced_file(f[0]), per_question_balanced_file(f[1])) for f in files.values()]
            balanced[name] = pairs if pairs and all(b is not None and a is not None for b, a in pairs) else None
    runs = {name: r for name, r in runs.items() if r}
    if not runs:
        return ""
    refs = [ref for ref in ("rl_real", "rl_no_search") if ref in runs]
    titles = ["variant", "runs", "after − before", "after − before, open questions",
              "after − before, position-balanced", *(f"after − {ref} after (same seeds)" for ref in refs)]
    head = "| " + " | ".join(titles) + " |"
    lines = [head, "|---" * len(titles) + "|"]
    for name, by_seed in runs.items():
        pairs = list(by_seed.values())
        before, after = [p[0] for p in pairs], [p[1] for p in pairs]
        cells = [cell(paired_difference(after, before, paired_seeds=True)),
                 cell(paired_difference(after, before, subset="open", paired_seeds=True))]
        bal = balanced[name]
        cells.append(cell(paired_difference([p[1] for p in bal], [p[0] for p in bal], paired_seeds=True)) if bal else "-")
        for ref in refs:
            # seed s of a variant against seed s of the reference (with a per-seed --warmstart, the same start)
            shared = sorted(set(by_seed) & set(runs[ref]))
            cells.append("-" if ref == name or not shared else cell(paired_difference(
                [by_seed[s][1] for s in shared], [runs[ref][s][1] for s in shared], paired_seeds=True)))
        lines.append(f"| {name} | {len(pairs)} | " + " | ".join(cells) + " |")
    return ("Held-out F1 differences, question by question, with 95 % intervals from a bootstrap over the questions "
            "and each variant's seeds; position-balanced scores each \"A or B\" question by the mean of its two "
            "orderings (`trainer.val_swap_options`), which an answer by position does not raise:\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=[*UNTRAINED, *TRAINED], choices=[*UNTRAINED, *TRAINED])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--warmstart", default="", help="a warm-started model (RUN/warmstart of an earlier run) that "
                        "every trained variant but rl_no_search starts from, instead of building its own; "
                        "'{seed}' in it is replaced by the seed (runs/main-s{seed}/warmstart: each seed its own)")
    parser.add_argument("--read-only", action="store_true", help="run nothing; tabulate the finished runs in --out")
    args, extra = parser.parse_known_args()
    results: dict[str, list[dict]] = {}
    for name in args.variants:
        if name in UNTRAINED:
            if args.read_only and not (args.out / name / "predictions.jsonl").exists():
                continue
            results[name] = [untrained(name, args.out, extra)]
        else:
            runs = [trained(name, seed, args.out, extra, args.warmstart, args.read_only) for seed in args.seeds]
            results[name] = [r for r in runs if r is not None]
    head = "| variant | runs | " + " | ".join(f"{title} after (before)" for _, title in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for name, runs in results.items():
        if not runs:
            continue
        title = (UNTRAINED.get(name) or TRAINED[name])[0]
        cells = []
        for key, _ in COLUMNS:
            after = cell([r["after"][key] for r in runs])
            before = cell([r["before"][key] for r in runs if "before" in r])
            cells.append(after if before == "-" else f"{after} ({before})")
        lines.append(f"| {title} | {len(runs)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n\n" + paired_table(results, args.out, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(table + "\n")
    (args.out / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
