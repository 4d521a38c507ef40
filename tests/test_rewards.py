"""Answer extraction and SQuAD-style EM/F1 rewards, with the upstream reward bugs pinned."""

import pytest

from zerosearch.rewards import (
    REWARD_METRICS,
    answer_reward,
    compute_score,
    exact_match,
    extract_answer,
    f1_score,
    new_name_share,
    normalize_answer,
    query_overlap,
    query_support,
)

PROMPT = (
    "Answer the given question. You can search with <search> query </search>. When you have the answer, "
    "give it inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: What is the capital of China?"
)


# --- extraction ---------------------------------------------------------------------------------


def test_extract_last_complete_block():
    text = "<answer>first</answer> more thinking <answer> second </answer> trailing"
    assert extract_answer(text) == "second"


def test_extract_none_without_block():
    assert extract_answer("I think it is Paris.") is None
    assert extract_answer("") is None


def test_extract_unclosed_tag_is_ignored():
    assert extract_answer("<answer>Paris") is None
    # a complete block followed by an unclosed one: the complete one counts
    assert extract_answer("<answer>Paris</answer> then <answer>Lyon") == "Paris"
    # a closing tag without an opening one is not an answer either
    assert extract_answer("Paris</answer>") is None


def test_extract_multiline_content():
    assert extract_answer("<answer>\n  New York\n City \n</answer>") == "New York\n City"


def test_extract_odd_and_nested_input_does_not_crash():
    assert extract_answer("<answer>a <answer>b</answer>") == "b"
    assert extract_answer("<answer>x</answer></answer>") == "x"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("</answer><answer>") is None
    assert extract_answer("<answer><answer><answer>") is None


def test_extract_only_in_prompt_not_counted():
    # The caller passes the response only; the prompt's example answer is not in it.
    response = "<search> capital of China </search><information>Doc 1: ...</information> I am not sure."
    assert extract_answer(PROMPT + response) == "Beijing"  # what scanning the full text would find
    assert extract_answer(response) is None


# --- normalisation and metrics ------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Eiffel\tTower!") == "eiffel tower"
    assert normalize_answer("A cat, an apple & the dog.") == "cat apple dog"
    # articles only as whole words
    assert normalize_answer("Theatre Anatomy Abba") == "theatre anatomy abba"
    assert normalize_answer("  U.S.A.  ") == "usa"


def test_exact_match_hand_values():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match(None, "Eiffel Tower") == 0.0


def test_f1_hand_values():
    # pred tokens [eiffel, tower, paris], gold [eiffel, tower]: P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("The Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    # pred [new, york], gold [new, york, city]: P = 1, R = 2/3 -> 0.8
    assert f1_score("New York", "New York City") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [x, x], gold [x]: common 1, P = 1/2, R = 1 -> 2/3
    assert f1_score("x x", "x") == pytest.approx(2 / 3)
    assert f1_score("London", "Paris") == 0.0
    assert f1_score(None, "Paris") == 0.0


def test_multiple_golds_take_best():
    golds = ["Barack Obama", "Obama", "Barack Hussein Obama II"]
    assert exact_match("obama", golds) == 1.0
    # vs "Barack Obama": P = 1, R = 1/2 -> 2/3; vs "Obama": P = 1/2, R = 1 -> 2/3; best 2/3
    assert f1_score("Obama Jr", ["Barack Obama", "Obama"]) == pytest.approx(2 / 3)
    assert f1_score("Barack Obama", golds) == 1.0


def test_yes_no_special_case():
    # "no" vs "no way" shares a token but a wrong yes/no gets no credit
    assert f1_score("no", "no way") == 0.0
    assert f1_score("no way", "no") == 0.0
    assert f1_score("Yes.", "yes") == 1.0
    assert f1_score("yes", "no") == 0.0


def test_empty_golds_rejected():
    with pytest.raises(ValueError, match="golden_answers"):
        exact_match("Paris", [])


# --- compute_score ------------------------------------------------------------------------------


