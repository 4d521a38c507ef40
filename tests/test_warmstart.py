"""The supervised warm-start stage: its demonstrations are the agent loop's own token sequences, with the loss
on the policy's turns only, and only questions whose answer the policy could see are kept."""

from __future__ import annotations

import pytest

from tests.test_rollout_loop import make_loop, run, sample
from zerosearch.config import load_config
from zerosearch.search import SearchResult
from zerosearch.training.warmstart import build_demonstrations, demonstration


@pytest.mark.parametrize("protocol", ["inline", "chat"])
def test_a_demonstration_is_the_trajectory_the_agent_loop_builds(smollm2_tokenizer, protocol):
    tok = smollm2_tokenizer
    q = sample(0)
    script = [f"<search> {q.question} </search>", "<answer> Paris </answer>"]
    loop, engine = make_loop(tok, [script], protocol=protocol)
    (traj,), _ = run(loop, engine, [q])
    docs = f"Doc 1(Title: Paris) Paris is the capital of France. [{q.question}]"
    demo = demonstration(tok, q.prompt, q.question, docs, "Paris", protocol)
    assert demo["input_ids"] == traj.prompt_ids + traj.response_ids
    # the loss covers exactly the tokens the loop marks as the policy's (loss mask 1)
    trained = [label != -100 for label in demo["labels"]]
    assert trained == [False] * len(traj.prompt_ids) + [m == 1 for m in traj.loss_mask]
    assert all(label in (-100, token) for label, token in zip(demo["labels"], demo["input_ids"]))


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
