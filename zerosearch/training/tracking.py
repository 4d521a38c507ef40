"""Phase timers, metric sinks (console progress bar, metrics.jsonl, wandb) and a peak-memory monitor."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

logger = logging.getLogger("zerosearch.training")


class PhaseTimer:
    """`with timer("gen"): ...` records seconds under `timing/gen_s` for the current step."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"timing/{name}_s"] = self.times.get(f"timing/{name}_s", 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out


def rewrite_metrics(path: Path, resume_step: int) -> int:
    """Keep the records of `path` up to `resume_step`, replacing the file atomically; returns how many were kept.

    A line that is not a JSON record (a kill mid-write tears the last one) is dropped with a warning."""
    kept, torn = [], []
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, TypeError, KeyError, RecursionError):
            torn.append(number)
            continue
        if step <= resume_step:
            kept.append(line)
    if torn:
        logger.warning("%s: dropped %d unreadable line(s) (number %s; a write cut short by a kill) while resuming "
                       "at step %d", path, len(torn), ", ".join(map(str, torn[:10])), resume_step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a kill during the rewrite leaves the old file whole, never half of it
    return len(kept)


class Tracker:
    """Writes each step's metrics to the sinks named in `trainer.logger`."""

    CONSOLE_KEYS = ("reward/mean", "reward/f1", "val/f1", "curriculum/p_noisy", "rollout/searches_per_traj",
                    "actor/kl_loss", "timing/step_s")

    def __init__(self, run_dir: Path, loggers: list[str], config: dict, project: str, name: str, resume_step: int = 0):
        self.run_dir, self.loggers = run_dir, loggers
        self.path = run_dir / "metrics.jsonl"
        if resume_step == 0 and self.path.exists():  # an earlier attempt that saved no checkpoint: kept aside
            self.path.rename(run_dir / f"metrics.jsonl.{time.strftime('%Y%m%d-%H%M%S')}.old")
        elif self.path.exists():  # drop lines newer than the checkpoint we resume from
            rewrite_metrics(self.path, resume_step)
        self.wandb = None
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("trainer.logger includes wandb but it is not installed: pip install 'zerosearch[wandb]'")
            self.wandb = wandb.init(project=project, name=name, config=config, dir=str(run_dir), resume="allow")
        self.bar = None

    def progress(self, total: int, initial: int):
        if "console" in self.loggers:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        return self.bar

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if "jsonl" in self.loggers:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1] if k != "val/f1" else "val_f1": f"{metrics[k]:.3g}"
                                  for k in self.CONSOLE_KEYS if k in metrics}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


class MemoryMonitor:
    """Samples the RSS of this process and all its descendants (Ray workers, simulation server)."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-monitor")

    def sample(self) -> int:
        root = psutil.Process(os.getpid())
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30
