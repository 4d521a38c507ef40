"""The multi-turn agent loop, the action parser and the loss mask.

A scripted engine replays fixed turn texts (the real engines are tested in test_engines.py and
the end-to-end rollout in test_rollout_e2e.py), so every branch of the loop is reached on purpose.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from zerosearch.config import RolloutConfig
from zerosearch.data import build_prompt
from zerosearch.data.qa import QASample
from zerosearch.rollout.engines import Generation, SamplingSpec
from zerosearch.rollout.loop import INVALID_ACTION_TEXT, AgentLoop, LoopSettings, encode_prompt, loop_metrics
from zerosearch.rollout.parser import Action, parse_action
from zerosearch.search import SearchResult

# --- parser --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>hm</think><search> capital of France </search>", Action("search", "capital of France")),
        ("<answer>Paris</answer>", Action("answer", "Paris")),
        ("<search>a</search><answer>b</answer>", Action("search", "a")),  # first complete block wins
        ("<answer>b</answer><search>a</search>", Action("answer", "b")),
        ("<search>first</search> then <search>second</search>", Action("search", "first")),
        ("<search>unclosed", Action("invalid")),
        ("<search></search>", Action("invalid")),  # empty query
        ("<search>   </search>", Action("invalid")),
        ("<answer></answer>", Action("answer", "")),  # an empty answer is an answer (it scores 0)
        ("<search><search>q</search></search>", Action("invalid")),  # nested
        ("<search>a<answer>b</answer></search>", Action("invalid")),
        ("no tags at all", Action("invalid")),
        ("", Action("invalid")),
        ("<search>multi\nline</search>", Action("search", "multi\nline")),
        ("<search>東京の人口</search>", Action("search", "東京の人口")),
        ("<answer>Zürich 🇨🇭</answer>", Action("answer", "Zürich 🇨🇭")),
        ("</search>orphan close", Action("invalid")),
        ("<SEARCH>upper</SEARCH>", Action("invalid")),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_parse_action_huge_query_is_capped():
    action = parse_action("<search>" + "x" * 100_000 + "</search>")
    assert action.kind == "search" and len(action.content) == 1000
    assert parse_action("<think>" + "y" * 200_000).kind == "invalid"


# --- a scripted engine and a recording search backend -----------------------------------------


class ScriptedEngine:
    """PolicyEngine that replays `scripts[group][turn]` texts; finishes one request per poll."""

    def __init__(self, tokenizer, scripts, per_poll=1):
        self.tokenizer, self.scripts, self.per_poll = tokenizer, scripts, per_poll
        self.queue: list[tuple[str, list[int], SamplingSpec]] = []
        self.submitted: list[tuple[str, list[int], SamplingSpec]] = []
        self.group_of: dict[int, int] = {}

    def submit(self, request_id, prompt_token_ids, sampling):
        self.queue.append((request_id, list(prompt_token_ids), sampling))
        self.submitted.append(self.queue[-1])

    def has_unfinished(self):
        return bool(self.queue)

    def poll(self):
        out = []
        for request_id, _, sampling in self.queue[: self.per_poll]:
            uid, turn = map(int, request_id.split("/"))
            script = self.scripts[self.group_of[uid]]
            text = script[min(turn, len(script) - 1)]
            ids = self.tokenizer.encode(text, add_special_tokens=False)[: sampling.max_tokens]
            finish = "length" if len(ids) == sampling.max_tokens and "</" not in text[-12:] else "stop"
            out.append((request_id, Generation(ids, [-0.5] * len(ids), self.tokenizer.decode(ids), finish, None)))
        del self.queue[: self.per_poll]
        return out


class RecordingSearch:
    name = "recording"

    def __init__(self, delay=0.0, docs="Doc 1(Title: Paris) Paris is the capital of France."):
        self.delay, self.docs, self.requests = delay, docs, []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def search(self, requests):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.requests += requests
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        return [SearchResult(text=f"{self.docs} [{r.query}]", noisy=r.noisy) for r in requests]

    def stats(self):
        return {"search/queries": float(len(self.requests))}

    def close(self):
        pass


def sample(i, question="What is the capital of France?", answers=("Paris",)):
    return QASample(question=question, golden_answers=list(answers), data_source="test", prompt=build_prompt(question),
                    index=i, extra_info={})


def loop_settings(**settings) -> LoopSettings:
    """LoopSettings from flat keywords: the rollout section's fields go to its RolloutConfig."""
    rollout_keys = {f.name for f in dataclasses.fields(RolloutConfig)}
    rollout = RolloutConfig(**{k: v for k, v in settings.items() if k in rollout_keys})
    return LoopSettings(rollout=rollout, **{k: v for k, v in settings.items() if k not in rollout_keys})


