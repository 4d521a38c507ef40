"""`zerosearch eval` / `infer`: aggregation, names, table, input errors, trace splitting; one real run (slow)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from zerosearch.eval import (
    AVERAGE,
    _parse_eval_args,
    aggregate,
    build_config,
    dataset_display_name,
    eval_main,
    format_table,
    load_eval_samples,
    resolve_data_files,
    write_outputs,
)
from zerosearch.infer import mask_spans, render_trace, split_trace, use_color
from zerosearch.rollout.trajectory import Trajectory

SHARED = Path(__file__).resolve().parents[2] / "shared"
QA = SHARED / "data" / "qa"
TWOWIKI_DEV = QA / "2wiki_corpus_subset" / "dev.jsonl"
TWOWIKI_CORPUS = QA / "corpus" / "hipporag_2wiki_corpus_6119.jsonl"
needs_shared = pytest.mark.skipif(not TWOWIKI_DEV.is_file(), reason=f"shared QA data not found under {QA}")


def row(dataset, em, f1, searches=1, prediction="x"):
    return {"dataset": dataset, "em": em, "f1": f1, "num_searches": searches, "prediction": prediction}


# ------------------------------------------------------------------------------------------ aggregation


def test_aggregate_per_dataset_and_unweighted_average():
    rows = [
        row("HotpotQA", 1.0, 1.0, searches=2),
        row("HotpotQA", 0.0, 0.5, searches=1, prediction=None),
        row("NQ", 1.0, 1.0, searches=0),
        row("NQ", 0.0, 0.0, searches=1),
        row("NQ", 0.0, 0.2, searches=2, prediction=None),
        row("NQ", 1.0, 0.8, searches=1),
    ]
    table = aggregate(rows)
    assert [r["dataset"] for r in table] == ["NQ", "HotpotQA", AVERAGE]  # paper order, then Average
    nq, hotpot, avg = table
    assert nq == pytest.approx({"dataset": "NQ", "em": 50.0, "f1": 50.0, "searches": 1.0, "answer_rate": 75.0, "n": 4})
    assert hotpot == pytest.approx(
        {"dataset": "HotpotQA", "em": 50.0, "f1": 75.0, "searches": 1.5, "answer_rate": 50.0, "n": 2}
    )
    # unweighted: each dataset counts once (a weighted F1 would be (2.0 + 1.5) / 6 = 58.3)
    assert avg == pytest.approx(
        {"dataset": AVERAGE, "em": 50.0, "f1": 62.5, "searches": 1.25, "answer_rate": 62.5, "n": 6}
    )


def test_aggregate_empty():
    assert aggregate([]) == []


@pytest.mark.parametrize("source, name", [
    ("nq", "NQ"), ("NQ", "NQ"), ("natural_questions", "NQ"), ("triviaqa", "TriviaQA"),
    ("popqa", "PopQA"), ("hotpotqa", "HotpotQA"), ("2wiki_corpus_subset", "2WikiMultiHopQA"),
    ("2WikiMultihopQA", "2WikiMultiHopQA"), ("musique", "MuSiQue"), ("bamboogle", "Bamboogle"),
    ("my_set", "my_set"),
])
def test_dataset_display_name(source, name):
    assert dataset_display_name(source) == name


def test_format_table_contents():
    table = aggregate([row("NQ", 1.0, 1.0), row("PopQA", 0.0, 0.25, searches=3, prediction=None)])
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0].startswith("| Dataset | EM | F1 | Searches/q | Answer rate (%) | N |")
    assert len(lines) == 2 + 3
    assert "| NQ | 100.00 | 100.00 | 1.00 | 100.0 | 1 |" in lines
    assert "| PopQA | 0.00 | 25.00 | 3.00 | 0.0 | 1 |" in lines
    assert lines[-1] == "| **Average** | 50.00 | 62.50 | 2.00 | 50.0 | 2 |"


def test_data_folder_and_file_names(tmp_path):
    for sub, name in (("nq", "test.jsonl"), ("nq", "train.jsonl"), ("hotpotqa", "dev.jsonl"), ("corpus", "c.jsonl")):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / name).write_text('{"question": "q?", "answers": ["a"]}\n' * 3)
    files = resolve_data_files(tmp_path)
    assert sorted(f.relative_to(tmp_path).as_posix() for f in files) == ["hotpotqa/dev.jsonl", "nq/test.jsonl"]
    assert resolve_data_files(tmp_path / "nq") == [tmp_path / "nq" / "test.jsonl"]
    samples = load_eval_samples([str(tmp_path)], limit=2)
    assert [s.data_source for s in samples] == ["NQ", "NQ", "HotpotQA", "HotpotQA"]


# ------------------------------------------------------------------------------------- input errors


def run_fast(argv, capsys):
    """eval_main on bad input: status 2, one clear line, and quickly (no engine or server started)."""
    t0 = time.perf_counter()
    status = eval_main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert status == 2, err
    assert elapsed < 10, f"took {elapsed:.1f}s: something started an engine"
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "nq" / "test.jsonl"
    path.parent.mkdir()
    path.write_text('{"question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}\n')
    return path


def test_bad_data_file_names_file_row_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answers": ["a"]}\n{"question": "no answers"}\n')
    err = run_fast(["--data", str(bad), "--method", "direct", "--engine", "hf"], capsys)
    assert str(bad) in err and "line 2" in err and "answers" in err


def test_missing_data_file(tmp_path, capsys):
    err = run_fast(["--data", str(tmp_path / "none.jsonl"), "--method", "direct"], capsys)
    assert "none.jsonl" in err


def test_wiki_without_corpus(qa_file, capsys):
    err = run_fast(["--data", str(qa_file), "--search", "wiki", "search.corpus="], capsys)
    assert "search.corpus" in err and "retriever_url" in err


def test_eval_searches_the_real_engine_unless_asked(qa_file, tiny_model_dir, monkeypatch, capsys):
    def config(*argv):
        args, overrides = _parse_eval_args(["--data", str(qa_file), "--model", str(tiny_model_dir), *argv])
        return build_config(args, overrides, search_default="search.engine")

    cfg = config()  # cpu: BM25 over the bundled corpus, not the training simulator
    assert (cfg.search.mode, cfg.search.corpus) == ("wiki", "default")
    assert config("--search", "simulate_prompt").search.mode == "simulate_prompt"
    assert config("search.mode=simulate_sft").search.mode == "simulate_sft"
    assert config("search.engine=wiki", "--config", "grpo", "search.corpus=default").search.mode == "wiki"
    monkeypatch.delenv("SER_API_KEY", raising=False)
    err = run_fast(["--data", str(qa_file), "--model", str(tiny_model_dir), "--config", "grpo"], capsys)
    assert "--search google" in err and "SER_API_KEY" in err  # grpo.yaml validates through Google


def test_eval_of_a_two_hop_training_config_searches_the_real_engine(qa_file, tiny_model_dir, tmp_path, capsys):
    """A run's config with the prompt-mode simulator's `search.two_hop` is what the warm-start's untrained eval
    loads: the real engine it searches has no two-hop mode, so the setting is off, not an error."""
    from zerosearch.config import load_config, save_config

    saved = save_config(load_config("cpu", ["search.two_hop=true"]), tmp_path)

    def config(*argv):
        args, overrides = _parse_eval_args(["--data", str(qa_file), "--model", str(tiny_model_dir),
                                            "--config", str(saved), *argv])
        return build_config(args, overrides, search_default="search.engine")

    cfg = config()
    assert (cfg.search.mode, cfg.search.two_hop) == ("wiki", False)
    assert (config("--search", "wiki").search.two_hop, config("search.mode=wiki").search.two_hop) == (False, False)
    cfg = config("--search", "simulate_prompt")  # the simulator it was trained against keeps its setting
    assert (cfg.search.mode, cfg.search.two_hop) == ("simulate_prompt", True)
    err = run_fast(["--data", str(qa_file), "--model", str(tiny_model_dir), "--config", str(saved),
                    "search.two_hop=true"], capsys)
    assert "search.two_hop" in err  # asked for explicitly with the real engine: still refused


def test_simulated_search_results_say_the_simulator_saw_the_answer(tmp_path):
    table = aggregate([row("NQ", 1.0, 1.0)])
    write_outputs(tmp_path / "sim", [], table, {"simulator_saw_answer": True})
    write_outputs(tmp_path / "real", [], table, {"simulator_saw_answer": False})
    assert "oracle scores, not held-out numbers" in (tmp_path / "sim" / "results.md").read_text()
    assert (tmp_path / "real" / "results.md").read_text() == format_table(table) + "\n"


def test_wiki_with_missing_corpus(qa_file, tmp_path, capsys):
    err = run_fast(["--data", str(qa_file), "--search", "wiki", "--corpus", str(tmp_path / "c.jsonl")], capsys)
    assert "c.jsonl" in err and "no such file" in err


def test_model_path_that_does_not_exist(qa_file, tmp_path, capsys):
    missing = tmp_path / "no-model"
    err = run_fast(["--model", str(missing), "--data", str(qa_file), "--method", "direct"], capsys)
    assert str(missing) in err and "--model" in err


def test_model_folder_without_config(qa_file, tmp_path, capsys):
    err = run_fast(["--model", str(tmp_path), "--data", str(qa_file), "--method", "direct"], capsys)
    assert "config.json" in err


def test_embedded_model_not_built(qa_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZEROSEARCH_HOME", str(tmp_path / "home"))
    err = run_fast(["--model", "smollm2-135m-instruct", "--data", str(qa_file), "--method", "direct"], capsys)
    assert "fetch-model" in err
    err = run_fast(["--model", "gemma3-270m", "--data", str(qa_file), "--method", "direct"], capsys)
    assert "--model gemma3-270m:" in err and "fetch-model --model gemma3-270m" in err


def test_unknown_method_and_search(qa_file, capsys):
    err = run_fast(["--data", str(qa_file), "--method", "oracle"], capsys)
    assert "oracle" in err and "agent" in err
    err = run_fast(["--data", str(qa_file), "--search", "bing"], capsys)
    assert "bing" in err and "simulate_prompt" in err


def test_unknown_override(qa_file, capsys):
    err = run_fast(["--data", str(qa_file), "--method", "direct", "rollout.bogus=1"], capsys)
    assert "rollout.bogus" in err


# ------------------------------------------------------------------------------------ trace splitter


def hand_built_trajectory(tokenizer) -> Trajectory:
    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    traj = Trajectory(0, 0, "Who wrote Hamlet?", ["Shakespeare"], enc("prompt"))
    turn1 = enc("<think>I should look it up.</think>\n<search>Hamlet author</search>")
    traj.append_policy(turn1)
    traj.append_observation(enc("\n\n<information>Doc 1(Title: Hamlet) A play by William Shakespeare.</information>\n\n"))
    turn2 = enc("<think>It is Shakespeare.</think>\n<answer>William Shakespeare</answer>")
    traj.append_policy(turn2)
    return traj


def test_mask_spans_follow_the_loss_mask():
    assert mask_spans([5, 6, 7, 8, 9], [1, 1, 0, 0, 1]) == [(True, [5, 6]), (False, [7, 8]), (True, [9])]
    assert mask_spans([], []) == []


def test_split_trace_policy_and_observation_spans(smollm2_tokenizer):
    segments = split_trace(hand_built_trajectory(smollm2_tokenizer), smollm2_tokenizer)
    assert [(s.kind, s.policy) for s in segments] == [
        ("think", True), ("search", True), ("information", False), ("think", True), ("answer", True),
    ]
    assert segments[1].text == "<search>Hamlet author</search>"
    assert "William Shakespeare" in segments[2].text and segments[2].text.startswith("<information>")
    assert segments[4].text == "<answer>William Shakespeare</answer>"


def test_render_plain_when_not_a_tty_and_coloured_otherwise(smollm2_tokenizer):
    segments = split_trace(hand_built_trajectory(smollm2_tokenizer), smollm2_tokenizer)
    piped = io.StringIO()
    assert not use_color(piped)
    plain = render_trace(segments, use_color(piped))
    assert "\x1b" not in plain
    assert "<search>Hamlet author</search>" in plain and "<answer>William Shakespeare</answer>" in plain

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not use_color(Tty(), no_color=True)
    coloured = render_trace(segments, color=True)
    assert "\x1b[" in coloured and coloured.count("\x1b[0m") == len(segments)


# --------------------------------------------------------------------------------------- a real run


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("method, searches", [("agent", None), ("direct", 0), ("rag", 1)])
def test_eval_runs_end_to_end_with_hf_engine(tiny_model_dir, tmp_path, method, searches, capsys):
    out = tmp_path / method
    t0 = time.perf_counter()
    status = eval_main([
        "--model", str(tiny_model_dir), "--engine", "hf", "--method", method,
        "--data", str(TWOWIKI_DEV), "--search", "wiki", "--corpus", str(TWOWIKI_CORPUS),
        "--limit", "3", "--max-turns", "2", "--output", str(out),
        "rollout.max_response_length=24", "rollout.max_obs_length=128",
    ])
    elapsed = time.perf_counter() - t0
    stdout = capsys.readouterr().out
    assert status == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["dataset"] for r in rows} == {"2WikiMultiHopQA"}
    for r in rows:
        assert {"dataset", "question", "golden_answers", "prediction", "em", "f1", "num_searches"} <= set(r)
        if searches is not None:
            assert r["num_searches"] == searches
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["num_questions"] == 3
    assert summary["search"] == ("none" if method == "direct" else "wiki")
    assert summary["simulator_saw_answer"] is False
    assert summary["search_backend"] == (None if method == "direct" else f"wiki: BM25 over {TWOWIKI_CORPUS.name}")
    assert summary["average"]["n"] == 3 and len(summary["datasets"]) == 1
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 and "| 2WikiMultiHopQA |" in table[2] and "**Average**" in table[3]
    assert json.loads((out / "results.json").read_text())[-1]["dataset"] == AVERAGE
    assert "| 2WikiMultiHopQA |" in stdout
    print(f"eval --method {method}: {elapsed:.1f}s")
