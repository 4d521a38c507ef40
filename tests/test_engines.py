"""Policy engines: stop strings, finish reasons, raw log-probs, submit/poll interleaving, weight pushes.

The vLLM tests share one in-process engine on a tiny random model (float32, so log-probs compare
exactly with an HF forward pass). vLLM's CPU attention needs head_dim >= 32, hence hidden=128 there.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import build_tiny_model

from zerosearch.rollout.engines import (
    Generation,
    PolicyEngine,
    SamplingSpec,
    build_policy_engine,
    engine_names,
)
from zerosearch.rollout.engines.hf_engine import HFEngine, truncate_generation

STOP = ["</search>", "</answer>"]


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of one forward pass over prompt + completion, at the completion's tokens."""
    ids = torch.tensor([prompt + completion])  # [1, seq]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [completion, vocab]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def pick_stop(engine: PolicyEngine, prompt: list[int]) -> tuple[str, Generation]:
    """A stop string the greedy continuation is known to produce: the text of its 3rd-4th tokens."""
    free = engine.generate([prompt], SamplingSpec(temperature=0, max_tokens=8, stop=[]))[0][0]
    stop = engine.tokenizer.decode(free.token_ids[2:4])
    assert stop.strip(), f"degenerate continuation {free.text!r}"
    return stop, free


def check_stopped_at(stopped: Generation, free: Generation, stop: str) -> None:
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text.endswith(stop)
    assert stopped.text == free.text[: free.text.index(stop) + len(stop)]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]  # greedy: same prefix
    assert len(stopped.token_ids) <= 4 and len(stopped.logprobs) == len(stopped.token_ids)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    return [
        smollm2_tokenizer("Question: who wrote Hamlet? Let me search.")["input_ids"],
        smollm2_tokenizer("Hi")["input_ids"],
    ]


# ---------------------------------------------------------------------------------------------
# types and registry


def test_sampling_spec_defaults_and_validation():
    spec = SamplingSpec()
    assert (spec.temperature, spec.top_p, spec.max_tokens, spec.stop, spec.seed) == (
        1.0,
        1.0,
        500,
        STOP,
        None,
    )
    assert SamplingSpec().stop is not spec.stop  # default_factory
    assert SamplingSpec(temperature=0).greedy
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingSpec(**bad)


def test_build_policy_engine_unknown_name_lists_choices():
    assert {"vllm", "hf"} <= set(engine_names())
    with pytest.raises(ValueError, match="hf.*vllm"):
        build_policy_engine("sglang", "/nowhere")


# ---------------------------------------------------------------------------------------------
# truncation (the HF engine's stop handling)


def test_truncate_keeps_stop_string_and_cuts_right_after_it(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("I think <search>capital of France</search>\n\nmore text</answer>")["input_ids"]
    kept, text, finish, stop_reason = truncate_generation(ids, tok, STOP, [tok.eos_token_id])
    assert (text, finish, stop_reason) == ("I think <search>capital of France</search>", "stop", "</search>")
    assert kept == ids[: len(kept)]
    assert "</search>" in tok.decode(kept) and "</search>" not in tok.decode(kept[:-1])


def test_truncate_earliest_stop_string_wins(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("x</answer> y</search>")["input_ids"]
    _, text, finish, stop_reason = truncate_generation(ids, tok, STOP, [tok.eos_token_id])
    assert (text, finish, stop_reason) == ("x</answer>", "stop", "</answer>")


def test_truncate_eos_and_length(smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    ids = tok("no stop here")["input_ids"]
    # EOS ends it and is kept in the tokens, not in the text; a stop string after EOS does not count
    tail = tok("</search>")["input_ids"]
    kept, text, finish, stop_reason = truncate_generation(ids + [eos] + tail, tok, STOP, [eos])
    assert (kept, text, finish, stop_reason) == (ids + [eos], "no stop here", "stop", None)
    assert truncate_generation(ids, tok, STOP, [eos]) == (ids, "no stop here", "length", None)


# ---------------------------------------------------------------------------------------------
# HF engine


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    engine = build_policy_engine("hf", str(tiny_model_dir))
    yield engine
    engine.close()


def test_hf_engine_n_samples_and_raw_logprobs(hf_engine, prompts):
    gens = hf_engine.generate(prompts, SamplingSpec(temperature=0.7, max_tokens=6, stop=[]), n=3)
    assert [len(g) for g in gens] == [3, 3]
    for prompt, samples in zip(prompts, gens):
        assert len({tuple(g.token_ids) for g in samples}) > 1  # separate requests diverge
        for g in samples:
            assert (g.finish_reason, g.stop_reason, len(g.token_ids), len(g.logprobs)) == (
                "length",
                None,
                6,
                6,
            )
            # raw log-probs (before temperature) == the trainer's forward pass
            expected = hf_logprobs(hf_engine.model, prompt, g.token_ids)
            torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)


def test_hf_engine_stop_string_end_to_end(hf_engine, prompts):
    stop, free = pick_stop(hf_engine, prompts[0])
    stopped = hf_engine.generate([prompts[0]], SamplingSpec(temperature=0, max_tokens=8, stop=[stop]))[0][0]
    check_stopped_at(stopped, free, stop)


def test_hf_engine_seed_reproducible_and_submit_rules(hf_engine, prompts):
    spec = SamplingSpec(max_tokens=5, stop=[], seed=7)
    a, b = (hf_engine.generate(prompts[:1], spec)[0][0] for _ in range(2))
    assert a.token_ids == b.token_ids
    hf_engine.submit("x", prompts[0], spec)
    with pytest.raises(ValueError, match="in flight"):
        hf_engine.submit("x", prompts[0], spec)
    assert hf_engine.has_unfinished()
    assert [rid for rid, _ in hf_engine.poll()] == ["x"] and not hf_engine.has_unfinished()


def test_hf_engine_load_weights_and_wraps_a_model(tmp_path, smollm2_tokenizer, tiny_model_dir, prompts):
    other = load_hf(build_tiny_model(tmp_path / "b", smollm2_tokenizer, seed=1))
    engine = HFEngine(str(tiny_model_dir))
    reference = HFEngine(other, tokenizer=smollm2_tokenizer)  # an in-memory model object
    greedy = SamplingSpec(temperature=0, max_tokens=5, stop=[])
    before = engine.generate(prompts[:1], greedy)[0][0]
    engine.load_weights(other.state_dict().items())
    after = engine.generate(prompts[:1], greedy)[0][0]
    expected = reference.generate(prompts[:1], greedy)[0][0]
    assert after.token_ids == expected.token_ids and after.logprobs != before.logprobs
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(expected.logprobs))
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("not.a.weight", torch.zeros(1))])


