"""`zerosearch simulator collect|label|train|eval`: build your own simulation LLM (see docs/simulator.md).

    zerosearch simulator collect --out records.jsonl [--model M] [--search wiki|google] [--corpus default]
                                 [--data default] [--split train] [--data-source 2wikimultihopqa]
                                 [--limit N] [--offset N] [--no-policy] [--config cpu] [key=value ...]
    zerosearch simulator label   --data records.jsonl --out labelled.jsonl [--judge rule|llm
                                 --judge-url http://HOST:PORT/v1 --judge-model NAME] [--dedupe] [--only-options]
                                 [--contrast CORPUS [--contrast-depth 30]]
    zerosearch simulator train   --data labelled.jsonl --out DIR [--model M] [--epochs 1] [--lora-r 16]
    zerosearch simulator eval    --data heldout.jsonl --out DIR [--prompt-model M] [--sft-model DIR]
                                 [--limit N] [--config cpu] [key=value ...]

Bad input (missing or malformed files, a corpus row without text, one class only) prints one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger("zerosearch.simulator")
EXIT_USAGE = 2


class SimulatorUsageError(Exception):
    """Bad input: one line, exit status 2."""


def _config(name: str, overrides: list[str]):
    from zerosearch.config import load_config

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SimulatorUsageError(f"unexpected argument {bad[0]!r}; config overrides look like search.topk=3")
    return load_config(name, overrides)


def cmd_collect(argv: list[str]) -> int:
    from zerosearch.data import load_samples
    from zerosearch.simulator.collect import collect, select_questions

    p = argparse.ArgumentParser(prog="zerosearch simulator collect",
                                description="Record the real engine's top-k documents for a policy's searches.")
    p.add_argument("--out", required=True, help="JSONL to append the records to (resumed when it exists)")
    p.add_argument("--model", default=None, help="policy model (default: the config's model.path, the embedded one)")
    p.add_argument("--search", choices=("wiki", "google"), default=None, help="real engine (default: search.engine)")
    p.add_argument("--corpus", default=None, help="JSONL passage corpus for wiki (default: search.corpus)")
    p.add_argument("--topk", type=int, default=None, help="documents per search (default: search.topk)")
    p.add_argument("--data", default=None, help="QA data folder or file (default: data.path)")
    p.add_argument("--split", default="train")
    p.add_argument("--data-source", default="", help="only questions of this data_source, e.g. 2wikimultihopqa")
    p.add_argument("--limit", type=int, default=0, help="at most this many questions (0: all)")
    p.add_argument("--offset", type=int, default=0, help="skip the first N selected questions")
    p.add_argument("--no-policy", action="store_true", help="search only the questions themselves (no model)")
    p.add_argument("--n", type=int, default=1, help="policy rollouts per question (sampled at rollout.temperature)")
    p.add_argument("--chunk", type=int, default=16, help="questions per agent-loop batch (and per resume point)")
    p.add_argument("--config", default="cpu")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.max_turns=2")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for value, key in ((args.model, "model.path"), (args.search, "search.engine"), (args.corpus, "search.corpus"),
                       (args.topk, "search.topk"), (args.data, "data.path")):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = _config(args.config, overrides)
    samples = select_questions(load_samples(cfg, args.split), args.data_source, args.limit, args.offset)
    if not samples:
        raise SimulatorUsageError(f"no questions selected from {cfg.data.path} split {args.split!r} "
                                  f"(data source {args.data_source or 'any'!r}, offset {args.offset})")
    t0 = time.perf_counter()
    s = collect(cfg, samples, args.out, args.split, policy=not args.no_policy, n=args.n, chunk=args.chunk)
    print(f"collect: {s.records} records ({s.policy_records} from the policy's searches) for {s.questions} questions "
          f"in {time.perf_counter() - t0:.1f}s; {s.skipped} already in {args.out}")
    return 0


def cmd_label(argv: list[str]) -> int:
    from zerosearch.simulator.label import LLMJudge, label

    p = argparse.ArgumentParser(prog="zerosearch simulator label", description="Label searches useful / noisy, balanced.")
    p.add_argument("--data", required=True, help="collect output")
    p.add_argument("--out", required=True, help="balanced labelled JSONL")
    p.add_argument("--judge", choices=("rule", "llm"), default="rule",
                   help="rule: a gold answer in the documents; llm: a judge model (--judge-url, --judge-model)")
    p.add_argument("--judge-url", default="http://127.0.0.1:6001/v1", help="OpenAI-compatible base URL of the judge")
    p.add_argument("--judge-model", default="", help="model name the judge server serves")
    p.add_argument("--judge-retries", type=int, default=3)
    p.add_argument("--judge-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0, help="which records of the larger class are kept")
    p.add_argument("--dedupe", action="store_true", help="after balancing, one record per distinct query and label")
    p.add_argument("--only-options", action="store_true",
                   help="after balancing, only searches for one option of an \"A or B\" question (docs/simulator.md)")
    p.add_argument("--contrast", default="", metavar="CORPUS",
                   help="also write each search under the other label, from the real engine's deeper BM25 results "
                        "over CORPUS (`default`: the bundled one; rule judge only; docs/simulator.md)")
    p.add_argument("--contrast-depth", type=int, default=30, help="how deep --contrast looks for twin documents")
    args = p.parse_args(argv)
    if args.contrast and args.judge != "rule":
        raise SimulatorUsageError("--contrast labels its twins by the rule; use it with --judge rule")
    if args.contrast_depth < 2:
        raise SimulatorUsageError(f"--contrast-depth must be at least 2, got {args.contrast_depth}")
    contrast = None
    if args.contrast:
        from zerosearch.data import resolve_corpus
        from zerosearch.simulator.label import bm25_retrieve

        contrast = bm25_retrieve(resolve_corpus(args.contrast))
    judge = None
    if args.judge == "llm":
        if not args.judge_model:
            raise SimulatorUsageError("--judge llm needs --judge-model NAME (what the server at --judge-url serves)")
        judge = LLMJudge(args.judge_url, args.judge_model, timeout_s=args.judge_timeout, max_retries=args.judge_retries)
    t0 = time.perf_counter()
    try:
        s = label(args.data, args.out, judge=judge, seed=args.seed, unique=args.dedupe, only_options=args.only_options,
                  contrast=contrast, contrast_depth=args.contrast_depth)
    finally:
        if judge is not None:
            judge.close()
    twins = f", twins {s.twins['useful']} useful + {s.twins['noisy']} noisy" if s.twins else ""
    print(f"label: {s.counts['useful']} useful, {s.counts['noisy']} noisy ({s.judged} judged now, {s.dropped_short} "
          f"with fewer than k documents left out){twins}; kept {s.kept['useful']} + {s.kept['noisy']} in {args.out} "
          f"in {time.perf_counter() - t0:.1f}s")
    if not s.kept["useful"]:
        print("warning: one class is empty, so nothing is kept; `train` needs both", file=sys.stderr)
    return 0


def cmd_train(argv: list[str]) -> int:
    from zerosearch.simulator.train import DEFAULT_MAX_DOC_WORDS, TrainSettings, train_simulator

    p = argparse.ArgumentParser(prog="zerosearch simulator train", description="SFT of the simulation LLM (TRL).")
    p.add_argument("--data", required=True, help="label output")
    p.add_argument("--out", required=True, help="model folder to write (serve it with `zerosearch serve-sim --model`)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (folder, hub id or the embedded name)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (-1: --epochs)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024, help="tokens per example (prompt + documents)")
    p.add_argument("--max-doc-words", type=int, default=DEFAULT_MAX_DOC_WORDS,
                   help="cut each real document to this many words (0: whole)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep activations: faster, more memory (fine for small models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights while training (bfloat16 for large simulators on GPU)")
    args = p.parse_args(argv)
    settings = TrainSettings(dtype=args.dtype, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, max_length=args.max_length, max_doc_words=args.max_doc_words,
                             lora_r=args.lora_r, save_steps=args.save_steps, seed=args.seed,
                             gradient_checkpointing=not args.no_gradient_checkpointing)
    s = train_simulator(args.data, args.out, args.model, settings)
    print(f"train: {s['steps']} steps on {s['records']} records {s['labels']} in {s['wall_s']}s, loss "
          f"{s['first_loss']} -> {s['last_loss']}; serve it with `zerosearch serve-sim --model {args.out}` and "
          f"train against it with `SEARCH_MODE simulate_sft SIMULATION_LLM {args.out}`")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from zerosearch.simulator.evaluate import Simulator, evaluate

    p = argparse.ArgumentParser(prog="zerosearch simulator eval", description="Simulators against held-out real searches.")
    p.add_argument("--data", required=True, help="collect output for held-out questions")
    p.add_argument("--out", required=True, help="folder for results.md, results.json and per-system results")
    p.add_argument("--prompt-model", default="smollm2-135m-instruct", help="prompt-mode simulator ('' to skip)")
    p.add_argument("--sft-model", default="", help="fine-tuned simulator folder (simulate_sft)")
    p.add_argument("--limit", type=int, default=0, help="at most this many held-out searches (0: all)")
    p.add_argument("--max-doc-words", type=int, default=30, help="as `train`: the real documents are cut to this")
    p.add_argument("--config", default="cpu", help="search.temperature / max_tokens / timeouts come from here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = _config(args.config, list(args.overrides))
    sims = [Simulator("prompt", "prompt", args.prompt_model)] if args.prompt_model else []
    if args.sft_model:
        sims.append(Simulator("sft", "sft", args.sft_model))
    t0 = time.perf_counter()
    result = evaluate(cfg, args.data, sims, args.out, limit=args.limit, max_doc_words=args.max_doc_words)
    print(result["markdown"], end="")
    print(f"eval: {result['searches']} held-out searches in {time.perf_counter() - t0:.1f}s; wrote {args.out}/results.md")
    return 0


COMMANDS = {"collect": cmd_collect, "label": cmd_label, "train": cmd_train, "eval": cmd_eval}


def main(argv: list[str]) -> int:
    from zerosearch.config import ConfigError
    from zerosearch.data import DataFormatError
    from zerosearch.search.bm25 import CorpusError
    from zerosearch.simulator.label import JudgeError
    from zerosearch.simulator.records import RecordError
    from zerosearch.simulator.train import TrainDataError

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_USAGE
    if argv[0] not in COMMANDS:
        print(f"error: unknown simulator step '{argv[0]}'; steps: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[argv[0]](argv[1:])
    except JudgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (SimulatorUsageError, ConfigError, DataFormatError, CorpusError, RecordError, TrainDataError,
            FileNotFoundError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
