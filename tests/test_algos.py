"""Advantage estimators and losses: hand-computed values and invariants (CPU, tiny tensors)."""

import math

import pytest
import torch

from zerosearch.algos import (
    actor_loss,
    advantage_estimators,
    agg_loss,
    apply_kl_penalty,
    discounted_returns,
    entropy_from_logits,
    gae,
    get_advantage_estimator,
    grpo_advantages,
    kl_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    outcome_to_token_rewards,
    policy_loss,
    register_advantage,
    rloo_advantages,
    value_loss,
)

# Response masks with holes: 0s in the middle are retrieved <information> tokens, trailing 0s padding.
HOLEY_MASK = torch.tensor(
    [
        [1, 1, 0, 0, 1, 1, 1, 0],
        [1, 0, 1, 0, 1, 0, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 1, 0],
    ],
    dtype=torch.bool,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _valid_std(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x[mask.bool()].std())  # unbiased, like masked_whiten


# --- registry -----------------------------------------------------------------------------------


def test_registered_estimators_and_unknown_name():
    assert advantage_estimators() == ("gae", "grpo", "reinforce", "reinforce_plus_plus", "rloo")
    with pytest.raises(ValueError, match="gae, grpo, reinforce, reinforce_plus_plus, rloo"):
        get_advantage_estimator("ppo2")


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda *a, **k: None)


# --- GRPO / RLOO --------------------------------------------------------------------------------

SCORES = torch.tensor([1.0, 3.0, 0.0, 5.0, 1.0, 1.0, 0.0])
GROUPS = ["a", "b", "a", "c", "a", "b", "a"]  # a: [1, 0, 1, 0], b: [3, 1], c: [5] alone


def test_grpo_hand_computed():
    # group a: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) -> +-0.5 * sqrt(3)
    # group b: mean 2, unbiased std sqrt(2) -> +-1/sqrt(2); group c (one sample) -> 0
    h, s = 0.5 * math.sqrt(3), 1 / math.sqrt(2)
    expected = torch.tensor([h, s, -h, 0.0, h, -s, -h])
    torch.testing.assert_close(grpo_advantages(SCORES, GROUPS), expected, atol=1e-5, rtol=1e-5)
    # tensor ids give the same grouping
    ids = torch.tensor([7, 3, 7, 9, 7, 3, 7])
    torch.testing.assert_close(grpo_advantages(SCORES, ids), expected, atol=1e-5, rtol=1e-5)


def test_grpo_without_std_only_centres():
    expected = torch.tensor([0.5, 1.0, -0.5, 0.0, 0.5, -1.0, -0.5])
    torch.testing.assert_close(grpo_advantages(SCORES, GROUPS, norm_by_std=False), expected)


def test_grpo_group_of_one_and_constant_group_are_zero():
    adv = grpo_advantages(torch.tensor([4.0, 2.0, 2.0, 2.0]), [0, 1, 1, 1])
    torch.testing.assert_close(adv, torch.zeros(4))


@pytest.mark.parametrize("n", [2, 5, 8, 16])
@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 1.0])
def test_identical_rewards_give_exactly_zero_advantage_at_any_group_size(n, value):
    # next to a group whose rewards differ, so the batch is not constant as a whole
    scores = torch.tensor([value] * n + [0.0, 1.0, 0.25])
    groups = [0] * n + [1, 1, 1]
    for adv in (grpo_advantages(scores, groups), grpo_advantages(scores, groups, norm_by_std=False),
                rloo_advantages(scores, groups)):
        assert adv[:n].tolist() == [0.0] * n  # exactly: fp32 rounding of the mean gave up to |0.1| at n >= 8
        assert adv[n:].abs().min() > 0


def test_group_ids_length_must_match():
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.tensor([1.0, 2.0]), ["a"])


def test_rloo_hand_computed():
    # a: 1 - (0+1+0)/3 = 2/3, 0 - (1+1+0)/3 = -2/3; b: 3 - 1 = 2, 1 - 3 = -2; c alone -> 0
    expected = torch.tensor([2 / 3, 2.0, -2 / 3, 0.0, 2 / 3, -2.0, -2 / 3])
    torch.testing.assert_close(rloo_advantages(SCORES, GROUPS), expected)


