"""The training driver: one loop of named, timed phases.

    sample prompts -> rollout (multi-turn, p_noisy(step)) -> reward -> reference / old log-probs
    -> (values) -> advantages -> update (critic, actor) -> weight sync -> metrics, validation, checkpoint

Ray and the worker groups are in `group`; the workers' maths in `workers`, `heads` and `zerosearch.algos`;
the reward in `zerosearch.rewards`. Per-token quantities travel between them as [batch, response_len] tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from zerosearch.algos import apply_kl_penalty, get_advantage_estimator, outcome_to_token_rewards
from zerosearch.config import Config, ConfigError, save_config, uses_simulation_server
from zerosearch.curriculum import NoiseCurriculum, curriculum_steps
from zerosearch.data import PromptSampler, load_samples, order_pairs, swapped_samples
from zerosearch.ledger import Ledger, Prices, usage_between
from zerosearch.rewards import answer_reward
from zerosearch.rollout.copying import copy_metrics, position_scores, split_metrics
from zerosearch.rollout.trajectory import Trajectory
from zerosearch.search.base import merge_search_stats
from zerosearch.search.server import start_simulation_servers
from zerosearch.training import checkpoint, rundir
from zerosearch.training.batch import pad_to_grid, response_len, stack_grids
from zerosearch.training.group import WorkerGroup, gpu_placement, split, start_group, start_ray, world_size
from zerosearch.training.preflight import (
    _check_validation_engine,
    _validation_searches,
    check_prompt_lengths,
    warm_started,
)
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


# --- phases -----------------------------------------------------------------------------------------


def assess(trajs: list[Trajectory], metric: str = "f1", format_score: float = 0.0, retrieval_score: float = 0.0,
           template: str = "") -> list[dict]:
    """Per trajectory, `rewards.answer_reward` of its answer: the shaped reward (`score`), F1, EM, and whether a
    document the search backend returned held a gold answer (`retrieval_hit`). An answer that copies its
    prompt's worked example (`template`'s `{example}`) is not valid: it earns neither floor. An answer that
    repeats the question (`copying.repeats_question`) earns nothing: its F1 on a "which of A or B" question is
    the credit for naming both, not for choosing (F1 and EM are still logged as they are). Nor does one that
    names a retrieved document's header instead of its content ("Doc 1", `copying.names_document`)."""
    from zerosearch.rollout.copying import copies_example, names_document, repeats_question

    rows = []
    for t in trajs:
        row = answer_reward(t.answer, t.golden_answers, metric, documents=t.documents, format_score=format_score,
                            retrieval_score=retrieval_score,
                            valid=t.answer is not None and not copies_example(t, template))
        if repeats_question(t) or names_document(t):
            row["score"] = 0.0
        rows.append(row)
    return rows


