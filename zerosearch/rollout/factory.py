"""Build the rollout stack from a Config: simulation server(s), search backend, policy engine, loop.

Shared by `zerosearch train`, `zerosearch rollout` and `zerosearch eval`, so every command starts
and stops the same parts the same way.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from zerosearch.config import Config
from zerosearch.data import build_prompt, load_split, resolve_corpus
from zerosearch.models import resolve_model_path
from zerosearch.rollout.engines import SamplingSpec, build_policy_engine
from zerosearch.rollout.loop import AgentLoop, LoopSettings
from zerosearch.search import SearchBackend, build_search_backend

logger = logging.getLogger("zerosearch.rollout")


def load_samples(cfg: Config, split: str):
    """A split of `data.path`, with prompts rebuilt from `data.prompt_template` when it is set; the training
    split keeps only `data.train_sources` when that is set."""
    samples = load_split(cfg.data.path, split)
    sources = cfg.data.train_sources
    if sources and split == cfg.data.train_split:
        found = {s.data_source for s in samples}
        if not set(sources) & found:  # other data than the sources were chosen for: keep it whole, and say so
            logger.warning("data.train_sources=%s matches no row of the %r split of %s (its sources: %s); "
                           "training on all of it. Set data.train_sources=[] to silence this.", list(sources), split,
                           cfg.data.path, sorted(found))
            return samples
        samples = [s for s in samples if s.data_source in sources]
    if cfg.data.prompt_template:
        for sample in samples:
            sample.prompt = build_prompt(sample.question, cfg.data.prompt_template)
    return samples


def loop_settings(cfg: Config) -> LoopSettings:
    r = cfg.rollout
    return LoopSettings(
        max_turns=r.max_turns,
        max_response_length=r.max_response_length,
        max_obs_length=r.max_obs_length,
        max_total_length=r.max_total_length,
        max_prompt_length=cfg.data.max_prompt_length,
        search_concurrency=cfg.search.concurrency,
        max_search_error_share=cfg.search.max_error_share,
        protocol=cfg.rollout.protocol,
        min_query_overlap=cfg.search.min_query_overlap,
    )


def train_sampling(cfg: Config) -> SamplingSpec:
    return SamplingSpec(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        max_tokens=cfg.rollout.max_response_length, seed=cfg.trainer.seed)


def val_sampling(cfg: Config) -> SamplingSpec:
    return SamplingSpec(temperature=cfg.rollout.val_temperature, top_p=1.0,
                        max_tokens=cfg.rollout.max_response_length, seed=cfg.trainer.seed)


def start_simulation_servers(cfg: Config, stack: ExitStack, log_dir: str | Path | None = None) -> None:
    """With `search.start_server=auto`, start a server for each local `search.ip` where nothing listens
    (stopped by `stack`)."""
    s = cfg.search
    if s.start_server != "auto":
        return
    from zerosearch.search.server import ensure_simulation_server

    engine = None if s.server_engine == "auto" else s.server_engine
    kv = {"kv_cache_gib": s.server_kv_cache_gib} if s.server_kv_cache_gib else {}
    for server in ensure_simulation_server(s.ip, s.simulation_llm, engine=engine, log_dir=log_dir,
                                           start_timeout_s=s.server_startup_timeout_s, **kv):
        stack.callback(server.stop)
        logger.info("simulation server %s up in %.1fs (pid %s)", server.url, server.startup_s, server.pid)


def start_search(cfg: Config, stack: ExitStack, log_dir: str | Path | None = None,
                 mode: str | None = None) -> SearchBackend:
    """The configured search backend; starts local simulation servers when needed (stopped by `stack`)."""
    s = cfg.search
    mode = mode or s.mode
    if mode.startswith("simulate"):
        start_simulation_servers(cfg, stack, log_dir)
        backend = build_search_backend(
            mode, servers=s.ip, model=s.simulation_llm, topk=s.topk, temperature=s.temperature,
            max_tokens=s.max_tokens, timeout_s=s.timeout_s, max_retries=s.max_retries, concurrency=s.concurrency,
        )
    elif mode == "wiki":
        options = {"retriever_url": s.retriever_url} if s.retriever_url else {"corpus": s.corpus}
        backend = build_search_backend("wiki", topk=s.topk, **options)
    else:
        backend = build_search_backend(mode, topk=s.topk)
    stack.callback(backend.close)
    return backend


def describe_search(cfg: Config, mode: str) -> str:
    """The search backend of `mode`, in words, for summaries: e.g. `wiki: BM25 over corpus.jsonl`."""
    s = cfg.search
    if mode == "wiki" and s.retriever_url:
        return f"wiki: retriever {s.retriever_url}"
    if mode == "wiki":
        return f"wiki: BM25 over {Path(resolve_corpus(s.corpus)).name}"
    if mode == "google":
        return "google: SerpAPI"
    return f"{mode}: simulation LLM {s.simulation_llm}, which saw the gold answer (useful documents)"


def build_engine(cfg: Config, model_path: str | None = None, stack: ExitStack | None = None):
    """The policy engine of `rollout.engine` on the policy model (or `model_path`)."""
    path = resolve_model_path(model_path or cfg.model.path)
    r = cfg.rollout
    if r.engine == "vllm":
        engine = build_policy_engine(
            "vllm", path, dtype=r.dtype, seed=cfg.trainer.seed, max_model_len=r.max_total_length,
            gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
            cpu_kv_cache_gib=r.cpu_kv_cache_gib,
        )
    else:
        engine = build_policy_engine("hf", path, dtype=cfg.model.dtype, seed=cfg.trainer.seed)
    if stack is not None:
        stack.callback(engine.close)
    return engine


def build_loop(cfg: Config, engine, search: SearchBackend, stack: ExitStack | None = None) -> AgentLoop:
    loop = AgentLoop(engine, search, engine.tokenizer, loop_settings(cfg))
    if stack is not None:
        stack.callback(loop.close)
    return loop