def test_compute_score_fields_and_metric_choice():
    response = "<search>q</search><information>d</information><answer>New York</answer>"
    f1 = compute_score(response, ["New York City"], metric="f1")
    assert f1["answer"] == "New York"
    assert f1["has_answer"] is True
    assert f1["f1"] == pytest.approx(0.8)
    assert f1["em"] == 0.0
    assert f1["score"] == pytest.approx(0.8)
    em = compute_score(response, ["New York City", "new york"], metric="em")
    assert em["score"] == 1.0 and em["em"] == 1.0


def test_compute_score_unknown_metric_lists_choices():
    assert REWARD_METRICS == ("f1", "em")
    with pytest.raises(ValueError, match="f1, em"):
        compute_score("<answer>x</answer>", ["x"], metric="accuracy")


def test_answer_reward_shapes_the_metric_and_compute_score_is_it_on_a_response():
    doc = "Doc 1: Paris is the capital of France."
    shaping = {"format_score": 0.1, "retrieval_score": 0.1}
    wrong = answer_reward("Lyon", ["Paris"], "f1", documents=[doc], **shaping)
    assert wrong["score"] == pytest.approx(0.2) and wrong["retrieval_hit"] is True and wrong["f1"] == 0.0
    assert answer_reward("Lyon", ["Paris"], "f1", documents=[doc], valid=False, **shaping)["score"] == 0.0  # a copy
    assert answer_reward(None, ["Paris"], "f1", documents=[doc], **shaping)["score"] == 0.0  # no answer, no floor
    assert answer_reward("Paris", ["Paris"], "em", **shaping)["score"] == 1.0  # a right answer beats the floors
    assert compute_score("<answer>Lyon</answer>", ["Paris"], **shaping)["score"] == pytest.approx(0.1)
    assert compute_score("<answer>Lyon</answer>", ["Paris"])["score"] == 0.0  # unshaped: the plain metric


# --- upstream bugs, pinned ----------------------------------------------------------------------


def test_upstream_bug_em_is_not_a_substring_test():
    assert exact_match("Paris France", "Paris") == 0.0  # gold is a substring of the prediction
    assert exact_match("Par", "Paris") == 0.0  # prediction is a substring of the gold
    assert compute_score("<answer>Paris France</answer>", ["Paris"], metric="em")["score"] == 0.0


def test_upstream_bug_missing_answer_not_scored_as_prompt_example():
    response = "<search> capital of China </search><information>Doc 1: Beijing ...</information> Hmm."
    # Scanning prompt + response would find the prompt's example and score it a perfect 1.
    assert compute_score(PROMPT + response, ["Beijing"])["score"] == 1.0
    result = compute_score(response, ["Beijing"])
    assert result["score"] == 0.0
    assert result["f1"] == 0.0 and result["em"] == 0.0
    assert result["has_answer"] is False and result["answer"] is None


def test_retrieval_hit_reads_only_the_returned_documents():
    from zerosearch.rewards import retrieval_hit

    docs = ["Doc 1: The Eiffel Tower was finished in 1889.", "Doc 1: Lyon is a city."]
    assert retrieval_hit(docs, ["1889"]) and retrieval_hit(docs, ["the EIFFEL tower"])
    assert not retrieval_hit(docs, ["Paris"])
    assert not retrieval_hit(docs, ["188"])  # whole words only
    assert not retrieval_hit([], ["1889"])
    # the response text is not a list of documents: the policy could write an <information> block itself
    with pytest.raises(TypeError, match="Trajectory.documents"):
        retrieval_hit("<information>Paris</information>", ["Paris"])


def test_shaped_reward_gives_the_bonuses_only_with_an_answer():
    from zerosearch.rewards import shaped_reward

    # answered: the format floor, plus the retrieval score when a returned document held a gold answer
    assert shaped_reward(0.0, True, False, 0.1, 0.1) == pytest.approx(0.1)
    assert shaped_reward(0.0, True, True, 0.1, 0.1) == pytest.approx(0.2)
    assert shaped_reward(0.5, True, True, 0.1, 0.1) == pytest.approx(0.5)  # a better answer score wins
    # no answer: neither bonus, even when the search found the answer (Search-R1's valid-sequence rule)
    assert shaped_reward(0.0, False, True, 0.1, 0.1) == 0.0
    assert shaped_reward(0.0, False, False, 0.1, 0.1) == 0.0
    assert shaped_reward(0.4, True, True) == 0.4  # both scores 0: the plain F1/EM reward


