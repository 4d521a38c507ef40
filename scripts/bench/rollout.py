"""Rollout benchmark: the raw engine against the full multi-turn agent loop, on the same prompts.

Starts the simulation server (vLLM's OpenAI server on 127.0.0.1) and an in-process vLLM policy
engine on the embedded model, then measures
  - engine tokens/s: one batched single-turn generation of all prompts x n;
  - loop generation tokens/s: policy tokens / wall time during which at least one generation runs;
  - search wait per turn, against one batched simulator call of the same size;
  - queries in flight, overhead share, and the weight-push time.

    .venv/bin/python scripts/bench/rollout.py [--prompts 16] [--n 4] [key=value ...]

Ends with one line: RESULT loop_tokens_per_s=... engine_tokens_per_s=... ratio=... overhead_share=... weight_push_s=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--port", type=int, default=6017)
    parser.add_argument("--p-noisy", type=float, default=0.25)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from zerosearch.config import load_config
    from zerosearch.models import resolve_model_path
    from zerosearch.rollout.factory import load_samples, train_sampling
    from zerosearch.rollout.loop import encode_prompt, loop_metrics
    from zerosearch.rollout.stack import build_rollout_stack
    from zerosearch.search import SearchRequest

    cfg = load_config("cpu", [f"search.ip=127.0.0.1:{args.port}", f"rollout.n={args.n}", *args.overrides])
    samples = load_samples(cfg, "test")[: args.prompts]
    sampling = train_sampling(cfg)
    with build_rollout_stack(cfg, start_servers=True) as rollout:
        engine, search, loop = rollout.engine, rollout.search, rollout.loop
        prompts = [encode_prompt(engine.tokenizer, s.prompt) for s in samples]
        engine.generate(prompts[:2], sampling, n=1)  # warm-up

        t0 = time.perf_counter()
        outs = engine.generate(prompts, sampling, n=args.n)
        engine_s = time.perf_counter() - t0
        engine_tokens = sum(len(g.token_ids) for gens in outs for g in gens)
        engine_tps = engine_tokens / engine_s

        trajs, stats = loop.run(samples, args.n, sampling, args.p_noisy, noise_seed=1)
        loop_tps = stats.policy_tokens / stats.generation_s
        overhead = max(stats.wall_s - stats.generation_s - stats.search_wait_s, 0.0) / stats.wall_s
        behaviour = loop_metrics(trajs)
        turns_with_search = max(1, sum(1 for t in trajs for _ in t.queries))
        queries = [q for t in trajs for q in t.queries]

        # one batched simulator call as large as the loop's biggest burst of queries
        size = max(1, int(stats.max_queries_in_flight))
        requests = [SearchRequest(query=q, question=samples[0].question, golden_answers=samples[0].golden_answers,
                                  noisy=False) for q in (queries or ["capital of France"] * size)[:size]]
        t0 = time.perf_counter()
        search.search(requests)
        batched_call_s = time.perf_counter() - t0

        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.path), dtype=torch.float32)
        pushes = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine.load_weights(model.named_parameters())
            pushes.append(time.perf_counter() - t0)
        push_s = statistics.median(pushes)

    lat = sorted(stats.search_latency_s) or [0.0]
    rows = [
        ("prompts x n", f"{len(samples)} x {args.n}"),
        ("engine: tokens / seconds", f"{engine_tokens} / {engine_s:.1f}"),
        ("engine tokens/s", f"{engine_tps:.0f}"),
        ("loop: policy tokens / generation seconds", f"{stats.policy_tokens} / {stats.generation_s:.1f}"),
        ("loop generation tokens/s", f"{loop_tps:.0f}"),
        ("ratio loop / engine", f"{loop_tps / engine_tps:.2f}"),
        ("loop wall s", f"{stats.wall_s:.1f}"),
        ("search wait s (engine idle)", f"{stats.search_wait_s:.1f}"),
        ("queries / per trajectory", f"{len(queries)} / {behaviour['rollout/searches_per_traj']:.2f}"),
        ("search latency per query p50 / max s", f"{lat[len(lat) // 2]:.1f} / {lat[-1]:.1f}"),
        ("search wait per search turn s", f"{stats.search_wait_s / turns_with_search:.2f}"),
        (f"one batched simulator call of {size} s", f"{batched_call_s:.1f}"),
        ("max queries in flight", f"{stats.max_queries_in_flight}"),
        ("overhead share", f"{overhead:.3f}"),
        ("weight push s (median of 3)", f"{push_s:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'measure':{width}s} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:{width}s} | {v} |")
    print(f"machine: {machine()}")
    print(f"RESULT loop_tokens_per_s={loop_tps:.1f} engine_tokens_per_s={engine_tps:.1f} "
          f"ratio={loop_tps / engine_tps:.3f} overhead_share={overhead:.4f} weight_push_s={push_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
