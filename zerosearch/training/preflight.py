"""Before RL starts: the checks a launch must pass (prompt lengths, the validation engine) and the optional
warm-start stage, which runs as child processes (`zerosearch eval` of the untrained policy, `zerosearch warmstart`)
so that their memory is gone before the workers start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from zerosearch.config import Config, ConfigError

logger = logging.getLogger("zerosearch.training")


def warm_started(cfg: Config, run_dir: Path, val_samples) -> Config:
    """With `warmstart.enabled`, the config to train with: the policy (and the reference) start from the
    supervised warm-start in `run_dir/warmstart`, built first unless a finished one is there (a resumed run
    keeps its own). The saved config keeps the model the user named.

    So that the summary can show what the warm-start did apart from RL, the untrained model is first scored
    on the same held-out questions with the same search (`zerosearch eval` in a child process, into
    `run_dir/warmstart/untrained_eval`)."""
    if not cfg.warmstart.enabled:
        return cfg
    from zerosearch.training.warmstart import SUMMARY_FILE

    out = run_dir / "warmstart"
    if (out / SUMMARY_FILE).is_file():
        logger.info("policy warm-started in %s (already built)", out)
    else:
        if cfg.trainer.test_freq != 0 and cfg.trainer.val_search != "simulator":
            _child(run_dir, ["eval", "--config", str(run_dir / "config.yaml"), "--data", str(_heldout_file(val_samples, out)),
                             "--method", "agent", "--output", str(out / "untrained_eval")],
                   out / "untrained_eval.log", "scoring the untrained policy on the held-out questions")
        # a child process as well: the fine-tuning's memory would otherwise stay with the driver all run long
        _child(run_dir, ["warmstart", "--config", str(run_dir / "config.yaml"), "--out", str(out)],
               out / "warmstart.log", "warm-start: supervised demonstrations of the tag format (warmstart.enabled)")
        summary = json.loads((out / SUMMARY_FILE).read_text())
        logger.info("warm-start: %d demonstrations, loss %.3f -> %.3f, %.0f s", summary["demonstrations"],
                    summary["first_loss"] or 0, summary["last_loss"] or 0, summary["wall_s"])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(out)))


def _heldout_file(val_samples, out: Path) -> Path:
    """The held-out questions as a QA file, so that `zerosearch eval` scores exactly these."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "heldout.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": s.question, "golden_answers": list(s.golden_answers),
                                 "data_source": s.data_source}, ensure_ascii=False) + "\n" for s in val_samples)
    return path


def _child(run_dir: Path, args: list[str], log_path: Path, what: str) -> None:
    """`zerosearch ARGS` in a child process (its engines and memory are gone before the workers start)."""

    cmd = [sys.executable, "-m", "zerosearch.cli", *args]
    logger.info("%s: %s (log %s)", what, " ".join(cmd), log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}); see {log_path}")


def check_prompt_lengths(cfg: Config, *splits) -> None:
    """Every prompt fits `data.max_prompt_length` tokens, checked when the data loads (not at a random step)."""
    from transformers import AutoTokenizer

    from zerosearch.data.qa import check_prompt_lengths as check
    from zerosearch.models import resolve_model_path
    from zerosearch.rollout.loop import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
    limit = cfg.data.max_prompt_length
    overhead = len(encode_prompt(tokenizer, [{"role": "user", "content": ""}])) + 8  # template tokens per message

    def count(messages: list[dict]) -> int:
        # A token covers at least one byte (byte-level BPE), so a short prompt needs no tokenizing: keeps the
        # check to seconds on upstream's 170k questions.
        bound = sum(len(m["content"].encode()) + overhead for m in messages)
        return bound if bound <= limit else len(encode_prompt(tokenizer, messages))

    for name, samples in splits:
        check(samples, count, limit, f"data.path={cfg.data.path} split {name!r}")


def _validation_searches(cfg: Config) -> dict[str, str]:
    """Metric prefix -> the search backend validation uses under it, in words (none when it never runs)."""
    from zerosearch.rollout.factory import describe_search

    t = cfg.trainer
    if t.test_freq == 0:
        return {}
    out = {}
    if t.val_search in ("engine", "both"):
        out["val"] = describe_search(cfg, cfg.search.engine)
    if t.val_search in ("simulator", "both"):
        out["val_oracle"] = describe_search(cfg, cfg.search.mode)
    return out


def _check_validation_engine(cfg: Config) -> None:
    """Before anything starts: a Google validation needs its API key (config validation checked the rest)."""
    from zerosearch.search.google import API_KEY_ENV

    if cfg.search.mode == "google" and not os.environ.get(API_KEY_ENV):
        raise ConfigError(f"search.mode=google trains against Google through SerpAPI, which needs {API_KEY_ENV} in "
                          f"the environment (export {API_KEY_ENV}=...); or train against the simulator with "
                          "SEARCH_MODE simulate_prompt")
    if "val" in _validation_searches(cfg) and cfg.search.engine == "google" and not os.environ.get(API_KEY_ENV):
        raise ConfigError(f"search.engine=google: validation searches Google through SerpAPI, which needs {API_KEY_ENV} "
                         f"in the environment (export {API_KEY_ENV}=...); or validate on a local Wikipedia corpus "
                         "with SEARCH_ENGINE wiki and search.corpus=PATH.jsonl (or search.retriever_url=URL), or set "
                         "trainer.test_freq=0")


# --- the run ----------------------------------------------------------------------------------------