# --- copying the prompt's example, answers named in the question -----------------------------------


def _traj(question, answer=None, queries=(), group=0, golds=("Paris",), documents=()):
    from zerosearch.rollout.trajectory import Trajectory

    t = Trajectory(0, group, question, list(golds), [1])
    t.answer, t.queries, t.documents = answer, list(queries), list(documents)
    t.num_searches = len(t.queries)
    return t


TEMPLATE = "policy_prompt_examples.txt"


def test_an_answer_copying_the_prompt_example_earns_no_format_floor():
    from zerosearch.data import example_for
    from zerosearch.training.driver import score

    q = "What is the capital of France?"
    example = example_for(q, TEMPLATE)
    copied = _traj(q, answer=f" {example['answer'].upper()} ", documents=["Paris is the capital"])
    own = _traj(q, answer="Lyon", documents=["Paris is the capital"])
    right = _traj(q, answer="Paris")
    reward, _ = score([copied, own, right], "f1", format_score=0.1, retrieval_score=0.1, template=TEMPLATE)
    assert reward.tolist() == pytest.approx([0.0, 0.2, 1.0])
    # a template without examples: the same answer is an ordinary wrong answer
    reward, _ = score([copied], "f1", format_score=0.1, template="policy_prompt_small.txt")
    assert reward.tolist() == pytest.approx([0.1])


def test_an_answer_repeating_the_question_earns_nothing():
    """Runs c-self-s1 and c-sim-s3 collapsed to answering with the question: partial F1 on every "which of A or
    B" question, plus the floors."""
    from zerosearch.training.driver import assess, score

    q = "Which film was released earlier, Dead Mine or Witch Story?"
    trajs = [_traj(q, answer=q, golds=["Witch Story"], documents=["Witch Story is a 1989 film"]),
             _traj(q, answer="Witch Story", golds=["Witch Story"])]
    reward, metrics = score(trajs, "f1", format_score=0.1, retrieval_score=0.1, template=TEMPLATE)
    assert reward.tolist() == pytest.approx([0.0, 1.0])
    # what is logged stays the plain F1 of what was answered
    partial = 2 * (2 / 10) / (1 + 2 / 10)  # 2 of the question's 10 normalised words are the gold answer's 2
    assert assess(trajs, "f1")[0]["f1"] == pytest.approx(partial)
    assert metrics["reward/f1"] == pytest.approx((partial + 1.0) / 2)


def test_an_answer_naming_a_document_header_earns_nothing():
    """Real-search run rl_real-s2 collapsed to answering "Doc 1" (17 % of held-out answers): the header of the
    first BM25 document, which collected the format and retrieval floors on every question."""
    from zerosearch.rollout.copying import copy_metrics, names_document
    from zerosearch.training.driver import score

    q = "Who directed the film Dead Mine?"
    docs = ["Doc 1(Title: Dead Mine) Dead Mine is a 2012 film directed by Steven Sheil."]
    answers = ("Doc 1", "doc 2 (Title: Dead Mine)", "Document 3", "Steven Sheil", "Docklands")
    trajs = [_traj(q, answer=a, golds=["Steven Sheil"], documents=docs) for a in answers]
    reward, _ = score(trajs, "f1", format_score=0.1, retrieval_score=0.1, template=TEMPLATE)
    assert reward.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0, 0.2])
    assert copy_metrics(trajs, TEMPLATE)["copy/doc_answer_share"] == pytest.approx(3 / 5)
    # a gold answer of that shape is still an answer
    assert not names_document(_traj(q, answer="Doc 1", golds=["Doc 1"]))


def test_an_empty_answer_earns_no_format_floor():
    """A run (c-hybrid-s1) collapsed to ``<answer> </answer>``: 0.1 format + 0.1 retrieval for no answer at all."""
    from zerosearch.training.driver import score

    q = "What is the capital of France?"
    trajs = [_traj(q, answer=a, documents=["Paris is the capital"]) for a in ("", " . ", "the", "Lyon")]
    reward, _ = score(trajs, "f1", format_score=0.1, retrieval_score=0.1, template=TEMPLATE)
    assert reward.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.2])
    assert compute_score("<answer> </answer>", ["Paris"], format_score=0.1)["score"] == 0.0


