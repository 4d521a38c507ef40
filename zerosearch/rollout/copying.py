"""Degenerate-output checks: answers and queries that copy the prompt's worked example, or one string
that most questions get, and the split of questions whose answer the question itself names.

A small model collects the format reward by replaying its prompt's example ("William Shakespeare" for
every question); a rise in reward bought that way is not learning. These shares are logged every step
(`copy/...`) and for validation, and `rewards.shaped_reward` pays no format floor for a copied answer.
"""

from __future__ import annotations

import re
from collections import Counter

from zerosearch.data import example_for
from zerosearch.rewards import f1_score, normalize_answer, query_addition, query_overlap


def _norm(text: str | None) -> str:
    return normalize_answer(text) if text else ""


def copies_example(traj, template: str) -> bool:
    """The trajectory's answer is its prompt's worked-example answer (never a right answer: the examples
    are made-up questions outside the data)."""
    example = example_for(traj.question, template)
    if example is None or traj.answer is None:
        return False
    return _norm(traj.answer) == _norm(example["answer"])


def answer_in_question(question: str, golden_answers) -> bool:
    """A gold answer is named in the question ("Which film came out first, A or B?"): a policy can guess it
    without searching."""
    q = f" {_norm(question)} "
    return any(_norm(g) and f" {_norm(g)} " in q for g in golden_answers)


def answer_guessable(question: str, golden_answers) -> bool:
    """The answer is among what the question offers: named in it (`answer_in_question`), or a yes/no question. The
    issue's "named" questions, which a policy can learn to guess without searching; the bundled held-out 2Wiki
    questions hold no yes/no question, so there the two tests agree."""
    return answer_in_question(question, golden_answers) or all(_norm(g) in ("yes", "no") for g in golden_answers)


_LAST_OPTION = re.compile(r",[^,]*?\bor\s+([^?]+?)\s*\?\s*$", re.IGNORECASE)


def last_option(question: str) -> str | None:
    """The last option a "Which film came out first, A or B?" question names (None for other questions): what a
    policy that guesses by position, without searching, would answer."""
    m = _LAST_OPTION.search(question)
    return m.group(1).strip() if m else None


_OPTIONS = re.compile(r"^(?P<head>.*,\s*)(?P<a>[^,]+?)\s+or\s+(?P<b>[^,?]+?)\s*\?\s*$", re.IGNORECASE)


def swap_options(question: str) -> tuple[str, str, str] | None:
    """"Which film came out first, A or B?" -> ("Which film came out first, B or A?", A, B); None for a question
    without two such options. The same question with its options swapped tells a policy that reads the documents
    (the same answer both ways) from one that answers by position."""
    m = _OPTIONS.match(question.strip())
    if not m:
        return None
    a, b = m.group("a").strip(), m.group("b").strip()
    return f"{m.group('head')}{b} or {a}?", a, b


def gold_option(question: str, golden_answers) -> str | None:
    """The option of a "which of A or B" question (`swap_options`) that is a gold answer, as the question writes
    it (the first such option); None for a question without two options or whose gold answer is neither."""
    swapped = swap_options(question)
    if swapped is None:
        return None
    golds = {normalize_answer(str(g)) for g in golden_answers}
    return next((o for o in swapped[1:] if normalize_answer(o) in golds), None)


def swapped_question(question: str, golden_answers) -> str | None:
    """The question with its two options swapped (`swap_options`), when a gold answer is one of them
    (`gold_option`); else None."""
    return swap_options(question)[0] if gold_option(question, golden_answers) is not None else None


def option_pairs(written: list[dict], swapped: list[dict]) -> list[tuple[dict, dict]]:
    """Rows `{"question", "golden_answers", ...}` of held-out questions as written, and of the "A or B" ones among
    them asked with their options swapped (`swapped_question`) -> (as written, swapped) for each such question."""
    by_question = {r["question"]: r for r in swapped}
    return [(r, by_question[s]) for r in written
            if (s := swapped_question(r["question"], r.get("golden_answers", []))) in by_question]


def balanced_f1(written: list[dict], swapped: list[dict]) -> dict[str, float]:
    """question -> its position-balanced F1: for an "A or B" question asked both ways (`option_pairs`), the mean of
    its two orderings' `f1`; for any other, its own."""
    balanced = {a["question"]: (a["f1"] + b["f1"]) / 2 for a, b in option_pairs(written, swapped)}
    return {r["question"]: balanced.get(r["question"], r["f1"]) for r in written}


def position_scores(written: list[dict], swapped: list[dict]) -> dict[str, float]:
    """Rows `{"question", "golden_answers", "prediction", "f1"}`: every held-out question as written, and the
    "A or B" ones among them asked with their options swapped (`swapped_question`). Over those pairs: F1 as
    written, swapped, their mean, the share of answers naming the last option each way, and the share naming the
    same option both ways (and rightly so). Over every question: F1 as written, and position-balanced
    (`balanced_f1`), which a policy that answers by position does not raise."""
    pairs = option_pairs(written, swapped)

    def last(part: list[dict]) -> float:
        return sum(1 for r in part if r["prediction"] is not None
                   and _norm(r["prediction"]) == _norm(last_option(r["question"]))) / max(len(part), 1)

    n = max(len(pairs), 1)
    out = {"pairs": float(len(pairs)), "f1_as_written": sum(a["f1"] for a, _ in pairs) / n,
           "f1_swapped": sum(b["f1"] for _, b in pairs) / n,
           "last_option_as_written": last([a for a, _ in pairs]), "last_option_swapped": last([b for _, b in pairs]),
           "f1": sum(r["f1"] for r in written) / max(len(written), 1)}
    out["f1_pairs_balanced"] = (out["f1_as_written"] + out["f1_swapped"]) / 2
    # the same option named both ways round: what reading does, and what a position guess never does
    same = [(a, b) for a, b in pairs if _norm(a["prediction"]) == _norm(b["prediction"])
            and _norm(a["prediction"]) in {_norm(o) for o in swap_options(a["question"])[1:]}]
    out["same_option_share"] = len(same) / n
    out["same_option_right_share"] = sum(a["f1"] == 1.0 for a, _ in same) / n
    out["f1_balanced"] = sum(balanced_f1(written, swapped).values()) / max(len(written), 1)
    return out