def test_outcome_to_token_rewards_places_score_on_last_valid_token():
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    rewards = outcome_to_token_rewards(torch.tensor([2.0, 3.0, 4.0]), mask)
    expected = torch.zeros(3, 5)
    expected[0, 3], expected[2, 0] = 2.0, 4.0
    torch.testing.assert_close(rewards, expected)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_outcome_estimators_broadcast_and_zero_on_mask(name):
    scores = torch.tensor([1.0, 0.0, 2.0, 0.5])
    groups = [0, 0, 1, 1]
    token_rewards = outcome_to_token_rewards(scores, HOLEY_MASK)
    adv, returns = get_advantage_estimator(name)(token_rewards, HOLEY_MASK, groups)
    per_seq = grpo_advantages(scores, groups) if name == "grpo" else rloo_advantages(scores, groups)
    torch.testing.assert_close(adv, torch.where(HOLEY_MASK, per_seq[:, None], 0.0))
    assert adv[0, 0] != 0  # the broadcast value is not trivially zero
    assert torch.all(adv[~HOLEY_MASK] == 0) and torch.all(returns[~HOLEY_MASK] == 0)


def test_outcome_estimators_need_group_ids():
    with pytest.raises(ValueError, match="group_ids"):
        get_advantage_estimator("grpo")(torch.zeros(4, 8), HOLEY_MASK)


# --- REINFORCE++ and GAE against per-sequence loops over the valid tokens ------------------------


def _loop_returns(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = torch.nonzero(mask[b]).squeeze(-1).tolist()
        running = 0.0
        for t in reversed(idx):
            running = float(rewards[b, t]) + gamma * running
            out[b, t] = running
    return out


def _loop_gae(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = torch.nonzero(mask[b]).squeeze(-1).tolist()
        last = 0.0
        for k in reversed(range(len(idx))):
            next_value = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            delta = float(rewards[b, idx[k]]) + gamma * next_value - float(values[b, idx[k]])
            last = delta + gamma * lam * last
            adv[b, idx[k]] = last
    return adv


def test_discounted_returns_match_loop_with_holes():
    rewards = torch.randn(4, 8, generator=_gen(1), dtype=torch.float64)
    got = discounted_returns(rewards, HOLEY_MASK, gamma=0.9)
    torch.testing.assert_close(got, _loop_returns(rewards, HOLEY_MASK, 0.9))


def test_reinforce_plus_plus_outcome_reaches_tokens_before_a_hole():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    returns = discounted_returns(outcome_to_token_rewards(scores, HOLEY_MASK), HOLEY_MASK, gamma=0.5)
    # row 0 valid tokens at 0, 1, 4, 5, 6: discount counts valid tokens only, the hole adds nothing
    torch.testing.assert_close(returns[0], torch.tensor([0.0625, 0.125, 0, 0, 0.25, 0.5, 1.0, 0]))


def test_reinforce_plus_plus_whitened_over_valid_tokens():
    rewards = torch.randn(4, 8, generator=_gen(2), dtype=torch.float64) + 3.0
    adv, returns = get_advantage_estimator("reinforce_plus_plus")(rewards, HOLEY_MASK, gamma=0.95)
    torch.testing.assert_close(returns, _loop_returns(rewards, HOLEY_MASK, 0.95))
    assert abs(float(masked_mean(adv, HOLEY_MASK))) < 1e-6
    assert _valid_std(adv, HOLEY_MASK) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(adv[~HOLEY_MASK] == 0)


def test_reinforce_is_upstreams_outcome_on_every_token_without_baseline():
    # upstream's compute_reinforce_outcome_advantage: the summed reward on each valid token, returns = advantages
    scores = torch.tensor([1.0, 0.0, 0.25, 0.5])
    rewards = outcome_to_token_rewards(scores, HOLEY_MASK)
    rewards[1, 3] = 7.0  # a reward on a hole is not the policy's: ignored
    adv, returns = get_advantage_estimator("reinforce")(rewards, HOLEY_MASK, group_ids=[0, 0, 1, 1], gamma=0.5)
    torch.testing.assert_close(adv, scores[:, None] * HOLEY_MASK)  # no baseline, no whitening, no discount
    torch.testing.assert_close(returns, adv)
    from zerosearch.config import ADV_ESTIMATORS

    assert set(ADV_ESTIMATORS) == set(advantage_estimators())  # the config accepts every registered name


def test_gae_hand_computed_with_hole():
    rewards = torch.tensor([[0.0, 5.0, 1.0]])  # reward on the hole must be ignored
    values = torch.tensor([[0.5, 9.0, 0.2]])  # the hole's value must not be bootstrapped
    mask = torch.tensor([[1, 0, 1]])
    adv, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 - 0.2 = 0.8; t=0: delta = 0.9 * 0.2 - 0.5 = -0.32, adv = -0.32 + 0.72 * 0.8
    torch.testing.assert_close(adv, torch.tensor([[0.256, 0.0, 0.8]]))
    torch.testing.assert_close(returns, torch.tensor([[0.756, 0.0, 1.0]]))


def test_gae_matches_loop_on_random_data_with_holes():
    rewards = torch.randn(4, 8, generator=_gen(3), dtype=torch.float64)
    values = torch.randn(4, 8, generator=_gen(4), dtype=torch.float64)
    expected = _loop_gae(rewards, values, HOLEY_MASK, gamma=0.97, lam=0.9)
    adv, returns = gae(rewards, values, HOLEY_MASK, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(returns, torch.where(HOLEY_MASK, expected + values, 0.0))

    white, returns2 = get_advantage_estimator("gae")(rewards, HOLEY_MASK, values=values, gamma=0.97, lam=0.9)
    valid = expected[HOLEY_MASK]
    torch.testing.assert_close(white[HOLEY_MASK], (valid - valid.mean()) / valid.std(), atol=1e-5, rtol=1e-5)
    assert torch.all(white[~HOLEY_MASK] == 0)
    torch.testing.assert_close(returns2, returns)


def test_gae_needs_values():
    with pytest.raises(ValueError, match="values"):
        get_advantage_estimator("gae")(torch.zeros(4, 8), HOLEY_MASK)


def test_masked_reductions_ignore_inf_and_nan_on_masked_positions():
    x = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 5.0, -float("inf")]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert float(masked_mean(x, mask)) == pytest.approx(3.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 5.0]))


