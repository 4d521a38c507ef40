"""Outcome rewards: pull the answer out of a response and score it against the gold answers.

Pure functions of strings (stdlib only), SQuAD-style normalisation and metrics (Rajpurkar et al. 2016,
``evaluate-v1.1.py``) with HotpotQA's yes/no special case for F1.

Two bugs of the upstream ZeroSearch reward are pinned by tests here:

* its exact match is a *substring* test (``"paris" in "paris france"`` scores 1); ours is equality of the
  normalised strings;
* it searches the *whole* decoded sequence, prompt included, for ``<answer>``, so a response without an
  answer is scored as the prompt's example (``For example, <answer> Beijing </answer>``). Our
  :func:`extract_answer` is given only the response text; the caller never passes the prompt.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

REWARD_METRICS = ("f1", "em")

# One complete block whose content holds no further opening tag: for "<answer>a <answer>b</answer>" this
# is the inner block "b", and a stray "</answer>" after a block never becomes part of its content.
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
# HotpotQA: a wrong yes/no (or "noanswer") gets no partial F1 credit from token overlap.
_SPECIAL_ANSWERS = ("yes", "no", "noanswer")


def extract_answer(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` block in ``text``, stripped, else None.

    ``text`` must be the *response* only (what the policy generated, retrieved documents included),
    never prompt + response: the prompt's own example ``<answer>`` must not count as the policy's answer.
    Content may span lines. An unclosed ``<answer>`` is ignored; an empty block gives ``""``.
    """
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].strip()


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """1.0 iff the normalised prediction *equals* the normalised form of some gold answer, else 0.0.

    Equality, not containment: "Paris France" does not match "Paris". A None prediction scores 0.0.
    """
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in _as_list(golden_answers)))


