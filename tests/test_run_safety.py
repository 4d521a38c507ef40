"""Issue 12 items 2 and 3: runs never clobber each other, and checkpoints are safe to write and to load.

Everything here runs without Ray or an engine: the run-directory planner, the checkpoint writer, the
metrics rewrite at resume, the optimizer restore, plus two launches of the real CLI that must be refused."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from zerosearch.config import load_config, save_config
from zerosearch.training import checkpoint
from zerosearch.training.optim import load_tensors, restore_optimizer, warmup_scheduler
from zerosearch.training.rundir import RunDirError, RunLock, plan_run
from zerosearch.training.tracking import Tracker, rewrite_metrics

QA = [{"question": "What is the capital of France?", "answers": ["Paris"]},
      {"question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"id": "0", "contents": "Paris\nParis is in France."}) + "\n")
    return data


def _cfg(tmp_path: Path, model: Path | str = "x", **extra):
    base = {"model.path": model, "warmstart.enabled": False, "rollout.engine": "hf", "search.mode": "wiki", "search.corpus": tmp_path / "corpus.jsonl",
            "data.path": tmp_path / "data", "data.train_batch_size": 2, "rollout.n": 2, "trainer.test_freq": 0,
            "trainer.output_dir": tmp_path / "runs", "trainer.logger": "[jsonl]"}
    base.update(extra)
    return load_config("cpu", [f"{k}={v}" for k, v in base.items()])


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    tmp = checkpoint.begin(run_dir, step)
    return checkpoint.commit(run_dir, tmp, step, {"step": step}, keep_last=5)


# --- item 2: run directories -------------------------------------------------------------------------------


def test_every_unnamed_launch_gets_its_own_directory(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    now = datetime(2026, 11, 26, 12, 0, 0)
    first, lock1 = plan_run(cfg, now)
    second, lock2 = plan_run(cfg, now)  # the same second: still a new directory
    lock1.release(), lock2.release()
    assert first.run_dir != second.run_dir
    assert first.run_dir.name == "grpo-x-wiki-20261126-120000" and second.run_dir.name.endswith("-2")
    assert first.resume_ckpt is None and second.resume_ckpt is None


def test_a_second_process_in_the_same_run_directory_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"trainer.experiment_name": "shared"})
    _, lock = plan_run(cfg)
    try:
        with pytest.raises(RunDirError, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
            plan_run(cfg)
    finally:
        lock.release()
    _, lock = plan_run(cfg)  # free again once released
    lock.release()


def test_second_cli_launch_into_a_running_directory_exits_2(tmp_path: Path, data_dir: Path, tiny_model_dir: Path) -> None:
    """A real `zerosearch train` against a directory locked by another process: one line, exit 2, nothing
    written (today it trains on, and both runs write the same metrics.jsonl and checkpoints)."""
    cfg = _cfg(tmp_path, tiny_model_dir, **{"trainer.experiment_name": "busy"})
    _, lock = plan_run(cfg)
    (cfg_dir := Path(cfg.trainer.output_dir) / "busy").joinpath("metrics.jsonl").write_text('{"step": 1}\n')
    try:
        args = [f"model.path={tiny_model_dir}", "warmstart.enabled=false", "rollout.engine=hf", "search.mode=wiki",
                f"search.corpus={tmp_path / 'corpus.jsonl'}", f"data.path={data_dir}", "data.train_batch_size=2",
                "rollout.n=2", "trainer.test_freq=0", f"trainer.output_dir={tmp_path / 'runs'}",
                "trainer.experiment_name=busy", "trainer.logger=[jsonl]"]
        proc = subprocess.run([sys.executable, "-m", "zerosearch.cli", "train", *args], capture_output=True,
                              text=True, timeout=120, check=False)
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run directory") and "in use" in last and "Traceback" not in proc.stderr
    assert not (cfg_dir / "config.yaml").exists() and (cfg_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_never_refuses_a_directory_holding_a_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"trainer.experiment_name": "old", "trainer.resume": "never"})
    run_dir = Path(cfg.trainer.output_dir) / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    with pytest.raises(RunDirError, match="trainer.resume=never.*already holds a run"):
        plan_run(cfg)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "reward/mean": 0.5}\n'


def test_resume_auto_needs_a_matching_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tmp_path, **{"trainer.experiment_name": "named"})
    run_dir = Path(cfg.trainer.output_dir) / "named"
    save_config(cfg, run_dir)
    ckpt = _fake_checkpoint(run_dir, 3)
    plan, lock = plan_run(cfg)  # same config: resumes the newest checkpoint
    lock.release()
    assert plan.run_dir == run_dir and plan.resume_ckpt == ckpt
    # operational fields may change
    plan, lock = plan_run(_cfg(tmp_path, **{"trainer.experiment_name": "named", "trainer.save_freq": 7}))
    lock.release()
    assert plan.resume_ckpt == ckpt
    changed = _cfg(tmp_path, **{"trainer.experiment_name": "named", "actor.lr": 3e-5, "rollout.n": 4})
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(RunDirError) as info:
        plan_run(changed)
    message = str(info.value)
    assert "actor.lr: 1e-05 -> 3e-05" in message and "rollout.n: 2 -> 4" in message
    assert f"trainer.resume={ckpt}" in message  # how to force
    assert (run_dir / "config.yaml").read_text() == before
    forced = _cfg(tmp_path, **{"trainer.experiment_name": "named", "actor.lr": 3e-5, "trainer.resume": str(ckpt)})
    with caplog.at_level(logging.WARNING, logger="zerosearch.training"):
        plan, lock = plan_run(forced)
    lock.release()
    assert plan.resume_ckpt == ckpt and plan.run_dir == run_dir
    assert "differs from its run's: actor.lr: 1e-05 -> 3e-05" in caplog.text


def test_resume_path_to_a_run_directory_continues_that_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "grpo-x-wiki-20261126-120000"
    ckpt = _fake_checkpoint(run_dir, 2)
    plan, lock = plan_run(_cfg(tmp_path, **{"trainer.resume": str(run_dir)}))
    lock.release()
    assert plan.run_dir == run_dir and plan.resume_ckpt == ckpt


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, 20)  # left by a longer earlier run; this one resumed from an older step
    tmp = checkpoint.begin(run_dir, 10)
    final = checkpoint.commit(run_dir, tmp, 10, {"step": 10}, keep_last=1)
    assert final.is_dir() and checkpoint.load_trainer_state(final)["step"] == 10
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [10]


def test_resumed_learning_rate_is_the_configured_one(caplog: pytest.LogCaptureFixture) -> None:
    def make(lr):
        net = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        return net, opt, warmup_scheduler(opt, 0.5, 10)

    net, opt, sched = make(1e-3)
    for _ in range(2):
        net(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    _, opt2, sched2 = make(1e-5)
    with caplog.at_level(logging.WARNING, logger="zerosearch.training"):
        restore_optimizer(opt2, sched2, state, 1e-5, "actor.lr")
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-5 * 3 / 5)  # warm-up position kept (step 3 of 5)
    assert "actor.lr=1e-05 differs from the checkpoint's 0.001" in caplog.text
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-5 * 4 / 5)


# --- item 3: checkpoints ---------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "actor_state.pt"
    torch.save({"optimizer": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="cannot load checkpoint file .*actor_state.pt"):
        load_tensors(path)
    assert not marker.exists()
    path.write_bytes(path.read_bytes()[:100])  # a torn file: a clear error too
    with pytest.raises(ValueError, match="cannot load checkpoint file"):
        load_tensors(path)


def test_saved_worker_state_loads_with_weights_only(tmp_path: Path) -> None:
    from zerosearch.training.distributed import DistInfo
    from zerosearch.training.optim import load_rank_state, optimizer_state_to_local

    net = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = warmup_scheduler(opt, 0.5, 10)
    net(torch.randn(2, 3)).sum().backward()
    opt.step(), sched.step()
    torch.save({"optimizer": optimizer_state_to_local(opt), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "world": 1}, tmp_path / "actor_state.pt")
    state = load_rank_state(tmp_path, "actor", DistInfo())
    assert torch.equal(state["torch_rng"], torch.get_rng_state()) and state["scheduler"]["last_epoch"] == 1


def test_commit_flushes_files_and_folders_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    tmp = checkpoint.begin(run_dir, 1)
    (tmp / "actor").mkdir()
    (tmp / "actor" / "model.safetensors").write_bytes(b"weights")
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(self: Path, target):
        synced.append(f"rename {self.name}")
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    checkpoint.commit(run_dir, tmp, 1, {"step": 1}, keep_last=2)
    at = synced.index("rename .tmp_step_1")
    before, after = synced[:at], synced[at + 1:]
    for name in ("model.safetensors", "trainer_state.json", "actor", ".tmp_step_1"):
        assert any(p.endswith(name) for p in before), (name, synced)
    assert any(p.endswith("checkpoints") for p in after)  # the rename itself reaches the disk


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "val/f1": 0.1}\n{"step": 1, "reward/mean": 0.2}\n{"step": 2, "reward/mean": 0.3}\n'
                    '{"step": 3, "rew')
    with caplog.at_level(logging.WARNING, logger="zerosearch.training"):
        Tracker(tmp_path, ["jsonl"], {}, "p", "n", resume_step=2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert "dropped 1 unreadable line(s) (number 4" in caplog.text
    assert not path.with_name("metrics.jsonl.tmp").exists()


def test_metrics_rewrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the middle of the rewrite leaves the old file whole."""
    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6))
    path.write_text(original)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rewrite_metrics(path, 2)
    assert path.read_text() == original


