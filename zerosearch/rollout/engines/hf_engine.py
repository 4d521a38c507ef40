"""The transformers policy engine: batched ``model.generate`` behind the same submit/poll protocol.

Slow (no continuous batching, no paged KV cache): for unit tests and as a fallback where vLLM is
missing. ``poll`` runs every pending request at once, as one left-padded ``generate`` per distinct
:class:`SamplingSpec` (requests with different seeds therefore run in separate batches), then cuts
each sequence right after its first stop string or EOS, as vLLM does.

It can wrap a model object that lives in memory (``HFEngine(model, tokenizer=...)``), e.g. the one
a test trainer updates, so the two share weights without any push.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
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


def truncate_generation(
    token_ids: Sequence[int], tokenizer: Any, stop: Sequence[str], eos_token_ids: Iterable[int]
) -> tuple[list[int], str, str, str | None]:
    """Cut sampled tokens where vLLM would have stopped: right after the first stop string, else at EOS.

    The cut token is the first one whose decoded prefix contains a stop string (found by bisection:
    containment only grows with the prefix); the stop string is kept in tokens and text, and text
    ends with it. An EOS (searched first, since nothing after it counts) is kept in the tokens but,
    being special, not in the text. Returns ``(token_ids, text, finish_reason, stop_reason)`` with
    ``finish_reason`` ``"stop"`` or ``"length"``.
    """
    eos = set(eos_token_ids)
    end = next((i for i, t in enumerate(token_ids) if t in eos), None)
    body = list(token_ids[:end])

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    def first_stop(text: str) -> tuple[int, str] | None:
        hits = [(text.find(s), s) for s in stop if s in text]
        return min(hits, key=lambda hit: hit[0]) if hits else None

    text = decode(body)
    if stop and first_stop(text) is not None:
        # smallest k such that decode(body[:k]) contains a stop string
        k = bisect.bisect_left(
            range(len(body) + 1), True, key=lambda n: first_stop(decode(body[:n])) is not None
        )
        position, matched = first_stop(decode(body[:k]))  # type: ignore[misc]  # found at k by construction
        return body[:k], decode(body[:k])[: position + len(matched)], "stop", matched
    if end is not None:
        return body + [token_ids[end]], text, "stop", None
    return body, text, "length", None


class StopOnStrings:
    """A ``generate`` stopping criterion: a row is done once its *sampled* text contains a stop string.

    transformers' own ``stop_strings`` also match across the prompt boundary (a prompt ending in
    ``"."`` plus a sampled ``"."`` ends a row on ``".."``); vLLM, and this, look at sampled text only.
    Each step decodes only the last few sampled tokens: enough to hold any stop string that the
    newest token can have completed.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_width = prompt_width
        self.window = max(len(s) for s in self.stop) + 4  # tokens; each non-special one has >= 1 char

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tails = input_ids[:, self.prompt_width :][:, -self.window :].tolist()  # [batch, <= window]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # [batch]


@register_engine("hf")
class HFEngine:
    """A policy engine on transformers ``generate``. See the module docstring.

    ``model_path`` is an HF folder (or hub name) or a model object; with an object pass
    ``tokenizer`` too (else it is loaded from the model's ``name_or_path``). Each ``generate`` batch
    is seeded by its requests' ``seed``, else by the next draw of a private stream seeded by ``seed``,
    inside ``fork_rng``: it neither disturbs nor depends on torch's global RNG.
    """

    def __init__(
        self,
        model_path: str | Path | torch.nn.Module,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        tokenizer: Any = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model_path, torch.nn.Module):
            self.model = model_path
            source = tokenizer if tokenizer is not None else self.model.name_or_path
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype(dtype))
            self.model.to(device)
            source = tokenizer if tokenizer is not None else str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(source) if isinstance(source, (str, Path)) else source
        self.device = next(self.model.parameters()).device
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )
        self._rng = torch.Generator().manual_seed(seed)
        self._pending: dict[str, tuple[list[int], SamplingSpec]] = {}

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the model has no EOS token id (generation_config nor tokenizer)")
        return [eos] if isinstance(eos, int) else list(eos)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec) -> None:
        if request_id in self._pending:
            raise ValueError(f"request {request_id!r} is already in flight")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        self._pending[request_id] = (list(prompt_token_ids), sampling)

    def poll(self) -> list[tuple[str, Generation]]:
        """Run every pending request (one ``generate`` per distinct sampling spec); return them all."""
        groups: dict[tuple, list[tuple[str, list[int]]]] = {}
        specs: dict[tuple, SamplingSpec] = {}
        for request_id, (prompt, spec) in self._pending.items():
            key = (spec.temperature, spec.top_p, spec.max_tokens, tuple(spec.stop), spec.seed)
            groups.setdefault(key, []).append((request_id, prompt))
            specs[key] = spec
        self._pending.clear()
        finished = []
        for key, items in groups.items():
            generations = self._generate_batch([prompt for _, prompt in items], specs[key])
            finished.extend((request_id, g) for (request_id, _), g in zip(items, generations))
        return finished

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingSpec, n: int = 1
    ) -> list[list[Generation]]:
        return generate_with_engine(self, prompts, sampling, n)

    def _generate_batch(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        from transformers import StoppingCriteriaList

        width = max(len(p) for p in prompts)
        input_ids = torch.tensor(
            [[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=self.device
        )  # [batch, width], left-padded
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )  # [batch, width]
        sampling = (
            {"do_sample": False}
            if spec.greedy
            else {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0}
        )
        was_training = self.model.training
        self.model.eval()
        try:
            # a seed for this batch: the request's, else the next draw of the private stream
            seed = (
                spec.seed if spec.seed is not None else int(torch.randint(2**62, (1,), generator=self._rng))
            )
            forked = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=forked):
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=spec.max_tokens,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=self.pad_token_id,
                    stopping_criteria=StoppingCriteriaList(
                        [StopOnStrings(self.tokenizer, spec.stop, width)] if spec.stop else []
                    ),
                    output_logits=True,
                    return_dict_in_generate=True,
                    **sampling,
                )
        finally:
            self.model.train(was_training)
        sampled = out.sequences[:, width:]  # [batch, steps]
        logprobs = torch.stack(
            [
                torch.log_softmax(step_logits.float(), dim=-1).gather(-1, sampled[:, t : t + 1]).squeeze(-1)
                for t, step_logits in enumerate(out.logits)  # raw logits, [batch, vocab] each
            ],
            dim=1,
        )  # [batch, steps]
        generations = []
        for row in range(len(prompts)):
            ids, text, finish, stop_reason = truncate_generation(
                sampled[row].tolist(), self.tokenizer, spec.stop, self.eos_token_ids
            )
            generations.append(
                Generation(
                    token_ids=ids,
                    logprobs=logprobs[row, : len(ids)].tolist(),
                    text=text,
                    finish_reason=finish,
                    stop_reason=stop_reason,
                )
            )
        return generations

    # -- weights ----------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model in place; an unknown name is an error."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise KeyError(f"load_weights: the model has no parameter or buffer named {name!r}")
                state[name].copy_(tensor.to(device=state[name].device, dtype=state[name].dtype))

    def close(self) -> None:
        self._pending.clear()