def make_loop(tokenizer, scripts, search=None, per_poll=1, **settings):
    engine = ScriptedEngine(tokenizer, scripts, per_poll)
    loop = AgentLoop(engine, search or RecordingSearch(), tokenizer, loop_settings(**settings))
    return loop, engine


def run(loop, engine, samples, n=1, p_noisy=0.0, seed=0):
    for uid in range(len(samples) * n):
        engine.group_of[uid] = uid // n
    return loop.run(samples, n, SamplingSpec(max_tokens=64), p_noisy=p_noisy, noise_seed=seed)


# --- the loop ----------------------------------------------------------------------------------


SEARCH_THEN_ANSWER = ["<think>I should look it up.</think><search>capital of France</search>",
                      "<think>The documents say Paris.</think><answer>Paris</answer>"]


def test_mask_is_one_exactly_on_policy_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    script = ["<think>hmm</think> nothing useful", *SEARCH_THEN_ANSWER]  # invalid, search, answer
    loop, engine = make_loop(tok, [script])
    (traj,), stats = run(loop, engine, [sample(0)])
    assert traj.finish_reason == "answer" and traj.answer == "Paris"
    assert (traj.num_invalid, traj.num_searches, traj.turns) == (1, 1, 3)
    assert len(traj.loss_mask) == len(traj.response_ids)
    policy = tok.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if m == 1])
    observed = tok.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if m == 0])
    assert policy == "".join(script)  # every policy token, in order, nothing else
    assert "<information>" in observed and "</information>" in observed and "Paris is the capital" in observed
    assert INVALID_ACTION_TEXT.strip() in observed
    assert "<information>" not in policy and "My previous action is invalid" not in policy
    # observation spans: each contiguous 0-run decodes to feedback or a whole <information> block
    runs, current = [], []
    for t, m in zip(traj.response_ids, traj.loss_mask):
        if m == 0:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert len(runs) == 2
    assert runs[0].strip() == INVALID_ACTION_TEXT.strip()
    assert runs[1].strip().startswith("<information>") and runs[1].strip().endswith("</information>")
    # the prompt is never part of the response
    assert traj.prompt_ids == encode_prompt(tok, sample(0).prompt)
    assert stats.queries == 1 and stats.policy_tokens == sum(traj.loss_mask)


def test_each_turn_continues_from_the_whole_token_sequence(smollm2_tokenizer):
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER])
    (traj,), _ = run(loop, engine, [sample(0)])
    first, second = engine.submitted
    assert first[1] == traj.prompt_ids
    n_first = len(smollm2_tokenizer.encode(SEARCH_THEN_ANSWER[0], add_special_tokens=False))
    assert second[1][: len(traj.prompt_ids) + n_first] == traj.prompt_ids + traj.response_ids[:n_first]
    assert second[1] == traj.prompt_ids + traj.response_ids[: len(second[1]) - len(traj.prompt_ids)]


def test_max_turns_then_a_last_turn_without_search(smollm2_tokenizer):
    always_search = ["<search>more</search>"]
    search = RecordingSearch()
    loop, engine = make_loop(smollm2_tokenizer, [always_search], search=search, max_turns=2)
    (traj,), _ = run(loop, engine, [sample(0)])
    assert traj.finish_reason == "max_turns"
    assert traj.num_searches == 2 and len(search.requests) == 2 and traj.turns == 3
    assert traj.answer is None