def score(trajs: list[Trajectory], metric: str, format_score: float = 0.0, retrieval_score: float = 0.0,
          template: str = "", assessed: list[dict] | None = None,
          search_discount: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward of each trajectory [B] (F1 or EM of its answer with Search-R1's shaping, see `assess`, times
    `search_discount` per search it made) and the batch's reward metrics. `assessed`: `assess(trajs, ...)` when
    the caller already has it."""
    rows = assess(trajs, metric, format_score, retrieval_score, template) if assessed is None else assessed
    reward = torch.tensor([row["score"] * search_discount**t.num_searches for row, t in zip(rows, trajs, strict=True)],
                          dtype=torch.float32)  # [B]
    n = max(len(trajs), 1)
    return reward, {
        "reward/mean": float(reward.mean()) if len(trajs) else 0.0,
        "reward/f1": sum(row["f1"] for row in rows) / n,
        "reward/em": sum(row["em"] for row in rows) / n,
        "reward/retrieval_hit": sum(row["retrieval_hit"] for row in rows) / n,
    }


def compute_advantages(cfg: Config, trajs: list[Trajectory], reward: torch.Tensor, values, ref_lp, old_lp):
    """Token rewards (outcome on the last loss-carrying token; PPO also -kl_coef*KL per token, estimated by
    `algorithm.kl_type`) -> `(advantages [B, R], returns [B, R], metrics)`, over each trajectory's `train_mask`.

    `values`, `ref_lp`, `old_lp`: [B, R'] grids or per-trajectory lists (or None)."""
    a = cfg.algorithm
    R = response_len(trajs)
    mask = pad_to_grid([t.train_mask for t in trajs], R)  # [B, R]
    token_rewards = outcome_to_token_rewards(reward, mask)  # [B, R]
    metrics = {}
    if a.use_kl_in_reward and ref_lp is not None and old_lp is not None:
        token_rewards, metrics = apply_kl_penalty(token_rewards, pad_to_grid(old_lp, R), pad_to_grid(ref_lp, R), mask,
                                                  a.kl_coef, a.kl_type)
    estimator = get_advantage_estimator(a.adv_estimator)
    vals = pad_to_grid(values, R) if values is not None else None
    # a trajectory cut short by a failed search is no sample of the policy: alone in its group, its reward of 0
    # does not move its siblings' mean and std (it carries no loss itself, `Trajectory.train_mask`)
    groups = [("error", t.uid) if t.finish_reason == "error" else t.group for t in trajs]
    extra = {"norm_by_std": a.norm_adv_by_std_in_grpo} if a.adv_estimator == "grpo" else {}
    adv, returns = estimator(token_rewards, mask, groups, vals, gamma=a.gamma, lam=a.lam, **extra)  # [B, R] x2
    metrics["adv/mean_abs"] = float((adv.abs() * mask).sum() / mask.sum().clamp(min=1))
    metrics["reward/zero_std_group_share"] = zero_std_group_share(groups, reward)
    metrics.update(search_reward_covariance(groups, reward, [t.num_searches for t in trajs]))
    return adv, returns, metrics


def rewards_differ(rewards: list[float]) -> bool:
    """Whether a group's rewards are not all equal: only then does GRPO give it an advantage to learn from."""
    return bool(rewards) and max(rewards) - min(rewards) > 1e-6


def zero_std_group_share(groups: list, reward: torch.Tensor) -> float:
    """The share of prompt groups (of two or more trajectories) whose rewards are all equal: GRPO gives them no
    advantage, so they teach nothing this step (TRL's `frac_reward_zero_std`)."""
    sized = sized_groups(groups, reward.tolist())
    return sum(not rewards_differ(rs) for rs in sized) / max(len(sized), 1)


def sized_groups(groups: list, values: list) -> list[list]:
    """`values` gathered by prompt group, keeping the groups of two or more (a lone trajectory has no siblings)."""
    by_group: dict = {}
    for g, v in zip(groups, values):
        by_group.setdefault(g, []).append(v)
    return [vs for vs in by_group.values() if len(vs) > 1]


def search_reward_covariance(groups: list, reward: torch.Tensor, searches: list[int]) -> dict[str, float]:
    """Whether this step's rewards favour searching more: within each prompt group (of two or more trajectories),
    the covariance of reward and number of searches, averaged over the groups (`reward/search_cov`: > 0 when the
    trajectories that searched more than their siblings scored more, so a group-relative update pushes towards
    more searches), and the share of groups whose trajectories searched a different number of times
    (`rollout/mixed_search_group_share`: only these can teach how often to search)."""
    sized = sized_groups(groups, list(zip(reward.tolist(), searches)))
    covs = []
    for rs in sized:
        mean_r, mean_s = sum(r for r, _ in rs) / len(rs), sum(s for _, s in rs) / len(rs)
        covs.append(sum((r - mean_r) * (s - mean_s) for r, s in rs) / len(rs))
    n = max(len(sized), 1)
    return {"reward/search_cov": sum(covs) / n,
            "rollout/mixed_search_group_share": sum(len({s for _, s in rs}) > 1 for rs in sized) / n}


def search_stats(actor: WorkerGroup) -> dict[str, float]:
    """The search clients' counters, summed over the actor ranks (the peaks: the largest)."""
    return merge_search_stats(actor.call("search_stats"))


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
        assessed = assess(trajs, a.reward_metric, a.format_score, a.retrieval_score, cfg.data.prompt_template)
        _, r = score(trajs, a.reward_metric, assessed=assessed)
        out.update({f"{prefix}/reward": r["reward/mean"], f"{prefix}/f1": r["reward/f1"],
                    f"{prefix}/em": r["reward/em"], f"{prefix}/retrieval_hit": r["reward/retrieval_hit"],
                    f"{prefix}/answer_rate": m["rollout/answer_rate"],
                    f"{prefix}/searches_per_traj": m["rollout/searches_per_traj"]})
        out.update(copy_metrics(trajs, cfg.data.prompt_template, prefix=f"{prefix}_copy"))
        out.update(split_metrics(trajs, assessed, [row["retrieval_hit"] for row in assessed], prefix))
        if run_dir is not None:
            write_rollouts(Path(run_dir) / "val_rollouts" / f"{prefix}_step_{step}.jsonl", trajs, assessed)
        if cfg.trainer.val_swap_options and not oracle:
            out.update(validate_swapped(actor, samples, trajs, assessed, step, cfg, run_dir))
    return out


def validate_swapped(actor: WorkerGroup, samples, trajs: list[Trajectory], assessed: list[dict], step: int,
                     cfg: Config, run_dir: str | Path | None) -> dict[str, float]:
    """`trainer.val_swap_options`: the "A or B" held-out questions again with their options swapped, in a rollout
    of their own (so `val/...` stays what it is without them). `val/f1_balanced` scores each such question by the
    mean of its two orderings: a policy that answers by position gains nothing on it (`copying.position_scores`).
    `val/last_option_share`, `val_swapped/last_option_share`: the answers naming the last option each way;
    `val/same_option_share`: the pairs answered with the same option both ways (`..._right_share`: and rightly)."""
    swapped = swapped_samples(samples)
    if not swapped:
        return {}
    swapped_trajs, _ = rollout(actor, swapped, 0.0, step, validate=True)
    a = cfg.algorithm
    swapped_assessed = assess(swapped_trajs, a.reward_metric, a.format_score, a.retrieval_score,
                              cfg.data.prompt_template)
    if run_dir is not None:
        write_rollouts(Path(run_dir) / "val_rollouts" / f"val_swapped_step_{step}.jsonl", swapped_trajs,
                       swapped_assessed)

    def rows(ts, scored):
        return [{"question": t.question, "golden_answers": t.golden_answers, "prediction": t.answer, "f1": r["f1"]}
                for t, r in zip(ts, scored)]

    p = position_scores(rows(trajs, assessed), rows(swapped_trajs, swapped_assessed))
    return {"val/f1_balanced": p["f1_balanced"], "val/option_pairs": p["pairs"], "val_swapped/f1": p["f1_swapped"],
            "val/last_option_share": p["last_option_as_written"],
            "val_swapped/last_option_share": p["last_option_swapped"], "val/same_option_share": p["same_option_share"],
            "val/same_option_right_share": p["same_option_right_share"]}


def write_rollouts(path: Path, trajs: list[Trajectory], scores: list[dict] | None = None) -> None:
    """Each trajectory's question, answers, queries, documents and text as one JSON row: what validation saw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(trajs):
            row = {k: v for k, v in t.to_record().items() if k not in ("prompt_ids", "response_ids", "loss_mask")}
            row["f1"] = (scores[i] if scores else t.score())["f1"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- launch -----------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class Workers:
    """A run's worker groups: the actor (with its rollout engines), and the reference and the critic when the
    algorithm uses them."""

    ray: object
    actor: WorkerGroup
    ref: WorkerGroup | None
    critic: WorkerGroup | None

    def close(self) -> None:
        for group in (self.actor, self.ref, self.critic):
            if group is not None:
                group.call("close")


@dataclasses.dataclass
class TrainingRun:
    """What the loop works with: the config, the run directory, the workers, the data and its schedules, and
    the run's validation history, logger, memory monitor and clock."""

    cfg: Config
    run_dir: Path
    workers: Workers
    train_samples: list
    val_samples: list
    sampler: PromptSampler
    curriculum: NoiseCurriculum
    ledger: Ledger
    """What the searches cost: per step in the metrics (`cost/...`), the run's in the summary."""
    history: dict
    tracker: Tracker
    memory: MemoryMonitor
    t_start: float
    wall_before: float
    """Seconds the run had trained before this launch (a resumed run)."""

    def wall_s(self) -> float:
        return time.time() - self.t_start + self.wall_before


def _resume_state(resume_ckpt: Path | None, world: int) -> dict:
    """The trainer state of the checkpoint to resume ({} for a fresh start), which must have `world` ranks."""
    state = checkpoint.load_trainer_state(resume_ckpt) if resume_ckpt else {}
    if state and state.get("world_size", 1) != world:
        raise ConfigError(f"checkpoint {resume_ckpt} was saved by {state.get('world_size', 1)} rank(s) per worker, "
                          f"this run has {world}: its optimizer state is sharded that way. Resume with "
                          f"trainer.world_size={state.get('world_size', 1)} (or as many GPUs)")
    return state


def _schedules(cfg: Config, train_samples: list, state: dict) -> tuple[PromptSampler, NoiseCurriculum]:
    """The prompt order and the noise curriculum, where a resumed run left them."""
    pairs = order_pairs(train_samples) if cfg.data.pair_orders else []
    sampler = PromptSampler(len(train_samples), cfg.data.train_batch_size, cfg.trainer.seed, cfg.data.shuffle,
                            pairs=pairs)
    s = cfg.search
    curriculum = NoiseCurriculum(s.start_threshold, s.end_threshold, curriculum_steps(cfg), s.curriculum_base)
    if state:
        sampler.load_state_dict(state["sampler"])
        curriculum.load_state_dict(state["curriculum"])
    return sampler, curriculum


def start_workers(cfg: Config, stack: ExitStack, run_dir: Path, world: int, resume_ckpt: Path | None) -> Workers:
    """Ray, any local simulation servers, and `world` ranks of each worker the algorithm needs."""
    ray = start_ray(cfg, stack)
    if uses_simulation_server(cfg.search.mode):  # here, once; the workers only connect
        start_simulation_servers(cfg, stack, run_dir / "logs")
    from zerosearch.training.workers import ActorRolloutWorker, CriticWorker, ReferenceWorker

    resume_arg = str(resume_ckpt) if resume_ckpt else None
    need_ref = (cfg.algorithm.use_kl_loss or cfg.algorithm.use_kl_in_reward) and cfg.algorithm.kl_coef > 0
    need_critic = cfg.algorithm.adv_estimator == "gae"
    placement = gpu_placement(ray, cfg, world, stack)
    share = 1.0 / (1 + need_ref + need_critic)
    actor = start_group(ray, ActorRolloutWorker, cfg, world, share, placement, resume_arg)
    ref = start_group(ray, ReferenceWorker, cfg, world, share, placement) if need_ref else None
    critic = start_group(ray, CriticWorker, cfg, world, share, placement, resume_arg) if need_critic else None
    info = actor.call("info")[0]
    logger.info("actor ready: %d rank(s) on %s (rollout engine started in %.1fs)", world, info["device"],
                info["engine_start_s"])
    return Workers(ray, actor, ref, critic)


def _train(cfg: Config, run_dir: Path, resume_ckpt: Path | None, world: int, train_samples, val_samples) -> dict:
    state = _resume_state(resume_ckpt, world)
    start_step = state.get("step", 0)
    save_config(cfg, run_dir)  # after every check: a refused launch leaves the run's config as it was
    logger.info("run directory %s%s", run_dir, f" (resuming from {resume_ckpt})" if resume_ckpt else "")
    t_start = time.time()  # the wall time reported includes the warm-start stage
    cfg = warm_started(cfg, run_dir, val_samples)
    sampler, curriculum = _schedules(cfg, train_samples, state)
    with ExitStack() as stack, MemoryMonitor() as memory:
        workers = start_workers(cfg, stack, run_dir, world, resume_ckpt)
        tracker = Tracker(run_dir, cfg.trainer.logger, _plain(cfg), cfg.trainer.project_name, run_dir.name, start_step)
        stack.callback(tracker.close)
        ledger = Ledger(Prices(cfg.cost.api_usd_per_1k_queries, cfg.cost.simulator_usd_per_hour))
        if "ledger" in state:
            ledger.load_state_dict(state["ledger"])
        run = TrainingRun(cfg, run_dir, workers, train_samples, val_samples, sampler, curriculum, ledger,
                          state.get("history", {"val": []}), tracker, memory, t_start, state.get("wall_s", 0.0))
        if start_step == 0:
            _validate_before_training(run)
        _train_steps(run, start_step)
        workers.close()
    return _summarise(run)


def _validate_before_training(run: TrainingRun) -> None:
    """Step 0's validation (`trainer.val_before_train`): the policy before any update."""
    cfg, t = run.cfg, run.cfg.trainer
    if not (t.val_before_train and t.test_freq != 0):
        return
    val = validate(run.workers.actor, run.val_samples, 0, cfg, run.run_dir)
    run.history["val"].append({"step": 0, **val})
    run.tracker.log(0, val)
    for prefix, searched in _validation_searches(cfg).items():
        logger.info("validation before training (%s): F1 %.4f EM %.4f", searched, val[f"{prefix}/f1"],
                    val[f"{prefix}/em"])


def _train_steps(run: TrainingRun, start_step: int) -> None:
    """Steps `start_step + 1` .. `trainer.total_steps`: train, count the searches, validate and checkpoint when
    due, log."""
    t = run.cfg.trainer
    bar = run.tracker.progress(t.total_steps, start_step)
    search_before = search_stats(run.workers.actor)
    for step in range(start_step + 1, t.total_steps + 1):
        metrics = train_step(run, step)
        search_now = search_stats(run.workers.actor)
        metrics.update(search_step_metrics(search_before, search_now))
        metrics.update(run.ledger.step(usage_between(search_before, search_now)))
        search_before = search_now
        if (t.test_freq > 0 and step % t.test_freq == 0) or (step == t.total_steps and t.test_freq != 0):
            val = validate(run.workers.actor, run.val_samples, step, run.cfg, run.run_dir)
            run.history["val"].append({"step": step, **val})
            metrics.update(val)
        metrics["memory/peak_rss_gib"] = run.memory.peak_gib
        run.tracker.log(step, metrics)
        if bar is not None:
            bar.update(1)
        if (t.save_freq > 0 and step % t.save_freq == 0) or (step == t.total_steps and t.final_checkpoint):
            save_checkpoint(run, step)


def search_step_metrics(before: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """The step's search counts (`..._step`) and the run's totals so far (`..._total`); with hybrid search also
    why queries went to the real engine (`search/hybrid_drawn|low_confidence|refused_step`), and with
    `simulate_self` the time the policy's engine had documents to write (`search/self_search_s_step`)."""
    keys = ["search/queries", "search/prompt_tokens", "search/completion_tokens", "search/errors", "search/retries",
            *sorted(k for k in now if k.startswith("search/hybrid_") or k == "search/self_search_s")]
    out = {f"{k}_step": now.get(k, 0) - before.get(k, 0) for k in keys}
    out.update({f"{k}_total": v for k, v in now.items()
                if k in ("search/queries", "search/prompt_tokens", "search/completion_tokens")})
    return out


def _summarise(run: TrainingRun) -> dict:
    from zerosearch.training.summary import write_summary

    cfg = run.cfg
    searched = _validation_searches(cfg)
    return write_summary(run.run_dir, run.history, steps=cfg.trainer.total_steps, wall_s=run.wall_s(),
                         peak_rss_gib=run.memory.peak_gib,
                         simulated_queries=run.ledger.total.simulated_queries, cost=run.ledger.summary(),
                         heldout_search=searched.get("val"), oracle_search=searched.get("val_oracle"))


# --- one step ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenGrids:
    """One step's per-token [B, R] tensors, in trajectory order (None where the algorithm has no use for one)."""

    ref_lp: torch.Tensor | None = None
    old_lp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def train_step(run: TrainingRun, step: int) -> dict[str, float]:
    cfg, workers = run.cfg, run.workers
    timer = PhaseTimer()
    t0 = time.perf_counter()
    # Upstream's index (global_steps starts at 1): step k = 1..T trains with p_noisy(k / T), so the last step
    # trains at END_THRESHOLD. The checkpoint after step k saves step k; a resumed run goes on at k + 1.
    p_noisy = run.curriculum.at(step)
    trajs, reward, metrics, reward_metrics = sample_groups(run, p_noisy, step, timer)
    if cfg.trainer.dump_rollouts:
        dump_rollouts(run.run_dir / "rollouts" / f"step_{step}.jsonl", trajs, reward)
    shards = split(len(trajs), workers.actor.world)  # equal shares: train() checks that B divides
    parts = [(workers.ray.put(trajs[sl]),) for sl in shards]  # each rank's share, sent once per step
    grids = per_token_inputs(cfg, workers, parts, len(trajs), timer)
    with timer("adv"):
        grids.advantages, grids.returns, adv_metrics = compute_advantages(cfg, trajs, reward, grids.values,
                                                                          grids.ref_lp, grids.old_lp)
    metrics.update(update(cfg, workers, parts, shards, grids, step, timer))
    with timer("sync"):
        metrics["timing/weight_push_s"] = max(workers.actor.call("sync_weights"))
    step_s = time.perf_counter() - t0
    metrics.update(reward_metrics)
    metrics.update(copy_metrics(trajs, cfg.data.prompt_template))
    metrics.update(adv_metrics)
    metrics.update(timer.pop())
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    metrics.update(run.curriculum.metrics() | run.sampler.metrics())  # p_noisy of this step; data/epoch, progress
    metrics.update({"timing/step_s": step_s, "perf/tokens_per_s": tokens / step_s,
                    "perf/sync_share": metrics["timing/sync_s"] / step_s})
    return metrics


def sample_groups(run: TrainingRun, p_noisy: float, step: int, timer: PhaseTimer):
    """Roll out and score a batch of `data.train_batch_size` prompts -> `(trajs, reward [B], rollout metrics,
    reward metrics)`. With `algorithm.filter_groups` (DAPO's dynamic sampling) only groups whose rewards differ
    are kept, and further batches are rolled out, up to `algorithm.max_gen_batches`, until there are
    `train_batch_size` of them; a step that finds too few fills up with the others. The reward metrics are those of
    every trajectory rolled out, so the training curve is not raised by the filter."""
    cfg, a = run.cfg, run.cfg.algorithm
    size = cfg.data.train_batch_size
    rolled: list[Trajectory] = []
    rewards: list[float] = []  # of `rolled`
    kept: list[list[int]] = []  # each group's indices into `rolled`: rewards that differ
    spare: list[list[int]] = []  # and rewards all equal
    metrics: dict[str, float] = {}
    batch_metrics: list[dict[str, float]] = []  # each batch's reward metrics (the batches are the same size)
    for n in range(1, (a.max_gen_batches if a.filter_groups else 1) + 1):
        batch = [run.train_samples[i] for i in run.sampler.next_batch()]
        with timer("gen"):
            trajs, m = rollout(run.workers.actor, batch, p_noisy, step)
        metrics = metrics or m  # the first batch's rollout metrics
        for t in trajs:  # decided once: actor, critic, advantages and metrics all read `t.train_mask`
            t.train_observations = not a.mask_retrieved_tokens
        with timer("reward"):
            reward, reward_metrics = score(trajs, a.reward_metric, a.format_score, a.retrieval_score,
                                           cfg.data.prompt_template, search_discount=a.search_discount)
        if not a.filter_groups:
            return trajs, reward, metrics, reward_metrics
        batch_metrics.append(reward_metrics)
        groups: dict[int, list[int]] = {}
        for k, t in enumerate(trajs):
            groups.setdefault(t.group, []).append(len(rolled) + k)
        rolled += trajs
        rewards += reward.tolist()
        for members in groups.values():  # a trajectory cut short by a failed search is no sample of the policy
            differ = rewards_differ([rewards[i] for i in members if rolled[i].finish_reason != "error"])
            (kept if differ else spare).append(members)
        if len(kept) >= size:
            break
    chosen = (kept + spare)[:size]
    trajs = []
    for g, members in enumerate(chosen):
        for i in members:
            rolled[i].group, rolled[i].uid = g, len(trajs)
            trajs.append(rolled[i])
    reward = torch.tensor([rewards[i] for members in chosen for i in members], dtype=torch.float32)
    reward_metrics = {k: sum(m[k] for m in batch_metrics) / len(batch_metrics) for k in batch_metrics[0]}
    metrics.update({"filter/gen_batches": float(n), "filter/kept_groups": float(min(len(kept), size)),
                    "filter/filled_groups": float(max(size - len(kept), 0)),
                    "filter/differing_share": len(kept) / max(len(kept) + len(spare), 1)})
    return trajs, reward, metrics, reward_metrics


def _gather(group: WorkerGroup, method: str, parts: list[tuple]) -> torch.Tensor:
    """Every rank's [B_r, R_r] grid for its share, as one [B, R] grid in trajectory order."""
    return stack_grids(group.scatter(method, parts))


def per_token_inputs(cfg: Config, workers: Workers, parts: list[tuple], n: int, timer: PhaseTimer) -> TokenGrids:
    """The reference log-probs (for a KL), the old log-probs (off-policy updates, or PPO's KL in the reward) and
    the critic's values, each as one [B, R] grid."""
    grids = TokenGrids()
    a = cfg.actor
    on_policy = a.ppo_epochs == 1 and a.ppo_mini_batch_size >= n
    with timer("ref"):
        grids.ref_lp = _gather(workers.ref, "compute_log_probs", parts) if workers.ref is not None else None
    if not on_policy or cfg.algorithm.use_kl_in_reward:
        with timer("old_log_prob"):
            grids.old_lp = _gather(workers.actor, "compute_log_probs", parts)
    if workers.critic is not None:
        with timer("values"):
            grids.values = _gather(workers.critic, "compute_values", parts)
    return grids


def update(cfg: Config, workers: Workers, parts: list[tuple], shards: list[slice], grids: TokenGrids, step: int,
           timer: PhaseTimer) -> dict[str, float]:
    """The critic's update, then the actor's; each rank gets its share of the grids. Metrics: means over ranks."""

    def per_rank(*tensors):  # rank r's rows of each grid (None stays None)
        return [tuple(x[sl].clone() if x is not None else None for x in tensors) for sl in shards]

    metrics: dict[str, float] = {}
    if workers.critic is not None:
        with timer("update_critic"):
            args = [p + q for p, q in zip(parts, per_rank(grids.returns, grids.values))]
            metrics.update(_mean(workers.critic.scatter("update", args)))
    with timer("update_actor"):
        kl_ref = grids.ref_lp if cfg.algorithm.use_kl_loss else None
        args = [p + q + (step,) for p, q in zip(parts, per_rank(grids.advantages, kl_ref, grids.old_lp))]
        metrics.update(_mean(workers.actor.scatter("update", args)))
    return metrics


def _mean(per_rank: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(m[k] for m in per_rank) / len(per_rank) for k in per_rank[0]}


def save_checkpoint(run: TrainingRun, step: int) -> Path:
    workers, cfg = run.workers, run.cfg
    tmp = checkpoint.begin(run.run_dir, step)
    workers.actor.call("save", str(tmp))
    if workers.critic is not None:
        workers.critic.call("save", str(tmp))
    state = {"step": step, "world_size": workers.actor.world, "sampler": run.sampler.state_dict(),
             "curriculum": run.curriculum.state_dict(), "ledger": run.ledger.state_dict(), "history": run.history, "wall_s": run.wall_s(),
             "saved_at": datetime.now().isoformat(timespec="seconds")}
    return checkpoint.commit(run.run_dir, tmp, step, state, cfg.trainer.keep_last)


def dump_rollouts(path: Path, trajs: list[Trajectory], reward: torch.Tensor) -> None:
    """The step's trajectories as text, for reading what the policy did (no token ids)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"group": t.group, "question": t.question, "golden_answers": t.golden_answers,
                                "response_text": t.response_text, "answer": t.answer, "reward": r,
                                "queries": t.queries, "noisy_flags": t.noisy_flags, "held_flags": t.held_flags,
                                "documents": t.documents, "finish_reason": t.finish_reason}, ensure_ascii=False) + "\n" for t, r in zip(trajs, reward.tolist()))


def _plain(cfg: Config) -> dict:
    return json.loads(json.dumps(asdict(cfg)))
