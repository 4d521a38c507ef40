"""The supervised warm-start stage: its demonstrations are the agent loop's own token sequences, with the loss
on the policy's turns only, and only questions whose answer the policy could see are kept."""

from __future__ import annotations

from typing import ClassVar

import pytest

from tests.test_rollout_loop import RecordingSearch, make_loop, run, sample
from zerosearch.config import load_config
from zerosearch.search import SearchResult
from zerosearch.training.warmstart import bridge_names, build_demonstrations, demonstration


@pytest.mark.parametrize("protocol", ["inline", "chat"])
def test_a_demonstration_is_the_trajectory_the_agent_loop_builds(smollm2_tokenizer, protocol):
    tok = smollm2_tokenizer
    q = sample(0)
    script = [f"<search> {q.question} </search>", "<answer> Paris </answer>"]
    loop, engine = make_loop(tok, [script], protocol=protocol)
    (traj,), _ = run(loop, engine, [q])
    docs = f"Doc 1(Title: Paris) Paris is the capital of France. [{q.question}]"
    demo = demonstration(tok, q.prompt, [(q.question, docs)], "Paris", protocol)
    assert demo["input_ids"] == traj.prompt_ids + traj.response_ids
    # the loss covers exactly the tokens the loop marks as the policy's (loss mask 1)
    trained = [label != -100 for label in demo["labels"]]
    assert trained == [False] * len(traj.prompt_ids) + [m == 1 for m in traj.loss_mask]
    assert all(label in (-100, token) for label, token in zip(demo["labels"], demo["input_ids"]))


@pytest.mark.parametrize("protocol", ["inline", "chat"])
def test_a_two_search_demonstration_is_the_trajectory_the_agent_loop_builds(smollm2_tokenizer, protocol):
    tok = smollm2_tokenizer
    q = sample(0)
    docs = "Doc 1(Title: Paris) Paris is the capital of France."
    script = [f"<search> {q.question} </search>", "<search> Anne Hidalgo </search>", "<answer> Paris </answer>"]
    loop, engine = make_loop(tok, [script], search=RecordingSearch(docs=docs), protocol=protocol, max_turns=3)
    (traj,), _ = run(loop, engine, [q])
    assert traj.num_searches == 2
    # RecordingSearch appends the query to its documents
    searches = [(query, f"{docs} [{query}]") for query in (q.question, "Anne Hidalgo")]
    demo = demonstration(tok, q.prompt, searches, "Paris", protocol)
    assert demo["input_ids"] == traj.prompt_ids + traj.response_ids
    trained = [label != -100 for label in demo["labels"]]
    assert trained == [False] * len(traj.prompt_ids) + [m == 1 for m in traj.loss_mask]


def test_bridge_names_are_the_names_the_documents_add_to_the_question():
    docs = ("Doc 1(Title: Age-Old Friends) Age-Old Friends is a 1989 film directed by Allan Kroeker. It stars "
            "Hume Cronyn and Vincent Gardenia. Doc 2(Title: Old Friends) A film by J. R. Smith, made in New York.")
    names = bridge_names(docs, "Where was the director of film Age-Old Friends born?")
    # a retrieved document's title counts too; a name the question holds ("Age-Old Friends") does not
    assert names == ["Allan Kroeker", "Hume Cronyn", "Vincent Gardenia", "Old Friends", "J. R. Smith", "New York"]
    assert bridge_names(docs, "Where was the director of film Age-Old Friends born?", limit=2) == names[:2]


class BridgeDocs:
    """BM25 in miniature: the film's page names its director, the director's page his birthplace."""

    pages: ClassVar[dict[str, str]] = {"Age-Old Friends": "Doc 1(Title: Age-Old Friends) Age-Old Friends is a film directed by Allan Kroeker.",
             "Allan Kroeker": "Doc 1(Title: Allan Kroeker) Allan Kroeker was born in Winnipeg, Manitoba.",
             "Red Herring": "Doc 1(Title: Red Herring) Red Herring is a film directed by Jane Doe."}

    def __init__(self):
        self.queries = []

    def search(self, requests):
        self.queries += [r.query for r in requests]
        return [SearchResult(text=next((page for key, page in self.pages.items() if key in r.query),
                                       "Doc 1(Title: Moon) The Moon orbits the Earth."), noisy=None) for r in requests]