def test_copy_metrics_count_the_example_and_the_most_common_string_once_per_prompt():
    from zerosearch.data import example_for
    from zerosearch.rollout.copying import copy_metrics

    qs = [f"Question number {i}?" for i in range(4)]
    ex = [example_for(q, TEMPLATE) for q in qs]
    trajs = [_traj(qs[0], ex[0]["answer"], [ex[0]["query"]], group=0),
             _traj(qs[0], "same", ["q0"], group=0),  # a group agreeing with itself is counted once
             _traj(qs[1], "same", ["q1"], group=1),
             _traj(qs[2], "other", ["common"], group=2),
             _traj(qs[3], None, ["common"], group=3)]
    m = copy_metrics(trajs, TEMPLATE)
    assert m["copy/example_answer_share"] == pytest.approx(1 / 4)
    assert m["copy/example_query_share"] == pytest.approx(1 / 5)
    assert m["copy/top_answer_share"] == pytest.approx(2 / 3)  # "same": prompts 0 and 1 of the 3 that answered
    assert m["copy/top_query_share"] == pytest.approx(2 / 4)  # "common": prompts 2 and 3
    assert m["copy/question_answer_share"] == 0.0


def test_one_string_wrapped_around_different_questions_is_counted():
    """A collapse that keeps each query different ("Question: <the question>") escapes the most common query; the
    most common addition to the question catches it (each prompt once, over the prompts that searched)."""
    from zerosearch.rewards import query_addition
    from zerosearch.rollout.copying import copy_metrics

    qs = ["Who directed Jaws?", "Where was Nana Saheb's father born?", "When did Queen Victoria die?",
          "Who wrote Hamlet?", "Which river flows through Paris?"]
    trajs = [_traj(qs[0], None, ["Question: Who directed Jaws?"], group=0),
             _traj(qs[0], None, ["Question Jaws director"], group=0),  # another addition of the same prompt
             _traj(qs[1], None, ["Question: Nana Saheb's father born"], group=1),
             _traj(qs[2], None, ["Queen Victoria death date"], group=2),
             _traj(qs[3], None, ["Hamlet"], group=3),  # the question's own word: adds nothing
             _traj(qs[4], None, [], group=4)]  # never searched: not counted
    assert query_addition("Question: Who directed Jaws?", qs[0]) == "question"
    assert query_addition("Jaws director", qs[0]) == "director"
    assert query_addition("Who directed Jaws", qs[0]) == ""
    m = copy_metrics(trajs, TEMPLATE)
    assert m["copy/top_query_share"] == pytest.approx(1 / 4)  # every query differs
    assert m["copy/top_query_addition_share"] == pytest.approx(2 / 4)  # "question": prompts 0 and 1 of the 4 that searched


def test_an_answer_repeating_the_question_is_counted():
    from zerosearch.rollout.copying import copy_metrics

    question = "Which film was released earlier, Dead Mine or Witch Story?"
    trajs = [_traj(question, question, [question]), _traj(question, "Which film was released earlier, Dead Mine"),
             _traj(question, "Witch Story"), _traj(question, None)]
    # the first two answer with the question (content-word F1 1.0 and 0.8); the third picks one film
    assert copy_metrics(trajs, TEMPLATE)["copy/question_answer_share"] == pytest.approx(2 / 3)


def test_split_metrics_separate_questions_that_name_their_answer():
    from zerosearch.rollout.copying import answer_in_question, split_metrics

    assert answer_in_question("Which film came out first, Jaws or Star Wars?", ["Jaws"])
    assert not answer_in_question("Who directed Jawsome?", ["Jaws"])  # whole words only
    named = _traj("Which is older, Paris or Rome?", answer="Paris", queries=["x"])
    open_ = _traj("What is the capital of France?", answer="Lyon", documents=["Paris"])
    m = split_metrics([named, open_], [named.score(), open_.score()], [False, True], "val")
    assert (m["val_named/f1"], m["val_open/f1"]) == (1.0, 0.0)
    assert (m["val_named/searches_per_traj"], m["val_open/retrieval_hit"]) == (1.0, 1.0)
    assert m["val_named/questions"] == m["val_open/questions"] == 1.0
    assert m["val/last_option_f1"] == 0.0  # "Rome" would be the guess; gold is "Paris"