def test_length_budget_stops_the_trajectory(smollm2_tokenizer):
    chatty = ["<think>" + "word " * 60 + "</think> still thinking"]
    prompt_len = len(encode_prompt(smollm2_tokenizer, sample(0).prompt))
    loop, engine = make_loop(smollm2_tokenizer, [chatty], max_total_length=prompt_len + 100, max_turns=10)
    (traj,), _ = run(loop, engine, [sample(0)])
    assert traj.finish_reason == "length"
    assert len(traj.prompt_ids) + len(traj.response_ids) <= prompt_len + 100 + len(loop._invalid_ids)
    for _, ids, sampling in engine.submitted:
        assert len(ids) + sampling.max_tokens <= prompt_len + 100


def test_observation_truncation_is_counted(smollm2_tokenizer):
    search = RecordingSearch(docs="Doc 1(Title: Long) " + "lorem ipsum " * 200)
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER], search=search, max_obs_length=50)
    (traj,), _ = run(loop, engine, [sample(0)])
    assert traj.obs_truncated == 1
    observed = [t for t, m in zip(traj.response_ids, traj.loss_mask) if m == 0]
    assert len(observed) == 50 + len(loop._info_prefix_ids) + len(loop._info_suffix_ids)


def test_all_queries_of_a_turn_are_in_flight_together(smollm2_tokenizer):
    search = RecordingSearch(delay=0.3)
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER] * 8, search=search, per_poll=8)
    samples = [sample(i) for i in range(8)]
    t0 = time.perf_counter()
    trajs, stats = run(loop, engine, samples)
    assert all(t.finish_reason == "answer" for t in trajs)
    assert search.max_in_flight == 8 and stats.max_queries_in_flight == 8
    assert time.perf_counter() - t0 < 8 * 0.3  # concurrent, not one after another
    assert stats.search_wait_s > 0.2


def test_noise_flags_follow_p_noisy_and_are_reproducible(smollm2_tokenizer):
    def flags(p, seed):
        search = RecordingSearch()
        loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER] * 40, search=search, per_poll=7)
        trajs, _ = run(loop, engine, [sample(i) for i in range(40)], p_noisy=p, seed=seed)
        assert [r.noisy for r in search.requests].count(True) == sum(t.noisy_flags[0] for t in trajs)
        return [t.noisy_flags[0] for t in trajs]

    assert not any(flags(0.0, 1)) and all(flags(1.0, 1))
    half = flags(0.5, 3)
    assert 8 <= sum(half) <= 32
    assert flags(0.5, 3) == half  # same seed, same draws, whatever the completion order
    assert flags(0.5, 4) != half


def test_the_relevance_gate_sends_noisy_documents_to_an_off_topic_query(smollm2_tokenizer):
    off_topic = ["<search>Your question</search>", "<answer>Paris</answer>"]
    search = RecordingSearch()
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER, off_topic], search=search, min_query_overlap=0.5)
    trajs, _ = run(loop, engine, [sample(0), sample(1)])
    noisy = {r.query: r.noisy for r in search.requests}
    assert noisy == {"capital of France": False, "Your question": True}
    assert [t.off_topic for t in trajs] == [0, 1] and [t.noisy_flags for t in trajs] == [[False], [True]]
    assert loop_metrics(trajs)["rollout/off_topic_share"] == 0.5

    # a follow-up query drawn from the documents already retrieved (a two-hop question's bridge) passes
    follow_up = ["<search>capital of France</search>", "<search>Paris capital</search>", "<answer>Paris</answer>"]
    search = RecordingSearch()
    loop, engine = make_loop(smollm2_tokenizer, [follow_up, ["<search>Lyon weather</search>", *off_topic]],
                             search=search, min_query_overlap=0.5, max_turns=3)
    trajs, _ = run(loop, engine, [sample(0, "Who is the mayor of the capital of France?"), sample(1)])
    assert [t.noisy_flags for t in trajs] == [[False, False], [True, True]]

    # an option of a "which of A or B" question: gated on token F1 (0.25), let through with gate_question_words
    option = ["<search>Jaws</search>", "<answer>Jaws</answer>"]
    question = "Which film came out first, Jaws or Star Wars?"
    for through in (False, True):
        search = RecordingSearch()
        loop, engine = make_loop(smollm2_tokenizer, [option, off_topic], search=search, min_query_overlap=0.5,
                                 gate_question_words=through)
        trajs, _ = run(loop, engine, [sample(0, question), sample(1, question)])
        assert [t.noisy_flags for t in trajs] == [[not through], [True]]  # "Your question" stays off topic

    search = RecordingSearch()  # off (the default, as upstream): the query does not matter
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER, off_topic], search=search)
    run(loop, engine, [sample(0), sample(1)])
    assert not any(r.noisy for r in search.requests)


