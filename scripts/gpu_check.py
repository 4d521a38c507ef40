"""GPU check: zerosearch's own log-prob and GRPO loss code on CPU and CUDA, and one timed update on CUDA.

Needs only torch, transformers and the pure-torch zerosearch modules (plus omegaconf, which
`zerosearch.training.heads` pulls in through `zerosearch.config`); no vLLM, Ray or model weights: every model
is random and seeded.

Part 1 (agreement): a tiny random LlamaForCausalLM and a batch of fake GRPO trajectories (prompt + response,
a masked `<information>` span in each response, two groups of 4, GRPO advantages from `compute_grpo_advantage`)
go through exactly what `ActorRolloutWorker._policy_loss` runs: `token_logprobs` (the selected-position head,
with entropies) and `actor_loss` (PPO-clip + low-var KL) minus the entropy bonus, then backward. Run on CPU
fp64 (a reference for the rounding scale), CPU fp32, CPU bf16 autocast, CUDA fp32, CUDA bf16 autocast, and CUDA
bf16 autocast with gradient checkpointing; a table gives each one's max differences from CPU fp32 and from the
fp64 reference. Asserted: CUDA fp32 agrees with CPU fp32 to the tolerances in `TOL_FP32` (see there), and the
bf16 runs stay near fp32 (`TOL_BF16`).

Part 2 (speed, CUDA only): one update (forward + backward over every micro-batch, grad clip, AdamW step) of a
random model of SmolLM2-135M's shape at the CPU default's batch shape (configs/cpu.yaml: 8 prompts x 4
rollouts = 32 trajectories of max_total_length 1024 tokens, the longest response 2 turns x 64 policy tokens
around a 160-token masked observation), fp32 master weights under bf16 autocast, micro-batched by
zerosearch's own `micro_batches` / `loss_weight` as `_TrainedWorker._accumulate` does.

    .venv/bin/python scripts/gpu_check.py            # on a machine without CUDA: part 1 on CPU only, part 2 skipped
    .venv/bin/python scripts/gpu_check.py --smoke --timing-device cpu   # part 2's code path at a toy size, on CPU

Part 3 (precision of the GPU default's update): one AdamW step at `configs/grpo.yaml`'s learning rate (1e-6) on
a random model of SmolLM2-135M's shape with the weights as `model.dtype` says (fp32 under bf16 autocast), and on
bf16 weights beside it: the share of the layers' weights the step changes. Asserted: the configured weights move.
Runs where part 2 runs.

Exit status 0 when every assertion held, 1 otherwise (after both parts have run and printed), 2 when the
zerosearch modules cannot be imported.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

try:
    from zerosearch.algos import actor_loss, agg_loss, get_advantage_estimator, outcome_to_token_rewards
    from zerosearch.dtypes import torch_dtype
    from zerosearch.rollout.trajectory import Trajectory
    from zerosearch.training.batch import collate, loss_totals, loss_weight, micro_batches, pad_to_grid
    from zerosearch.training.heads import TokenLogProbs, token_logprobs
except ModuleNotFoundError as exc:  # zerosearch.training.heads -> zerosearch.config -> omegaconf
    print(f"cannot import the zerosearch modules: {exc}. They need torch and omegaconf (`pip install omegaconf`, "
          "pure Python); run from the repo with its .venv, or put omegaconf on PYTHONPATH.", file=sys.stderr)
    sys.exit(2)

# The actor's settings this check runs with (configs/cpu.yaml over zerosearch/config.py's defaults).
TEMPERATURE = 0.6  # rollout.temperature: the log-probs are taken at it
CLIP_RATIO = 0.2
KL_COEF, KL_TYPE = 0.001, "low_var_kl"  # algorithm.use_kl_loss with configs/grpo.yaml's coefficient
ENTROPY_COEFF = 0.001
AGG = "token-mean"
GRAD_CLIP = 1.0

# CUDA fp32 against CPU fp32. fp32's unit roundoff is 6e-8; the "vs fp64" columns show what that adds up to through
# this model on the CPU: 1e-6 nats in the log-probs, 4e-7 of the largest gradient entry, 1e-8 in the loss and the
# gradient norm (the fp64 run's vocabulary head is still fp32: heads.py casts to it). Two fp32 implementations
# (other kernels, other summation orders) differ by about the sum of their errors, so these bounds leave 100x or
# more headroom, and stay below what a silent precision drop gives: TF32 matmuls (roundoff 5e-4) or a bf16 leak
# (4e-3; the bf16 rows move the log-probs by ~2e-3 and the gradients by ~2e-3 of their largest entry) fail them.
TOL_FP32 = {"logprob": 1e-4, "loss": 1e-6, "grad_norm_rel": 1e-5, "grad_max_rel": 1e-4}
# bf16 autocast against CPU fp32: a sanity bound only (bf16 roundoff 4e-3 per op); the table gives the real size.
TOL_BF16 = {"logprob": 0.1, "loss": 1e-2, "grad_norm_rel": 0.05, "grad_cos_min": 0.99}

# SmolLM2-135M's shape (its config.json): part 2's random model.
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def llama(seed: int, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


# --- fake trajectories ---------------------------------------------------------------------------------------

def fake_trajectories(gen: torch.Generator, vocab: int, groups: int, n: int, prompt_len: tuple[int, int],
                      turn_len: tuple[int, int], obs_len: tuple[int, int]) -> list[Trajectory]:
    """`groups` x `n` trajectories built as the agent loop builds them: policy tokens, an observation span
    (the retrieved `<information>` block, loss mask 0), policy tokens again. Lengths are drawn from the ranges."""

    def draw(lo_hi):
        lo, hi = lo_hi
        return lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def tokens(k):
        return torch.randint(3, vocab, (k,), generator=gen).tolist()

    trajs = []
    for g in range(groups):
        prompt = tokens(draw(prompt_len))  # the group's trajectories share their prompt, as GRPO's rollouts do
        for _ in range(n):
            t = Trajectory(uid=len(trajs), group=g, question=f"q{g}", golden_answers=["a"], prompt_ids=list(prompt))
            t.append_policy(tokens(draw(turn_len)))  # ... <search> query </search>
            t.append_observation(tokens(draw(obs_len)))  # <information> documents </information>: no loss
            t.append_policy(tokens(draw(turn_len)))  # ... <answer> ... </answer>
            t.finish_reason = "answer"
            trajs.append(t)
    return trajs


def grpo_advantages_for(trajs: list[Trajectory], rewards: torch.Tensor) -> torch.Tensor:
    """What `driver.compute_advantages` does for GRPO: the outcome reward on the last loss token, then the
    registered `grpo` estimator over each trajectory's `train_mask`. -> [B, R]"""
    R = max(len(t.response_ids) for t in trajs)
    mask = pad_to_grid([t.train_mask for t in trajs], R)  # [B, R]
    adv, _ = get_advantage_estimator("grpo")(outcome_to_token_rewards(rewards, mask), mask, [t.group for t in trajs])
    return adv  # [B, R]