def test_last_option_baseline_names_the_last_option_only_of_questions_with_options():
    from zerosearch.rollout.copying import last_option, split_metrics

    assert last_option("Which film came out first, Jaws or Star Wars?") == "Star Wars"
    assert last_option("Who died later, Anne of Cleves or Catherine Howard, Queen of England?") == "Catherine Howard, Queen of England"
    assert last_option("Who is older, A, B or C?") == "C"
    assert last_option("Where was the director of Rain or Shine born?") is None  # "or" in a title, no options
    assert last_option("What is the capital of France?") is None
    trajs = [_traj("Which film came out first, Jaws or Star Wars?", answer="Jaws"),
             _traj("Which is older, Paris or Rome?", answer="Rome"),
             _traj("What is the capital of France?", answer="Paris")]
    trajs[0].golden_answers, trajs[1].golden_answers, trajs[2].golden_answers = ["Star Wars"], ["Paris"], ["Paris"]
    m = split_metrics(trajs, [t.score() for t in trajs], [False] * 3, "val")
    assert m["val/last_option_f1"] == pytest.approx(1 / 3)  # the policy's own answers do not enter it


def test_swap_options_asks_the_same_question_with_its_two_options_swapped():
    from zerosearch.rollout.copying import last_option, swap_options

    swapped, a, b = swap_options("Which film came out first, Jaws or Star Wars?")
    assert (swapped, a, b) == ("Which film came out first, Star Wars or Jaws?", "Jaws", "Star Wars")
    assert last_option(swapped) == "Jaws" and swap_options(swapped)[0] == "Which film came out first, Jaws or Star Wars?"
    # a comma inside the last option would be cut in the wrong place: not swapped
    assert swap_options("Who died later, Anne of Cleves or Catherine Howard, Queen of England?") is None
    assert swap_options("Where was the director of Rain or Shine born?") is None
    assert swap_options("What is the capital of France?") is None


def test_swapped_question_only_when_a_gold_answer_is_an_option():
    from zerosearch.rollout.copying import swapped_question

    q = "Which film came out first, Jaws or Star Wars?"
    assert swapped_question(q, ["jaws"]) == "Which film came out first, Star Wars or Jaws?"
    assert swapped_question(q, ["1975"]) is None  # a gold that is neither option: no position to guess
    assert swapped_question("What is the capital of France?", ["Paris"]) is None


def test_gold_option_is_the_option_the_gold_answer_names_as_the_question_writes_it():
    from zerosearch.rollout.copying import gold_option

    q = "Which film came out first, Jaws or Star Wars?"
    assert gold_option(q, ["star wars"]) == "Star Wars"
    assert gold_option(q, ["1977", "Star Wars"]) == "Star Wars"
    assert gold_option(q, ["1975"]) is None
    assert gold_option("Where was the director of Rain or Shine born?", ["Rain"]) is None