def test_two_hop_simulation_holds_the_answer_back_until_a_follow_up_names_what_the_documents_gave(smollm2_tokenizer):
    open_question = sample(0, "Who is the mayor of the capital of France?", ("Anne Hidalgo",))
    named = sample(1, "Which is larger, Paris or Lyon?", ("Paris",))
    hops = ["<search>mayor capital of France</search>", "<search>Paris</search>", "<answer>Anne Hidalgo</answer>"]
    rephrased = ["<search>mayor capital France</search>", "<search>France mayor</search>", "<answer>x</answer>"]
    search = RecordingSearch()
    loop, engine = make_loop(smollm2_tokenizer, [hops, rephrased, ["<search>Paris or Lyon</search>", "<answer>Paris</answer>"]],
                             search=search, max_turns=3, two_hop=True)
    trajs, _ = run(loop, engine, [open_question, sample(2, open_question.question, ("Anne Hidalgo",)), named])
    held = {r.query: r.hold_answer for r in search.requests}
    # the open question's first hop, and a rephrasing of it, get documents without the answer; "Paris", which the
    # first documents named and the question did not, gets the answer; a named question is never held back
    assert held == {"mayor capital of France": True, "Paris": False, "mayor capital France": True,
                    "France mayor": True, "Paris or Lyon": False}
    assert [t.held_flags for t in trajs] == [[True, False], [True, True], [False]]
    assert [t.held_answer for t in trajs] == [1, 2, 0]
    metrics = loop_metrics(trajs)
    assert metrics["rollout/held_answer_share"] == 3 / 5
    # the documents ("... Paris is the capital of France. [query]") hold "Paris" (the named question's answer), never
    # "Anne Hidalgo": useful searches 1 of 2 (Paris, Paris or Lyon), held 0 of 3, and no noisy search, so no key
    assert metrics["rollout/answer_in_useful"] == 1 / 2 and metrics["rollout/answer_in_held"] == 0.0
    assert "rollout/answer_in_noisy" not in metrics

    search = RecordingSearch()  # off (the default, as upstream)
    loop, engine = make_loop(smollm2_tokenizer, [hops], search=search, max_turns=3)
    run(loop, engine, [open_question])
    assert not any(r.hold_answer for r in search.requests)

    search = RecordingSearch()  # a noisy draw is noisy, not held
    loop, engine = make_loop(smollm2_tokenizer, [hops], search=search, max_turns=3, two_hop=True)
    trajs, _ = run(loop, engine, [open_question], p_noisy=1.0)
    assert all(r.noisy and not r.hold_answer for r in search.requests)
    assert loop_metrics(trajs)["rollout/answer_in_noisy"] == 0.0 and "rollout/answer_in_useful" not in loop_metrics(trajs)

    # a real engine's searches (noisy None) are no simulator's: no answer_in_* key
    real = RecordingSearch()
    real.search = lambda requests: [SearchResult(text="Anne Hidalgo is the mayor of Paris.", noisy=None) for _ in requests]
    loop, engine = make_loop(smollm2_tokenizer, [hops], search=real, max_turns=3, two_hop=True)
    trajs, _ = run(loop, engine, [open_question])
    assert trajs[0].noisy_flags == [None, None] and not any(k.startswith("rollout/answer_in") for k in loop_metrics(trajs))