# --- part 1 ----------------------------------------------------------------------------------------------------

def policy_step(model, batch, adv, old, ref, device: torch.device, autocast: torch.dtype | None) -> dict:
    """`ActorRolloutWorker._policy_loss` + backward on `device`: log-probs, loss, metrics, gradients (on CPU)."""
    net = TokenLogProbs(model)
    model.zero_grad(set_to_none=True)
    lp, ent = token_logprobs(net, batch, batch.train_mask.bool(), device, with_entropy=True, autocast=autocast,
                             temperature=TEMPERATURE, entropy_grad=True)  # [B, R] x2
    mask = batch.train_mask.to(device)  # [B, R]
    loss, metrics = actor_loss(lp, old.to(device), ref.to(device), adv.to(device), mask, kl_coef=KL_COEF,
                               kl_kind=KL_TYPE, clip_ratio=CLIP_RATIO, agg=AGG)
    entropy = agg_loss(ent, mask, AGG)
    loss = loss - ENTROPY_COEFF * entropy
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return {"lp": lp.detach().double().cpu(), "loss": float(loss.detach()), "metrics": metrics, "grads": grads,
            "grad_norm": float(torch.sqrt(sum((g**2).sum() for g in grads.values())))}


def compare(a: dict, b: dict, mask: torch.Tensor) -> dict:
    sel = mask.bool()
    dg = max(float((a["grads"][n] - b["grads"][n]).abs().max()) for n in b["grads"])
    gmax = max(float(g.abs().max()) for g in b["grads"].values())
    va = torch.cat([a["grads"][n].flatten() for n in sorted(b["grads"])])
    vb = torch.cat([b["grads"][n].flatten() for n in sorted(b["grads"])])
    return {"logprob": float((a["lp"][sel] - b["lp"][sel]).abs().max()),
            "loss": abs(a["loss"] - b["loss"]),
            "grad_norm_rel": abs(a["grad_norm"] - b["grad_norm"]) / max(b["grad_norm"], 1e-30),
            "grad_max_rel": dg / max(gmax, 1e-30),
            "grad_cos": float(torch.nn.functional.cosine_similarity(va, vb, dim=0))}


