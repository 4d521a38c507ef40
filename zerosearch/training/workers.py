"""Workers the driver runs as Ray actors: actor+rollout, reference, critic.

Each is a plain class (testable without Ray); the driver wraps it with `ray.remote`. On CPU each
holds its model in fp32 in one process; on GPU it runs on the GPU Ray assigned it.

With `trainer.world_size` > 1 the driver starts that many ranks of each worker (see `distributed`); each rank
works on its share of the batch, and every actor rank has its own rollout engine and receives the full weights
after each update. FSDP's collectives need every rank to run the same number of forward passes, so a rank with
fewer micro-batches than the others repeats one with zero weight.

Per-token quantities (log-probs, values, advantages, returns) travel as float32 [batch, response_len] tensors,
0 where a token carries no loss; `heads` computes them only at the loss-carrying tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from zerosearch.algos import actor_loss, agg_loss, value_loss
from zerosearch.config import Config
from zerosearch.dtypes import torch_dtype
from zerosearch.models import resolve_model_path
from zerosearch.rollout.factory import train_sampling, val_sampling
from zerosearch.rollout.loop import loop_metrics
from zerosearch.rollout.stack import build_rollout_stack
from zerosearch.rollout.trajectory import Trajectory
from zerosearch.training.batch import (
    Batch,
    SharedLayout,
    collate,
    loss_totals,
    loss_weight,
    micro_batches,
    pad_to_grid,
    response_len,
    row_lengths,
)
from zerosearch.training.distributed import (
    DistInfo,
    full_tensor,
    init_distributed,
    pick_device,
    release_memory,
    setup_threads,
    shard_fsdp,
)
from zerosearch.training.heads import (
    TokenLogProbs,
    TokenValues,
    logprob_temperature,
    token_logprobs,
    token_values,
)
from zerosearch.training.optim import (
    load_rank_state,
    load_tensors,
    optimizer_state_to_local,
    restore_optimizer,
    state_file,
    warmup_scheduler,
)

LossFn = Callable[[Batch, list[int]], tuple[torch.Tensor, dict[str, float]]]
"""`(micro-batch, its rows in the update's trajectories) -> (loss aggregated over its own tokens, metrics)`."""


def _sdpa_fp32(module, query, key, value, attention_mask, shared_layout: SharedLayout | None = None, **kwargs):
    """transformers' SDPA attention with autocast off and q, k, v in fp32; the output back in the input dtype.

    With `shared_layout` (shared prompts, `batch.SharedLayout`), only what the mask lets through is computed: the
    prompts among themselves, then each response against its prompt and itself, gathered out of the rows, and the
    outputs put back in place. The [G, 1, L, L] mask would give the same, at the cost of attending every row's
    responses to one another."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()  # [G, H, L, D], k and v with fewer heads
        if shared_layout is None:
            out, weights = sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)
            return out.to(query.dtype), weights
        lay = shared_layout
        Pw, rows = lay.prompt_width, lay.rows[:, None]  # [B, 1]
        out_p, _ = sdpa_attention_forward(module, q[:, :, :Pw], k[:, :, :Pw], v[:, :, :Pw], lay.prompt_mask,
                                          **kwargs)  # [G, Pw, H, D]
        # indexing [rows, :, pos] puts the indexed dimensions first: [B, R, H, D] -> [B, H, R, D]
        qr = q[rows, :, lay.q_pos].transpose(1, 2)
        kr, vr = (t[rows, :, lay.kv_pos].transpose(1, 2) for t in (k, v))  # [B, h, Pw + R, D]
        out_r, _ = sdpa_attention_forward(module, qr, kr, vr, lay.resp_mask, **kwargs)  # [B, R, H, D]
        G, H, L, D = q.shape
        out = torch.cat([out_p, out_p.new_zeros((G, L - Pw, H, D))], 1)  # [G, L, H, D]
        b, j = lay.valid.nonzero(as_tuple=True)
        out = out.index_put((lay.rows[b], lay.q_pos[b, j]), out_r[b, j])
    return out.to(query.dtype), None