def test_groups_and_request_to_backend(smollm2_tokenizer):
    search = RecordingSearch()
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER, ["<answer>Berlin</answer>"]], search=search)
    samples = [sample(0), sample(1, "Capital of Germany?", ["Berlin"])]
    trajs, _ = run(loop, engine, samples, n=3)
    assert [t.group for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert {r.question for r in search.requests} == {"What is the capital of France?"}
    assert all(r.golden_answers == ["Paris"] and r.query == "capital of France" for r in search.requests)
    assert [t.answer for t in trajs] == ["Paris"] * 3 + ["Berlin"] * 3


def test_search_failure_propagates(smollm2_tokenizer):
    class Down(RecordingSearch):
        def search(self, requests):
            raise RuntimeError("simulation server http://127.0.0.1:1 is down")

    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER], search=Down())
    with pytest.raises(RuntimeError, match="is down"):
        run(loop, engine, [sample(0)])


def test_overlong_prompt_names_the_sample(smollm2_tokenizer):
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER], max_prompt_length=10)
    with pytest.raises(ValueError, match="sample 7.*max_prompt_length"):
        run(loop, engine, [sample(7)])


def test_reward_reads_the_policy_answer_not_the_documents(smollm2_tokenizer):
    # the simulator's documents contain an answer block; the policy never answers
    search = RecordingSearch(docs="Doc 1(Title: x) <answer>Paris</answer>")
    loop, engine = make_loop(smollm2_tokenizer, [["<search>capital of France</search>"]], search=search, max_turns=1)
    (traj,), _ = run(loop, engine, [sample(0)])
    assert traj.finish_reason == "max_turns" and traj.answer is None
    assert "<answer>Paris</answer>" in traj.response_text
    assert traj.score() == {"f1": 0.0, "em": 0.0}


def test_each_query_is_paired_with_its_own_question_when_others_do_not_search(smollm2_tokenizer):
    # upstream's batch_search indexes the questions with the query's position among the *searching*
    # trajectories, so when an earlier trajectory answers at once the query goes out with its question
    search = RecordingSearch()
    loop, engine = make_loop(smollm2_tokenizer, [["<answer>Berlin</answer>"], SEARCH_THEN_ANSWER], search=search)
    samples = [sample(0, "Capital of Germany?", ["Berlin"]), sample(1, "What is the capital of France?", ["Paris"])]
    run(loop, engine, samples, n=1)
    assert [(r.query, r.question, r.golden_answers) for r in search.requests] == [
        ("capital of France", "What is the capital of France?", ["Paris"])]


def test_returned_documents_are_recorded_as_the_policy_saw_them(smollm2_tokenizer):
    search = RecordingSearch(docs="Doc 1(Title: Long) Paris " + "lorem ipsum " * 200 + "Lyon")
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER], search=search, max_obs_length=50)
    (traj,), _ = run(loop, engine, [sample(0)])
    (document,) = traj.documents
    assert document.startswith("Doc 1(Title: Long) Paris") and "Lyon" not in document  # cut where truncated
    assert document in traj.response_text
    assert traj.to_record()["documents"] == [document]


def test_information_written_by_the_policy_earns_no_retrieval_bonus(smollm2_tokenizer):
    from zerosearch.training.driver import score

    # the policy fakes an <information> block holding the gold answer; the real search returns other text
    fake = "<information>Doc 1: Paris is the capital.</information><search>capital of France</search>"
    search = RecordingSearch(docs="Doc 1(Title: Lyon) Lyon is a city.")
    loop, engine = make_loop(smollm2_tokenizer, [[fake, "<answer>Lyon</answer>"], SEARCH_THEN_ANSWER], search=search)
    trajs, _ = run(loop, engine, [sample(0), sample(1)])
    assert "<information>Doc 1: Paris is the capital.</information>" in trajs[0].response_text
    reward, metrics = score(trajs, "f1", format_score=0.1, retrieval_score=0.1)
    assert reward.tolist() == pytest.approx([0.1, 1.0])  # format floor only: no bonus for its own text
    assert metrics["reward/retrieval_hit"] == 0.0
    # the same answer after a search that did return the gold answer earns it
    real = RecordingSearch(docs="Doc 1(Title: Paris) Paris is the capital of France.")
    loop, engine = make_loop(smollm2_tokenizer, [[fake, "<answer>Lyon</answer>"]], search=real)
    trajs, _ = run(loop, engine, [sample(0)])
    assert score(trajs, "f1", format_score=0.1, retrieval_score=0.1)[0].tolist() == pytest.approx([0.2])