# ---------------------------------------------------------------------------------------------
# vLLM engine (one engine alive at a time)


@pytest.fixture(scope="module")
def vllm_dirs(tmp_path_factory, smollm2_tokenizer):
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm-tiny")
    a = build_tiny_model(root / "a", smollm2_tokenizer, seed=0, hidden=128)
    b = build_tiny_model(root / "b", smollm2_tokenizer, seed=1, hidden=128)
    return a, b


def start_vllm(path, dtype="float32"):
    return build_policy_engine("vllm", str(path), dtype=dtype, max_model_len=512, cpu_kv_cache_gib=1)


GREEDY = SamplingSpec(temperature=0, max_tokens=12, stop=[])


@pytest.fixture(scope="module")
def fresh_b_bf16(vllm_dirs, prompts):
    """Greedy continuation of a fresh bf16 engine started from model B (closed on return)."""
    engine = start_vllm(vllm_dirs[1], dtype="bfloat16")
    try:
        return engine.generate(prompts[:1], GREEDY)[0][0]
    finally:
        engine.close()
        gc.collect()


def test_vllm_bf16_weight_push_equals_fresh_engine(vllm_dirs, prompts, fresh_b_bf16):
    """In bf16 the CPU GEMMs use pre-packed weights: the tied lm_head must be re-packed after a push.

    Runs before the shared float32 engine below starts (file order), so one engine lives at a time.
    """
    engine = start_vllm(vllm_dirs[0], dtype="bfloat16")
    try:
        before = engine.generate(prompts[:1], GREEDY)[0][0]
        engine.load_weights(load_hf(vllm_dirs[1]).state_dict().items())  # float32 in, cast to bf16
        print(f"weight push (bf16): {engine.last_load_seconds:.3f} s")
        after = engine.generate(prompts[:1], GREEDY)[0][0]
    finally:
        engine.close()
        gc.collect()
    assert after.token_ids == fresh_b_bf16.token_ids
    torch.testing.assert_close(
        torch.tensor(after.logprobs), torch.tensor(fresh_b_bf16.logprobs), atol=1e-3, rtol=0
    )
    assert not torch.allclose(torch.tensor(after.logprobs), torch.tensor(before.logprobs), atol=1e-2)


@pytest.mark.slow
def test_vllm_compiled_engine_sees_pushed_weights(vllm_dirs, prompts, fresh_b_bf16):
    """`rollout.enforce_eager=false` on CPU: torch.compile'd graphs read the parameters pushed in place, so after
    a push of model B the compiled engine continues as a fresh (eager) engine started from B."""
    engine = build_policy_engine("vllm", str(vllm_dirs[0]), dtype="bfloat16", max_model_len=512, cpu_kv_cache_gib=1,
                                 enforce_eager=False)
    try:
        assert not engine._llm.llm_engine.vllm_config.model_config.enforce_eager
        before = engine.generate(prompts[:1], GREEDY)[0][0]
        engine.load_weights(load_hf(vllm_dirs[1]).state_dict().items())
        after = engine.generate(prompts[:1], GREEDY)[0][0]
    finally:
        engine.close()
        gc.collect()
    assert after.token_ids == fresh_b_bf16.token_ids != before.token_ids
    # compiled kernels may fuse differently from eager ones: bf16 rounding, not a different model
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(fresh_b_bf16.logprobs), atol=2e-2, rtol=0)