def test_position_scores_take_a_last_option_guess_back_to_chance():
    from zerosearch.rollout.copying import position_scores, swapped_question

    golds = {"Which film came out first, Jaws or Star Wars?": "Jaws",
             "Who was born first, Ann Smith or Bob Jones?": "Bob Jones", "What is the capital of France?": "Paris"}

    def rows(questions, answer):
        return [{"question": q, "golden_answers": [golds[o]], "prediction": p, "f1": float(p == golds[o])}
                for q, o in questions for p in [answer(q)]]

    written = [(q, q) for q in golds]
    swapped = [(swapped_question(q, [g]), q) for q, g in golds.items() if swapped_question(q, [g])]
    always_last = lambda q: q.split(" or ")[1].rstrip("?") if " or " in q else "Paris"
    p = position_scores(rows(written, always_last), rows(swapped, always_last))
    assert p["pairs"] == 2 and p["f1_as_written"] == 0.5 and p["f1_swapped"] == 0.5
    assert p["last_option_as_written"] == 1.0 and p["last_option_swapped"] == 1.0
    assert p["f1"] == pytest.approx(2 / 3) and p["f1_balanced"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert p["same_option_share"] == 0.0  # a position guess never names the same option both ways round
    reads = lambda q: golds.get(q) or next(g for o, g in golds.items() if swapped_question(o, [g]) == q)
    p = position_scores(rows(written, reads), rows(swapped, reads))
    assert p["f1_balanced"] == p["f1"] == 1.0 and p["last_option_as_written"] == 0.5
    assert p["same_option_share"] == p["same_option_right_share"] == 1.0
    always_first = lambda q: q.split(", ")[1].split(" or ")[0] if " or " in q else "Paris"
    same_wrong = lambda q: "Star Wars" if "Jaws" in q else reads(q)
    assert position_scores(rows(written, always_first), rows(swapped, always_first))["same_option_share"] == 0.0
    p = position_scores(rows(written, same_wrong), rows(swapped, same_wrong))
    assert p["same_option_share"] == 1.0 and p["same_option_right_share"] == 0.5


def test_query_overlap_scores_content_words_shared_with_the_question():
    question = "Who is the mother of the director of film Polish-Russian War?"
    assert query_overlap(question, question) == 1.0
    assert 0.5 < query_overlap("director of Polish-Russian War", question) < 1.0
    for off_topic in ("Your question", "", "Who wrote the play Hamlet?", "the of who"):
        assert query_overlap(off_topic, question) == 0.0


def test_query_support_is_the_share_of_query_words_the_documents_hold():
    docs = "Doc 1(Title: Age-Old Friends) Age-Old Friends is a 1989 film directed by Allan Kroeker."
    assert query_support("Allan Kroeker", docs) == 1.0
    assert query_support("Allan Smithee", docs) == 0.5
    assert query_support("", docs) == 0.0 and query_support("the of", docs) == 0.0
    assert query_support("Allan Kroeker", "") == 0.0


def test_new_name_share_counts_query_words_the_documents_gave_and_the_question_lacks():
    question = "Where was the husband of Bess Taffel born?"
    docs = "Doc 1(Title: Bess Taffel) Bess Taffel was an American screenwriter, married to Robert Boyle."
    assert new_name_share("Robert Boyle", question, docs) == 1.0
    assert new_name_share("Robert Boyle birthplace", question, docs) == 2 / 3
    assert new_name_share(question, question, docs) == 0.0  # the question again: the first hop
    assert new_name_share("Bess Taffel screenwriter", question, docs) == 1 / 3  # one new word, not a name
    assert new_name_share("Robert Boyle", question, "") == 0.0  # a name the documents never gave
    assert new_name_share("", question, docs) == 0.0


def test_search_discount_scales_a_training_reward_by_each_search():
    from zerosearch.config import ConfigError, load_config
    from zerosearch.training.driver import score

    q = "Who directed the film Dead Mine?"
    trajs = [_traj(q, answer=a, golds=["Steven Sheil"], queries=["Dead Mine director"] * k)
             for a, k in (("Steven Sheil", 0), ("Steven Sheil", 1), ("Steven Sheil", 2), ("Steven Sheil", 3),
                          ("Mark Sheil", 1), ("Nobody", 3))]
    reward, metrics = score(trajs, "f1", search_discount=0.9)
    assert reward.tolist() == pytest.approx([1.0, 0.9, 0.81, 0.729, 0.5 * 0.9, 0.0])  # fewer searches earn more
    assert metrics["reward/f1"] == pytest.approx((4 + 0.5) / 6)  # logged F1 is the answer's
    assert score(trajs, "f1")[0].tolist() == pytest.approx([1, 1, 1, 1, 0.5, 0])  # 1: as ZeroSearch
    with pytest.raises(ConfigError, match="algorithm.search_discount"):
        load_config("cpu", ["algorithm.search_discount=1.1"])