def _top_share(groups: dict[int, set[str]], of: int | None = None) -> float:
    """Share of the prompts (`of` of them, by default those in `groups`) whose outputs include the single most
    common string (each prompt counted once, so a group of rollouts agreeing on its own answer is not a copy)."""
    counts = Counter(s for strings in groups.values() for s in strings)
    if not counts:
        return 0.0
    return counts.most_common(1)[0][1] / (of or len(groups))


def copy_metrics(trajs, template: str, prefix: str = "copy") -> dict[str, float]:
    """Per-batch shares of degenerate outputs. `top_query_addition_share` (the most common words the queries add to
    their question, `rewards.query_addition`) sees a collapse that keeps each query different by wrapping the
    question in one string: in one run at the CPU default without the relevance gate, "Question: <the question>"
    and then "Question" alone took over; the most common query saw it at its last stage (0.38 at step 10), the most
    common addition ("question") four steps earlier (0.50 at step 6)."""
    answers = [t for t in trajs if t.answer is not None]
    queries = [(t, q) for t in trajs for q in t.queries]
    example_queries = 0
    for t, q in queries:
        example = example_for(t.question, template)
        example_queries += example is not None and _norm(q) == _norm(example["query"])
    answer_groups: dict[int, set[str]] = {}
    query_groups: dict[int, set[str]] = {}
    for t in answers:
        answer_groups.setdefault(t.group, set()).add(_norm(t.answer))
    addition_groups: dict[int, set[str]] = {}
    for t, q in queries:
        query_groups.setdefault(t.group, set()).add(_norm(q))
        if added := query_addition(q, t.question):
            addition_groups.setdefault(t.group, set()).add(added)
    return {
        f"{prefix}/example_answer_share": sum(copies_example(t, template) for t in answers) / max(len(answers), 1),
        f"{prefix}/example_query_share": example_queries / max(len(queries), 1),
        f"{prefix}/top_answer_share": _top_share(answer_groups),
        f"{prefix}/top_query_share": _top_share(query_groups),
        f"{prefix}/top_query_addition_share": _top_share(addition_groups, of=len(query_groups)),
        f"{prefix}/question_answer_share": sum(repeats_question(t) for t in answers) / max(len(answers), 1),
        f"{prefix}/doc_answer_share": sum(names_document(t) for t in answers) / max(len(answers), 1),
    }


def repeats_question(traj) -> bool:
    """The answer is (most of) the question itself: it collects the F1 of every answer the question names
    without choosing one, a degenerate answer no single-string check sees (content-word F1 >= 0.8)."""
    return traj.answer is not None and query_overlap(traj.answer, traj.question) >= 0.8


# "Doc 1", "doc 2 (Title: ...)", "Document 3": the header `format_docs` puts before each retrieved document.
_DOC_ANSWER = re.compile(r"\s*doc(?:ument)?\s*\d+\b", re.IGNORECASE)


def names_document(traj) -> bool:
    """The answer is a retrieved document's header ("Doc 1") instead of anything the document says: a
    degenerate answer the policy converged on against the real engine (17 % of held-out answers in one
    run). Never an answer itself, unless a gold answer has that shape."""
    if traj.answer is None or not _DOC_ANSWER.match(traj.answer):
        return False
    return not any(_DOC_ANSWER.match(str(g)) for g in traj.golden_answers)


def split_metrics(trajs, scores: list[dict], hits: list[bool], prefix: str) -> dict[str, float]:
    """F1, answer rate, searches and retrieval hits for questions whose answer the question names
    (`{prefix}_named/...`) and for the rest (`{prefix}_open/...`); and `{prefix}/last_option_f1`, the F1 that
    naming each question's last option would score (0 for questions without options): a no-search baseline that
    only position bias in the questions pays for (2Wiki's held-out gold is the last option 71 % of the time)."""
    out = {f"{prefix}/last_option_f1":
           sum(f1_score(last_option(t.question) or "", t.golden_answers) for t in trajs) / max(len(trajs), 1)}
    named = [answer_in_question(t.question, t.golden_answers) for t in trajs]
    for part, want in (("named", True), ("open", False)):
        idx = [i for i, x in enumerate(named) if x == want]
        n = max(len(idx), 1)
        out.update({
            f"{prefix}_{part}/f1": sum(scores[i]["f1"] for i in idx) / n,
            f"{prefix}_{part}/answer_rate": sum(trajs[i].answer is not None for i in idx) / n,
            f"{prefix}_{part}/searches_per_traj": sum(trajs[i].num_searches for i in idx) / n,
            f"{prefix}_{part}/retrieval_hit": sum(hits[i] for i in idx) / n,
            f"{prefix}_{part}/questions": float(len(idx)),
        })
    return out