@pytest.fixture(scope="module")
def vllm_engine(vllm_dirs):
    """The shared float32 engine on model A."""
    engine = start_vllm(vllm_dirs[0])
    print(f"vLLM engine started in {engine.start_seconds:.1f} s")
    yield engine
    engine.close()
    gc.collect()


def test_vllm_generates_n_samples_per_prompt(vllm_engine, prompts):
    gens = vllm_engine.generate(prompts, SamplingSpec(temperature=1.0, max_tokens=8, stop=[]), n=3)
    assert [len(g) for g in gens] == [3, 3]
    for samples in gens:
        assert len({tuple(g.token_ids) for g in samples}) > 1
        for g in samples:
            assert len(g.token_ids) == len(g.logprobs) == 8 and g.finish_reason == "length"
            assert g.text == vllm_engine.tokenizer.decode(g.token_ids, skip_special_tokens=True)
    tiny = vllm_engine.generate(prompts[:1], SamplingSpec(max_tokens=1))[0][0]
    assert (len(tiny.token_ids), len(tiny.logprobs), tiny.finish_reason, tiny.stop_reason) == (
        1,
        1,
        "length",
        None,
    )


def test_vllm_stop_string_kept(vllm_engine, prompts):
    stop, free = pick_stop(vllm_engine, prompts[0])
    stopped = vllm_engine.generate([prompts[0]], SamplingSpec(temperature=0, max_tokens=8, stop=[stop]))[0][0]
    check_stopped_at(stopped, free, stop)


def test_vllm_submit_poll_interleaves(vllm_engine, prompts):
    vllm_engine.submit("short", prompts[0], SamplingSpec(max_tokens=3, stop=[]))
    vllm_engine.submit("long", prompts[1], SamplingSpec(max_tokens=40, stop=[]))
    with pytest.raises(ValueError, match="in flight"):
        vllm_engine.submit("long", prompts[1], SamplingSpec())
    order: list[str] = []
    while not order:
        order += [rid for rid, _ in vllm_engine.poll()]
    assert order == ["short"] and vllm_engine.has_unfinished()
    with pytest.raises(RuntimeError, match="in flight"):
        vllm_engine.load_weights([])
    vllm_engine.submit("late", prompts[0], SamplingSpec(max_tokens=3, stop=[]))  # joins mid-generation
    results = {}
    for _ in range(200):
        if not vllm_engine.has_unfinished():
            break
        for rid, gen in vllm_engine.poll():
            order.append(rid)
            results[rid] = gen
    assert order == ["short", "late", "long"]  # "late" overtook the running "long"
    assert len(results["long"].token_ids) == 40 and len(results["late"].token_ids) == 3


def test_vllm_logprobs_match_hf_forward(vllm_engine, vllm_dirs, prompts):
    model = load_hf(vllm_dirs[0])
    gens = vllm_engine.generate(prompts, SamplingSpec(temperature=0.7, max_tokens=10, stop=[]), n=2)
    for prompt, samples in zip(prompts, gens):
        for g in samples:  # raw log-probs: the temperature does not enter them
            expected = hf_logprobs(model, prompt, g.token_ids)
            torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-3, rtol=0)


def test_vllm_weight_push_matches_hf_forward_and_round_trips(vllm_engine, vllm_dirs, prompts):
    before = vllm_engine.generate(prompts[:1], GREEDY)[0][0]
    model_b = load_hf(vllm_dirs[1])
    vllm_engine.load_weights(model_b.state_dict().items())
    print(f"weight push (float32): {vllm_engine.last_load_seconds:.3f} s")
    after = vllm_engine.generate(prompts[:1], GREEDY)[0][0]
    expected = hf_logprobs(model_b, prompts[0], after.token_ids)
    torch.testing.assert_close(torch.tensor(after.logprobs), expected, atol=1e-4, rtol=0)
    assert not torch.allclose(torch.tensor(after.logprobs), torch.tensor(before.logprobs), atol=1e-2)
    # and back: the push is exact both ways
    vllm_engine.load_weights(load_hf(vllm_dirs[0]).state_dict().items())
    again = vllm_engine.generate(prompts[:1], GREEDY)[0][0]
    assert again.token_ids == before.token_ids
    torch.testing.assert_close(torch.tensor(again.logprobs), torch.tensor(before.logprobs), atol=1e-5, rtol=0)