def test_noise_draws_are_the_same_whatever_the_number_of_ranks(smollm2_tokenizer):
    def flags(samples, n, offset):
        loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER] * len(samples), per_poll=5)
        for uid in range(len(samples) * n):
            engine.group_of[uid] = uid // n
        trajs, _ = loop.run(samples, n, SamplingSpec(max_tokens=64, seed=7), p_noisy=0.5, noise_seed=11,
                            uid_offset=offset)
        return [t.noisy_flags[0] for t in trajs], [s.seed for _, _, s in engine.submitted if s.seed is not None]

    samples, n = [sample(i) for i in range(16)], 3
    whole, whole_seeds = flags(samples, n, 0)
    # two data-parallel ranks of the same batch: rank 1 starts at prompt 8, i.e. trajectory 8 * n
    rank0, seeds0 = flags(samples[:8], n, 0)
    rank1, seeds1 = flags(samples[8:], n, 8 * n)
    assert rank0 + rank1 == whole
    assert rank0 != rank1  # trajectory i of rank 1 does not repeat rank 0's draws
    assert set(seeds0).isdisjoint(seeds1) and sorted(seeds0 + seeds1) == sorted(whole_seeds)


# --- the chat protocol -----------------------------------------------------------------------------


def test_chat_protocol_returns_documents_as_a_user_turn_of_the_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    # the policy's first turn ends with EOS (the template's end-of-turn token): no second one is added
    script = ["nothing useful<|im_end|>", *SEARCH_THEN_ANSWER]
    loop, engine = make_loop(tok, [script], protocol="chat")
    (traj,), _ = run(loop, engine, [sample(0)])
    assert traj.finish_reason == "answer" and traj.answer == "Paris"
    policy = tok.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if m == 1])
    assert policy == "".join(script)
    # the whole sequence is what the chat template renders for the same conversation
    docs = "Doc 1(Title: Paris) Paris is the capital of France. [capital of France]"
    expected = tok.apply_chat_template(
        [*sample(0).prompt, {"role": "assistant", "content": "nothing useful"},
         {"role": "user", "content": INVALID_ACTION_TEXT.strip()},
         {"role": "assistant", "content": SEARCH_THEN_ANSWER[0]},
         {"role": "user", "content": f"<information>{docs}</information>"},
         {"role": "assistant", "content": SEARCH_THEN_ANSWER[1]}], tokenize=False)
    got = tok.decode(traj.prompt_ids + traj.response_ids)
    assert expected.startswith(got) and expected[len(got):].strip() == "<|im_end|>"
    # and the next turn was generated from the opened assistant turn
    assert tok.decode(engine.submitted[-1][1]).endswith("<|im_start|>assistant\n")


def test_inline_protocol_keeps_one_assistant_message(smollm2_tokenizer):
    loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER])
    (traj,), _ = run(loop, engine, [sample(0)])
    assert "<|im_start|>" not in smollm2_tokenizer.decode(traj.response_ids)


def test_unknown_protocol_is_refused(smollm2_tokenizer):
    with pytest.raises(ValueError, match="rollout.protocol"):
        make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER], protocol="tool")