def test_masked_whiten_ignores_masked_values():
    x = torch.randn(4, 8, generator=_gen(5), dtype=torch.float64)
    y = x.clone()
    y[~HOLEY_MASK] = 1e6
    torch.testing.assert_close(masked_whiten(x, HOLEY_MASK), masked_whiten(y, HOLEY_MASK))


# --- aggregation --------------------------------------------------------------------------------


def test_agg_modes_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the empty row is left out
    assert float(agg_loss(loss, mask, "token-mean")) == pytest.approx(7 / 3)
    assert float(agg_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx((1.5 + 4.0) / 2)
    assert float(agg_loss(loss, mask, "seq-mean-token-sum")) == pytest.approx((3.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum"):
        agg_loss(loss, mask, "mean")


def test_token_mean_shards_combine_by_token_count():
    loss = torch.randn(4, 8, generator=_gen(6), dtype=torch.float64)
    full = agg_loss(loss, HOLEY_MASK, "token-mean")
    a, b = agg_loss(loss[:1], HOLEY_MASK[:1]), agg_loss(loss[1:], HOLEY_MASK[1:])
    n_a, n_b = HOLEY_MASK[:1].sum(), HOLEY_MASK[1:].sum()
    assert n_a != n_b  # otherwise a plain mean of the shards would agree by accident
    torch.testing.assert_close((a * n_a + b * n_b) / (n_a + n_b), full)
    assert not torch.isclose((a + b) / 2, full)


# --- policy loss --------------------------------------------------------------------------------


def _ratios(*values):
    return torch.log(torch.tensor([values], dtype=torch.float64))


def test_policy_loss_inside_and_outside_clip():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    log_prob = _ratios(1.1, 1.5, 0.5, 1.1).requires_grad_()
    old = torch.zeros_like(log_prob)
    mask = torch.ones_like(adv)
    loss, metrics = policy_loss(log_prob, old, adv, mask, clip_ratio=0.2)
    # per token: -1.1 (inside), -1.2 (clipped at 1.2), 0.8 (clipped at 0.8), 1.1 (inside)
    assert float(loss.detach()) == pytest.approx((-1.1 - 1.2 + 0.8 + 1.1) / 4)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 1.1) / 4)
    k3 = [r - 1 - math.log(r) for r in (1.1, 1.5, 0.5, 1.1)]
    assert metrics["approx_kl"] == pytest.approx(sum(k3) / 4)
    loss.backward()
    # d/dlogp of -A * r is -A * r inside the clip, 0 where clipped
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-1.1, 0.0, 0.0, 1.1]], dtype=torch.float64) / 4)