def test_two_hop_demonstrations_search_the_name_the_first_documents_give(smollm2_tokenizer):
    samples = [sample(0, "Where was the director of film Age-Old Friends born?", ["Winnipeg, Manitoba"]),
               sample(1, "Where was the director of film Red Herring born?", ["Boston"])]
    one_hop, counts = build_demonstrations(load_config("cpu", []), samples, BridgeDocs(), smollm2_tokenizer)
    assert one_hop == [] and counts == {"searched": 2, "dropped_no_answer_seen": 2}

    search = BridgeDocs()
    cfg = load_config("cpu", ["warmstart.two_hop=true"])
    demos, counts = build_demonstrations(cfg, samples, search, smollm2_tokenizer)
    # the second question's bridge (Jane Doe) is searched too, but her documents do not hold Boston: dropped
    assert search.queries[2:] == ["Allan Kroeker", "Jane Doe"]
    assert counts == {"searched": 2, "kept_two_searches": 1, "dropped_no_answer_seen": 1}
    (demo,) = demos
    text = smollm2_tokenizer.decode(demo["input_ids"])
    reply = text.split("<|im_start|>assistant")[-1]
    assert reply.count("<search>") == 2 and "<search> Allan Kroeker </search>" in reply
    assert text.endswith("<answer> Winnipeg, Manitoba </answer>")
    trained = smollm2_tokenizer.decode([t for t, label in zip(demo["input_ids"], demo["labels"]) if label != -100])
    assert trained == ("<search> Where was the director of film Age-Old Friends born? </search><search> Allan "
                       "Kroeker </search><answer> Winnipeg, Manitoba </answer>")


class FilmDocs(BridgeDocs):
    """Each film's page gives its year; the question's search finds the first film named."""

    pages: ClassVar[dict[str, str]] = {"Dead Mine": "Doc 1(Title: Dead Mine) Dead Mine is a 2012 film by Steven Sheil.",
                                       "Witch Story": "Doc 1(Title: Witch Story) Witch Story is a 1989 horror film."}


def test_compare_options_demonstrates_a_search_for_each_option_then_the_gold_option(smollm2_tokenizer):
    samples = [sample(0, "Which film came out first, Dead Mine or Witch Story?", ["Witch Story"]),
               sample(1, "Are Dead Mine and Witch Story from the same country?", ["no"]),  # no options to search
               sample(2, "Which film came out first, Dead Mine or Zorro?", ["Mask of Zorro"])]  # gold not an option
    plain, plain_counts = build_demonstrations(load_config("cpu", []), samples, FilmDocs(), smollm2_tokenizer)
    assert [d["answer"] for d in plain] == ["Witch Story"] and plain_counts["kept_answer_in_question"] == 1

    search = FilmDocs()
    cfg = load_config("cpu", ["warmstart.compare_options=true"])
    demos, counts = build_demonstrations(cfg, samples, search, smollm2_tokenizer)
    # the three questions, then each option of the one whose gold answer is an option
    assert search.queries[3:] == ["Dead Mine", "Witch Story"]
    assert counts == {"searched": 3, "kept_compare_options": 1, "kept_named": 1, "dropped_no_answer_seen": 2}
    (demo,) = demos
    text = smollm2_tokenizer.decode(demo["input_ids"])
    assert "a 2012 film by Steven Sheil" in text and "a 1989 horror film" in text  # both options' documents
    trained = smollm2_tokenizer.decode([t for t, label in zip(demo["input_ids"], demo["labels"]) if label != -100])
    assert trained == "<search> Dead Mine </search><search> Witch Story </search><answer> Witch Story </answer>"