def part1(cuda: bool, failures: list[str]) -> None:
    print("\n== Part 1: log-probs, GRPO loss and gradients, CPU vs CUDA ==")
    vocab = 512
    base = llama(0, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(0)
    trajs = fake_trajectories(gen, vocab, groups=2, n=4, prompt_len=(12, 40), turn_len=(4, 16), obs_len=(8, 24))
    rewards = torch.tensor([1.0, 0.1, 0.0, 0.1, 0.0, 1.0, 1.0, 0.0])  # F1 + format score; no constant group
    batch = collate(trajs, pad_id=0)
    adv = grpo_advantages_for(trajs, rewards)  # [B, R]
    mask = batch.train_mask  # [B, R]
    # old / reference log-probs: the CPU fp32 ones, moved off by seeded noise so the clip and the KL are live;
    # the same tensors go to every device
    with torch.no_grad():
        lp0, _ = token_logprobs(base, batch, mask.bool(), torch.device("cpu"), temperature=TEMPERATURE)
    old = torch.where(mask.bool(), lp0 + 0.3 * torch.randn(lp0.shape, generator=gen), 0.0)
    ref = torch.where(mask.bool(), lp0 + 0.1 * torch.randn(lp0.shape, generator=gen), 0.0)
    n_obs = sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajs)
    print(f"model: LlamaForCausalLM vocab {vocab}, hidden 64, 2 layers, 4 heads / 2 kv heads "
          f"(attention: {base.config._attn_implementation}); batch: {len(trajs)} trajectories in 2 groups, "
          f"padded length {batch.input_ids.shape[1]}, {int(mask.sum())} loss tokens, {n_obs} masked "
          f"<information> tokens")

    runs: dict[str, dict] = {}
    cpu = torch.device("cpu")
    runs["cpu fp64 (ref)"] = policy_step(copy.deepcopy(base).double(), batch, adv, old, ref, cpu, None)
    runs["cpu fp32"] = policy_step(copy.deepcopy(base), batch, adv, old, ref, cpu, None)
    runs["cpu bf16-autocast"] = policy_step(copy.deepcopy(base), batch, adv, old, ref, cpu, torch.bfloat16)
    if cuda:
        dev = torch.device("cuda")
        runs["cuda fp32"] = policy_step(copy.deepcopy(base).to(dev), batch, adv, old, ref, dev, None)
        runs["cuda bf16-autocast"] = policy_step(copy.deepcopy(base).to(dev), batch, adv, old, ref, dev,
                                                 torch.bfloat16)
        ckpt = copy.deepcopy(base).to(dev)
        ckpt.gradient_checkpointing_enable()
        ckpt.train()
        runs["cuda bf16 + grad ckpt"] = policy_step(ckpt, batch, adv, old, ref, dev, torch.bfloat16)
    else:
        print("CUDA is not available: the cuda rows are skipped (CPU rows only).")

    # every run: finite, and exactly 0 on the masked <information> tokens and the padding
    for name, r in runs.items():
        if not (torch.isfinite(r["lp"]).all() and all(torch.isfinite(g).all() for g in r["grads"].values())):
            failures.append(f"{name}: non-finite log-probs or gradients")
        if float(r["lp"][~mask.bool()].abs().max()) != 0.0:
            failures.append(f"{name}: non-zero log-prob on a masked token")

    fp32, fp64 = runs["cpu fp32"], runs["cpu fp64 (ref)"]
    hdr = (f"{'run':<24}{'loss':>12}{'grad norm':>12}{'clip_frac':>10} | vs cpu fp32: {'|dlogp|max':>11}"
           f"{'|dloss|':>10}{'dgnorm rel':>11}{'dgrad max rel':>14}{'grad cos':>10} | vs fp64: {'|dlogp|max':>11}"
           f"{'dgrad max rel':>14}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in runs.items():
        c, d = compare(r, fp32, mask), compare(r, fp64, mask)
        print(f"{name:<24}{r['loss']:>12.7f}{r['grad_norm']:>12.6f}{r['metrics']['clip_frac']:>10.4f} | "
              f"{'':>13}{c['logprob']:>11.2e}{c['loss']:>10.2e}{c['grad_norm_rel']:>11.2e}{c['grad_max_rel']:>14.2e}"
              f"{c['grad_cos']:>10.6f} | {'':>9}{d['logprob']:>11.2e}{d['grad_max_rel']:>14.2e}")

    def check(name: str, tol: dict) -> None:
        c = compare(runs[name], fp32, mask)
        for key, bound in tol.items():
            bad = c["grad_cos"] < bound if key == "grad_cos_min" else c[key] > bound
            shown = c["grad_cos"] if key == "grad_cos_min" else c[key]
            print(f"  {'FAIL' if bad else 'ok  '} {name} vs cpu fp32: {key} = {shown:.3e} "
                  f"({'>=' if key == 'grad_cos_min' else '<='} {bound:g})")
            if bad:
                failures.append(f"{name} vs cpu fp32: {key} {shown:.3e} beyond {bound:g}")

    print("assertions:")
    check("cpu bf16-autocast", TOL_BF16)
    if cuda:
        check("cuda fp32", TOL_FP32)
        check("cuda bf16-autocast", TOL_BF16)
        check("cuda bf16 + grad ckpt", TOL_BF16)


# --- part 2 ----------------------------------------------------------------------------------------------------

def part2(device: torch.device, smoke: bool, repeats: int, failures: list[str]) -> None:
    print(f"\n== Part 2: one actor update at the CPU default's batch shape, on {device} ==")
    # configs/cpu.yaml: data.train_batch_size 8 x rollout.n 4; rollout.max_total_length 1024; max_turns 2 of
    # max_response_length 64 around one observation of max_obs_length 160 -> the longest trajectory: a 736-token
    # prompt + 64 policy + 160 <information> + 64 policy tokens
    groups, n, turn, obs, total = 8, 4, 64, 160, 1024
    shape = dict(SMOLLM2_135M)
    if smoke:  # part 2's code path at a toy size, to test it on a CPU
        groups, n, turn, obs, total = 2, 2, 8, 16, 96
        shape.update(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    prompt = total - 2 * turn - obs
    gen = torch.Generator().manual_seed(1)
    trajs = fake_trajectories(gen, shape["vocab_size"], groups, n, (prompt, prompt), (turn, turn), (obs, obs))
    rewards = torch.rand(len(trajs), generator=gen)
    adv = grpo_advantages_for(trajs, rewards)  # [B, R]
    tokens_all = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    loss_tokens, sequences = loss_totals(trajs)

    t0 = time.perf_counter()
    with torch.device(device):
        model = llama(0, **shape)  # fp32 master weights (model.dtype float32)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: random LlamaForCausalLM of SmolLM2-135M's shape{' (SMOKE: toy size)' if smoke else ''}, "
          f"{n_params / 1e6:.1f}M parameters, fp32 weights, bf16 autocast, attention "
          f"{model.config._attn_implementation}; built in {build_s:.1f} s")
    print(f"batch: {len(trajs)} trajectories x {total} tokens = {tokens_all} tokens, {loss_tokens} loss tokens "
          f"({turn}+{turn} per trajectory; {obs} masked <information> tokens each)")
    net = TokenLogProbs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, betas=(0.9, 0.999))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]

    def update(plan: list[list[int]]) -> dict:
        """`_TrainedWorker._optimize` for one mini-batch of every trajectory: the weighted micro-batch losses'
        backward, grad clip, AdamW step."""
        model.train()
        opt.zero_grad(set_to_none=True)
        sync()
        t_start = time.perf_counter()
        for idx in plan:
            batch = collate([trajs[i] for i in idx], pad_id=0)
            r = batch.response_ids.shape[1]
            mask = batch.train_mask.to(device)
            lp, ent = token_logprobs(net, batch, batch.train_mask.bool(), device, with_entropy=True, autocast=torch.bfloat16,
                                     temperature=TEMPERATURE, entropy_grad=True)
            a = pad_to_grid(adv[idx], r).to(device)
            loss, _ = actor_loss(lp, lp.detach(), lp.detach(), a, mask, kl_coef=KL_COEF, kl_kind=KL_TYPE,
                                 clip_ratio=CLIP_RATIO, agg=AGG)
            loss = loss - ENTROPY_COEFF * agg_loss(ent, mask, AGG)
            (loss * loss_weight(batch.train_mask, loss_tokens, sequences, AGG)).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sync()
        return {"s": time.perf_counter() - t_start, "grad_norm": float(norm)}

    configs = [
        ("configs/cpu.yaml: micro_batch_tokens 1024 -> 1 seq/micro, grad ckpt", 1024, 4, True),
        ("configs/cpu.yaml micro-batches, no grad ckpt", 1024, 4, False),
        ("micro_batch_tokens 8192, micro_batch_size 8 (config defaults / grpo.yaml)", 8192, 8, False),
        ("one micro-batch of all 32 sequences", 1 << 20, 1 << 10, False),
    ]
    if smoke:
        configs = [(label, tok * 96 // 1024, size, ckpt) for label, tok, size, ckpt in configs]
    print(f"{'setting':<76}{'micro':>6}{'s / update':>12}{'tokens/s':>11}{'loss tok/s':>11}{'peak GiB':>10}"
          f"{'grad norm':>11}")
    for label, mb_tokens, mb_size, ckpt in configs:
        plan = micro_batches(lengths, mb_tokens, mb_size)
        if ckpt:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            update(plan)  # warm-up: kernels, allocator, AdamW state
            times = [update(plan) for _ in range(repeats)]
            s = statistics.median(t["s"] for t in times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            gn = times[-1]["grad_norm"]
            each = ", ".join(f"{t['s']:.3f}" for t in times)
            if not torch.isfinite(torch.tensor(gn)):
                failures.append(f"part 2 ({label}): non-finite grad norm")
            print(f"{label:<76}{len(plan):>6}{s:>12.3f}{tokens_all / s:>11.0f}{loss_tokens / s:>11.0f}{peak:>10.2f}"
                  f"{gn:>11.4f}   (each: {each})")
        except torch.OutOfMemoryError as exc:  # report and carry on with the next setting
            failures.append(f"part 2 ({label}): out of memory")
            print(f"{label:<76}{len(plan):>6}  out of memory: {str(exc).splitlines()[0]}")
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    print(f"(median of {repeats} updates after one warm-up; tokens/s counts every token of the 32 sequences, "
          "loss tok/s only the loss-carrying ones)")


def part3(device: torch.device, smoke: bool, failures: list[str]) -> None:
    """The GPU default's precision: one AdamW step at `configs/grpo.yaml`'s learning rate, on weights kept as
    `model.dtype` says (fp32 masters under bf16 autocast) and, beside it, on bf16 weights (the old default)."""
    from zerosearch.config import load_config

    cfg = load_config("grpo", ["actor.lr_warmup_steps_ratio=0"])
    m, a = cfg.model, cfg.actor
    print(f"\n== Part 3: one AdamW step at configs/grpo.yaml's actor.lr={a.lr:g} (no warm-up), on {device} ==")
    shape = dict(SMOLLM2_135M)
    groups, n, turn, obs, prompt = 2, 4, 64, 160, 256
    if smoke:
        groups, n, turn, obs, prompt = 2, 2, 8, 16, 32
        shape.update(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    gen = torch.Generator().manual_seed(2)
    trajs = fake_trajectories(gen, shape["vocab_size"], groups, n, (prompt, prompt), (turn, turn), (obs, obs))
    adv = grpo_advantages_for(trajs, torch.rand(len(trajs), generator=gen))  # [B, R]
    batch = collate(trajs, pad_id=0)
    mask = batch.train_mask.to(device)
    rows = [(f"configs/grpo.yaml: model.dtype={m.dtype}, autocast {m.autocast_dtype or 'off'}", m.dtype,
             m.autocast_dtype or None), ("bf16 weights (the old model.dtype: bfloat16), no autocast", "bfloat16", None)]
    print(f"{'weights':<66}{'moved':>8}{'median |step| / lr':>20}{'s / step':>10}")
    for label, dtype, autocast in rows:
        with torch.device(device):
            model = llama(0, **shape).to(torch_dtype(dtype))
        net = TokenLogProbs(model)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.999))
        layers = [p for name, p in model.named_parameters() if ".layers." in name]
        before = [p.detach().float().clone() for p in layers]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        lp, _ = token_logprobs(net, batch, batch.train_mask.bool(), device,
                               autocast=torch_dtype(autocast) if autocast else None, temperature=TEMPERATURE)
        loss, _ = actor_loss(lp, lp.detach(), lp.detach(), adv.to(device), mask, kl_coef=KL_COEF, kl_kind=KL_TYPE,
                             clip_ratio=CLIP_RATIO, agg=AGG)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        sync()
        took = time.perf_counter() - t0
        delta = torch.cat([(p.detach().float() - b).flatten() for p, b in zip(layers, before)])
        moved = float((delta != 0).float().mean())
        step = float(delta.abs().median()) / a.lr
        print(f"{label:<66}{moved:>8.3f}{step:>20.3f}{took:>10.3f}")
        if dtype == m.dtype and moved < 0.9:
            failures.append(f"part 3: the configured weights ({dtype}) moved at only {moved:.3f} of their entries")
        del model, net, opt
    print("(moved: the share of the transformer layers' weights the step changed; |step| / lr about 1 is AdamW's "
          "first step taken in full, 0 is a step rounded away)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timing-device", choices=("auto", "cuda", "cpu", "none"), default="auto",
                    help="where part 2 runs: auto = CUDA if available, else skipped (the full size takes minutes "
                         "per update on a CPU)")
    ap.add_argument("--smoke", action="store_true", help="part 2 at a toy size (to test its code path)")
    ap.add_argument("--repeats", type=int, default=3, help="timed updates per setting in part 2")
    args = ap.parse_args()

    # fp32 means fp32: no TF32 matmuls (torch's default for matmuls, set here so part 1 cannot depend on it)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}, "
          f"cuda available: {cuda}" + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else ""))
    failures: list[str] = []
    try:
        part1(cuda, failures)
    except Exception as exc:  # noqa: BLE001 - still run part 2, then report it
        import traceback

        traceback.print_exc()
        failures.append(f"part 1 raised {type(exc).__name__}: {exc}")

    timing = args.timing_device
    if timing == "auto":
        timing = "cuda" if cuda else "none"
    if timing == "none":
        print("\n== Part 2 skipped: no CUDA device (time it on a CPU with --timing-device cpu; "
              "--smoke for a toy size) ==")
    elif timing == "cuda" and not cuda:
        failures.append("--timing-device cuda but CUDA is not available")
    else:
        try:
            part2(torch.device(timing), args.smoke, args.repeats, failures)
        except Exception as exc:  # noqa: BLE001 - reported in the RESULT lines
            import traceback

            traceback.print_exc()
            failures.append(f"part 2 raised {type(exc).__name__}: {exc}")

    if timing != "none" and not (timing == "cuda" and not cuda):
        try:
            part3(torch.device(timing), args.smoke, failures)
        except Exception as exc:  # noqa: BLE001 - reported in the RESULT lines
            import traceback

            traceback.print_exc()
            failures.append(f"part 3 raised {type(exc).__name__}: {exc}")

    print("\nRESULT " + ("ok" if not failures else f"FAILED ({len(failures)})"))
    for f in failures:
        print(f"  - {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