def test_policy_loss_clip_higher():
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = policy_loss(
        _ratios(1.5, 0.5), torch.zeros(1, 2), adv, torch.ones(1, 2), clip_ratio_low=0.2, clip_ratio_high=0.28
    )
    assert float(loss.detach()) == pytest.approx((-1.28 + 0.8) / 2)


def test_dual_clip_caps_negative_advantage_loss():
    log_prob, old, mask = _ratios(5.0, 5.0), torch.zeros(1, 2), torch.ones(1, 2)
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    plain, _ = policy_loss(log_prob, old, adv, mask, agg="seq-mean-token-sum")
    capped, metrics = policy_loss(log_prob, old, adv, mask, dual_clip_c=3.0, agg="seq-mean-token-sum")
    # A=-1, r=5: plain loss max(5, 1.2) = 5, capped at -A*c = 3; A=+1: max(-5, -1.2) = -1.2 either way
    assert float(plain) == pytest.approx(5.0 - 1.2)
    assert float(capped) == pytest.approx(3.0 - 1.2)
    assert metrics["dual_clip_frac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss(log_prob, old, adv, mask, dual_clip_c=0.5)


@pytest.mark.parametrize("kl_kind", ["k1", "k2", "low_var_kl"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_masked_tokens_cannot_change_loss_or_gradient(agg, kl_kind):
    g = _gen(7)
    log_prob = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.3 - 1.0
    old = log_prob + torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.3
    ref = log_prob + torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(4, 8, generator=g, dtype=torch.float64)

    def run(lp, old_lp, ref_lp, a):
        lp = lp.clone().requires_grad_()
        loss, _ = actor_loss(
            lp, old_lp, ref_lp, a, HOLEY_MASK, kl_coef=0.1, kl_kind=kl_kind, dual_clip_c=3.0, agg=agg
        )
        loss.backward()
        return loss.detach(), lp.grad

    base_loss, base_grad = run(log_prob, old, ref, adv)
    wild = torch.where(HOLEY_MASK, 0.0, 1.0).to(torch.float64)
    garbage = torch.tensor([1e4, float("nan"), -float("inf"), -1e4], dtype=torch.float64).repeat(4, 2)
    wild_lp = torch.where(HOLEY_MASK, log_prob, garbage)
    wild_old = torch.where(HOLEY_MASK, old, torch.tensor(-1e4, dtype=torch.float64))
    wild_ref = torch.where(HOLEY_MASK, ref, torch.tensor(float("nan"), dtype=torch.float64))
    wild_adv = adv + wild * 1e6
    loss, grad = run(wild_lp, wild_old, wild_ref, wild_adv)

    torch.testing.assert_close(loss, base_loss)
    torch.testing.assert_close(grad[HOLEY_MASK], base_grad[HOLEY_MASK])
    assert torch.all(grad[~HOLEY_MASK] == 0)
    assert base_grad[HOLEY_MASK].abs().min() > 0  # every valid token carries gradient


# --- value loss ---------------------------------------------------------------------------------


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 2.0, 50.0]])
    old = torch.tensor([[0.0, 1.8, -50.0]])
    returns = torch.tensor([[1.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, clip_range=0.5)
    # token 0: clipped value 0.5 -> max(0.04, 0.49) = 0.49; token 1: clipped 2.0 -> 4; loss 0.5 * mean
    assert float(loss) == pytest.approx(0.5 * (0.49 + 4.0) / 2)
    assert metrics["vf_clip_frac"] == pytest.approx(0.5)


# --- KL -----------------------------------------------------------------------------------------

LOGP = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)


def test_kl_estimators_hand_values_and_aliases():
    k1 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    k2 = torch.tensor([[0.125, 0.5]], dtype=torch.float64)
    k3 = torch.tensor([[math.exp(-0.5) + 0.5 - 1.0, math.e - 2.0]], dtype=torch.float64)
    for kinds, expected in ((("k1", "kl"), k1), (("k2", "mse"), k2), (("k3", "low_var_kl"), k3)):
        for kind in kinds:
            torch.testing.assert_close(kl_penalty(LOGP, REF, kind), expected)


def test_k3_nonnegative_and_clamped():
    g = _gen(8)
    lp, ref = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
    clamped = kl_penalty(torch.tensor([-30.0, 0.0]), torch.tensor([0.0, -30.0]), "k3")
    assert float(clamped[0]) == 10.0  # exp(30) would explode; clamped to 10
    assert float(clamped[1]) == 10.0  # 30 - 1 = 29 before the clamp


def test_unknown_kl_kind_lists_kinds():
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl, kl, mse"):
        kl_penalty(LOGP, REF, "js")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        actor_loss(LOGP, LOGP, REF, torch.zeros_like(LOGP), torch.ones_like(LOGP), kl_coef=0.0, kl_kind="js")


def test_kl_loss_aggregates_over_valid_tokens():
    mask = torch.tensor([[1, 0]])
    assert float(kl_loss(LOGP, REF, mask, kind="k1")) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["k2", "low_var_kl"])
