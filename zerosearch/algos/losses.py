"""Policy, value and KL losses: pure functions of tensors and a response mask (torch only).

Masks are 0/1 (bool or numeric), shaped like the per-token tensors, ``[batch, seq]``. Masked positions
never reach a loss or a gradient: they are replaced with neutral values (``torch.where``) *before* any
non-linearity, so even inf/NaN log-probabilities on retrieved tokens leave the loss and every gradient
unchanged, and the gradient at masked positions is exactly 0.

Losses return ``(loss, metrics)``: a scalar tensor to backpropagate and a dict of detached floats.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl", "kl", "mse")
_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
_LOG_RATIO_CLAMP = 20.0  # exp(±20) keeps ratios finite in fp32
_K3_CLAMP = 10.0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is 1 (over all positions when ``dim`` is None)."""
    masked = torch.where(mask.bool(), x, 0.0)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid positions; 0 where there is none."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid positions; Bessel-corrected when ``unbiased`` and > 1 valid."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    count = mask.to(x.dtype).sum()
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to mean 0, (unbiased) std 1 over all valid positions; masked positions become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce a per-token loss ``[batch, seq]`` to a scalar.

    * ``token-mean``: sum over all valid tokens / number of valid tokens in the batch; shards combine
      into the global value when weighted by their token counts.
    * ``seq-mean-token-mean``: mean over sequences of each sequence's token mean.
    * ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.

    The sequence means run over sequences with at least one valid token; no valid token gives 0.
    """
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)  # [batch]
    elif mode == "seq-mean-token-sum":
        per_seq = masked_sum(loss_mat, mask, dim=-1)  # [batch]
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")
    has_tokens = mask.bool().any(dim=-1)  # [batch]
    return masked_mean(per_seq, has_tokens)


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    dual_clip_c: float | None = None,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate ``max(-A r, -A clip(r, 1-low, 1+high))`` with optional dual clip.

    ``r = exp(log_prob - old_log_prob)``. ``clip_ratio_low/high`` default to ``clip_ratio`` (set high
    above low for DAPO's clip-higher). ``dual_clip_c`` (> 1) caps the loss of negative-advantage tokens
    at ``-A * c`` so a huge ratio cannot blow it up (Ye et al. 2020). Metrics: ``pg_loss``,
    ``clip_frac`` (tokens where the clipped term is active), ``dual_clip_frac``, ``approx_kl`` (k3
    estimate of KL(old || new)) and ``ratio_mean``.
    """
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    valid = mask.bool()  # [batch, seq]
    log_ratio = torch.where(valid, log_prob - old_log_prob, 0.0)  # [batch, seq]
    log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # [batch, seq]
    adv = torch.where(valid, advantages, 0.0)  # [batch, seq]

    unclipped = -adv * ratio  # [batch, seq]
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)  # [batch, seq]
    loss_mat = torch.maximum(unclipped, clipped)  # [batch, seq]
    dual_clipped = torch.zeros_like(valid)
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}; 3.0 is the usual value")
        cap = -adv * dual_clip_c  # [batch, seq]
        dual_clipped = (adv < 0) & (loss_mat > cap)
        loss_mat = torch.where(dual_clipped, cap, loss_mat)

    loss = agg_loss(loss_mat, mask, agg)
    with torch.no_grad():
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
        metrics = {
            "pg_loss": float(loss.detach()),
            "clip_frac": float(masked_mean((clipped > unclipped).to(ratio.dtype), mask)),
            "dual_clip_frac": float(masked_mean(dual_clipped.to(ratio.dtype), mask)),
            "approx_kl": float(approx_kl),
            "ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float = 0.5,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (v_clip - R)^2)``, ``v_clip = v_old + clip(v - v_old)``."""
    valid = mask.bool()  # [batch, seq]
    values = torch.where(valid, values, 0.0)  # [batch, seq]
    old_values = torch.where(valid, old_values, 0.0)  # [batch, seq]
    returns = torch.where(valid, returns, 0.0)  # [batch, seq]
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)  # [batch, seq]
    unclipped_sq = (values - returns) ** 2  # [batch, seq]
    clipped_sq = (clipped_values - returns) ** 2  # [batch, seq]
    loss = 0.5 * agg_loss(torch.maximum(unclipped_sq, clipped_sq), mask, agg)
    with torch.no_grad():
        metrics = {
            "vf_loss": float(loss.detach()),
            "vf_clip_frac": float(masked_mean((clipped_sq > unclipped_sq).to(values.dtype), mask)),
        }
    return loss, metrics


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy, ``[batch, seq]``.

    * ``k1`` / ``kl``: ``log p - log ref`` (unbiased, high variance, can be negative);
    * ``k2`` / ``mse``: ``0.5 * (log p - log ref)^2``;
    * ``k3`` / ``low_var_kl``: ``exp(ref - log p) - (ref - log p) - 1`` (unbiased, >= 0), clamped to
      [-10, 10] as in verl.
    """
    kind = _KL_ALIASES.get(kind, kind)
    if kind == "k1":
        return log_prob - ref_log_prob
    if kind == "k2":
        return 0.5 * (log_prob - ref_log_prob) ** 2
    if kind == "k3":
        log_ref_ratio = (ref_log_prob - log_prob).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (torch.exp(log_ref_ratio) - log_ref_ratio - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)
    raise ValueError(f"unknown KL kind {kind!r}; choose one of {', '.join(KL_KINDS)}")


def kl_loss(
    log_prob: Tensor, ref_log_prob: Tensor, mask: Tensor, kind: str = "low_var_kl", agg: str = "token-mean"
) -> Tensor:
    """KL(policy || reference) aggregated over valid tokens; masked tokens contribute nothing."""
    valid = mask.bool()  # [batch, seq]
    # Masked positions get log_prob == ref_log_prob (zero KL, zero gradient), whatever their values.
    log_prob = torch.where(valid, log_prob, 0.0)  # [batch, seq]
    ref_log_prob = torch.where(valid, ref_log_prob, 0.0)  # [batch, seq]
    return agg_loss(kl_penalty(log_prob, ref_log_prob, kind), mask, agg)


def entropy_given_lse(logits: Tensor, lse: Tensor) -> Tensor:
    """Entropy of the softmax over the last dimension from the logits and their logsumexp ``[...]``, no gradient
    of its own: for callers that have the logsumexp already."""
    return lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(dim=-1)  # [...]


class _Entropy(torch.autograd.Function):
    """``H(z) = logsumexp(z) - sum(softmax(z) * z)`` with ``dH/dz = -p * (log p + H)``.

    The backward recomputes ``p`` from the saved logits, so an entropy bonus keeps no vocabulary-sized
    tensor alive until the backward beyond the logits themselves (which the log-probs save anyway);
    plain autograd would also keep the softmax, about 200 MB per 1k tokens of a 49k vocabulary.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [..., 1]
        entropy = entropy_given_lse(logits, lse.squeeze(-1))  # [...]
        ctx.save_for_backward(logits, lse, entropy)
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        logits, lse, entropy = ctx.saved_tensors
        log_p = logits - lse  # [..., vocab]
        p = torch.exp(log_p)  # [..., vocab]
        return p.mul_(log_p.add_(entropy.unsqueeze(-1))).mul_(-grad.unsqueeze(-1))  # [..., vocab]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dimension, differentiable: ``[..., vocab] -> [...]``."""
    return _Entropy.apply(logits)


def actor_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    ref_log_prob: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    kl_coef: float = 0.0,
    kl_kind: str = "low_var_kl",
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    dual_clip_c: float | None = None,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """The actor's loss: ``pg_loss + kl_coef * kl``.

    The KL term is *added*: it is a penalty that pulls the policy toward the reference (the upstream
    trainer subtracted it, which pushes the policy away). With ``kl_coef == 0`` or no ``ref_log_prob``
    the KL term is skipped.
    """
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kl_kind!r}; choose one of {', '.join(KL_KINDS)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}; the KL term is a penalty")
    loss, metrics = policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        mask,
        clip_ratio=clip_ratio,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        dual_clip_c=dual_clip_c,
        agg=agg,
    )
    if ref_log_prob is not None and kl_coef > 0:
        kl = kl_loss(log_prob, ref_log_prob, mask, kind=kl_kind, agg=agg)
        loss = loss + kl_coef * kl
        metrics["kl_loss"] = float(kl.detach())
        metrics["kl_coef"] = float(kl_coef)
    metrics["actor_loss"] = float(loss.detach())
    return loss, metrics
