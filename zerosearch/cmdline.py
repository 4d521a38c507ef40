"""Command-line plumbing shared by `zerosearch eval` and `zerosearch infer`: the model/search/engine flags, the
config they resolve to, and fail-fast checks of the model and search inputs (one-line errors, exit status 2)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from zerosearch.config import (
    POLICY_ENGINES,
    SEARCH_MODES,
    Config,
    ConfigError,
    load_config,
    uses_simulation_server,
)
from zerosearch.data import resolve_corpus
from zerosearch.search.google import API_KEY_ENV

EXIT_USAGE = 2
# A positional `section.field=value` word is a config override, not a data path.
_OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


class EvalUsageError(Exception):
    """Bad input to `eval`/`infer`: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we report one line
        raise EvalUsageError(f"{message} (see `{self.prog} --help`)")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `section.field=value` overrides from the other words (which argparse reads)."""
    overrides = [a for a in argv if _OVERRIDE_RE.match(a)]
    return [a for a in argv if not _OVERRIDE_RE.match(a)], overrides


def add_stack_args(parser: argparse.ArgumentParser, search_default: str = "search.mode") -> None:
    """Options shared by `eval` and `infer`: the model, the search backend, the engine.

    `search_default`: the config field `--search` defaults to (`build_config` applies it)."""
    parser.add_argument("--model", help="policy model: a local HF folder, a hub id or smollm2-135m-instruct "
                                        "(default: model.path of --config)")
    parser.add_argument("--search", choices=SEARCH_MODES, help=f"search backend (default: {search_default} of --config)")
    parser.add_argument("--corpus", help="JSONL passage corpus for --search wiki (BM25 in process)")
    parser.add_argument("--ip", help="simulation server(s), host:port[,host:port...]; a local one is started "
                                     "when nothing listens there, and stopped at the end")
    parser.add_argument("--simulation-llm", help="model the simulation server serves")
    parser.add_argument("--engine", choices=POLICY_ENGINES, help="policy engine (default: rollout.engine)")
    parser.add_argument("--max-turns", type=int, help="most search turns per question (rollout.max_turns)")
    parser.add_argument("--topk", type=int, help="documents per search (search.topk)")
    parser.add_argument("--config", default="cpu", help="config YAML in configs/ or a path (default: cpu)")


def stack_overrides(args: argparse.Namespace) -> list[str]:
    """The shared flags as dotted config overrides."""
    flags = {
        "model.path": args.model,
        "search.mode": args.search,
        "search.corpus": args.corpus,
        "search.ip": args.ip,
        "search.simulation_llm": args.simulation_llm,
        "rollout.engine": args.engine,
        "rollout.max_turns": args.max_turns,
        "search.topk": args.topk,
    }
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def build_config(args: argparse.Namespace, overrides: list[str], uses_search: bool = True,
                 search_default: str = "search.mode") -> Config:
    """Config from `--config` + flags + `key=value` overrides; search inputs checked when used.

    Without `--search` (or a `search.mode=` override) the search is `search_default`: `search.mode`, or
    `search.engine` (the real engine) for `eval`."""
    flag_overrides = stack_overrides(args)
    if not uses_search:  # `--method direct`: the search flags do not matter, so they cannot fail
        flag_overrides = [o for o in flag_overrides if not o.startswith("search.")]
    all_overrides = flag_overrides + overrides
    modes = [o.split("=", 1)[1] for o in all_overrides if o.startswith("search.mode=")]
    try:
        # a training config's simulator-only setting (`search.two_hop`) does not apply when another backend is
        # chosen here; an explicit `search.two_hop=true` among the overrides still fails, as it should
        cfg = load_config(args.config, [*_simulator_only_off(modes[-1] if modes else None), *all_overrides])
        if uses_search and search_default == "search.engine" and not modes:
            cfg = load_config(args.config, [f"search.mode={cfg.search.engine}",
                                            *_simulator_only_off(cfg.search.engine), *all_overrides])
    except ConfigError as e:
        raise EvalUsageError(str(e)) from None
    if uses_search:
        check_search_inputs(cfg)
    check_model(cfg.model.path, "--model")
    return cfg


def _simulator_only_off(mode: str | None) -> list[str]:
    """Overrides that switch off the settings only a prompt-mode simulator reads, when `mode` is another backend."""
    return [] if mode in (None, "simulate_prompt", "hybrid") else ["search.two_hop=false"]


def check_search_inputs(cfg: Config) -> None:
    """The corpus file of a `wiki` search must exist; so must a simulation model we would serve."""
    s = cfg.search
    if uses_simulation_server(s.mode) and s.start_server == "auto":
        from zerosearch.search.server import LOCAL_HOSTS, is_listening
        from zerosearch.search.simulated import parse_servers, server_host_port

        try:
            addresses = [server_host_port(url) for url in parse_servers(s.ip)]
        except ValueError as e:
            raise EvalUsageError(f"--ip {s.ip}: {e}") from None
        if any(host in LOCAL_HOSTS and not is_listening(host, port) for host, port in addresses):
            check_model(s.simulation_llm, "--simulation-llm")
    if s.mode == "wiki" and not s.retriever_url:
        corpus = Path(resolve_corpus(s.corpus)).expanduser()
        if not corpus.is_file():
            raise EvalUsageError(
                f"--corpus {s.corpus}: no such file; give a JSONL passage corpus (one {{\"id\", \"contents\"}} "
                "object per line), e.g. shared/data/qa/corpus/hipporag_2wiki_corpus_6119.jsonl, or `default` "
                "(the bundled one)"
            )
    if s.mode == "google" and not os.environ.get(API_KEY_ENV):
        raise EvalUsageError(f"--search google needs a SerpAPI key in {API_KEY_ENV} (export {API_KEY_ENV}=...); "
                             "or search a local corpus with --search wiki --corpus FILE.jsonl")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative (`./`, `~`), deeper than one
    slash, or one slash whose first part is a local folder."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return True
    return name.count("/") == 1 and Path(name.split("/", 1)[0]).is_dir()


def check_model(name: str, flag: str = "--model") -> None:
    """Fail fast, before any engine starts, on a model that cannot load."""
    from zerosearch.models import (
        embedded_model_dir,
        embedded_model_ready,
        is_embedded,
        is_gemma,
        resolve_model_path,
    )

    if is_embedded(name):
        if not embedded_model_ready():
            raise EvalUsageError(
                f"{flag} {name}: the embedded model is not built at {embedded_model_dir()}; "
                "run `zerosearch fetch-model` (or `bash scripts/setup.sh`) first"
            )
        return
    if is_gemma(name):
        try:
            resolve_model_path(name)
        except FileNotFoundError as err:
            raise EvalUsageError(f"{flag} {name}: {err}") from None
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EvalUsageError(
                f"{flag} {name}: the folder has no config.json; point {flag} at a Hugging Face model folder "
                "(config.json, tokenizer and *.safetensors), e.g. a checkpoint's actor/ folder"
            )
        return
    if path.exists():
        raise EvalUsageError(f"{flag} {name}: is a file; point {flag} at a Hugging Face model folder")
    if _looks_local(name):
        raise EvalUsageError(
            f"{flag} {name}: no such folder; give an existing model folder, a hub id (org/name) or "
            "smollm2-135m-instruct"
        )


def keep_stdout_for_results(vllm_level: str | None = None) -> None:
    """vLLM logs to stdout by default; send its logs to stderr so stdout holds only our output."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if vllm_level is not None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", vllm_level)
