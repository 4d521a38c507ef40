"""How often does a simulator write the gold answer into its documents? Replay a training run's searches to one.

    .venv/bin/python scripts/sim_replay.py --runs RUN [RUN ...] --server 127.0.0.1:6011 --model NAME
        [--temperature 0.8] [--reps 2] [--follow 60] [--named 40] [--held 30] [--seed 0] [--out FILE]

It reads the useful (not noisy) searches of `RUN/rollouts/step_*.jsonl` and sorts them with the agent loop's
two-hop rule (`rollout.loop.answer_held_back`; `search.two_hop`, docs/differences.md), so runs that did not use it
can be replayed too:
- `follow`: an open question (`answer_guessable` false) searched for a name its earlier documents gave: the
  simulator is told the answer;
- `named`: a question that names its answer ("A or B?", yes/no): the simulator is told the answer;
- `held`: an open question's other searches: written from the bridge prompt, without the answer.
A seeded sample of each kind (one row per distinct query and question) is sent `--reps` times to the simulation
server at `--server` (started beforehand, e.g. `zerosearch serve-sim --model M --port 6011`), with `search.topk`
3 and `search.max_tokens` 160 as the CPU runs use, and the share of results holding a gold answer (whole words,
`rewards.retrieval_hit`) is printed per kind. `rollout/answer_in_{useful,held,noisy}` give the same live, in
training; this asks it again of another simulator or sampling temperature, for the same searches. `--out` keeps
every result (JSON).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import random
from pathlib import Path

from zerosearch.rewards import retrieval_hit
from zerosearch.rollout.copying import answer_guessable
from zerosearch.rollout.loop import answer_held_back
from zerosearch.search.base import SearchRequest
from zerosearch.search.simulated import SimulatedSearch

KINDS = ("follow", "named", "held")


def searches(runs: list[str]) -> dict[str, dict[tuple[str, str], list[str]]]:
    """kind -> {(query, question): gold answers} over the runs' useful training searches."""
    pool: dict[str, dict[tuple[str, str], list[str]]] = {k: {} for k in KINDS}
    for run in runs:
        for path in sorted(glob.glob(f"{run}/rollouts/step_*.jsonl")):
            with open(path) as f:
                rows = [json.loads(line) for line in f]
            for row in rows:
                named = answer_guessable(row["question"], row["golden_answers"])
                for i, (query, noisy) in enumerate(zip(row["queries"], row["noisy_flags"])):
                    if noisy is not False:  # noisy, or a real engine's search
                        continue
                    held = answer_held_back(query, row["question"], row["golden_answers"], " ".join(row["documents"][:i]))
                    kind = "named" if named else "held" if held else "follow"
                    pool[kind][(query, row["question"])] = row["golden_answers"]
    return pool


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run folders with rollouts/step_*.jsonl")
    p.add_argument("--server", default="127.0.0.1:6011")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--temperature", type=float, default=0.8, help="the simulator's (search.temperature)")
    p.add_argument("--reps", type=int, default=2, help="times each search is asked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write every result here (JSON)")
    for kind, n in zip(KINDS, (60, 40, 30)):
        p.add_argument(f"--{kind}", type=int, default=n, help=f"{kind} searches to sample (default {n})")
    args = p.parse_args()

    pool, rng = searches(args.runs), random.Random(args.seed)
    requests: list[tuple[str, SearchRequest]] = []
    for kind in KINDS:
        keys = sorted(pool[kind])
        rng.shuffle(keys)
        for query, question in keys[: getattr(args, kind)]:
            requests.append((kind, SearchRequest(query=query, question=question, golden_answers=pool[kind][(query, question)],
                                                 noisy=False, hold_answer=kind == "held")))
    sim = SimulatedSearch(args.server, args.model, topk=3, temperature=args.temperature, max_tokens=160, timeout_s=300)
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    rows = []
    for _ in range(args.reps):
        for (kind, request), result in zip(requests, sim.search([r for _, r in requests])):
            hits[kind].append(retrieval_hit([result.text], request.golden_answers))
            rows.append({"kind": kind, "query": request.query, "question": request.question,
                         "golden_answers": request.golden_answers, "text": result.text})
    sim.close()
    print(f"| simulator | temperature | {' | '.join(f'{k}: answer in documents' for k in KINDS)} |")
    print("|---|---|" + "---|" * len(KINDS))
    cells = [f"{sum(hits[k]) / len(hits[k]):.0%} of {len(hits[k])}" if hits[k] else "-" for k in KINDS]
    print(f"| {args.model} | {args.temperature} | {' | '.join(cells)} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
