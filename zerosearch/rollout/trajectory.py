"""One multi-turn trajectory, built in token space with its loss mask.

The mask is set where tokens join the sequence: 1 for tokens the policy sampled, 0 for
observation tokens (retrieved documents and feedback). Policy tokens are never decoded and
re-tokenised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zerosearch.rewards import exact_match, f1_score


@dataclass
class Trajectory:
    uid: int
    """Position in the batch."""
    group: int
    """Index of the prompt it was sampled from (GRPO group id)."""
    question: str
    golden_answers: list[str]
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    """1 on policy tokens, 0 on observation tokens; same length as `response_ids`."""
    turns: int = 0
    num_searches: int = 0
    num_invalid: int = 0
    obs_truncated: int = 0
    noisy_flags: list[bool | None] = field(default_factory=list)
    off_topic: int = 0
    """Searches the relevance gate (`LoopSettings.min_query_overlap`) sent noisy documents to."""
    held_flags: list[bool] = field(default_factory=list)
    """Per search: a useful search whose documents the simulator wrote without the gold answer
    (`LoopSettings.two_hop`)."""
    queries: list[str] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    """What the search backend returned, one text per search, as appended (cut where the observation was
    truncated). Only these count as retrieved for the reward, never `<information>` text the policy wrote."""
    answer: str | None = None
    finish_reason: str = ""
    """`answer`, `max_turns`, `length` (token budget) or `error` (a search failed: see `error`)."""
    error: str = ""
    """Why the search that ended this trajectory failed (finish reason `error`)."""
    response_text: str = ""
    train_observations: bool = False
    """The ablation `algorithm.mask_retrieved_tokens=False`, set once by the trainer: observation tokens
    carry loss too. Read it only through `train_mask`."""

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    @property
    def held_answer(self) -> int:
        """How many of the searches were held back (`held_flags`)."""
        return sum(self.held_flags)

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def train_mask(self) -> list[int]:
        """1 on the response tokens that carry loss: the one place that decides it for the actor's and the
        critic's losses and their normalisers, the advantages and the metrics.

        A trajectory cut short by a failed search carries no loss: the failure was the server's, and its
        reward of 0 would teach the policy not to search."""
        if self.finish_reason == "error":
            return [0] * len(self.response_ids)
        return [1] * len(self.response_ids) if self.train_observations else self.loss_mask

    def append_policy(self, token_ids: list[int]) -> None:
        self.response_ids += token_ids
        self.loss_mask += [1] * len(token_ids)

    def append_observation(self, token_ids: list[int]) -> None:
        self.response_ids += token_ids
        self.loss_mask += [0] * len(token_ids)

    def score(self) -> dict[str, float]:
        """F1 and EM of the answer the policy gave (parsed from its own tokens, never from documents)."""
        return {"f1": f1_score(self.answer, self.golden_answers), "em": exact_match(self.answer, self.golden_answers)}

    def to_record(self) -> dict:
        """The JSON row `zerosearch rollout` writes."""
        return {
            "question": self.question,
            "golden_answers": self.golden_answers,
            "group": self.group,
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "loss_mask": self.loss_mask,
            "response_text": self.response_text,
            "answer": self.answer,
            "num_searches": self.num_searches,
            "num_invalid": self.num_invalid,
            "turns": self.turns,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "noisy_flags": self.noisy_flags,
            "held_flags": self.held_flags,
            "queries": self.queries,
            "documents": self.documents,
            "obs_truncated": self.obs_truncated,
        }