def f1_score(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """SQuAD token-level F1 between prediction and gold, the best over the gold answers.

    A None prediction scores 0.0. When either normalised side is exactly "yes", "no" or "noanswer" and
    the two differ, the score is 0.0 (no credit for token overlap with a wrong yes/no).
    """
    if prediction is None:
        return 0.0
    return max(_f1_single(prediction, gold) for gold in _as_list(golden_answers))


def compute_score(
    response_text: str, golden_answers: str | Sequence[str], metric: str = "f1", **shaping
) -> dict[str, float | bool | str | None]:
    """Score one response: the reward the trainer uses (``score``) plus both metrics for logging.

    ``response_text`` is the response only (see :func:`extract_answer`); a response without a complete
    answer block scores 0. Returns :func:`answer_reward`'s ``{"score", "f1", "em", "has_answer", "answer",
    "retrieval_hit"}``, where ``score`` is the value of ``metric`` (one of :data:`REWARD_METRICS`), shaped by
    ``shaping`` (:func:`answer_reward`'s keywords; without them the plain metric).
    """
    return answer_reward(extract_answer(response_text), golden_answers, metric, **shaping)


def answer_reward(
    answer: str | None,
    golden_answers: str | Sequence[str],
    metric: str = "f1",
    *,
    documents: Sequence[str] = (),
    format_score: float = 0.0,
    retrieval_score: float = 0.0,
    valid: bool | None = None,
) -> dict[str, float | bool | str | None]:
    """The trainer's reward for one trajectory's ``answer`` (None: it gave none), and what it is made of.

    ``score`` is the ``metric`` (F1 or EM against ``golden_answers``) with Search-R1's shaping
    (:func:`shaped_reward`): a ``valid`` answer earns at least ``format_score``, plus ``retrieval_score`` when
    one of the ``documents`` the search backend returned holds a gold answer (``retrieval_hit``). ``valid``
    defaults to "an answer was given"; an empty one never is, and the trainer also refuses an answer that
    copies its prompt's worked example. Returns ``{"score", "f1", "em", "has_answer", "answer", "retrieval_hit"}``.
    """
    if metric not in REWARD_METRICS:
        raise ValueError(f"unknown reward metric {metric!r}; choose one of {', '.join(REWARD_METRICS)}")
    f1 = f1_score(answer, golden_answers)
    em = exact_match(answer, golden_answers)
    hit = retrieval_hit(documents, golden_answers)
    # an empty answer (or one of punctuation and articles only) is no answer: it must not buy the format floor
    ok = (answer is not None if valid is None else valid) and bool(normalize_answer(answer or ""))
    return {
        "score": shaped_reward(f1 if metric == "f1" else em, ok, hit, format_score, retrieval_score),
        "f1": f1,
        "em": em,
        "has_answer": answer is not None,
        "answer": answer,
        "retrieval_hit": hit,
    }


def retrieval_hit(documents: Sequence[str], golden_answers: str | Sequence[str]) -> bool:
    """Whether a gold answer appears (normalised, as whole words) in any of ``documents``: Search-R1's
    ``is_retrieval_correct``, for its ``retrieval_score`` and as a metric.

    ``documents`` are the texts the search backend returned to the trajectory (``Trajectory.documents``),
    never the response text: a policy that writes ``<information>Paris</information>`` itself must not
    count as having retrieved the answer.
    """
    if isinstance(documents, str):
        raise TypeError("retrieval_hit takes the list of returned documents (Trajectory.documents), not a text")
    golds = [normalize_answer(g) for g in _as_list(golden_answers)]
    for document in documents:
        text = f" {normalize_answer(document)} "
        if any(g and f" {g} " in text for g in golds):
            return True
    return False


# function words that say nothing about what a query is after ("who is the mother of X" -> "mother", "x")
_FUNCTION_WORDS = frozenset(
    ["who", "whom", "whose", "what", "which", "when", "where", "why", "how", "is", "are", "was", "were", "be", "been", "being", "do", "does", "did", "has", "have", "had", "of", "in", "on", "at", "to", "for", "by", "with", "from", "about", "into", "than", "and", "or", "but", "not", "as", "that", "this", "these", "those", "it", "its", "he", "she", "they", "his", "her", "their", "there", "here", "your", "you", "my", "our", "we", "i", "me"]
)


def _content_words(text: str) -> list[str]:
    """The normalised words of `text` without function words."""
    return [t for t in normalize_answer(text).split() if t not in _FUNCTION_WORDS]


def query_overlap(query: str, question: str) -> float:
    """Token F1 between the content words of a search ``query`` and of the ``question`` it serves.

    1.0 for the question itself, about 0.5-0.8 for a query naming one hop of it ("director of Polish-Russian
    War" for "Who is the mother of the director of film Polish-Russian War?"), 0.0 for "Your question" or
    an empty query. The simulated engine's relevance gate (``search.min_query_overlap``) compares it to a
    threshold.
    """
    q, ref = _content_words(query), _content_words(question)
    same = sum((Counter(q) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(q), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def query_in_question(query: str, question: str) -> bool:
    """Every content word of a search ``query`` is one of the ``question``'s (and there is one): an option of a "which
    of A or B" question ("Jaws" for "Which film came out first, Jaws or Star Wars?", token F1 0.25), or a name the
    question gives. ``search.gate_question_words`` lets such a query through the relevance gate."""
    q = _content_words(query)
    return bool(q) and set(q) <= set(_content_words(question))


def query_addition(query: str, question: str) -> str:
    """The content words a search ``query`` adds to its ``question``, in the query's order ("" for one that
    `query_in_question` accepts, or an empty one): "question" for "Question: <the question>". The copy metric
    `copy/top_query_addition_share` counts the most common addition (`rollout.copying.copy_metrics`)."""
    own = set(_content_words(question))
    return " ".join(w for w in _content_words(query) if w not in own)


def query_support(query: str, text: str, question: str = "") -> float:
    """The share of a search ``query``'s content words that ``text`` holds and ``question`` (if given) lacks.

    Without a question: 1.0 for a name copied from the documents a trajectory has already retrieved (the second
    hop of a two-hop question), 0.0 for an empty query; the relevance gate passes a follow-up query with enough of
    it (``search.min_query_overlap``). With the question: only the words the documents gave that the question did
    not, 1.0 for "Robert Boyle" after documents that named him for "Where was the husband of Bess Taffel born?",
    0.0 for the question itself and for an empty query (:func:`new_name_share`)."""
    q = _content_words(query)
    if not q:
        return 0.0
    asked = set(_content_words(question))
    seen = set(normalize_answer(text).split())
    return sum(t in seen and t not in asked for t in q) / len(q)


FOLLOW_UP_SHARE = 0.5
"""`search.two_hop` gives the gold answer to the simulator only for a query with at least this `new_name_share`."""


def new_name_share(query: str, question: str, text: str) -> float:
    """The share of a search ``query``'s content words that the ``question`` lacks and ``text`` (the documents a
    trajectory has already retrieved) holds: a bridge name the first search returned (``search.two_hop``)."""
    return query_support(query, text, question)


def shaped_reward(answer_score: float, has_answer: bool, retrieved_gold: bool, format_score: float = 0.0,
                  retrieval_score: float = 0.0) -> float:
    """Search-R1's shaping (``compute_score_em`` in its ``qa_em_format.py``) on top of the answer score.

    A trajectory with a valid answer (a complete ``<answer>`` block of its own tokens) earns at least
    ``format_score``, plus ``retrieval_score`` when a document the search engine returned to it held a gold
    answer (``retrieved_gold``, see :func:`retrieval_hit`); a better answer score wins. A trajectory without
    an answer gets its answer score (0) and neither bonus, as in Search-R1, where both need a valid sequence
    that ends in an answer. With both scores 0 this is the plain F1/EM reward (ZeroSearch).
    """
    if not has_answer:
        return answer_score
    return max(answer_score, format_score + retrieval_score * retrieved_gold)


def _as_list(golden_answers: str | Sequence[str]) -> list[str]:
    """Gold answers as a non-empty list of strings (a bare string is one answer; numbers become text)."""
    golds = [golden_answers] if isinstance(golden_answers, str) else list(golden_answers)
    if not golds:
        raise ValueError("golden_answers is empty; every example needs at least one gold answer")
    return [str(gold) for gold in golds]


def _f1_single(prediction: str, gold: str) -> float:
    pred, truth = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _SPECIAL_ANSWERS or truth in _SPECIAL_ANSWERS) and pred != truth:
        return 0.0
    pred_tokens, truth_tokens = pred.split(), truth.split()
    num_same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)