def load_causal_lm(path: str, dtype: str, device: torch.device, gradient_checkpointing: bool = False,
                   attn_implementation: str = "sdpa"):
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
    from transformers.masking_utils import sdpa_mask

    if attn_implementation == "sdpa_fp32":  # SDPA's masks too: a name without a mask function gets no mask at all
        AttentionInterface.register("sdpa_fp32", _sdpa_fp32)
        AttentionMaskInterface.register("sdpa_fp32", sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                 attn_implementation=attn_implementation).to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def sliding_window(config) -> int | None:
    """The attention window of a model's sliding-window layers, or None when it has none."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if "sliding_attention" in types else None
    return window if getattr(config, "use_sliding_window", True) else None


def check_shared_prompts(config, max_total_length: int) -> None:
    """Shared-prompt rows hand the model their own 4D mask, and `sdpa_fp32` its own layout: neither knows a
    sliding window, so a trajectory longer than the window would get other log-probs than the rollout engine's."""
    window = sliding_window(config)
    if window is not None and window < max_total_length:
        raise ValueError(
            f"actor.share_prompts: the model attends over a sliding window of {window} tokens, shorter than "
            f"rollout.max_total_length={max_total_length}, and shared-prompt rows do not apply it; set "
            f"actor.share_prompts=false or rollout.max_total_length<={window}"
        )


def _rows(grid: torch.Tensor | None, rows: list[int], R: int, device) -> torch.Tensor | None:
    """The micro-batch's rows of an update's [B, R'] grid, as [len(rows), R] on `device` (None stays None)."""
    return None if grid is None else pad_to_grid(grid[rows], R).to(device)


@dataclasses.dataclass
class UpdateStats:
    """What one update did: metric sums over its real micro-batches, each optimizer step's gradient norm
    (before clipping), the learning rate it trained at, and its forward and backward seconds."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    count: int = 0
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    lr: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def means(self, prefix: str) -> dict[str, float]:
        """`prefix/metric`: each metric's mean over the real micro-batches."""
        return {f"{prefix}/{k}": v / max(self.count, 1) for k, v in self.sums.items()}


