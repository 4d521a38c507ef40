"""Paired held-out differences (`training/paired.py`), as `scripts/compare.py` reports them."""

import json

import pytest

from zerosearch.training.paired import paired_difference, per_question_balanced, per_question_f1, val_files

QUESTIONS = [f"Who directed film number {i}?" for i in range(40)] + \
            [f"Which film came out first, Alpha{i} or Beta{i}?" for i in range(20)]


def run(f1: float | list[float]) -> dict[str, tuple[float, bool]]:
    scores = f1 if isinstance(f1, list) else [f1] * len(QUESTIONS)
    return {q: (s, "Beta" in q) for q, s in zip(QUESTIONS, scores)}


def test_a_uniform_gain_has_a_tight_interval_and_no_gain_an_interval_at_zero():
    same = paired_difference([run(0.3)] * 3, [run(0.3)] * 3)
    assert same["diff"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0
    gain = paired_difference([run(0.4)] * 3, [run(0.3)] * 3)
    assert gain["diff"] == pytest.approx(0.1) and gain["lo"] == pytest.approx(0.1) and gain["hi"] == pytest.approx(0.1)
    assert gain["questions"] == 60 and gain["runs"] == (3, 3)


def test_one_lucky_seed_does_not_make_a_gain_look_certain():
    # seed 1 gains 0.3 on every question, seeds 2 and 3 nothing: the mean gain is 0.1, but a third of the draws of
    # three seeds miss the lucky one, so the interval reaches zero. A bootstrap over questions alone would not.
    d = paired_difference([run(0.6), run(0.3), run(0.3)], [run(0.3)] * 3, paired_seeds=True)
    assert d["diff"] == pytest.approx(0.1)
    assert d["lo"] == pytest.approx(0.0) and d["hi"] == pytest.approx(0.3)


def test_noisy_questions_widen_the_interval_around_the_mean():
    after = run([1.0 if i % 4 == 0 else 0.0 for i in range(len(QUESTIONS))])  # +1 on a quarter of the questions
    d = paired_difference([after], [run(0.0)])
    assert d["diff"] == pytest.approx(0.25)
    assert 0.1 < d["lo"] < 0.25 < d["hi"] < 0.4


def test_subsets_split_named_from_open_questions():
    scores = [0.0] * 40 + [1.0] * 20  # the 20 "A or B" questions name their answer
    named = paired_difference([run(scores)], [run(0.0)], subset="named")
    open_ = paired_difference([run(scores)], [run(0.0)], subset="open")
    assert (named["diff"], named["questions"]) == (1.0, 20)
    assert (open_["diff"], open_["questions"]) == (0.0, 40)


def test_runs_on_different_questions_are_refused():
    other = dict(run(0.3))
    other.pop(QUESTIONS[0])
    with pytest.raises(ValueError, match="different questions"):
        paired_difference([run(0.3)], [other])
    with pytest.raises(ValueError, match="same runs"):
        paired_difference([run(0.3)] * 2, [run(0.3)], paired_seeds=True)


def test_val_files_are_the_first_and_last_step_in_numeric_order(tmp_path):
    val = tmp_path / "val_rollouts"
    val.mkdir()
    for step, f1 in ((0, 0.0), (6, 0.5), (12, 1.0)):
        row = {"question": "Which film came out first, A or B?", "golden_answers": ["B"], "f1": f1}
        (val / f"val_step_{step}.jsonl").write_text(json.dumps(row) + "\n")
    before, after = val_files(tmp_path)
    assert (before.name, after.name) == ("val_step_0.jsonl", "val_step_12.jsonl")
    assert per_question_f1(after) == {"Which film came out first, A or B?": (1.0, True)}
    assert val_files(tmp_path / "missing") is None


def test_balanced_per_question_f1_takes_the_mean_of_both_orderings():
    written = [{"question": "Which film came out first, Jaws or Star Wars?", "golden_answers": ["Star Wars"], "f1": 1.0},
               {"question": "Who directed Jaws?", "golden_answers": ["Steven Spielberg"], "f1": 0.5}]
    swapped = [{"question": "Which film came out first, Star Wars or Jaws?", "golden_answers": ["Star Wars"], "f1": 0.0}]
    got = per_question_balanced(written, swapped)
    assert got == {"Which film came out first, Jaws or Star Wars?": (0.5, True), "Who directed Jaws?": (0.5, False)}
    assert per_question_balanced(written, [])["Which film came out first, Jaws or Star Wars?"] == (1.0, True)


def _write_rollouts(run_dir, step: int, written_f1: float, swapped_f1: float | None) -> None:
    val = run_dir / "val_rollouts"
    val.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"Which film came out first, Alpha{i} or Beta{i}?", "golden_answers": [f"Beta{i}"],
             "f1": written_f1} for i in range(10)] + [{"question": "Who directed Jaws?", "golden_answers": ["Spielberg"],
                                                      "f1": 0.0}]
    (val / f"val_step_{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if swapped_f1 is not None:
        swapped = [{"question": f"Which film came out first, Beta{i} or Alpha{i}?", "golden_answers": [f"Beta{i}"],
                    "f1": swapped_f1} for i in range(10)]
        (val / f"val_swapped_step_{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swapped))


def test_compare_reports_a_position_guess_as_no_position_balanced_gain(tmp_path):
    """A run that goes from naming the first option to naming the last, whose golds are all last, gains +1 on
    those questions as written and nothing position-balanced; a run without swapped rollouts gets "-"."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    _write_rollouts(tmp_path / "rl_sim_prompt-s1", 0, written_f1=0.0, swapped_f1=1.0)
    _write_rollouts(tmp_path / "rl_sim_prompt-s1", 12, written_f1=1.0, swapped_f1=0.0)
    _write_rollouts(tmp_path / "rl_real-s1", 0, written_f1=0.0, swapped_f1=None)
    _write_rollouts(tmp_path / "rl_real-s1", 12, written_f1=0.5, swapped_f1=None)
    table = compare.paired_table({"rl_sim_prompt": [{}], "rl_real": [{}]}, tmp_path, [1])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| rl_")}
    header = next(line for line in table.splitlines() if line.startswith("| variant")).split(" | ")
    col = header.index("after − before, position-balanced")
    assert rows["rl_sim_prompt"][header.index("after − before")].startswith("+0.909 ")  # 10 of 11 questions
    assert rows["rl_sim_prompt"][col] == "+0.000 [+0.000, +0.000]"
    assert rows["rl_real"][col] == "-"


def test_compare_starts_each_seed_from_its_own_warm_start(tmp_path, monkeypatch):
    """`--warmstart RUN-s{seed}/warmstart` gives seed 2 the second run's warm-start (so a variant pairs with the main
    job's seed of the same number), and rl_no_search still builds its own (it warm-starts without search)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        run_dir = tmp_path / next(a.split("=", 1)[1] for a in cmd if a.startswith("trainer.experiment_name="))
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")

    monkeypatch.setattr(compare, "run", fake_run)
    for name in ("rl_real", "rl_no_search"):
        for seed in (1, 2):
            compare.trained(name, seed, tmp_path, [], warmstart="/runs/main-s{seed}/warmstart")
    paths = [[a for a in cmd if a.startswith("model.path=")] for cmd in commands]
    assert paths == [["model.path=/runs/main-s1/warmstart"], ["model.path=/runs/main-s2/warmstart"], [], []]
    assert "trainer.seed=2" in commands[1] and "warmstart.enabled=false" in commands[1]
    assert "warmstart.enabled=false" not in commands[3]
    # a path with braces of its own keeps them: only "{seed}" is filled in
    compare.trained("rl_real", 3, tmp_path, [], warmstart="/runs/{old}/main-s{seed}/warmstart")
    assert "model.path=/runs/{old}/main-s3/warmstart" in commands[4]


def test_compare_pairs_a_variant_with_the_reference_run_of_the_same_seed(tmp_path):
    """Seed s of a variant against seed s of rl_real: each seed's runs end the same, so the difference is 0 with
    no spread, where drawing the two sides' seeds apart would mix seed 1 with seed 2 (a wide interval); a seed
    the reference lacks is left out of that column."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    for seed, end in ((1, 0.0), (2, 1.0)):
        for name in ("rl_sim_prompt", "rl_real"):
            _write_rollouts(tmp_path / f"{name}-s{seed}", 0, written_f1=0.0, swapped_f1=None)
            _write_rollouts(tmp_path / f"{name}-s{seed}", 12, written_f1=end, swapped_f1=None)
    _write_rollouts(tmp_path / "rl_sim_prompt-s3", 0, written_f1=0.0, swapped_f1=None)  # no rl_real-s3
    _write_rollouts(tmp_path / "rl_sim_prompt-s3", 12, written_f1=1.0, swapped_f1=None)
    table = compare.paired_table({"rl_sim_prompt": [{}], "rl_real": [{}]}, tmp_path, [1, 2, 3])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| rl_")}
    header = next(line for line in table.splitlines() if line.startswith("| variant")).split(" | ")
    col = next(i for i, title in enumerate(header) if title.startswith("after − rl_real after"))
    assert rows["rl_sim_prompt"][1] == "3"
    assert rows["rl_sim_prompt"][col].rstrip(" |") == "+0.000 [+0.000, +0.000]"
    assert rows["rl_real"][col].rstrip(" |") == "-"
