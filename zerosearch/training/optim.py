"""Optimizer state across checkpoints: per-rank files, safe loading, FSDP shards <-> plain tensors, the
configured learning rate over a checkpoint's, and the warm-up schedule."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from zerosearch.training.distributed import DistInfo

logger = logging.getLogger("zerosearch.training")


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

