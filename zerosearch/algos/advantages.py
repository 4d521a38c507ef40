"""Advantage estimators: pure functions of tensors and a response mask (torch only).

Every registered estimator has one signature,

    fn(token_rewards, response_mask, group_ids=None, values=None, gamma=1.0, lam=1.0, eps=1e-6)
        -> (advantages [batch, seq], returns [batch, seq])

``token_rewards`` holds the outcome reward at the last valid token of each response (see
:func:`outcome_to_token_rewards`), plus any per-token KL penalty the caller folds in. Advantages and
returns are 0 wherever ``response_mask`` is 0.

The response mask has holes: in a multi-turn search rollout the retrieved ``<information>`` tokens sit in
the middle of the response with mask 0. The token-level estimators (REINFORCE++, GAE) therefore run over
the valid tokens only: a masked position is skipped, so the "next" token of a valid token is the next
*valid* one, discounting counts valid tokens, and rewards placed on masked positions are ignored.
(verl resets the running return at a masked token, which would cut the outcome reward off from every
policy token before the first retrieval.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from zerosearch.algos.losses import kl_penalty, masked_whiten

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]

_ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: make ``fn`` the advantage estimator the config selects with ``name``."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in _ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; a ValueError lists the valid names."""
    try:
        return _ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        valid = ", ".join(sorted(_ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {valid}") from None


def advantage_estimators() -> tuple[str, ...]:
    """Names of the registered advantage estimators, sorted."""
    return tuple(sorted(_ADVANTAGE_ESTIMATORS))


def outcome_to_token_rewards(scores: Tensor, response_mask: Tensor) -> Tensor:
    """Place each sequence's scalar score on its last valid response token; zeros elsewhere."""
    mask = response_mask.bool()  # [batch, seq]
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # [batch, seq]
    last = torch.where(mask, positions, -1).amax(dim=-1)  # [batch]
    token_rewards = torch.zeros(mask.shape, dtype=_float_dtype(scores), device=scores.device)
    has_token = last >= 0  # [batch]
    rows = torch.nonzero(has_token).squeeze(-1)  # [n]
    token_rewards[rows, last[rows]] = scores[rows].to(token_rewards.dtype)
    return token_rewards  # [batch, seq]


def apply_kl_penalty(
    token_rewards: Tensor, log_prob: Tensor, ref_log_prob: Tensor, response_mask: Tensor, kl_coef: float,
    kind: str = "k1",
) -> tuple[Tensor, dict[str, float]]:
    """PPO's KL in the reward: ``token_rewards - kl_coef * KL`` on the valid tokens, the KL to the reference
    estimated per token by :func:`kl_penalty` of ``kind``. Metric ``reward/kl_penalty``: each sequence's summed
    KL, averaged over the batch."""
    kl = kl_penalty(log_prob, ref_log_prob, kind) * response_mask  # [batch, seq]
    return token_rewards - kl_coef * kl, {"reward/kl_penalty": float((kl.sum(-1)).mean())}


def group_index(group_ids: Tensor | Sequence, batch_size: int) -> Tensor:
    """Map group ids (ints, strings, uuids...) to dense indices 0..n_groups-1, one per sample."""
    if isinstance(group_ids, Tensor):
        index = torch.unique(group_ids, return_inverse=True)[1].reshape(-1)  # [batch]
    else:
        dense: dict = {}
        index = torch.tensor([dense.setdefault(g, len(dense)) for g in group_ids], dtype=torch.long)
    if index.numel() != batch_size:
        raise ValueError(f"group_ids has {index.numel()} entries but the batch has {batch_size} samples")
    return index  # [batch]


def grpo_advantages(
    scores: Tensor, group_ids: Tensor | Sequence, eps: float = 1e-6, norm_by_std: bool = True
) -> Tensor:
    """GRPO: ``(score - group mean) / (group std + eps)``, one advantage per sequence.

    The std is the unbiased one (Bessel's correction, ``torch.std``'s default), as in verl. A group of
    one sample gets advantage 0 (mean = its score, std taken as 1); verl instead uses mean 0 there,
    which hands a lone sample its raw score. A group whose rewards are all equal gets exactly 0 at any
    size. ``norm_by_std=False`` only centres (Dr. GRPO).
    """
    scores = scores.to(_float_dtype(scores))  # [batch]
    index = group_index(group_ids, scores.shape[0]).to(scores.device)  # [batch]
    count, mean = _group_count_mean(scores, index)  # [batch], [batch]
    centred = torch.where(_constant_group(scores, index), 0.0, scores - mean)  # [batch]
    if not norm_by_std:
        return centred
    sq_sum = torch.zeros_like(scores).index_add_(0, index, centred**2)[index]  # [batch] (index < batch)
    std = torch.where(count > 1, (sq_sum / (count - 1).clamp_min(1)).sqrt(), 1.0)  # [batch]
    return centred / (std + eps)  # [batch]


def rloo_advantages(scores: Tensor, group_ids: Tensor | Sequence) -> Tensor:
    """RLOO: score minus the mean score of the *other* samples in its group; 0 for a group of one."""
    scores = scores.to(_float_dtype(scores))  # [batch]
    index = group_index(group_ids, scores.shape[0]).to(scores.device)  # [batch]
    count, mean = _group_count_mean(scores, index)  # [batch], [batch]
    others_mean = (mean * count - scores) / (count - 1).clamp_min(1)  # [batch]
    return torch.where(_constant_group(scores, index), 0.0, scores - others_mean)  # [batch] (a group of one is constant)


def discounted_returns(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Returns-to-go over the valid tokens of each sequence; masked positions are skipped and get 0."""
    mask = response_mask.bool()  # [batch, seq]
    rewards = torch.where(mask, token_rewards, 0.0)  # [batch, seq]
    returns = torch.zeros_like(rewards)  # [batch, seq]
    running = torch.zeros_like(rewards[:, 0])  # [batch]
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)  # [batch]
        returns[:, t] = torch.where(mask[:, t], running, 0.0)
    return returns  # [batch, seq]


def gae(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the valid tokens, un-whitened: ``(advantages, returns)``.

    A masked position is skipped: the value bootstrapped at a valid token is the value of the next
    valid token (0 after the last one). ``returns = advantages + values`` on valid tokens, 0 elsewhere.
    """
    mask = response_mask.bool()  # [batch, seq]
    rewards = torch.where(mask, token_rewards, 0.0)  # [batch, seq]
    values = torch.where(mask, values, 0.0).to(rewards.dtype)  # [batch, seq]
    advantages = torch.zeros_like(rewards)  # [batch, seq]
    next_value = torch.zeros_like(rewards[:, 0])  # [batch]
    next_adv = torch.zeros_like(rewards[:, 0])  # [batch]
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [batch]
        adv_t = delta + gamma * lam * next_adv  # [batch]
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        next_adv = torch.where(mask[:, t], adv_t, next_adv)
        advantages[:, t] = torch.where(mask[:, t], adv_t, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)  # [batch, seq]
    return advantages, returns


@register_advantage("grpo")
def compute_grpo_advantage(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor | Sequence | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantage broadcast over the valid tokens; returns == advantages (no critic).
    ``norm_by_std=False``: centred only (Dr. GRPO; verl's ``norm_adv_by_std_in_grpo=False``)."""
    scores = _sequence_scores(token_rewards, response_mask)  # [batch]
    adv = grpo_advantages(scores, _require_groups(group_ids, "grpo"), eps=eps, norm_by_std=norm_by_std)  # [batch]
    adv = torch.where(response_mask.bool(), adv[:, None], 0.0)  # [batch, seq]
    return adv, adv


@register_advantage("rloo")
def compute_rloo_advantage(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor | Sequence | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """RLOO outcome advantage broadcast over the valid tokens; returns == advantages (no critic)."""
    scores = _sequence_scores(token_rewards, response_mask)  # [batch]
    adv = rloo_advantages(scores, _require_groups(group_ids, "rloo"))  # [batch]
    adv = torch.where(response_mask.bool(), adv[:, None], 0.0)  # [batch, seq]
    return adv, adv


@register_advantage("reinforce_plus_plus")
def compute_reinforce_plus_plus_advantage(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor | Sequence | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted returns-to-go, whitened over all valid tokens of the batch."""
    returns = discounted_returns(token_rewards, response_mask, gamma)  # [batch, seq]
    advantages = masked_whiten(returns, response_mask, eps=eps)  # [batch, seq]
    return advantages, returns


@register_advantage("gae")
def compute_gae_advantage(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor | Sequence | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """PPO's GAE over the valid tokens (see :func:`gae`), advantages whitened over valid tokens."""
    if values is None:
        raise ValueError("the 'gae' advantage estimator needs critic values; pass values=[batch, seq]")
    advantages, returns = gae(token_rewards, values, response_mask, gamma, lam)  # [batch, seq] x2
    return masked_whiten(advantages, response_mask, eps=eps), returns


def _sequence_scores(token_rewards: Tensor, response_mask: Tensor) -> Tensor:
    if token_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)} and response_mask {tuple(response_mask.shape)} "
            "must have the same [batch, seq] shape"
        )
    return torch.where(response_mask.bool(), token_rewards, 0.0).sum(dim=-1)  # [batch]


def _require_groups(group_ids: Tensor | Sequence | None, name: str) -> Tensor | Sequence:
    if group_ids is None:
        raise ValueError(f"the {name!r} advantage estimator needs group_ids (the prompt each sample answers)")
    return group_ids


def _group_count_mean(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample size and mean of its group, gathered back to the batch."""
    n_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    count = count.index_add_(0, index, torch.ones_like(scores))  # [groups]
    total = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, index, scores)
    return count[index], (total / count)[index]  # [batch], [batch]


def _constant_group(scores: Tensor, index: Tensor) -> Tensor:
    """Whether each sample's group holds one reward value only. Its advantage must then be exactly 0, but the
    float mean of n equal rewards need not equal them (in fp32 the mean of eight 0.1 is 0.10000001), and GRPO's
    division by a std of the same rounding size blew that up to |0.1|."""
    n_groups = int(index.max()) + 1 if index.numel() else 0
    empty = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    low = empty.scatter_reduce(0, index, scores, "amin", include_self=False)  # [groups]
    high = empty.scatter_reduce(0, index, scores, "amax", include_self=False)  # [groups]
    return (low == high)[index]  # [batch]


def _float_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


@register_advantage("reinforce")
def compute_reinforce_advantage(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor | Sequence | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Upstream ZeroSearch's REINFORCE (``compute_reinforce_outcome_advantage``): each sequence's summed reward
    on every valid token, no baseline, no whitening; returns == advantages. REINFORCE++ is ``reinforce_plus_plus``."""
    scores = _sequence_scores(token_rewards, response_mask)  # [batch]
    adv = torch.where(response_mask.bool(), scores[:, None], 0.0)  # [batch, seq]
    return adv, adv