class _ModelWorker:
    """Shared by the actor, the reference and the critic: a causal LM and batched per-token computation."""

    def __init__(self, cfg: Config, model_path: str | None = None, dist_info: DistInfo | None = None,
                 dtype: str | None = None):
        setup_threads()
        self.cfg = cfg
        self.device = pick_device(cfg)
        self.dist = dist_info or DistInfo()
        init_distributed(self.dist, self.device)
        self.path = resolve_model_path(model_path or cfg.model.path)
        self.model = load_causal_lm(self.path, dtype or cfg.model.dtype, self.device, cfg.model.gradient_checkpointing,
                                    cfg.model.attn_implementation)
        if cfg.actor.share_prompts:
            check_shared_prompts(self.model.config, cfg.rollout.max_total_length)
        self.net = self._build_net().to(self.device)
        self.autocast = torch_dtype(cfg.model.autocast_dtype) if cfg.model.autocast_dtype else None
        if self.dist.world > 1:
            shard_fsdp(self.net, self.model, self.device, self.autocast if cfg.model.fsdp_mixed_precision else None)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.temperature = logprob_temperature(cfg)

    def _micro(self, trajs: list[Trajectory]) -> list[list[int]]:
        """Micro-batches of `trajs` (indices), by the rows `collate` makes of them: with shared prompts a group's
        trajectories stay in one micro-batch."""
        a = self.cfg.actor
        rows, lengths = row_lengths(trajs, a.share_prompts)
        return [[i for r in mb for i in rows[r]] for mb in micro_batches(lengths, a.micro_batch_tokens,
                                                                         a.micro_batch_size)]

    def _collate(self, trajs: list[Trajectory]) -> Batch:
        return collate(trajs, self.pad_id, self.cfg.actor.share_prompts)

    def _build_net(self) -> torch.nn.Module:
        return TokenLogProbs(self.model)

    def _rounds(self, n: int, op: str = "max") -> int:
        """`n` agreed over the group: the largest (or the sum) of every rank's `n`. Collective."""
        if self.dist.world <= 1:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return int(t.item())

    def _plan(self, trajs: list[Trajectory]) -> list[tuple[list[int], bool]]:
        """`(micro-batch, real)` pairs: the micro-batches, then repeats of a one-trajectory one (`real`
        False, to be given zero weight) up to the group's largest count, so FSDP's collectives stay in step."""
        plan = self._micro(trajs)
        return [(idx, True) for idx in plan] + [(plan[0][:1], False)] * (self._rounds(len(plan)) - len(plan))

    def _weighted(self, trajs: list[Trajectory], agg: str) -> Iterator[tuple[list[int], Batch, float, bool]]:
        """One mini-batch's `_plan`, collated, as `(micro-batch, batch, weight, real)`. `weight` scales the
        micro-batch's loss (aggregated by `agg` over its own tokens) to its share of the mini-batch's loss
        over every rank (`batch.loss_weight`), times the world size because FSDP averages the ranks'
        gradients; 0 for a repeat. The actor and the critic weight their losses with it. Collective."""
        tokens, sequences = loss_totals(trajs)
        tokens, sequences = self._rounds(tokens, "sum"), self._rounds(sequences, "sum")
        for idx, real in self._plan(trajs):
            batch = self._collate([trajs[i] for i in idx])
            weight = loss_weight(batch.train_mask, tokens, sequences, agg) * self.dist.world if real else 0.0
            yield idx, batch, weight, real

    @torch.no_grad()
    def per_token(self, trajs: list[Trajectory], fn: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """`fn(batch) -> [b, r]` over length-sorted micro-batches, gathered into one [B, R] grid in the order of
        `trajs` (R: their longest response; 0 where `fn` gives 0, and past each response)."""
        self.net.eval()
        out = torch.zeros((len(trajs), response_len(trajs)), dtype=torch.float32)  # [B, R]
        for idx, real in self._plan(trajs):
            batch = self._collate([trajs[i] for i in idx])
            grid = fn(batch)  # [b, r]
            if real:
                out[idx] = pad_to_grid(grid.cpu(), out.shape[1])
        release_memory()
        return out

    def compute_log_probs(self, trajs: list[Trajectory]) -> torch.Tensor:
        """Per-response-token log-probs at the sampling temperature, [B, R] (0 where no loss)."""
        return self.per_token(trajs, lambda batch: token_logprobs(
            self.net, batch, batch.train_mask.bool(), self.device, autocast=self.autocast,
            temperature=self.temperature)[0])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF model's whole state dict (gathered from the shards under FSDP). Collective."""
        return {name: full_tensor(t).detach() for name, t in self.model.state_dict().items()}

    def _save_model(self, directory: Path) -> None:
        state = self.full_state_dict()
        if self.dist.rank == 0:
            self.model.save_pretrained(directory, state_dict=state, safe_serialization=True)

    def close(self) -> None:
        import torch.distributed as dist

        if self.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class ReferenceWorker(_ModelWorker):
    """The frozen reference policy for the KL term."""

    def __init__(self, cfg: Config, dist_info: DistInfo | None = None):
        super().__init__(cfg, dist_info=dist_info, dtype=cfg.model.ref_dtype or None)
        self.model.requires_grad_(False)


class _TrainedWorker(_ModelWorker):
    """A worker with an optimizer and a scheduler (`self.optimizer`, `self.scheduler`): the actor and the critic."""

    def _init_optimizer(self, lr: float, weight_decay: float, warmup_ratio: float) -> None:
        """AdamW over the worker's weights (fp32: `model.dtype`), with the warm-up schedule."""
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
        self.scheduler = warmup_scheduler(self.optimizer, warmup_ratio, self.cfg.trainer.total_steps)

    def _optimize(self, trajs: list[Trajectory], loss_fn: LossFn, *, epochs: int, mini: int, agg: str,
                  grad_clip: float, gen: torch.Generator | None = None) -> UpdateStats:
        """`epochs` passes over `trajs` in mini-batches of `mini`, one optimizer step each, the gradients
        accumulated over its micro-batches (`_accumulate`) and clipped to `grad_clip`. With `gen` the order is
        shuffled when there is more than one pass or mini-batch; without, it is the given one. Afterwards no
        gradients are held through the next rollout, the scheduler steps once and memory goes back to the OS."""
        self.net.train()
        B = len(trajs)
        stats = UpdateStats(lr=self.scheduler.get_last_lr()[0])  # the rate this step trains at
        for _ in range(epochs):
            shuffle = gen is not None and (epochs > 1 or mini < B)
            order = torch.randperm(B, generator=gen).tolist() if shuffle else list(range(B))
            for start in range(0, B, mini):
                self.optimizer.zero_grad(set_to_none=True)
                self._accumulate(trajs, order[start: start + mini], loss_fn, agg, stats)
                norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), grad_clip)
                stats.grad_norms.append(float(full_tensor(norm)))
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        release_memory()
        return stats

    def _accumulate(self, trajs: list[Trajectory], sub: list[int], loss_fn: LossFn, agg: str,
                    stats: UpdateStats) -> None:
        """Backward of the mini-batch `sub` (indices into `trajs`), micro-batch by micro-batch, each loss times
        its `_weighted` weight; the real micro-batches' metrics go into `stats`."""
        for idx, batch, weight, real in self._weighted([trajs[i] for i in sub], agg):
            t0 = time.perf_counter()
            loss, m = loss_fn(batch, [sub[i] for i in idx])
            t1 = time.perf_counter()
            (loss * weight).backward()  # weight 0: a repeat that keeps FSDP's collectives in step
            stats.forward_s += t1 - t0
            stats.backward_s += time.perf_counter() - t1
            if real:
                stats.add(m)

    def _save_state(self, ckpt: Path, role: str, **extra) -> None:
        torch.save({"optimizer": optimizer_state_to_local(self.optimizer), "scheduler": self.scheduler.state_dict(),
                    **extra, "world": self.dist.world}, ckpt / state_file(role, self.dist))


