"""Issue 12 item 6: bad data, files and settings reach the user as one line naming the file, row and field,
with exit status 2, before anything is written or started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zerosearch.config import ConfigError, load_config
from zerosearch.data.qa import DataFormatError, DataNotFoundError, load_qa_file, load_split

GOOD = json.dumps({"question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}) + "\n"


def test_non_utf8_bytes_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b'{"question": "caf\xe9?", "answers": ["x"]}\n')
    with pytest.raises(DataFormatError, match=r"train.jsonl: line 2 .*not UTF-8 \(byte 0xe9.*Fix: save the file as UTF-8"):
        load_qa_file(path)


def test_deeply_nested_json_is_a_data_error_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(DataFormatError, match=r"train.jsonl: line 2 .*nested too deeply"):
        load_qa_file(path)


@pytest.mark.parametrize("name, content", [("train.jsonl", b""), ("train.jsonl", b"\n\n"), ("train.parquet", b""),
                                           ("train.parquet", b"PAR1 not really")])
def test_an_empty_or_broken_file_is_named(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=rf"{name}: file, field `\(file\)`: (the file holds no rows|not a readable parquet)"):
        load_qa_file(path)


def test_a_missing_data_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="no 'train' split in data path \\(does not exist\\)"):
        load_split(tmp_path / "nowhere", "train")


def _train_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = ["search.mode=wiki", "search.corpus=default", "rollout.engine=hf", "trainer.test_freq=0", "warmstart.enabled=false",
            f"trainer.output_dir={tmp_path / 'runs'}", "trainer.experiment_name=bad", "trainer.logger=[jsonl]"]
    return subprocess.run([sys.executable, "-m", "zerosearch.cli", "train", *base, *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, check=False)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_cli_missing_data_path_exits_2_before_writing_the_run(tmp_path: Path) -> None:
    proc = _train_cli(tmp_path, "DATA_PATH", str(tmp_path / "ZeroSearch_dataset"))
    line = _one_line_error(proc)
    assert str(tmp_path / "ZeroSearch_dataset") in line and "huggingface-cli download" in line
    assert not (tmp_path / "runs" / "bad" / "config.yaml").exists()


def test_cli_bad_row_exits_2_naming_file_line_and_field(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(GOOD.encode() + b'{"question": "x\xff", "answers": ["y"]}\n')
    line = _one_line_error(_train_cli(tmp_path, f"data.path={data}"))
    assert f"{data / 'train.jsonl'}: line 2" in line and "UTF-8" in line


def test_google_without_its_key_is_refused_at_launch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SER_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "zerosearch.cli", "train", "SEARCH_MODE", "google", "rollout.engine=hf",
                           "trainer.test_freq=0", f"trainer.output_dir={tmp_path / 'runs'}"], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    line = _one_line_error(proc)
    assert "search.mode=google" in line and "SER_API_KEY" in line
    assert not (tmp_path / "runs").exists()


def test_overlong_prompts_are_found_when_the_data_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    from zerosearch.training.driver import train

    data = tmp_path / "data"
    data.mkdir()
    long_question = "Which river " + "flows very far " * 40 + "?"
    (data / "train.jsonl").write_text(GOOD + json.dumps({"question": long_question, "answers": ["Nile"]}) + "\n")
    (data / "test.jsonl").write_text(GOOD)
    cfg = load_config("cpu", [f"model.path={tiny_model_dir}", "warmstart.enabled=false", f"data.path={data}", "search.mode=wiki",
                              "search.corpus=default", "rollout.engine=hf", "trainer.test_freq=0",
                              "data.max_prompt_length=200", "data.train_batch_size=2", "rollout.n=2",
                              f"trainer.output_dir={tmp_path / 'runs'}", "trainer.experiment_name=long"])
    with pytest.raises(DataFormatError, match=r"split 'train'.*field `prompt`.*Which river.*sample 1.*"
                                               r"more than data.max_prompt_length=200"):
        train(cfg)
    assert not (tmp_path / "runs").exists()  # found before the run directory, Ray or an engine


@pytest.mark.parametrize("override, key", [
    ("search.timeout_s=inf", "search.timeout_s"),
    ("search.timeout_s=-1", "search(.timeout_s)?"),  # the older combined check may answer first
    ("search.server_startup_timeout_s=inf", "search.server_startup_timeout_s"),
    ("rollout.cpu_kv_cache_gib=-1", "rollout.cpu_kv_cache_gib"),
    ("search.server_kv_cache_gib=-0.5", "search.server_kv_cache_gib"),
    ("ray.object_store_gib=-2", "ray.object_store_gib"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
    ("search.ip=127.0.0.1:99999", "search.ip"),
    ("search.ip=127.0.0.1:6001,bad host", "search.ip"),
    ("search.ip=127.0.0.1:port", "search.ip"),
    ("trainer.resume=/nonexistent/checkpoints/step_5", "trainer.resume"),
    ("trainer.experiment_name=../outside", "trainer.experiment_name"),
    ("trainer.experiment_name=/tmp/abs", "trainer.experiment_name"),
    ("trainer.experiment_name=..", "trainer.experiment_name"),
])
def test_config_rejects_values_that_would_hang_or_fail_late(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config("cpu", [override])


def test_config_accepts_the_usual_addresses() -> None:
    cfg = load_config("cpu", ["search.ip=127.0.0.1:6001,gpu-node-2,http://10.0.0.5:6002/v1,[::1]:6003"])
    assert cfg.search.ip.count(",") == 3
