"""`zerosearch infer`: answer one question and print the whole trace.

    zerosearch infer [--model PATH] "question" [--search simulate_prompt|simulate_sft|wiki|google]
                     [--corpus FILE] [--engine vllm|hf] [--max-turns N] [--ip HOST:PORT]
                     [--simulation-llm NAME] [--topk K] [--answer GOLD ...] [--no-color]
                     [--config cpu] [key=value ...]

One greedy trajectory through the same agent loop as training and `zerosearch eval`. The trace is
cut into spans by the loss mask (policy tokens vs observation tokens, each span decoded on its own),
policy spans further into `<think>`, `<search>` and `<answer>` blocks, and printed in colour on a
terminal (plain text when piped, or with `--no-color` / `NO_COLOR`). `--answer` gives gold answers:
the simulator writes its documents toward them and the answer is scored against them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from dataclasses import dataclass
from typing import TextIO

from zerosearch.cmdline import (
    EXIT_USAGE,
    EvalUsageError,
    _Parser,
    add_stack_args,
    build_config,
    keep_stdout_for_results,
    split_overrides,
)

# Policy text: a tagged block, or an unclosed one running to the end (cut by the token budget).
_BLOCK_RE = re.compile(r"<(think|search|answer)>.*?(?:</\1>|\Z)", re.DOTALL)
RESET = "\x1b[0m"
COLORS = {
    "think": "\x1b[2m",  # dim
    "search": "\x1b[1;33m",  # bold yellow
    "information": "\x1b[36m",  # cyan
    "answer": "\x1b[1;32m",  # bold green
    "feedback": "\x1b[31m",  # red: the invalid-action message
    "text": "",  # untagged policy text
}


@dataclass
class Segment:
    kind: str
    """`think`, `search`, `answer`, `text` (policy text outside tags), `information` or `feedback`."""
    text: str
    policy: bool
    """Whether the policy generated it (loss mask 1)."""


def mask_spans(response_ids: list[int], loss_mask: list[int]) -> list[tuple[bool, list[int]]]:
    """Maximal runs of equal mask bits: `[(is_policy, token_ids), ...]` in sequence order."""
    assert len(response_ids) == len(loss_mask), "one mask bit per response token"
    return [
        (bool(bit), [token for token, _ in run])
        for bit, run in itertools.groupby(zip(response_ids, loss_mask), key=lambda pair: pair[1])
    ]


def _policy_segments(text: str) -> list[Segment]:
    out, pos = [], 0
    for match in _BLOCK_RE.finditer(text):
        if text[pos:match.start()].strip():
            out.append(Segment("text", text[pos:match.start()].strip(), True))
        out.append(Segment(match.group(1), match.group(0).strip(), True))
        pos = match.end()
    if text[pos:].strip():
        out.append(Segment("text", text[pos:].strip(), True))
    return out


def split_trace(traj, tokenizer) -> list[Segment]:
    """A trajectory's response as display segments: mask runs decoded separately, then split by tag."""
    segments: list[Segment] = []
    for is_policy, ids in mask_spans(traj.response_ids, traj.loss_mask):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if is_policy:
            segments += _policy_segments(text)
        elif text.strip():
            kind = "information" if "<information>" in text else "feedback"
            segments.append(Segment(kind, text.strip(), False))
    return segments


def use_color(stream: TextIO, no_color: bool = False) -> bool:
    """Colour only on a terminal, and not with `--no-color` or the NO_COLOR convention."""
    return not no_color and "NO_COLOR" not in os.environ and stream.isatty()


def render_trace(segments: list[Segment], color: bool) -> str:
    """Segments one after another, each coloured by kind when `color`."""
    lines = []
    for seg in segments:
        code = COLORS.get(seg.kind, "") if color else ""
        lines.append(f"{code}{seg.text}{RESET}" if code else seg.text)
    return "\n".join(lines)


def _parse_infer_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    words, overrides = split_overrides(argv)
    parser = _Parser(prog="zerosearch infer", description="Answer one question and print its full trace.")
    parser.add_argument("question", help="the question to answer")
    add_stack_args(parser)
    parser.add_argument("--answer", action="append", default=[],
                        help="a gold answer (repeatable): guides the simulator, and the answer is scored")
    parser.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    args = parser.parse_args(words)
    if not args.question.strip():
        raise EvalUsageError("the question is empty; pass it as one quoted argument")
    return args, overrides


def infer_main(argv: list[str]) -> int:
    keep_stdout_for_results(vllm_level="WARNING")
    try:
        args, overrides = _parse_infer_args(argv)
        cfg = build_config(args, overrides)
    except EvalUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0)

    from zerosearch.data import QASample, build_prompt
    from zerosearch.rollout.factory import val_sampling
    from zerosearch.rollout.stack import build_rollout_stack

    question = args.question.strip()
    sample = QASample(question=question, golden_answers=list(args.answer), data_source="infer",
                      prompt=build_prompt(question), index=0)
    with build_rollout_stack(cfg, start_servers=True) as rollout:
        (traj,), _ = rollout.loop.run([sample], 1, val_sampling(cfg), p_noisy=0.0, noise_seed=cfg.trainer.seed)
        segments = split_trace(traj, rollout.engine.tokenizer)

    color = use_color(sys.stdout, args.no_color)
    print(f"Question: {question}\n")
    print(render_trace(segments, color))
    print(f"\nanswer: {traj.answer if traj.answer is not None else '(none)'}  "
          f"[searches {traj.num_searches}, turns {traj.turns}, finish {traj.finish_reason}]")
    if args.answer:
        score = traj.score()
        print(f"gold: {' | '.join(args.answer)}  EM {score['em']:.0f}  F1 {score['f1']:.2f}")
    return 0