class AnswerDocs:
    """Returns a document naming the gold answer for questions about France only."""

    def search(self, requests):
        return [SearchResult(text=("Doc 1(Title: Paris) Paris is the capital of France." if "France" in r.query
                             else "Doc 1(Title: Moon) The Moon orbits the Earth."), noisy=None) for r in requests]


def test_only_questions_whose_answer_was_seen_become_demonstrations(smollm2_tokenizer):
    cfg = load_config("cpu", [])
    samples = [sample(0), sample(1, "What is the capital of Peru?", ["Lima"]),
               sample(2, "Which is larger, Mars or Venus?", ["Venus"])]
    demos, counts = build_demonstrations(cfg, samples, AnswerDocs(), smollm2_tokenizer)
    assert [d["answer"] for d in demos] == ["Paris", "Venus"]
    assert counts == {"searched": 3, "kept_answer_in_documents": 1, "dropped_no_answer_seen": 1,
                      "kept_answer_in_question": 1, "kept_named": 1}
    # the answer a demonstration writes is the gold one found in the documents, in the policy's final turn
    assert smollm2_tokenizer.decode(demos[0]["input_ids"]).endswith("<answer> Paris </answer>")

    # without search (the baseline's warm-start): the same questions, answered in the first turn
    no_search = load_config("cpu", ["warmstart.search=false"])
    direct, direct_counts = build_demonstrations(no_search, samples, AnswerDocs(), smollm2_tokenizer)
    assert [d["answer"] for d in direct] == ["Paris", "Venus"] and direct_counts == counts
    for demo in direct:
        text = smollm2_tokenizer.decode(demo["input_ids"])
        reply = text.split("<|im_start|>assistant")[-1]
        assert reply == "\n<answer> " + demo["answer"] + " </answer>"
        trained = smollm2_tokenizer.decode([t for t, label in zip(demo["input_ids"], demo["labels"]) if label != -100])
        assert trained == f"<answer> {demo['answer']} </answer>"


