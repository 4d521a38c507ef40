"""The `zerosearch` command.

    zerosearch train [--algo grpo|ppo|reinforce] [KEY VALUE ...] [key=value ...] [--print-config]
    zerosearch rollout [KEY VALUE ...] [key=value ...] --num-prompts N --out FILE.jsonl
    zerosearch serve-sim --model M --port 6001 [--engine sglang|vllm]
    zerosearch prepare-data --input FILE.jsonl [...] --out DIR [--split train]
    zerosearch fetch-model
    zerosearch config [--describe]
    zerosearch simulator collect|label|train|eval ...   (build your own simulator: docs/simulator.md)
    zerosearch warmstart [KEY VALUE ...] [key=value ...] --out DIR   (optional supervised stage: warmstart.*)

The launchers `train_grpo.sh`, `train_ppo.sh` and `train_reinforce.sh` call `zerosearch train`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from zerosearch.config import LAUNCHER_KEYS, Config, ConfigError, load_config, parse_override, to_yaml

# Which YAML a launcher starts from: (GPU config, CPU default) per algorithm.
ALGO_CONFIGS = {
    "grpo": ("grpo", "cpu"),
    "ppo": ("ppo", "cpu_ppo"),
    "reinforce": ("reinforce", "cpu_reinforce"),
}
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line words: printed with the valid choices, exit status 2."""


@dataclass
class RunArgs:
    """What `train`/`rollout` were given: upstream KEY VALUE pairs, dotted overrides and flags."""

    keys: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    config: str | None = None
    print_config: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def parse_run_args(argv: list[str], flags: dict[str, bool] | None = None) -> RunArgs:
    """Read `KEY VALUE` pairs by name (any order), `key=value` overrides and `--flags`.

    `flags` maps extra `--name` options to whether they take a value.
    """
    flags = {"--config": True, "--print-config": False, **(flags or {})}
    out = RunArgs()
    valid = ", ".join(LAUNCHER_KEYS)
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in LAUNCHER_KEYS:
            if i + 1 >= len(argv) or argv[i + 1] in LAUNCHER_KEYS or argv[i + 1].startswith("--"):
                raise UsageError(f"KEY {token} has no value; give it as `{token} VALUE`. Valid keys: {valid}")
            if token in out.keys:
                raise UsageError(f"KEY {token} is given twice")
            out.keys[token] = argv[i + 1]
            i += 2
        elif token.startswith("--"):
            name, _, inline = token.partition("=")
            if name not in flags:
                raise UsageError(f"unknown option {name}; options: {', '.join(flags)}")
            if flags[name]:
                if inline:
                    value = inline
                elif i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                else:
                    raise UsageError(f"option {name} needs a value")
            else:
                value = "1"
            if name == "--config":
                out.config = value
            elif name == "--print-config":
                out.print_config = True
            else:
                out.extra[name.lstrip("-").replace("-", "_")] = value
            i += 1
        elif "=" in token:
            try:
                parse_override(token)
            except ConfigError as e:
                raise UsageError(str(e)) from None
            out.overrides.append(token)
            i += 1
        else:
            raise UsageError(
                f"unknown KEY '{token}'. Valid keys: {valid}; dotted overrides look like actor.lr=1e-6"
            )
    return out


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except (ImportError, OSError, RuntimeError):  # no usable torch: no CUDA
        return False


def choose_config(args: RunArgs, algo: str) -> str:
    """`--config` if given; the algorithm's GPU config when KEYs ask for GPUs (or CUDA is there);
    otherwise the embedded CPU default."""
    if args.config:
        return args.config
    gpu_config, cpu_config = ALGO_CONFIGS[algo]
    if not args.keys:
        return cpu_config
    gpus = args.keys.get("NUM_GPUS_PER_NODE")
    if gpus is not None:
        return gpu_config if gpus.strip() not in ("0", "") else cpu_config
    return gpu_config if _cuda_available() else cpu_config


def build_config(args: RunArgs, algo: str) -> Config:
    overrides = [f"{LAUNCHER_KEYS[k]}={v}" for k, v in args.keys.items()] + args.overrides
    return load_config(choose_config(args, algo), overrides)


def cmd_train(argv: list[str]) -> int:
    parser_flags = {"--algo": True}
    args = parse_run_args(argv, parser_flags)
    algo = args.extra.pop("algo", "grpo")
    if algo not in ALGO_CONFIGS:
        raise UsageError(f"--algo {algo} is not one of {list(ALGO_CONFIGS)}")
    cfg = build_config(args, algo)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    from zerosearch.training.driver import train

    train(cfg)
    return 0


def _config_with_out(argv: list[str], flags: dict[str, bool], need_out: str) -> tuple[RunArgs, Config | None]:
    """A command that writes to `--out`: its words and config; the config is None when `--print-config` printed it."""
    args = parse_run_args(argv, {"--out": True, **flags})
    if "out" not in args.extra:
        raise UsageError(need_out)
    cfg = build_config(args, "grpo")
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return args, None
    return args, cfg


