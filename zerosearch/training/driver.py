"""The training driver: one loop of named, timed phases.

    sample prompts -> rollout (multi-turn, p_noisy(step)) -> reward -> reference / old log-probs
    -> (values) -> advantages -> update (critic, actor) -> weight sync -> metrics, validation, checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from zerosearch.algos import get_advantage_estimator, kl_penalty, outcome_to_token_rewards
from zerosearch.config import Config, ConfigError, save_config
from zerosearch.curriculum import NoiseCurriculum
from zerosearch.data import PromptSampler
from zerosearch.rewards import retrieval_hit
from zerosearch.rollout.copying import copy_metrics, split_metrics
from zerosearch.rollout.factory import load_samples, start_simulation_servers
from zerosearch.rollout.trajectory import Trajectory
from zerosearch.training import checkpoint, rundir
from zerosearch.training.batch import pad_to_grid
from zerosearch.training.tracking import MemoryMonitor, PhaseTimer, Tracker

logger = logging.getLogger("zerosearch.training")


def run_name(cfg: Config) -> str:
    """`trainer.experiment_name`, or `<algo>-<model>-<mode>-<YYYYmmdd-HHMMSS>`: a new name for every launch."""
    if cfg.trainer.experiment_name:
        return cfg.trainer.experiment_name
    return f"{rundir.base_name(cfg)}-{datetime.now():%Y%m%d-%H%M%S}"


def run_dir_for(cfg: Config) -> Path:
    """The directory of a named run (`trainer.experiment_name`); for an unnamed one, the name a launch now gets."""
    return Path(cfg.trainer.output_dir) / run_name(cfg)


# --- Ray ------------------------------------------------------------------------------------------


def start_ray(cfg: Config, stack: ExitStack):
    """Join `ray.address`, or start a local Ray with every listener on 127.0.0.1 (stopped by us)."""
    if not cfg.ray.address:
        # Read by Ray when it is first imported: a local Ray then uses the loopback address, and every
        # listener (GCS, raylet, workers, object manager) binds 127.0.0.1 instead of all interfaces.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray starts workers at nice 15; ours do the heavy work, so they should not yield to the simulator.
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return ray
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        temp_dir = Path(f"/tmp/zs-ray-{os.getpid()}")
        ray.init(
            num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            num_gpus=cfg.trainer.n_gpus_per_node if torch.cuda.is_available() else 0,
            include_dashboard=False,
            object_store_memory=int(cfg.ray.object_store_gib * 2**30),
            _temp_dir=str(temp_dir),
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )
        stack.callback(lambda: __import__("shutil").rmtree(temp_dir, ignore_errors=True))
    stack.callback(ray.shutdown)
    return ray


def world_size(cfg: Config) -> int:
    """Ranks per worker group: `trainer.world_size`, or one per GPU of the cluster (1 on CPU)."""
    t = cfg.trainer
    if t.world_size:
        return t.world_size
    if torch.cuda.is_available() and t.n_gpus_per_node > 0:
        return t.n_gpus_per_node * t.nnodes
    return 1


class WorkerGroup:
    """The ranks of one worker (actor, reference or critic) behind one handle.

    `call` runs a method on every rank with the same arguments; `scatter` gives rank r the r-th
    argument tuple; `concat` joins the per-rank lists of a `scatter` in rank order.
    """

    def __init__(self, ray, handles: list):
        self.ray, self.handles = ray, handles

    @property
    def world(self) -> int:
        return len(self.handles)

    def call(self, method: str, *args) -> list:
        return self.ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def scatter(self, method: str, per_rank: list[tuple]) -> list:
        return self.ray.get([getattr(h, method).remote(*args) for h, args in zip(self.handles, per_rank)])

    def concat(self, method: str, per_rank: list[tuple]) -> list:
        return [item for part in self.scatter(method, per_rank) for item in part]


def split(n: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of range(n), sizes differing by at most one."""
    bounds = [n * r // parts for r in range(parts + 1)]
    return [slice(bounds[r], bounds[r + 1]) for r in range(parts)]


def _rendezvous_address(multi_node: bool) -> tuple[str, int]:
    """Host and a free port for rank 0's store: this node's address only when ranks span nodes, else loopback."""
    import socket

    host = "" if multi_node else "127.0.0.1"
    with socket.socket() as sock:
        sock.bind((host, 0))
        if not multi_node:
            return "127.0.0.1", sock.getsockname()[1]
        import ray

        return ray.util.get_node_ip_address(), sock.getsockname()[1]


def multi_node(cfg: Config) -> bool:
    """Whether a worker group's ranks may sit on several nodes (`trainer.nnodes` > 1)."""
    return cfg.trainer.nnodes > 1


def start_group(ray, cls, cfg: Config, world: int, share: float, placement, *args) -> WorkerGroup:
    """`world` ranks of `cls`; rank r runs in placement bundle r (its GPU) when there is a placement group.

    `share` is the fraction of a GPU each rank takes: the actor, reference and critic ranks of one bundle
    share its GPU, as veRL's colocated workers do.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from zerosearch.training.workers import DistInfo

    def where(rank: int) -> dict:
        if placement is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank)}

    addr, port, store = "127.0.0.1", 0, ""
    if world > 1 and multi_node(cfg):  # rank 0's node hosts the process group's TCP store
        addr, port = ray.get(ray.remote(num_cpus=0)(_rendezvous_address).options(**where(0)).remote(True))
    elif world > 1:  # one node: a file store, nothing listening on the network (see workers.init_distributed)
        import tempfile
        import uuid

        store = os.path.join(tempfile.gettempdir(), f"zs-rdzv-{uuid.uuid4().hex}")
    gpus = share if placement is not None else 0
    # Fractional CPUs: the workers take turns, and each sets its own torch thread count.
    remote_cls = ray.remote(num_cpus=0.1 if placement is None else 0.01, num_gpus=gpus, max_restarts=0)(cls)
    return WorkerGroup(ray, [remote_cls.options(**where(r)).remote(cfg, *args, DistInfo(r, world, addr, port, store))
                             for r in range(world)])


def gpu_placement(ray, cfg: Config, world: int, stack: ExitStack):
    """One bundle (1 GPU) per rank, packed onto as few nodes as possible; None on CPU."""
    if not (torch.cuda.is_available() and cfg.trainer.n_gpus_per_node > 0):
        return None
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"GPU": 1, "CPU": 1}] * world, strategy="PACK")
    ray.get(pg.ready(), timeout=600)
    stack.callback(remove_placement_group, pg)
    return pg


# --- phases -----------------------------------------------------------------------------------------


def assess(trajs: list[Trajectory], template: str = "") -> tuple[list[dict], list[bool], list[bool]]:
    """Per trajectory: its answer scores (`Trajectory.score`), whether a document the backend returned held a
    gold answer, and whether its answer counts (given, and not a copy of the prompt's worked example)."""
    from zerosearch.rollout.copying import copies_example

    scores = [t.score() for t in trajs]
    hits = [retrieval_hit(t.documents, t.golden_answers) for t in trajs]
    valid = [t.answer is not None and not copies_example(t, template) for t in trajs]
    return scores, hits, valid


def score(trajs: list[Trajectory], metric: str, format_score: float = 0.0, retrieval_score: float = 0.0,
          template: str = "", assessed=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward of each trajectory: F1 or EM of its answer with Search-R1's shaping (`rewards.shaped_reward`):
    an answered trajectory earns at least `format_score`, plus `retrieval_score` when a document the search
    backend returned to it held a gold answer. An answer that copies its prompt's worked example (`template`'s
    `{example}`) earns neither. `assessed`: `assess(trajs, template)` when the caller already has it."""
    from zerosearch.rewards import shaped_reward

    scores, hits, valid = assessed or assess(trajs, template)
    reward = torch.tensor([shaped_reward(s[metric], ok, hit, format_score, retrieval_score)
                           for s, ok, hit in zip(scores, valid, hits)], dtype=torch.float32)  # [B]
    n = max(len(trajs), 1)
    return reward, {
        "reward/mean": float(reward.mean()) if len(trajs) else 0.0,
        "reward/f1": sum(s["f1"] for s in scores) / n,
        "reward/em": sum(s["em"] for s in scores) / n,
        "reward/retrieval_hit": sum(hits) / n,
    }


def compute_advantages(cfg: Config, trajs: list[Trajectory], reward: torch.Tensor, values, ref_lp, old_lp):
    """Token rewards (outcome on the last loss-carrying token; PPO also -kl_coef*KL per token, estimated by
    `algorithm.kl_type`) -> advantages, over each trajectory's `train_mask`."""
    a = cfg.algorithm
    R = max(len(t.response_ids) for t in trajs)
    mask = pad_to_grid([t.train_mask for t in trajs], R)  # [B, R]
    token_rewards = outcome_to_token_rewards(reward, mask)  # [B, R]
    metrics = {}
    if a.use_kl_in_reward and ref_lp is not None and old_lp is not None:
        kl = kl_penalty(pad_to_grid(old_lp, R), pad_to_grid(ref_lp, R), a.kl_type) * mask  # [B, R]
        token_rewards = token_rewards - a.kl_coef * kl
        metrics["reward/kl_penalty"] = float((kl.sum(-1)).mean())
    estimator = get_advantage_estimator(a.adv_estimator)
    group_ids = [t.group for t in trajs]
    vals = pad_to_grid(values, R) if values is not None else None
    adv, returns = estimator(token_rewards, mask, group_ids, vals, gamma=a.gamma, lam=a.lam)
    lengths = [len(t.response_ids) for t in trajs]
    metrics["adv/mean_abs"] = float((adv.abs() * mask).sum() / mask.sum().clamp(min=1))
    return ([adv[b, :n].tolist() for b, n in enumerate(lengths)],
            [returns[b, :n].tolist() for b, n in enumerate(lengths)], metrics)


def search_stats(actor: WorkerGroup) -> dict[str, float]:
    """The search clients' counters, summed over the actor ranks (the peaks: the largest)."""
    out: dict[str, float] = {}
    for stats in actor.call("search_stats"):
        for key, value in stats.items():
            out[key] = max(out.get(key, 0.0), value) if key.startswith("search/max") else out.get(key, 0.0) + value
    return out


_SUMMED = {"rollout/policy_tokens", "rollout/obs_tokens", "rollout/queries", "rollout/gen_tokens_per_s",
           "rollout/search_errors"}


def rollout(actor: WorkerGroup, samples, p_noisy: float, step: int, validate: bool = False, oracle: bool = False):
    """Each actor rank rolls out its contiguous share of the prompts; group ids stay global.

    `validate` searches the real engine, or the training simulator with `oracle` (ActorRolloutWorker.rollout)."""
    from zerosearch.rollout.loop import loop_metrics

    parts = [(samples[sl], sl.start) for sl in split(len(samples), actor.world)]
    busy = [r for r, (part, _) in enumerate(parts) if part]
    results = actor.ray.get([actor.handles[r].rollout.remote(parts[r][0], p_noisy, step, validate, offset=parts[r][1],
                                                             oracle=oracle) for r in busy])
    trajs, per_rank = [], []
    for r, (part_trajs, metrics) in zip(busy, results):
        for t in part_trajs:
            t.group += parts[r][1]
            t.uid = len(trajs)
            trajs.append(t)
        per_rank.append(metrics)
    if len(per_rank) == 1:
        return trajs, per_rank[0]
    merged = {}
    for key in per_rank[0]:
        values = [m[key] for m in per_rank]
        merged[key] = (sum(values) if key in _SUMMED else max(values) if key.endswith("_s") or "/max" in key
                       else sum(values) / len(values))
    merged.update(loop_metrics(trajs))
    return trajs, merged


def validate(actor: WorkerGroup, samples, step: int, cfg: Config, run_dir: str | Path | None = None) -> dict[str, float]:
    """Greedy rollouts on the held-out split, searching what `trainer.val_search` names.

    `val/...`: through the real engine (`search.engine`), as upstream validates. `val_oracle/...`: through
    the training simulator with useful documents (p_noisy = 0), whose prompt holds the gold answer, so the
    policy can copy it: an oracle score, not a held-out number. `reward` is the training reward
    (`reward_metric` with the `format_score` floor); `f1` and `em` are the pure answer scores."""
    out: dict[str, float] = {}
    for prefix, oracle in (("val", False), ("val_oracle", True)):
        if cfg.trainer.val_search not in ("both", "simulator" if oracle else "engine"):
            continue
        trajs, m = rollout(actor, samples, 0.0, step, validate=True, oracle=oracle)
        a = cfg.algorithm
        assessed = assess(trajs, cfg.data.prompt_template)
        _, r = score(trajs, a.reward_metric, a.format_score, a.retrieval_score, assessed=assessed)
        out.update({f"{prefix}/reward": r["reward/mean"], f"{prefix}/f1": r["reward/f1"],
                    f"{prefix}/em": r["reward/em"], f"{prefix}/retrieval_hit": r["reward/retrieval_hit"],
                    f"{prefix}/answer_rate": m["rollout/answer_rate"],
                    f"{prefix}/searches_per_traj": m["rollout/searches_per_traj"]})
        out.update(copy_metrics(trajs, cfg.data.prompt_template, prefix=f"{prefix}_copy"))
        out.update(split_metrics(trajs, assessed[0], assessed[1], prefix))
        if run_dir is not None:
            write_rollouts(Path(run_dir) / "val_rollouts" / f"{prefix}_step_{step}.jsonl", trajs, assessed[0])
    return out


def write_rollouts(path: Path, trajs: list[Trajectory], scores: list[dict] | None = None) -> None:
    """Each trajectory's question, answers, queries, documents and text as one JSON row: what validation saw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(trajs):
            row = {k: v for k, v in t.to_record().items() if k not in ("prompt_ids", "response_ids", "loss_mask")}
            row["f1"] = (scores[i] if scores else t.score())["f1"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- the loop ---------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    """Check everything a user can get wrong (one-line errors, nothing written yet), claim and lock the run
    directory (see `rundir`), then train; the lock is held until the run ends."""
    world = world_size(cfg)  # checked before anything starts
    if (cfg.data.train_batch_size * cfg.rollout.n) % world:
        raise ConfigError(f"data.train_batch_size x rollout.n = {cfg.data.train_batch_size * cfg.rollout.n} "
                          f"trajectories do not split evenly over {world} ranks (trainer.world_size, or one per "
                          "GPU); change the batch size or the world size")
    _check_validation_engine(cfg)
    train_samples = load_samples(cfg, cfg.data.train_split)
    val_samples = load_samples(cfg, cfg.data.test_split)
    if cfg.data.val_size:
        val_samples = val_samples[: cfg.data.val_size]
    check_prompt_lengths(cfg, (cfg.data.train_split, train_samples), (cfg.data.test_split, val_samples))
    plan, lock = rundir.plan_run(cfg)
    try:
        return _train(cfg, plan.run_dir, plan.resume_ckpt, world, train_samples, val_samples)
    finally:
        lock.release()


def warm_started(cfg: Config, run_dir: Path, val_samples) -> Config:
    """With `warmstart.enabled`, the config to train with: the policy (and the reference) start from the
    supervised warm-start in `run_dir/warmstart`, built first unless a finished one is there (a resumed run
    keeps its own). The saved config keeps the model the user named.

    So that the summary can show what the warm-start did apart from RL, the untrained model is first scored
    on the same held-out questions with the same search (`zerosearch eval` in a child process, into
    `run_dir/warmstart/untrained_eval`)."""
    if not cfg.warmstart.enabled:
        return cfg
    from zerosearch.training.warmstart import SUMMARY_FILE

    out = run_dir / "warmstart"
    if (out / SUMMARY_FILE).is_file():
        logger.info("policy warm-started in %s (already built)", out)
    else:
        if cfg.trainer.test_freq != 0 and cfg.trainer.val_search != "simulator":
            _child(run_dir, ["eval", "--config", str(run_dir / "config.yaml"), "--data", str(_heldout_file(val_samples, out)),
                             "--method", "agent", "--output", str(out / "untrained_eval")],
                   out / "untrained_eval.log", "scoring the untrained policy on the held-out questions")
        # a child process as well: the fine-tuning's memory would otherwise stay with the driver all run long
        _child(run_dir, ["warmstart", "--config", str(run_dir / "config.yaml"), "--out", str(out)],
               out / "warmstart.log", "warm-start: supervised demonstrations of the tag format (warmstart.enabled)")
        summary = json.loads((out / SUMMARY_FILE).read_text())
        logger.info("warm-start: %d demonstrations, loss %.3f -> %.3f, %.0f s", summary["demonstrations"],
                    summary["first_loss"] or 0, summary["last_loss"] or 0, summary["wall_s"])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(out)))


def _heldout_file(val_samples, out: Path) -> Path:
    """The held-out questions as a QA file, so that `zerosearch eval` scores exactly these."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "heldout.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": s.question, "golden_answers": list(s.golden_answers),
                                 "data_source": s.data_source}, ensure_ascii=False) + "\n" for s in val_samples)
    return path