class ActorRolloutWorker(_TrainedWorker):
    """The policy being trained, with the colocated rollout engine that receives its weights."""

    def __init__(self, cfg: Config, resume_dir: str | None = None, dist_info: DistInfo | None = None):
        super().__init__(cfg, model_path=str(Path(resume_dir) / "actor") if resume_dir else None, dist_info=dist_info)
        a = cfg.actor
        self._init_optimizer(a.lr, a.weight_decay, a.lr_warmup_steps_ratio)
        if resume_dir:
            self._load_state(Path(resume_dir))
        # engine, then search backend, then loops, in the one order that works (rollout/stack.py); a client
        # only: the driver started any simulation servers. Validation searches the real engine (search.engine),
        # as upstream: the simulator's useful prompt holds the gold answer. Every rank builds its own.
        validate = cfg.trainer.test_freq != 0 and cfg.trainer.val_search != "simulator"
        self.rollout_stack = build_rollout_stack(cfg, model_path=self.path, start_servers=False,
                                                 val_mode=cfg.search.engine if validate else None)
        self.engine, self.search = self.rollout_stack.engine, self.rollout_stack.search
        self.loop, self.val_loop = self.rollout_stack.loop, self.rollout_stack.val_loop
        self.engine_start_s = self.rollout_stack.timings_s["start_engine_s"]

    # --- rollout ---------------------------------------------------------------------------

    def rollout(self, samples, p_noisy: float, step: int, validate: bool = False,
                offset: int = 0, oracle: bool = False) -> tuple[list[Trajectory], dict]:
        """`offset`: the batch-wide index of this rank's first prompt (its noise draws follow from it).

        `validate`: greedy, one rollout per prompt, searching the real engine (`search.engine`); with
        `oracle` too, searching the training simulator instead."""
        cfg = self.cfg
        loop = self.loop
        if validate and not oracle:
            if self.val_loop is None:
                raise RuntimeError("validation through search.engine was not set up: trainer.test_freq is 0 or "
                                   "trainer.val_search is 'simulator'")
            loop = self.val_loop
        base = val_sampling(cfg) if validate else train_sampling(cfg)
        sampling = dataclasses.replace(base, seed=cfg.trainer.seed * 1_000_003 + step * 7919 + (1 if validate else 0))
        n = 1 if validate else cfg.rollout.n
        trajs, stats = loop.run(samples, n, sampling, p_noisy, noise_seed=cfg.trainer.seed * 100_003 + step,
                                uid_offset=offset * n)
        metrics = {**loop_metrics(trajs), **stats.metrics()}
        return trajs, metrics

    def search_stats(self) -> dict[str, float]:
        return self.search.stats()

    def sync_weights(self) -> float:
        """Push the trained weights into the rollout engine in place; returns seconds."""
        t0 = time.perf_counter()
        self.engine.load_weights((name, full_tensor(p).detach()) for name, p in self.model.named_parameters())
        return time.perf_counter() - t0

    # --- update ----------------------------------------------------------------------------

    def update(self, trajs: list[Trajectory], advantages: torch.Tensor, ref_logprobs: torch.Tensor | None,
               old_logprobs: torch.Tensor | None, step: int) -> dict[str, float]:
        """PPO-clip epochs over mini-batches; gradient accumulation over length-sorted micro-batches.

        The per-token inputs are [B, R] grids (or one list per trajectory), 0 where no loss; without
        `old_logprobs` the update is on-policy, without `ref_logprobs` there is no KL loss."""
        a = self.cfg.actor
        R = response_len(trajs)
        adv, ref, old = (None if x is None else pad_to_grid(x, R) for x in (advantages, ref_logprobs, old_logprobs))

        def loss(batch: Batch, rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            r = batch.response_ids.shape[1]
            return self._policy_loss(batch, _rows(adv, rows, r, self.device), _rows(ref, rows, r, self.device),
                                     _rows(old, rows, r, self.device))

        # each rank takes its share of every mini-batch; FSDP averages the gradients over the ranks
        mini = min(max(a.ppo_mini_batch_size // self.dist.world, 1), len(trajs))
        stats = self._optimize(trajs, loss, epochs=a.ppo_epochs, mini=mini, agg=a.loss_agg_mode, grad_clip=a.grad_clip,
                               gen=torch.Generator().manual_seed(self.cfg.trainer.seed + step))
        out = stats.means("actor")
        out.update({"actor/grad_norm": sum(stats.grad_norms) / len(stats.grad_norms), "actor/lr": stats.lr,
                    "timing/actor_forward_s": stats.forward_s, "timing/actor_backward_s": stats.backward_s})
        return out

    def _policy_loss(self, batch: Batch, adv: torch.Tensor, ref: torch.Tensor | None,
                     old: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's actor loss, aggregated over its own loss-carrying tokens: PPO-clip, + KL to the
        reference, - `entropy_coeff` x entropy. `adv`, `ref`, `old`: its [B, R] grids on the device; without
        `old` the update is on-policy (old = the current log-probs, detached)."""
        cfg, a = self.cfg, self.cfg.actor
        bonus = a.entropy_coeff > 0  # else the entropy is only a metric, and not worth a graph
        lp, ent = token_logprobs(self.net, batch, batch.train_mask.bool(), self.device, with_entropy=True,
                                 autocast=self.autocast, temperature=self.temperature, entropy_grad=bonus)  # [B, R] x2
        mask = batch.train_mask.to(self.device)  # [B, R]
        use_kl = cfg.algorithm.use_kl_loss and ref is not None
        loss, m = actor_loss(
            lp, old if old is not None else lp.detach(), ref if ref is not None else lp.detach(), adv, mask,
            kl_coef=cfg.algorithm.kl_coef if use_kl else 0.0, kl_kind=cfg.algorithm.kl_type, clip_ratio=a.clip_ratio,
            clip_ratio_low=None if a.clip_ratio_low < 0 else a.clip_ratio_low,
            clip_ratio_high=None if a.clip_ratio_high < 0 else a.clip_ratio_high,
            dual_clip_c=a.dual_clip_c or None, agg=a.loss_agg_mode,
        )
        entropy = agg_loss(ent, mask, a.loss_agg_mode)
        if bonus:
            loss = loss - a.entropy_coeff * entropy
        m["entropy"] = float(entropy.detach())
        return loss, m

    # --- checkpoints -----------------------------------------------------------------------

    def save(self, ckpt_dir: str) -> None:
        ckpt = Path(ckpt_dir)
        self._save_model(ckpt / "actor")
        if self.dist.rank == 0:
            self.tokenizer.save_pretrained(ckpt / "actor")
        self._save_state(ckpt, "actor", torch_rng=torch.get_rng_state())

    def _load_state(self, ckpt: Path) -> None:
        state = load_rank_state(ckpt, "actor", self.dist)
        restore_optimizer(self.optimizer, self.scheduler, state, self.cfg.actor.lr, "actor.lr")
        torch.set_rng_state(state["torch_rng"])

    def info(self) -> dict:
        return {"engine_start_s": self.engine_start_s, "model_path": self.path, "device": str(self.device)}

    def close(self) -> None:
        self.rollout_stack.close()
        super().close()



class CriticWorker(_TrainedWorker):
    """PPO's value model: the policy's transformer with a scalar head, values on the [B, R] grid."""

    def __init__(self, cfg: Config, resume_dir: str | None = None, dist_info: DistInfo | None = None):
        c = cfg.critic
        path = str(Path(resume_dir) / "critic") if resume_dir else (c.model_path or None)
        self._head_state = None
        if resume_dir:  # the value head is restored before FSDP shards it
            self._head_state = load_tensors(Path(resume_dir) / "critic_value_head.pt")
        super().__init__(cfg, model_path=path, dist_info=dist_info)
        # an untied vocabulary head gets no gradient here, and AdamW skips it
        self._init_optimizer(c.lr, c.weight_decay, c.lr_warmup_steps_ratio)
        if resume_dir:
            state = load_rank_state(Path(resume_dir), "critic", self.dist)
            restore_optimizer(self.optimizer, self.scheduler, state, c.lr, "critic.lr")

    def _build_net(self):
        net = TokenValues(self.model)
        if self._head_state is not None:
            net.value_head.load_state_dict(self._head_state)
        return net

    def _values(self, batch: Batch) -> torch.Tensor:
        return token_values(self.net, batch, batch.train_mask.bool(), self.device, self.autocast)  # [B, R]

    def compute_values(self, trajs: list[Trajectory]) -> torch.Tensor:
        """Per-response-token values, [B, R] (0 where no loss)."""
        return self.per_token(trajs, self._values)

    def update(self, trajs: list[Trajectory], returns: torch.Tensor, old_values: torch.Tensor) -> dict[str, float]:
        """`critic.ppo_epochs` passes over the whole batch (one optimizer step each) of the clipped value loss,
        token-mean. `returns`, `old_values`: [B, R] grids (or one list per trajectory)."""
        c = self.cfg.critic
        R = response_len(trajs)
        ret, old = pad_to_grid(returns, R), pad_to_grid(old_values, R)

        def loss(batch: Batch, rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            r = batch.response_ids.shape[1]
            v = self._values(batch)  # [B, R]
            return value_loss(v, _rows(old, rows, r, self.device), _rows(ret, rows, r, self.device),
                              batch.train_mask.to(self.device), clip_range=c.cliprange_value, agg="token-mean")

        stats = self._optimize(trajs, loss, epochs=c.ppo_epochs, mini=max(len(trajs), 1), agg="token-mean",
                               grad_clip=c.grad_clip)
        return stats.means("critic")

    def save(self, ckpt_dir: str) -> None:
        ckpt = Path(ckpt_dir)
        self._save_model(ckpt / "critic")
        head = {k: full_tensor(v).detach() for k, v in self.net.value_head.state_dict().items()}
        if self.dist.rank == 0:
            self.tokenizer.save_pretrained(ckpt / "critic")  # a resumed critic loads from this folder
            torch.save(head, ckpt / "critic_value_head.pt")
        self._save_state(ckpt, "critic")