def test_warm_start_fine_tunes_the_policy_on_the_demonstrations(tmp_path, tiny_model_dir, smollm2_tokenizer):
    """The stage end to end on a tiny corpus and a tiny random model: BM25 documents, demonstrations, TRL steps,
    and an HF folder the trainer can start from."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.test_simulator import CORPUS, QUESTIONS, _write_jsonl
    from zerosearch.training.warmstart import SUMMARY_FILE, warm_start

    corpus = _write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    data = tmp_path / "qa"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", QUESTIONS)
    cfg = load_config("cpu", [f"model.path={tiny_model_dir}", f"data.path={data}", "data.train_sources=[]",
                              f"search.corpus={corpus}", "search.topk=2", "model.autocast_dtype=",
                              "model.gradient_checkpointing=false", "warmstart.epochs=8", "warmstart.lr=3e-3",
                              "warmstart.batch_size=4"])
    out = tmp_path / "ws"
    summary = warm_start(cfg, out)
    # the four questions whose answer BM25 finds are kept; K2 and Yangtze are not in the corpus
    assert summary["demonstrations"] == 4 and summary["candidates"]["dropped_no_answer_seen"] == 2
    assert summary["last_loss"] < summary["first_loss"]
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    shown = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
    assert {d["answer"] for d in shown} == {"Paris", "William Shakespeare", "Berlin", "Danube"}
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(smollm2_tokenizer)
    assert not (out / "checkpoints").exists()


def test_summary_of_a_warm_started_run_shows_the_untrained_policy_apart(tmp_path):
    import json

    from zerosearch.training.summary import write_summary

    (tmp_path / "warmstart" / "untrained_eval").mkdir(parents=True)
    (tmp_path / "warmstart" / "warmstart.json").write_text(json.dumps(
        {"base_model": "base", "engine": "wiki", "demonstrations": 10, "steps": 2, "first_loss": 1.0,
         "last_loss": 0.5, "wall_s": 30.0}))
    rows = [{"question": "Which is larger, Mars or Venus?", "golden_answers": ["Venus"], "prediction": "Venus",
             "em": 1.0, "f1": 1.0, "num_searches": 1, "retrieval_hit": True},
            {"question": "Who wrote Faust?", "golden_answers": ["Goethe"], "prediction": None, "em": 0.0, "f1": 0.0,
             "num_searches": 0, "retrieval_hit": False}]
    (tmp_path / "warmstart" / "untrained_eval" / "predictions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    val = [{"step": 0, "val/f1": 0.3, "val/em": 0.3}, {"step": 4, "val/f1": 0.4, "val/em": 0.35}]
    summary = write_summary(tmp_path, {"val": val}, steps=4, wall_s=60.0, peak_rss_gib=1.0, simulated_queries=3)
    assert summary["heldout_f1_untrained"] == 0.5 and summary["heldout_f1_before"] == 0.3
    assert summary["heldout_searches_untrained"] == 0.5 and summary["heldout_retrieval_hit_untrained"] == 0.5
    assert (summary["heldout_f1_answer_named_untrained"], summary["heldout_f1_answer_open_untrained"]) == (1.0, 0.0)
    assert summary["warmstart"]["demonstrations"] == 10
    table = (tmp_path / "summary.md").read_text()
    assert "| untrained | before (warm-started) | after |" in table and "| F1 | 0.5000 | 0.3000 | 0.4000 |" in table
    assert "10 demonstrations with wiki documents for training questions" in table


def test_summary_says_when_the_warm_start_demonstrated_no_search(tmp_path):
    """The no-search variant's warm-start (`warmstart.search=false`) picks its questions with the engine's documents
    but writes demonstrations without the search turn; its summary says so rather than "with wiki documents"."""
    import json

    from zerosearch.training.summary import write_summary

    (tmp_path / "warmstart").mkdir()
    (tmp_path / "warmstart" / "warmstart.json").write_text(json.dumps(
        {"base_model": "base", "engine": "wiki", "demonstrations": 10, "steps": 2, "wall_s": 30.0,
         "settings": {"search": False}}))
    val = [{"step": 0, "val/f1": 0.3, "val/em": 0.3}, {"step": 4, "val/f1": 0.4, "val/em": 0.35}]
    summary = write_summary(tmp_path, {"val": val}, steps=4, wall_s=60.0, peak_rss_gib=1.0, simulated_queries=0)
    assert summary["warmstart"]["search"] is False
    table = (tmp_path / "summary.md").read_text()
    assert "10 demonstrations without the search turn (questions chosen with wiki documents)" in table
    assert "with wiki documents for training" not in table


def test_the_trainer_builds_the_warm_start_once_and_trains_from_it(tmp_path, tiny_model_dir):
    """`warmstart.enabled`: the driver builds the stage in a child process into RUN/warmstart and returns a config
    whose policy is that folder; a resumed run finds it built and does not build it again."""
    import json

    from tests.test_simulator import CORPUS, QUESTIONS, _write_jsonl
    from zerosearch.config import save_config
    from zerosearch.training.preflight import warm_started

    corpus = _write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    data = tmp_path / "qa"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", QUESTIONS)
    cfg = load_config("cpu", [f"model.path={tiny_model_dir}", f"data.path={data}", "data.train_sources=[]",
                              f"search.corpus={corpus}", "search.topk=2", "model.autocast_dtype=", "trainer.test_freq=0",
                              "warmstart.enabled=true", "warmstart.batch_size=4"])
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir)
    trained = warm_started(cfg, run_dir, [])
    out = run_dir / "warmstart"
    assert trained.model.path == str(out) and cfg.model.path == str(tiny_model_dir)
    assert json.loads((out / "warmstart.json").read_text())["demonstrations"] == 4
    assert not (out / "untrained_eval").exists()  # no validation, so no untrained score to compare with
    built = (out / "model.safetensors").stat().st_mtime_ns
    assert warm_started(cfg, run_dir, []).model.path == str(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == built
    assert warm_started(load_config("cpu", ["warmstart.enabled=false"]), run_dir, []).model.path == "smollm2-135m-instruct"
