"""End-of-run outputs: reward-curve PNG, before/after table and summary.json in the run directory."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_reward_curve(run_dir: Path, rows: list[dict]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]
    val = [(r["step"], r["val/f1"]) for r in rows if "val/f1" in r]
    val_reward = [(r["step"], r["val/reward"]) for r in rows if "val/reward" in r]
    oracle = [(r["step"], r["val_oracle/f1"]) for r in rows if "val_oracle/f1" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, rewards = zip(*train)
        ax.plot(steps, rewards, color="#9ab", lw=1, label="train reward (per step)")
        k = max(1, len(rewards) // 10)
        smooth = [sum(rewards[max(0, i - k + 1): i + 1]) / len(rewards[max(0, i - k + 1): i + 1]) for i in range(len(rewards))]
        ax.plot(steps, smooth, color="#268", lw=2, label=f"train reward (moving mean, {k})")
    if val:
        steps, f1 = zip(*val)
        ax.plot(steps, f1, "o-", color="#c52", lw=2, label="held-out F1 (greedy)")
    if val_reward:
        steps, reward = zip(*val_reward)
        ax.plot(steps, reward, "s--", color="#e93", lw=1.5, label="held-out reward (greedy)")
    if oracle:
        steps, f1 = zip(*oracle)
        ax.plot(steps, f1, "^:", color="#888", lw=1, label="oracle F1 (simulator saw the answer)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / F1")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = run_dir / "reward_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# (metric, summary name): besides F1/EM/reward, what shows whether the policy learned to search
SUMMARY_KEYS = (
    ("val/searches_per_traj", "searches"),
    ("val/retrieval_hit", "retrieval_hit"),
    ("val/answer_rate", "answer_rate"),
    ("val_named/f1", "f1_answer_named"),
    ("val_open/f1", "f1_answer_open"),
    ("val/last_option_f1", "f1_last_option_guess"),
    ("val/f1_balanced", "f1_position_balanced"),
    ("val_swapped/f1", "f1_options_swapped"),
    ("val/last_option_share", "last_option_answer_share"),
    ("val_swapped/last_option_share", "last_option_answer_share_swapped"),
    ("val/same_option_share", "same_option_share"),
    ("val/same_option_right_share", "same_option_right_share"),
    ("val_named/searches_per_traj", "searches_answer_named"),
    ("val_open/searches_per_traj", "searches_answer_open"),
    ("val_copy/example_answer_share", "copy_example_answer"),
    ("val_copy/example_query_share", "copy_example_query"),
    ("val_copy/top_answer_share", "top_answer_share"),
    ("val_copy/top_query_share", "top_query_share"),
    ("val_copy/top_query_addition_share", "top_query_addition_share"),
    ("val_copy/question_answer_share", "question_answer_share"),
    ("val_copy/doc_answer_share", "doc_answer_share"),
)
# rows of summary.md
TABLE_KEYS = (
    ("val/reward", "reward"), ("val/f1", "F1"), ("val/em", "EM"), ("val/answer_rate", "answer rate"),
    ("val/searches_per_traj", "searches per question"),
    ("val/retrieval_hit", "questions whose retrieved documents hold a gold answer"),
    ("val_named/f1", "F1, answer named in the question"), ("val_open/f1", "F1, the other questions"),
    ("val/last_option_f1", "F1 of naming each question's last option, no search (a baseline)"),
    ("val/f1_balanced", "F1, position-balanced (each \"A or B\" question: the mean of both orderings)"),
    ("val_swapped/f1", "F1 of the \"A or B\" questions with their options swapped"),
    ("val/last_option_share", "\"A or B\" answers naming the last option, as written"),
    ("val_swapped/last_option_share", "\"A or B\" answers naming the last option, options swapped"),
    ("val/same_option_share", "\"A or B\" questions answered with the same option both ways (reading, not position)"),
    ("val/same_option_right_share", "\"A or B\" questions answered rightly both ways"),
    ("val_copy/example_answer_share", "answers copying the prompt's example"),
    ("val_copy/top_answer_share", "questions sharing the most common answer"),
    ("val_copy/top_query_share", "questions sharing the most common query"),
    ("val_copy/top_query_addition_share", "questions whose queries add the same words to the question"),
    ("val_copy/question_answer_share", "answers repeating the question"),
    ("val_copy/doc_answer_share", "answers naming a document header"),
)


def untrained_scores(predictions: Path) -> dict[str, float]:
    """The validation metrics (`val/...` names) of a `zerosearch eval` of the untrained policy, when there is one."""
    from types import SimpleNamespace

    from zerosearch.rollout.copying import split_metrics

    if not predictions.is_file():
        return {}
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    n = max(len(rows), 1)
    trajs = [SimpleNamespace(question=r["question"], golden_answers=r["golden_answers"], answer=r["prediction"],
                             num_searches=r["num_searches"]) for r in rows]
    hits = [bool(r.get("retrieval_hit")) for r in rows]
    out = {"val/f1": sum(r["f1"] for r in rows) / n, "val/em": sum(r["em"] for r in rows) / n,
           "val/answer_rate": sum(r["prediction"] is not None for r in rows) / n,
           "val/searches_per_traj": sum(r["num_searches"] for r in rows) / n, "val/retrieval_hit": sum(hits) / n}
    out.update(split_metrics(trajs, rows, hits, "val"))
    return out


def write_summary(run_dir: Path, history: dict, steps: int, wall_s: float, peak_rss_gib: float,
                  simulated_queries: float, heldout_search: str | None = None,
                  oracle_search: str | None = None, cost: dict[str, float] | None = None) -> dict:
    """`heldout_*` come from validation through the real engine `heldout_search` (metrics `val/...`);
    with `oracle_search` (the simulator, which saw the gold answer) also `oracle_f1_*` (`val_oracle/...`)."""
    rows = read_metrics(run_dir)
    val = history.get("val", [])
    before = val[0] if val and val[0]["step"] == 0 else None
    after = val[-1] if val else None
    summary = {
        "heldout_search": heldout_search,
        "heldout_f1_before": before.get("val/f1") if before else None,
        "heldout_f1_after": after.get("val/f1") if after else None,
        "heldout_em_before": before.get("val/em") if before else None,
        "heldout_em_after": after.get("val/em") if after else None,
        "heldout_reward_before": before.get("val/reward") if before else None,
        "heldout_reward_after": after.get("val/reward") if after else None,
    }
    for key, name in SUMMARY_KEYS:
        summary[f"heldout_{name}_before"] = before.get(key) if before else None
        summary[f"heldout_{name}_after"] = after.get(key) if after else None
    train_rows = [r for r in rows if "copy/example_answer_share" in r]
    for key in (k.removeprefix("val_copy/") for k, _ in SUMMARY_KEYS if k.startswith("val_copy/")):
        # the worst step of training: a copy that came and went is still reported
        summary[f"train_copy_{key}_max"] = max((r[f"copy/{key}"] for r in train_rows if f"copy/{key}" in r),
                                               default=None)
    warm = run_dir / "warmstart" / "warmstart.json"
    untrained = untrained_scores(run_dir / "warmstart" / "untrained_eval" / "predictions.jsonl")
    if warm.is_file():  # the optional supervised stage: "before" is the warm-started policy, not the base model
        w = json.loads(warm.read_text())
        summary["warmstart"] = {k: w.get(k) for k in ("base_model", "engine", "demonstrations", "sources", "steps",
                                                      "first_loss", "last_loss", "wall_s")}
        summary["warmstart"]["search"] = (w.get("settings") or {}).get("search", True)
        summary["heldout_f1_untrained"] = untrained.get("val/f1")
        for key, name in SUMMARY_KEYS:
            if key in untrained:
                summary[f"heldout_{name}_untrained"] = untrained[key]
    if oracle_search:
        summary.update({
            "oracle_search": oracle_search,
            "oracle_f1_before": before.get("val_oracle/f1") if before else None,
            "oracle_f1_after": after.get("val_oracle/f1") if after else None,
        })
    summary |= {
        "steps": steps,
        "wall_s": round(wall_s, 1),
        "peak_rss_gib": round(peak_rss_gib, 2),
        "simulated_queries": int(simulated_queries),
    }
    if cost is not None:  # the cost ledger's run totals (zerosearch/ledger.py)
        summary["cost"] = {k: round(v, 4) for k, v in cost.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_reward_curve(run_dir, rows)
    table = _render_markdown(summary, [untrained, before, after], heldout_search, oracle_search, steps, wall_s,
                             peak_rss_gib, simulated_queries, cost)
    (run_dir / "summary.md").write_text(table + "\n")
    print("\n" + table + f"\n\nrun directory: {run_dir}\n")
    return summary


def _render_markdown(summary: dict, columns: list, heldout_search: str | None, oracle_search: str | None, steps: int,
                     wall_s: float, peak_rss_gib: float, simulated_queries: float, cost: dict | None) -> str:
    untrained, before, after = columns
    cols = [before, after]
    lines = ["| held-out (greedy) | before | after |", "|---|---|---|"]
    if "warmstart" in summary:
        cols = [untrained, before, after]
        lines = ["| held-out (greedy) | untrained | before (warm-started) | after |", "|---|---|---|---|"]
    keys = list(TABLE_KEYS)
    if oracle_search:
        keys += [(f"val_oracle/{k}", f"oracle {k}") for k in ("f1", "em")]
    for key, name in keys:
        cells = [f"{col[key]:.4f}" if col and key in col else "-" for col in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"held-out search: {heldout_search or 'none (no validation through a real engine)'}"]
    if oracle_search:
        lines.append(f"oracle search: {oracle_search}; its scores are not held-out numbers")
    if "warmstart" in summary:
        w = summary["warmstart"]
        # warmstart.search=false (the no-search variant): the documents chose the questions, the demonstrations omit them
        shown = (f"with {w['engine']} documents" if w.get("search", True)
                 else f"without the search turn (questions chosen with {w['engine']} documents)")
        lines.append(f"warm-start (a separate supervised stage, before 'before'): {w['demonstrations']} demonstrations "
                     f"{shown} for training questions, {w['steps']} steps, {w['wall_s']:.0f} s; "
                     f"untrained base model: {w['base_model']}")
    lines += ["", (f"steps {steps}, wall {wall_s / 60:.1f} min, peak RSS {peak_rss_gib:.2f} GiB, "
              f"simulated queries {int(simulated_queries)}")]
    if cost is not None:
        lines.append(_cost_line(cost))
    return "\n".join(lines)


def _cost_line(c: dict[str, float]) -> str:
    real = ", ".join(f"{k.removeprefix('real_queries/')} {int(v)}" for k, v in c.items() if k.startswith("real_queries/"))
    return (f"searches: {int(c['simulated_queries'])} simulated ({int(c['simulated_prompt_tokens'])} prompt + "
            f"{int(c['simulated_completion_tokens'])} completion tokens, simulator busy {c['simulator_s']:.0f} s), "
            f"{int(c['real_queries'])} real{f' ({real})' if real else ''}; at the paid API's price the run's searches "
            f"would cost ${c['api_equivalent_usd']:.2f}; paid API ${c['real_api_usd']:.2f}, simulator "
            f"${c['simulator_usd']:.4f}, saved ${c['saved_usd']:.2f}")
