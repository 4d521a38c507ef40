"""The parts of the rollout stack, each from a Config: the policy engine, the search backend, the loop's
settings and sampling. `rollout/stack.py` puts them together in the one order that works; use that.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from zerosearch.config import Config
from zerosearch.data import load_samples, resolve_corpus  # noqa: F401  load_samples: training/ imports it from here
from zerosearch.models import resolve_model_path
from zerosearch.rollout.engines import SamplingSpec, build_policy_engine
from zerosearch.rollout.loop import AgentLoop, LoopSettings
from zerosearch.search import SearchBackend, build_search_backend
from zerosearch.search.server import start_simulation_servers


def loop_settings(cfg: Config) -> LoopSettings:
    return LoopSettings(
        rollout=cfg.rollout,
        max_prompt_length=cfg.data.max_prompt_length,
        search_concurrency=cfg.search.concurrency,
        max_search_error_share=cfg.search.max_error_share,
        min_query_overlap=cfg.search.min_query_overlap,
        gate_question_words=cfg.search.gate_question_words,
        two_hop=cfg.search.two_hop,
    )


def train_sampling(cfg: Config) -> SamplingSpec:
    return SamplingSpec(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        max_tokens=cfg.rollout.max_response_length, seed=cfg.trainer.seed)


def val_sampling(cfg: Config) -> SamplingSpec:
    return SamplingSpec(temperature=cfg.rollout.val_temperature, top_p=1.0,
                        max_tokens=cfg.rollout.max_response_length, seed=cfg.trainer.seed)


def start_search(cfg: Config, stack: ExitStack, log_dir: str | Path | None = None,
                 mode: str | None = None, start_servers: bool = True) -> SearchBackend:
    """The configured search backend (closed by `stack`). For a simulated mode, with `start_servers`, first
    the local simulation servers that are down (`search.server.start_simulation_servers`, stopped by `stack`)."""
    s = cfg.search
    mode = mode or s.mode
    if mode == "hybrid":  # the simulator, and the real engine for what it routes there
        simulated = _simulated(cfg, stack, log_dir, "simulate_prompt", start_servers, s.hybrid_min_confidence > 0)
        real = start_search(cfg, stack, log_dir, mode=s.engine)
        backend = build_search_backend(
            "hybrid", simulated=simulated, real=real, real_share=s.hybrid_real_share,
            min_confidence=s.hybrid_min_confidence, max_real_per_step=s.hybrid_max_real_per_step,
            max_real_per_run=s.hybrid_max_real_per_run, seed=cfg.trainer.seed,
        )
    elif mode == "simulate_self":  # the policy's engine writes the documents: no server
        backend = build_search_backend(mode, topk=s.topk, temperature=s.temperature, max_tokens=s.max_tokens)
    elif mode.startswith("simulate"):
        return _simulated(cfg, stack, log_dir, mode, start_servers)
    elif mode == "wiki" and s.retriever_url:
        backend = build_search_backend("wiki", topk=s.topk, retriever_url=s.retriever_url, concurrency=s.concurrency)
    elif mode in ("wiki", "oracle_wiki"):
        backend = build_search_backend(mode, topk=s.topk, corpus=s.corpus)
    else:
        backend = build_search_backend(mode, topk=s.topk)
    stack.callback(backend.close)
    return backend


def _simulated(cfg: Config, stack: ExitStack, log_dir, mode: str, start_servers: bool,
               with_confidence: bool = False) -> SearchBackend:
    s = cfg.search
    if start_servers:
        start_simulation_servers(cfg, stack, log_dir)
    backend = build_search_backend(
        mode, servers=s.ip, model=s.simulation_llm, topk=s.topk, temperature=s.temperature,
        max_tokens=s.max_tokens, timeout_s=s.timeout_s, max_retries=s.max_retries, concurrency=s.concurrency,
        with_confidence=with_confidence,
    )
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
    if mode == "oracle_wiki":
        return f"oracle_wiki: BM25 over {Path(resolve_corpus(s.corpus)).name}, told the gold answer (a perfect simulator)"
    if mode == "hybrid":
        return f"hybrid: simulation LLM {s.simulation_llm}, and {describe_search(cfg, s.engine)} for routed queries"
    if mode == "simulate_self":
        return "simulate_self: the policy writes its own documents (it saw the gold answer)"
    return f"{mode}: simulation LLM {s.simulation_llm}, which saw the gold answer (useful documents)"


def build_engine(cfg: Config, model_path: str | None = None, stack: ExitStack | None = None):
    """The policy engine of `rollout.engine` on the policy model (or `model_path`)."""
    path = resolve_model_path(model_path or cfg.model.path)
    r = cfg.rollout
    if r.engine == "vllm":
        engine = build_policy_engine(
            "vllm", path, dtype=r.dtype, seed=cfg.trainer.seed, max_model_len=r.max_total_length,
            gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
            cpu_kv_cache_gib=r.cpu_kv_cache_gib, enforce_eager=r.enforce_eager,
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