def cmd_rollout(argv: list[str]) -> int:
    args, cfg = _config_with_out(argv, {"--num-prompts": True, "--split": True, "--step": True},
                                 "rollout needs --out FILE.jsonl")
    if cfg is None:
        return 0
    from zerosearch.rollout.command import run_rollout_command

    return run_rollout_command(
        cfg,
        out=args.extra["out"],
        num_prompts=int(args.extra.get("num_prompts", 4)),
        split=args.extra.get("split", cfg.data.train_split),
        step=int(args.extra.get("step", 0)),
    )


def cmd_warmstart(argv: list[str]) -> int:
    """Supervised warm-start on the tag format (a separate stage; `zerosearch/training/warmstart.py`):
    `warmstart.*` fields set it, `--out DIR` names the fine-tuned policy (train from it with MODEL_PATH DIR)."""
    args, cfg = _config_with_out(argv, {}, "warmstart needs --out DIR (the fine-tuned policy; train from it with "
                                           "MODEL_PATH DIR)")
    if cfg is None:
        return 0
    from zerosearch.training.warmstart import warm_start

    print(json.dumps(warm_start(cfg, args.extra["out"]), indent=2))
    return 0


def cmd_fetch_model(argv: list[str]) -> int:
    from zerosearch.models import EMBEDDED_MODEL, GEMMA_MODEL, build_model, model_ready

    parser = argparse.ArgumentParser(prog="zerosearch fetch-model", description="Build the embedded default model.")
    parser.add_argument("--model", default=EMBEDDED_MODEL, choices=[EMBEDDED_MODEL, GEMMA_MODEL],
                        help=f"{GEMMA_MODEL}: Gemma-3-270M base, from the `gemma` extra (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = parser.parse_args(argv)
    already = model_ready(args.model) and not args.force
    path = build_model(args.model, force=args.force)
    print(f"{'already built' if already else 'built'}: {path}")
    return 0


def cmd_prepare_data(argv: list[str]) -> int:
    from zerosearch.data.prepare import add_prepare_data_args, prepare_data_main

    parser = argparse.ArgumentParser(prog="zerosearch prepare-data", description="JSONL QA -> ZeroSearch parquet layout.")
    add_prepare_data_args(parser)
    return prepare_data_main(parser.parse_args(argv)) or 0


def cmd_serve_sim(argv: list[str]) -> int:
    from zerosearch.search.server import add_serve_sim_args, serve_sim_main

    parser = argparse.ArgumentParser(prog="zerosearch serve-sim", description="Serve a simulation LLM (OpenAI API).")
    add_serve_sim_args(parser)
    return serve_sim_main(parser.parse_args(argv)) or 0


def cmd_eval(argv: list[str]) -> int:
    from zerosearch.eval import eval_main

    return eval_main(argv)


def cmd_infer(argv: list[str]) -> int:
    from zerosearch.infer import infer_main

    return infer_main(argv)


def cmd_simulator(argv: list[str]) -> int:
    from zerosearch.simulator.cli import main as simulator_main

    return simulator_main(argv)


def cmd_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="zerosearch config", description="Print a resolved config or describe the fields.")
    parser.add_argument("--describe", action="store_true", help="list every field with its documentation")
    parser.add_argument("--config", default="cpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.describe:
        from zerosearch.config import field_docs

        cfg = Config()
        for key, doc in field_docs().items():
            section, name = key.split(".")
            print(f"{key} = {getattr(getattr(cfg, section), name)!r}\n    {doc}")
        return 0
    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


COMMANDS = {
    "train": cmd_train,
    "rollout": cmd_rollout,
    "serve-sim": cmd_serve_sim,
    "eval": cmd_eval,
    "infer": cmd_infer,
    "prepare-data": cmd_prepare_data,
    "fetch-model": cmd_fetch_model,
    "config": cmd_config,
    "simulator": cmd_simulator,
    "warmstart": cmd_warmstart,
}


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("ZEROSEARCH_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    # SIGTERM unwinds like Ctrl-C, so the servers and Ray a command started are stopped on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[command](rest)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as e:
        if not _is_bad_input(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        search = sys.modules.get("zerosearch.search.base")  # loaded by whatever searched
        if search is None or not isinstance(e, search.SearchError):
            raise
        # too many searches failed: the message names the server and how to start one; a Ray task's error
        # (a subclass of the cause) would print the worker's traceback, so print the cause
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 1


def _is_bad_input(e: BaseException) -> bool:
    """A data-file error (it names the file, row and field): the user's to fix, so one line, not a traceback."""
    qa = sys.modules.get("zerosearch.data.qa")  # loaded by whatever read the data
    return qa is not None and isinstance(e, (qa.DataFormatError, qa.DataNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