def test_a_fresh_start_keeps_an_earlier_attempts_metrics(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val/f1": 0.1}\n')
    Tracker(tmp_path, ["jsonl"], {}, "p", "n", resume_step=0)
    kept = list(tmp_path.glob("metrics.jsonl.*.old"))
    assert len(kept) == 1 and kept[0].read_text() == '{"step": 0, "val/f1": 0.1}\n'


def test_lock_file_is_not_inherited(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        assert lock._fd is not None and not os.get_inheritable(lock._fd)
    assert pickle.dumps(RunDirError("x"))  # crosses process boundaries like other config errors


def test_resume_path_that_is_no_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"trainer.resume=.*empty is neither a checkpoint .* nor a run directory"):
        plan_run(_cfg(tmp_path, **{"trainer.resume": str(tmp_path / "empty")}))


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path: Path) -> None:
    """A process SIGKILLed while it writes step 2: step 1 stays the latest whole checkpoint, and the next save
    of step 2 (after resume) replaces the torn temporary folder."""
    import signal
    import time

    run_dir = tmp_path / "run"
    first = checkpoint.commit(run_dir, checkpoint.begin(run_dir, 1), 1, {"step": 1}, keep_last=2)
    script = f"""
import sys, time
from pathlib import Path
from zerosearch.training import checkpoint
tmp = checkpoint.begin(Path({str(run_dir)!r}), 2)
with open(tmp / "actor_state.pt", "wb") as f:
    f.write(b"x" * 4096); f.flush()
    print("writing", flush=True)
    time.sleep(60)  # killed here, mid-write
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (run_dir / "checkpoints" / ".tmp_step_2").is_dir()  # the torn write is there ...
    assert checkpoint.latest_checkpoint(run_dir) == first  # ... but never taken for a checkpoint
    assert checkpoint.load_trainer_state(first) == {"step": 1}
    t0 = time.time()
    tmp = checkpoint.begin(run_dir, 2)
    assert not any(tmp.iterdir())  # the torn files are gone
    second = checkpoint.commit(run_dir, tmp, 2, {"step": 2}, keep_last=2)
    assert checkpoint.latest_checkpoint(run_dir) == second and first.is_dir() and time.time() - t0 < 10
