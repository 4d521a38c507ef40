"""Run directories that never clobber each other.

* Every launch gets its own directory, `<algo>-<model>-<mode>-<YYYYmmdd-HHMMSS>` under `trainer.output_dir`,
  unless `trainer.experiment_name` names one; only a named run (or `trainer.resume=PATH`) is ever resumed.
* While a run trains it holds an exclusive `fcntl` lock on `<run_dir>/.lock`: a second process for the same
  directory is refused (the lock goes with the process, even after SIGKILL).
* `trainer.resume=auto` resumes the newest checkpoint only when the directory's saved `config.yaml` matches
  this launch in every field that shapes training; otherwise it stops and lists the differing fields.
* `trainer.resume=never` refuses a directory that already holds a run instead of overwriting it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from omegaconf import OmegaConf

from zerosearch.config import Config, ConfigError
from zerosearch.training import checkpoint

logger = logging.getLogger("zerosearch.training")

LOCK_FILE = ".lock"
# Fields that may change between a run and its resume: where things run and how often they are logged, saved
# or validated, not what is trained. (`trainer.world_size` has its own check against the checkpoint.)
RESUMABLE_CHANGES = (
    "trainer.resume", "trainer.logger", "trainer.save_freq", "trainer.keep_last", "trainer.test_freq",
    "trainer.val_before_train", "trainer.dump_rollouts", "trainer.final_checkpoint", "trainer.output_dir",
    "trainer.world_size", "trainer.n_gpus_per_node", "trainer.nnodes", "trainer.device", "data.val_size",
    "search.ip", "search.start_server", "search.server_engine", "search.server_kv_cache_gib",
    "search.server_startup_timeout_s", "search.timeout_s", "search.max_retries", "search.concurrency",
    "search.max_error_share",
    "rollout.gpu_memory_utilization", "rollout.cpu_kv_cache_gib", "rollout.tensor_parallel_size",
    "rollout.enforce_eager", "ray.",
)


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked; one line, exit status 2."""


def base_name(cfg: Config) -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.model.path.rstrip("/")).name)
    return f"{cfg.algorithm.adv_estimator}-{model}-{cfg.search.mode}"


def checkpoint_run_dir(ckpt: Path) -> Path | None:
    """The run directory a checkpoint `<run>/checkpoints/step_N` belongs to (None for a loose folder)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def resolve_resume_path(value: str) -> Path:
    """`trainer.resume=PATH`: a checkpoint folder, or a run directory (its newest checkpoint)."""
    path = Path(value)
    if (path / "trainer_state.json").is_file():
        return path
    latest = checkpoint.latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise RunDirError(f"trainer.resume={value} is neither a checkpoint (no trainer_state.json) nor a run "
                          "directory with checkpoints/step_N; point it at one, or use trainer.resume=auto|never")
    return latest


def flat(node: Any) -> dict[str, Any]:
    """`section.field` -> value of a Config or of a saved config.yaml."""
    tree = OmegaConf.to_container(OmegaConf.structured(node) if isinstance(node, Config) else node)
    return {f"{section}.{key}": value for section, fields in tree.items() if isinstance(fields, dict)
            for key, value in fields.items()}


def config_differences(saved_yaml: Path, cfg: Config) -> list[str]:
    """`field: saved -> now` for each training-relevant field where `cfg` differs from the saved config."""
    saved, now, defaults = flat(OmegaConf.load(saved_yaml)), flat(cfg), flat(Config())
    out = []
    for key in sorted(now):  # a field the saved file lacks (added since) had its default then
        before = saved.get(key, defaults.get(key))
        if key.startswith(RESUMABLE_CHANGES) or before == now[key]:
            continue
        out.append(f"{key}: {before!r} -> {now[key]!r}")
    return out


@dataclass
class RunPlan:
    """Where a launch writes, and the checkpoint it resumes from (None: a fresh start)."""

    run_dir: Path
    resume_ckpt: Path | None


def _holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() or bool(checkpoint.list_checkpoints(run_dir))


class RunLock:
    """An exclusive lock on `<run_dir>/.lock`, held while the run trains; released when the process ends."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another training process (pid {holder}); wait for it "
                "to finish, or start a separate run with another trainer.experiment_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        os.set_inheritable(fd, False)  # a child (simulator, Ray) must not keep the lock after we die
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_new_dir(parent: Path, name: str) -> Path:
    """Create `parent/name` (`name-2`, `-3`, ... when two launches share a second); never an existing one."""
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"cannot create a new run directory {parent / name}: too many with that name")


def plan_run(cfg: Config, now: datetime | None = None) -> tuple[RunPlan, RunLock]:
    """Pick and lock the run directory, then decide what to resume. Raises RunDirError (one line) when the
    directory is in use, holds a run that `resume=never` would overwrite, or holds a run whose config differs."""
    t = cfg.trainer
    resume_ckpt = resolve_resume_path(t.resume) if t.resume not in ("auto", "never") else None
    if t.experiment_name:
        run_dir = Path(t.output_dir) / t.experiment_name
        run_dir.mkdir(parents=True, exist_ok=True)
    elif resume_ckpt is not None and checkpoint_run_dir(resume_ckpt) is not None:
        run_dir = checkpoint_run_dir(resume_ckpt)  # resume=PATH continues that run's directory
    else:
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        run_dir = claim_new_dir(Path(t.output_dir), f"{base_name(cfg)}-{stamp}")
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        if t.resume == "never" and _holds_a_run(run_dir):
            raise RunDirError(
                f"trainer.resume=never, but run directory {run_dir} already holds a run (metrics.jsonl or "
                "checkpoints), which would be overwritten; resume it with trainer.resume=auto, choose another "
                "trainer.experiment_name, or move that directory away yourself")
        if t.resume == "auto":
            resume_ckpt = checkpoint.latest_checkpoint(run_dir)
            saved = run_dir / "config.yaml"
            if resume_ckpt is not None and saved.is_file():
                diffs = config_differences(saved, cfg)
                if diffs:
                    raise RunDirError(
                        f"trainer.resume=auto: run directory {run_dir} was trained with a different config "
                        f"({'; '.join(diffs)}); to resume it anyway with this config pass "
                        f"trainer.resume={resume_ckpt}, or start a separate run with another trainer.experiment_name")
        elif resume_ckpt is not None:  # an explicit path: resumed as asked, its differences said out loud
            origin = checkpoint_run_dir(resume_ckpt)
            if origin is not None and (origin / "config.yaml").is_file():
                diffs = config_differences(origin / "config.yaml", cfg)
                if diffs:
                    logger.warning("resuming %s with a config that differs from its run's: %s", resume_ckpt,
                                   "; ".join(diffs))
    except BaseException:
        lock.release()
        raise
    return RunPlan(run_dir, resume_ckpt), lock