class SelfSearchEngine(ScriptedEngine):
    """ScriptedEngine that also answers `simulate_self` requests (ids ending in /search) with documents."""

    def __init__(self, tokenizer, scripts, docs):
        super().__init__(tokenizer, scripts)
        self.docs, self.search_prompts = docs, []

    def poll(self):
        searches = [q for q in self.queue if q[0].endswith("/search")]
        self.queue = [q for q in self.queue if not q[0].endswith("/search")]
        out = []
        for request_id, prompt_ids, sampling in searches:
            self.search_prompts.append(self.tokenizer.decode(prompt_ids))
            ids = self.tokenizer.encode(self.docs, add_special_tokens=False)[: sampling.max_tokens]
            out.append((request_id, Generation(ids, [-0.5] * len(ids), self.tokenizer.decode(ids), "stop", None)))
        return out + super().poll()


def test_simulate_self_writes_the_documents_with_the_policy_engine(smollm2_tokenizer):
    from zerosearch.rollout.self_search import SelfSimulation

    tok = smollm2_tokenizer
    engine = SelfSearchEngine(tok, [SEARCH_THEN_ANSWER] * 2, "Doc 1: Paris is the capital of France.\nDoc 2: Lyon.")
    backend = SelfSimulation(topk=3, temperature=0.7, max_tokens=48)
    loop = AgentLoop(engine, backend, tok, LoopSettings())
    engine.group_of.update({0: 0, 1: 1})
    trajs, stats = loop.run([sample(0), sample(1)], 1, SamplingSpec(max_tokens=64), p_noisy=0.5, noise_seed=3)
    assert all(t.finish_reason == "answer" and t.answer == "Paris" for t in trajs)
    # the simulator's prompt: the same templates as the served simulator, filled with the query and the answer
    assert len(engine.search_prompts) == 2 and all("Query: capital of France" in p for p in engine.search_prompts)
    assert all("whose answer is Paris" in p or "Noisy Output" in p for p in engine.search_prompts)
    sim_requests = [s for _, _, s in engine.submitted if s.max_tokens == 48]
    assert len(sim_requests) == 2 and all(s.temperature == 0.7 and s.stop == [] for s in sim_requests)
    for traj in trajs:
        # the documents are the observation, masked out of the loss; none of the simulator's tokens is the policy's
        observed = tok.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if m == 0])
        policy = tok.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if m == 1])
        assert "<information>" in observed and "Doc 1: Paris is the capital of France." in observed
        assert policy == "".join(SEARCH_THEN_ANSWER) and traj.noisy_flags in ([True], [False])
    assert stats.queries == 2 and len(stats.search_latency_s) == 2
    counts = backend.stats()
    assert counts["search/simulated_queries"] == 2 and counts["search/completion_tokens"] > 0
    # the engine's time on documents is counted, apart from a served simulator's (which has a price)
    assert counts["search/self_search_s"] > 0 and counts["search/max_in_flight"] >= 1
    assert "search/simulator_s" not in counts
    with pytest.raises(Exception, match="inside the agent loop"):
        backend.search([])


def test_the_cpu_default_gates_the_collapsed_query_and_the_gpu_default_does_not(smollm2_tokenizer):
    # the twenty-fifth session's case (docs/results.md): a run without the gate collapsed every query to "Question";
    # its earlier form, "Question: <the question>", is the question's own words and passes
    from zerosearch.config import load_config
    from zerosearch.rollout import factory

    question = "Who is Edsel Ford Ii's paternal grandfather?"
    queries = ["Question", f"Question: {question}", "Edsel Ford"]  # the last: the question's own words
    scripts = [[f"<search>{q}</search>", "<answer>Edsel Ford</answer>"] for q in queries]
    for name, gated in (("cpu", [True, False, False]), ("grpo", [False, False, False])):  # grpo: upstream, no gate
        search = RecordingSearch()
        loop = AgentLoop(ScriptedEngine(smollm2_tokenizer, scripts, 1), search, smollm2_tokenizer,
                         factory.loop_settings(load_config(name)))
        trajs, _ = run(loop, loop.engine, [sample(i, question) for i in range(3)])
        assert [t.noisy_flags for t in trajs] == [[g] for g in gated]
        assert {r.query: r.noisy for r in search.requests} == dict(zip(queries, gated))