def _child(run_dir: Path, args: list[str], log_path: Path, what: str) -> None:
    """`zerosearch ARGS` in a child process (its engines and memory are gone before the workers start)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "zerosearch.cli", *args]
    logger.info("%s: %s (log %s)", what, " ".join(cmd), log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}); see {log_path}")


def check_prompt_lengths(cfg: Config, *splits) -> None:
    """Every prompt fits `data.max_prompt_length` tokens, checked when the data loads (not at a random step)."""
    from transformers import AutoTokenizer

    from zerosearch.data.qa import check_prompt_lengths as check
    from zerosearch.models import resolve_model_path
    from zerosearch.rollout.loop import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
    limit = cfg.data.max_prompt_length
    overhead = len(encode_prompt(tokenizer, [{"role": "user", "content": ""}])) + 8  # template tokens per message

    def count(messages: list[dict]) -> int:
        # A token covers at least one byte (byte-level BPE), so a short prompt needs no tokenizing: keeps the
        # check to seconds on upstream's 170k questions.
        bound = sum(len(m["content"].encode()) + overhead for m in messages)
        return bound if bound <= limit else len(encode_prompt(tokenizer, messages))

    for split, samples in splits:
        check(samples, count, limit, f"data.path={cfg.data.path} split {split!r}")


def _train(cfg: Config, run_dir: Path, resume_ckpt: Path | None, world: int, train_samples, val_samples) -> dict:
    state = checkpoint.load_trainer_state(resume_ckpt) if resume_ckpt else {}
    if state and state.get("world_size", 1) != world:
        raise ConfigError(f"checkpoint {resume_ckpt} was saved by {state.get('world_size', 1)} rank(s) per worker, "
                          f"this run has {world}: its optimizer state is sharded that way. Resume with "
                          f"trainer.world_size={state.get('world_size', 1)} (or as many GPUs)")
    start_step = state.get("step", 0)
    save_config(cfg, run_dir)  # after every check: a refused launch leaves the run's config as it was
    logger.info("run directory %s%s", run_dir, f" (resuming from {resume_ckpt})" if resume_ckpt else "")
    t_start = time.time()  # the wall time reported includes the warm-start stage
    cfg = warm_started(cfg, run_dir, val_samples)

    sampler = PromptSampler(len(train_samples), cfg.data.train_batch_size, cfg.trainer.seed, cfg.data.shuffle)
    s = cfg.search
    curriculum = NoiseCurriculum(s.start_threshold, s.end_threshold, cfg.trainer.total_steps, s.curriculum_base)
    if state:
        sampler.load_state_dict(state["sampler"])
        curriculum.load_state_dict(state["curriculum"])
    history = state.get("history", {"val": []})

    with ExitStack() as stack, MemoryMonitor() as memory:
        ray = start_ray(cfg, stack)
        worker_cfg = _worker_config(cfg, stack, run_dir)
        from zerosearch.training.workers import ActorRolloutWorker, CriticWorker, ReferenceWorker

        resume_arg = str(resume_ckpt) if resume_ckpt else None
        need_ref = (cfg.algorithm.use_kl_loss or cfg.algorithm.use_kl_in_reward) and cfg.algorithm.kl_coef > 0
        need_critic = cfg.algorithm.adv_estimator == "gae"
        placement = gpu_placement(ray, cfg, world, stack)
        share = 1.0 / (1 + need_ref + need_critic)
        actor = start_group(ray, ActorRolloutWorker, worker_cfg, world, share, placement, resume_arg)
        ref = start_group(ray, ReferenceWorker, worker_cfg, world, share, placement) if need_ref else None
        critic = start_group(ray, CriticWorker, worker_cfg, world, share, placement, resume_arg) if need_critic else None
        info = actor.call("info")[0]
        logger.info("actor ready: %d rank(s) on %s (rollout engine started in %.1fs)", world, info["device"],
                    info["engine_start_s"])

        tracker = Tracker(run_dir, cfg.trainer.logger, _plain(cfg), cfg.trainer.project_name, run_dir.name, start_step)
        stack.callback(tracker.close)
        t = cfg.trainer
        if start_step == 0 and t.val_before_train and t.test_freq != 0:
            val = validate(actor, val_samples, 0, cfg, run_dir)
            history["val"].append({"step": 0, **val})
            tracker.log(0, val)
            for prefix, searched in _validation_searches(cfg).items():
                logger.info("validation before training (%s): F1 %.4f EM %.4f", searched, val[f"{prefix}/f1"],
                            val[f"{prefix}/em"])
        bar = tracker.progress(t.total_steps, start_step)
        search_before = search_stats(actor)
        for step in range(start_step + 1, t.total_steps + 1):
            metrics = train_step(cfg, ray, actor, ref, critic, train_samples, sampler, curriculum, step, run_dir)
            search_now = search_stats(actor)
            metrics.update({f"{k}_step": search_now.get(k, 0) - search_before.get(k, 0) for k in
                            ("search/queries", "search/prompt_tokens", "search/completion_tokens",
                             "search/errors", "search/retries")})
            metrics.update({f"{k}_total": v for k, v in search_now.items()
                            if k in ("search/queries", "search/prompt_tokens", "search/completion_tokens")})
            search_before = search_now
            if (t.test_freq > 0 and step % t.test_freq == 0) or (step == t.total_steps and t.test_freq != 0):
                val = validate(actor, val_samples, step, cfg, run_dir)
                history["val"].append({"step": step, **val})
                metrics.update(val)
            metrics["memory/peak_rss_gib"] = memory.peak_gib
            tracker.log(step, metrics)
            if bar is not None:
                bar.update(1)
            if (t.save_freq > 0 and step % t.save_freq == 0) or (step == t.total_steps and t.final_checkpoint):
                wall_so_far = time.time() - t_start + state.get("wall_s", 0.0)
                save_checkpoint(ray, cfg, run_dir, actor, critic, sampler, curriculum, step, history, wall_so_far)
        total_queries = search_stats(actor).get("search/queries", 0.0)
        for group in (actor, ref, critic):
            if group is not None:
                group.call("close")
    wall = time.time() - t_start + state.get("wall_s", 0.0)
    from zerosearch.training.summary import write_summary

    searched = _validation_searches(cfg)
    return write_summary(run_dir, history, steps=cfg.trainer.total_steps, wall_s=wall, peak_rss_gib=memory.peak_gib,
                         simulated_queries=total_queries if cfg.search.mode.startswith("simulate") else 0.0,
                         heldout_search=searched.get("val"), oracle_search=searched.get("val_oracle"))


def _validation_searches(cfg: Config) -> dict[str, str]:
    """Metric prefix -> the search backend validation uses under it, in words (none when it never runs)."""
    from zerosearch.rollout.factory import describe_search

    t = cfg.trainer
    if t.test_freq == 0:
        return {}
    out = {}
    if t.val_search in ("engine", "both"):
        out["val"] = describe_search(cfg, cfg.search.engine)
    if t.val_search in ("simulator", "both"):
        out["val_oracle"] = describe_search(cfg, cfg.search.mode)
    return out


def _check_validation_engine(cfg: Config) -> None:
    """Before anything starts: a Google validation needs its API key (config validation checked the rest)."""
    from zerosearch.search.google import API_KEY_ENV

    if cfg.search.mode == "google" and not os.environ.get(API_KEY_ENV):
        raise ConfigError(f"search.mode=google trains against Google through SerpAPI, which needs {API_KEY_ENV} in "
                          f"the environment (export {API_KEY_ENV}=...); or train against the simulator with "
                          "SEARCH_MODE simulate_prompt")
    if "val" in _validation_searches(cfg) and cfg.search.engine == "google" and not os.environ.get(API_KEY_ENV):
        raise ConfigError(f"search.engine=google: validation searches Google through SerpAPI, which needs {API_KEY_ENV} "
                         f"in the environment (export {API_KEY_ENV}=...); or validate on a local Wikipedia corpus "
                         "with SEARCH_ENGINE wiki and search.corpus=PATH.jsonl (or search.retriever_url=URL), or set "
                         "trainer.test_freq=0")


def train_step(cfg: Config, ray, actor, ref, critic, samples, sampler, curriculum, step: int,
               run_dir: Path | None = None) -> dict[str, float]:
    timer = PhaseTimer()
    t0 = time.perf_counter()
    # Upstream's index (global_steps starts at 1): step k = 1..T trains with p_noisy(k / T), so the last step
    # trains at END_THRESHOLD. The checkpoint after step k saves step k; a resumed run goes on at k + 1.
    curriculum.step = step
    p_noisy = curriculum.probability()
    batch = [samples[i] for i in sampler.next_batch()]
    with timer("gen"):
        trajs, metrics = rollout(actor, batch, p_noisy, step)
    for t in trajs:  # decided once: actor, critic, advantages and metrics all read `t.train_mask`
        t.train_observations = not cfg.algorithm.mask_retrieved_tokens
    with timer("reward"):
        a = cfg.algorithm
        reward, reward_metrics = score(trajs, a.reward_metric, a.format_score, a.retrieval_score,
                                       cfg.data.prompt_template)
    if cfg.trainer.dump_rollouts:
        dump_rollouts((run_dir or run_dir_for(cfg)) / "rollouts" / f"step_{step}.jsonl", trajs, reward)
    shards = split(len(trajs), actor.world)  # equal shares: train() checks that B divides
    parts = [(ray.put(trajs[sl]),) for sl in shards]  # each rank's share, sent once per step

    def per_rank(*lists):  # rank r's share of each per-trajectory list (None stays None)
        return [tuple(x[sl] if x is not None else None for x in lists) for sl in shards]

    a = cfg.actor
    on_policy = a.ppo_epochs == 1 and a.ppo_mini_batch_size >= len(trajs)
    with timer("ref"):
        ref_lp = ref.concat("compute_log_probs", parts) if ref is not None else None
    old_lp = None
    if not on_policy or cfg.algorithm.use_kl_in_reward:
        with timer("old_log_prob"):
            old_lp = actor.concat("compute_log_probs", parts)
    values = None
    if critic is not None:
        with timer("values"):
            values = critic.concat("compute_values", parts)
    with timer("adv"):
        advantages, returns, adv_metrics = compute_advantages(cfg, trajs, reward, values, ref_lp, old_lp)
    if critic is not None:
        with timer("update_critic"):
            metrics.update(_mean(critic.scatter("update", [p + q for p, q in zip(parts, per_rank(returns, values))])))
    with timer("update_actor"):
        kl_ref = ref_lp if cfg.algorithm.use_kl_loss else None
        metrics.update(_mean(actor.scatter("update", [p + q + (step,) for p, q in
                                                      zip(parts, per_rank(advantages, kl_ref, old_lp))])))
    with timer("sync"):
        metrics["timing/weight_push_s"] = max(actor.call("sync_weights"))
    step_s = time.perf_counter() - t0
    metrics.update(reward_metrics)
    metrics.update(copy_metrics(trajs, cfg.data.prompt_template))
    metrics.update(adv_metrics)
    metrics.update(timer.pop())
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    metrics.update(curriculum.metrics() | sampler.metrics())  # p_noisy of this step; data/epoch, epoch progress
    metrics.update({"timing/step_s": step_s, "perf/tokens_per_s": tokens / step_s,
                    "perf/sync_share": metrics["timing/sync_s"] / step_s})
    return metrics


def _mean(per_rank: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}


def dump_rollouts(path: Path, trajs: list[Trajectory], reward: torch.Tensor) -> None:
    """The step's trajectories as text, for reading what the policy did (no token ids)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"group": t.group, "question": t.question, "golden_answers": t.golden_answers,
                                "response_text": t.response_text, "answer": t.answer, "reward": r,
                                "queries": t.queries, "noisy_flags": t.noisy_flags, "documents": t.documents,
                                "finish_reason": t.finish_reason}, ensure_ascii=False) + "\n" for t, r in zip(trajs, reward.tolist()))


def save_checkpoint(ray, cfg, run_dir, actor, critic, sampler, curriculum, step, history, wall_s) -> Path:
    tmp = checkpoint.begin(run_dir, step)
    actor.call("save", str(tmp))
    if critic is not None:
        critic.call("save", str(tmp))
    state = {"step": step, "world_size": actor.world, "sampler": sampler.state_dict(), "curriculum": curriculum.state_dict(),
             "history": history, "wall_s": wall_s, "saved_at": datetime.now().isoformat(timespec="seconds")}
    return checkpoint.commit(run_dir, tmp, step, state, cfg.trainer.keep_last)


def _worker_config(cfg: Config, stack: ExitStack, run_dir: Path) -> Config:
    """Start local simulation servers here in the driver; workers then only connect."""
    from copy import deepcopy

    if cfg.search.mode.startswith("simulate"):
        start_simulation_servers(cfg, stack, run_dir / "logs")
    worker_cfg = deepcopy(cfg)
    worker_cfg.search.start_server = "never"
    return worker_cfg


def _plain(cfg: Config) -> dict:
    return json.loads(json.dumps(asdict(cfg)))