def test_upstream_bug_kl_penalty_is_added_not_subtracted(kind):
    g = _gen(9)
    log_prob = torch.randn(2, 5, generator=g, dtype=torch.float64) - 1.0
    ref = log_prob + torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.5
    mask = torch.ones(2, 5)
    zero_adv = torch.zeros_like(log_prob)

    losses = [
        float(actor_loss(log_prob, log_prob, ref, zero_adv, mask, kl_coef=c, kl_kind=kind)[0])
        for c in (0.0, 0.1, 1.0)
    ]
    assert losses[0] == 0.0 and losses[0] < losses[1] < losses[2]

    lp = log_prob.clone().requires_grad_()
    loss, metrics = actor_loss(lp, log_prob, ref, zero_adv, mask, kl_coef=1.0, kl_kind=kind)
    loss.backward()
    # gradient descent moves log_prob toward ref: the gradient has the sign of (log_prob - ref)
    assert torch.all(torch.sign(lp.grad) == torch.sign(log_prob - ref))
    stepped = log_prob - 0.1 * lp.grad
    assert torch.all((stepped - ref).abs() < (log_prob - ref).abs())
    assert metrics["kl_loss"] > 0


def test_kl_in_the_reward_subtracts_the_masked_estimate():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    log_prob, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, 0.0, -0.5]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # the retrieved token's KL is not charged
    out, metrics = apply_kl_penalty(rewards, log_prob, ref, mask, kl_coef=0.5, kind="k1")
    assert out[0].tolist() == pytest.approx([-0.25, 0.0, 1.0])
    assert metrics["reward/kl_penalty"] == pytest.approx(0.5)
    k3, _ = apply_kl_penalty(rewards, log_prob, ref, mask, kl_coef=1.0, kind="low_var_kl")
    torch.testing.assert_close(k3, rewards - kl_penalty(log_prob, ref, "low_var_kl") * mask)


# --- entropy ------------------------------------------------------------------------------------


def test_entropy_from_logits():
    logits = torch.randn(2, 3, 7, generator=_gen(10), dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    expected = -(probs * torch.log(probs)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    uniform = entropy_from_logits(torch.full((1, 1, 8), 1e4, dtype=torch.float64))
    torch.testing.assert_close(uniform, torch.full((1, 1), math.log(8), dtype=torch.float64))


def test_entropy_from_logits_gradient_matches_autograd_of_the_definition():
    logits = torch.randn(3, 5, 11, generator=_gen(11), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 5, generator=_gen(12), dtype=torch.float64)
    (entropy_from_logits(logits) * weights).sum().backward()
    ours, logits.grad = logits.grad, None
    log_p = torch.log_softmax(logits, dim=-1)
    (-(log_p.exp() * log_p).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad)
    assert torch.autograd.gradcheck(entropy_from_logits, (logits.detach()[:1, :2].requires_grad_(),))
