"""Fault injection for the search path (issue 12, items 4, 5 and 7; docs/reliability.md lists what each proves).

* Hostile policy or simulator text: every parser over it runs in linear time.
* A search that fails, or a reply that is malformed, ends one trajectory with finish reason `error`; the
  batch stops only past `max_search_error_share`, with a message naming the server and how to start it.
* The simulator killed mid-rollout (a real server process, SIGKILLed).
* Loopback searches bypass HTTP_PROXY; timeouts must be finite.
* The simulation server dies with the process that started it, even when that one is SIGKILLed.

Fake servers only (stdlib HTTP on 127.0.0.1), a scripted policy engine; no model weights, a few seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import http_server, reply
from test_rollout_loop import SEARCH_THEN_ANSWER, make_loop, run, sample

from zerosearch.config import ConfigError, load_config
from zerosearch.search import SearchError, SearchRequest
from zerosearch.search.simulated import SimulatedSearch

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# item 7: linear time on hostile text

N = 200_000
_HOSTILE = textwrap.dedent(f"""
    import json, sys, time
    from zerosearch.rollout.parser import parse_action
    from zerosearch.rewards import extract_answer
    from zerosearch.search.simulated import normalize_docs
    from zerosearch.infer import _BLOCK_RE
    N = {N}
    cases = {{
        "parse_action: <search> repeated": (parse_action, "<search>" * (N // 8)),
        "parse_action: <answer> repeated": (parse_action, "<answer>" * (N // 8)),
        "parse_action: <search>a</answer> repeated": (parse_action, "<search>a</answer>" * (N // 17)),
        "parse_action: unclosed long query": (parse_action, "<search>" + "x" * N),
        "extract_answer: <answer> repeated": (extract_answer, "<answer>" * (N // 8)),
        "extract_answer: </answer prefixes": (extract_answer, "<answer>" + "</answer" * (N // 8)),
        "simulator text: spaces": (lambda t: normalize_docs(t, 5), " " * N + "x"),
        "simulator text: tabs": (lambda t: normalize_docs(t, 5), "\\t" * N + "x"),
        "simulator text: blank lines": (lambda t: normalize_docs(t, 5), "x\\n" + "\\n" * N + "y"),
        "simulator text: Doc then spaces": (lambda t: normalize_docs(t, 5), "Doc" + " " * N + "x"),
        "simulator text: (Title: then spaces": (lambda t: normalize_docs(t, 5), "Doc 1 (Title:" + " " * N),
        "simulator text: Doc repeated": (lambda t: normalize_docs(t, 5), " Doc" * (N // 4)),
        "simulator text: stars": (lambda t: normalize_docs(t, 5), "*" * N + "x"),
        "infer blocks: <think> repeated": (lambda t: _BLOCK_RE.findall(t), "<think>" * (N // 7)),
    }}
    for name, (fn, text) in cases.items():
        t0 = time.perf_counter()
        fn(text)
        print(json.dumps([name, time.perf_counter() - t0]), flush=True)
""")


def test_hostile_text_is_parsed_in_linear_time() -> None:
    """200,000 characters of adversarial text per parser: each under 1 s (linear: ~0.01 s; the old
    backtracking regexes took minutes, so a subprocess with a deadline keeps the suite from hanging)."""
    try:
        done = subprocess.run([sys.executable, "-c", _HOSTILE], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        finished = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"hostile text took over 60 s; the cases that finished first:\n{finished}")
    assert done.returncode == 0, done.stderr[-3000:]
    times = dict(json.loads(line) for line in done.stdout.splitlines())
    assert len(times) == 14
    slow = {name: round(t, 3) for name, t in times.items() if t > 1.0}
    assert not slow, f"not linear: {slow}"


def test_linear_parser_finds_what_the_backtracking_regex_found() -> None:
    from zerosearch.rollout.parser import _first_block

    reference = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
    atoms = ["<search>", "</search>", "<answer>", "</answer>", "q", " ", "<", "/", "search>", "\n", "<think>"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 10)))
        match = reference.search(text)
        assert _first_block(text) == (None if match is None else (match.group(1), match.group(2))), text


# --------------------------------------------------------------------------------------------
# a fake OpenAI server that answers each kind of malformed reply


def _completion(content: object, choices: bool = True) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "sim",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]
            if choices else [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


GOOD = "Doc 1: Paris is the capital of France."
REPLIES: dict[str, tuple[str, bytes]] = {
    "good": ("application/json", json.dumps(_completion(GOOD)).encode()),
    "html page": ("text/html", b"<html><body><h1>Proxy login</h1></body></html>"),
    "html labelled as json": ("application/json", b"<html><body>502 Bad Gateway</body></html>"),
    "no choices": ("application/json", json.dumps(_completion(GOOD, choices=False)).encode()),
    "null content": ("application/json", json.dumps(_completion(None)).encode()),
    "not an object": ("application/json", b"[1, 2, 3]"),
    "over the size cap": ("application/json", json.dumps(_completion("Doc 1: " + "x" * 70_000)).encode()),
}


class FakeOpenAI:
    """/v1/chat/completions on 127.0.0.1 answering `kind` (one of REPLIES) with status 200; a query that
    contains "[kind]" gets that kind instead, so one batch can mix good and malformed replies."""

    def __init__(self, kind: str = "good") -> None:
        self.kind, self.requests = kind, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests += 1
                prompt = body["messages"][-1]["content"]
                kind = next((k for k in REPLIES if f"[{k}]" in prompt), fake.kind)
                content_type, data = REPLIES[kind]
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_openai():
    made: list[FakeOpenAI] = []

    def make(kind: str = "good") -> FakeOpenAI:
        made.append(FakeOpenAI(kind))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize("kind", [k for k in REPLIES if k != "good"])
def test_each_malformed_reply_is_a_retried_then_reported_search_error(fake_openai, kind: str) -> None:
    server = fake_openai(kind)
    with SimulatedSearch(server.address, model="sim", max_retries=1, backoff_s=0.01, timeout_s=5) as sim:
        with pytest.raises(SearchError, match=rf"simulation server http://{server.address}/v1 failed after 2 attempt"):
            sim.search([SearchRequest("capital of France", "Capital of France?", ["Paris"])])
        stats = sim.stats()
    assert server.requests == 2
    assert stats["search/errors"] == 1 and stats["search/retries"] == 1


def test_a_good_reply_still_reads_as_documents(fake_openai) -> None:
    with SimulatedSearch(fake_openai().address, model="sim") as sim:
        (result,) = sim.search([SearchRequest("q", "Q?", ["Paris"])])
    assert result.text == "Doc 1: Paris is the capital of France."


# --------------------------------------------------------------------------------------------
# item 4: a failed search ends one trajectory, not the batch


def _malformed_mix(fake_openai, tokenizer, share: float, kinds: list[str]):
    """One sample per kind: the good ones answer after their search, the others hit a malformed reply."""
    server = fake_openai("good")
    sim = SimulatedSearch(server.address, model="sim", max_retries=1, backoff_s=0.01, timeout_s=5)
    scripts = [[f"<search>capital of France [{kind}]</search>", SEARCH_THEN_ANSWER[1]] for kind in kinds]
    loop, engine = make_loop(tokenizer, scripts, search=sim, max_search_error_share=share)
    return sim, loop, engine, [sample(i) for i in range(len(kinds))]


def test_malformed_replies_end_only_their_trajectories(fake_openai, smollm2_tokenizer) -> None:
    from zerosearch.rollout.loop import loop_metrics

    kinds = ["good", "html page", "good", "no choices", "good", "null content", "good", "over the size cap"]
    sim, loop, engine, samples = _malformed_mix(fake_openai, smollm2_tokenizer, 0.5, kinds)
    with sim:
        trajs, stats = run(loop, engine, samples)
    assert [t.finish_reason for t in trajs] == ["answer" if k == "good" else "error" for k in kinds]
    assert all(t.answer == "Paris" for t in trajs if t.finish_reason == "answer")
    for t in trajs:
        if t.finish_reason == "error":
            assert "MalformedReply" in t.error and "simulation server" in t.error
            assert set(t.train_mask) == {0} and 1 in t.loss_mask  # no loss on the server's failure
    metrics = {**loop_metrics(trajs), **stats.metrics()}
    assert metrics["rollout/finish_error"] == 0.5 and metrics["rollout/search_errors"] == 4
    assert sim.stats()["search/errors"] == 4


def test_more_failed_searches_than_the_share_stop_the_batch_naming_the_server(fake_openai, smollm2_tokenizer) -> None:
    kinds = ["good", "html page", "no choices", "good"]
    sim, loop, engine, samples = _malformed_mix(fake_openai, smollm2_tokenizer, 0.2, kinds)
    with sim, pytest.raises(SearchError) as info:
        run(loop, engine, samples)
    message = str(info.value)
    assert "2 of 4 searches of this batch failed, more than search.max_error_share=0.2" in message
    assert sim.urls[0] in message and "zerosearch serve-sim --model sim" in message


_SERVER_PROCESS = textwrap.dedent("""
    import json, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    delay, port = float(sys.argv[1]), int(sys.argv[2])
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "sim"}]})
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay)
            self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "sim", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Doc 1: Paris."}}]})
        def _send(self, payload):
            data = json.dumps(payload).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    server = ThreadingHTTPServer(("127.0.0.1", port), H)
    print(server.server_address[1], flush=True)
    server.serve_forever()
""")


def _server_process(delay_s: float, port: int = 0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_PROCESS, str(delay_s), str(port)], stdout=subprocess.PIPE,
                            text=True)
    return proc, f"127.0.0.1:{int(proc.stdout.readline())}"


def test_simulator_killed_mid_rollout_ends_the_batch_clearly_and_a_restart_serves_the_next(smollm2_tokenizer) -> None:
    """The simulation server process is SIGKILLed while a batch's searches are in flight: the batch ends
    within the retry budget (error trajectories, then a SearchError saying which server and how to start
    one), and the same client and loop work again once a server is back on that port."""
    proc, address = _server_process(delay_s=1.0)
    sim = SimulatedSearch(address, model="sim", max_retries=1, backoff_s=0.05, timeout_s=3)
    try:
        loop, engine = make_loop(smollm2_tokenizer, [SEARCH_THEN_ANSWER] * 4, search=sim, max_search_error_share=0.2)
        killer = threading.Timer(0.5, proc.kill)  # mid-rollout: every search is waiting on the server
        killer.start()
        t0 = time.perf_counter()
        with pytest.raises(SearchError, match=r"4 of 4 searches of this batch failed.*zerosearch serve-sim"):
            run(loop, engine, [sample(i) for i in range(4)])
        assert time.perf_counter() - t0 < 2 * 3 + 0.05 + 5, "the retry budget bounds the wait"
        killer.join()
        proc.wait(timeout=10)
        proc, _ = _server_process(delay_s=0.0, port=int(address.split(":")[1]))  # the restart
        trajs, _ = run(loop, engine, [sample(i) for i in range(4)])
        assert [t.finish_reason for t in trajs] == ["answer"] * 4
    finally:
        sim.close()
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# item 4: loopback bypasses HTTP_PROXY; timeouts are finite; the share is validated


def test_loopback_searches_bypass_http_proxy(fake_openai, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's prompt holds the gold answers: it must never reach a proxy."""
    seen: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            seen.append(self.path)
            reply(self, 502)

    with http_server(Proxy) as proxy:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.server_address[1]}")
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        server = fake_openai()
        with SimulatedSearch(server.address, model="sim", max_retries=0, timeout_s=5) as sim:
            (result,) = sim.search([SearchRequest("q", "Q?", ["the gold answer"])])
    assert seen == [] and server.requests == 1
    assert result.text.startswith("Doc 1: Paris")


def test_timeouts_must_be_finite_and_the_error_share_a_fraction() -> None:
    with pytest.raises(ValueError, match="finite"):
        SimulatedSearch("127.0.0.1:1", model="sim", timeout_s=float("inf"))
    for override, key in (("search.timeout_s=inf", "search.timeout_s"), ("search.timeout_s=nan", "search"),
                          ("search.max_error_share=1.0", "search.max_error_share"),
                          ("search.max_error_share=-0.1", "search.max_error_share")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config("cpu", [override])
    assert load_config("cpu", ["search.max_error_share=0"]).search.max_error_share == 0.0


# --------------------------------------------------------------------------------------------
# item 5: no orphans


_TRAINER = textwrap.dedent("""
    import sys
    from zerosearch.search.server import SimulationServer
    listener = sys.argv[1]
    class Fake(SimulationServer):
        def command(self, model_path):
            return [sys.executable, "-c", listener, str(self.port)]
    server = Fake("fake-model", port=int(sys.argv[2]), log_dir=sys.argv[3], gpu=False, stop_grace_s=1.0)
    server.start()
    import psutil
    print(" ".join(str(p.pid) for p in [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]), flush=True)
    import time
    time.sleep(600)
""")

# A stand-in engine: an HTTP server with a child process of its own (as vLLM has its engine core),
# optionally deaf to SIGTERM.
_LISTENER = textwrap.dedent("""
    import json, signal, subprocess, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            data = json.dumps({"data": [{"id": "fake-model"}]}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("ignore_term", [False, True])
def test_the_simulation_server_dies_with_a_sigkilled_trainer(tmp_path: Path, ignore_term: bool) -> None:
    import psutil

    listener = _LISTENER.replace('"--ignore-term" in sys.argv', str(ignore_term))
    port = _free_port()
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, listener, str(port), str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    tree: list = []
    try:
        import zerosearch.search.server as server_module

        line = trainer.stdout.readline()
        assert line, f"the trainer stand-in did not start the server (exit {trainer.poll()})"
        tree = [psutil.Process(int(pid)) for pid in line.split()]
        assert len(tree) == 2 and server_module.is_listening("127.0.0.1", port)
        os.kill(trainer.pid, signal.SIGKILL)  # no atexit, no finally: only the watchdog can act
        trainer.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left running after the trainer died: {alive}"
        assert not server_module.is_listening("127.0.0.1", port), "the port is still held"
    finally:
        for proc in [trainer, *tree]:  # on failure, what this test started, by pid
            try:
                proc.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass


# --------------------------------------------------------------------------------------------
# the simulator killed during a real training run, then a restart and a resume (slow: Ray, two launches)


def _always_searching_policy(out_dir: Path, tokenizer) -> Path:
    """A tiny Llama that writes `<search>x</search>` after the prompt and after every observation.

    The layers add nothing (zero output projections), so the logits depend on the last token only; the
    untied head maps each token of the chain to the next with a margin that makes sampling deterministic.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    chain = ids("<search>x</search>")  # "<", "search", ">", "x", "</", "search", ">": stop string, then it ends
    starts = {ids("\n")[-1], ids("</information>\n\n\n")[-1], ids("try again.\n")[-1]}
    successor = dict(itertools.pairwise(chain)) | dict.fromkeys(starts, chain[0])
    tokens = sorted(set(successor) | set(successor.values()))
    hidden = 64
    assert len(tokens) <= hidden
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) or "embed" in name or "lm_head" in name:
                param.zero_()
        for i, token in enumerate(tokens):
            model.model.embed_tokens.weight[token, i] = 1.0
        for token, following in successor.items():
            model.lm_head.weight[following, tokens.index(token)] = 20.0  # logit 160 after the RMSNorm
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
def test_a_run_whose_simulator_dies_stops_clearly_and_resumes_from_its_last_checkpoint(tmp_path: Path,
                                                                                        smollm2_tokenizer) -> None:
    from zerosearch.training import checkpoint

    policy = _always_searching_policy(tmp_path / "policy", smollm2_tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        rows = [{"question": f"What is the capital of country {i}?", "answers": ["Paris"]} for i in range(4)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    sim, address = _server_process(delay_s=1.0)  # slow enough that the kill lands while step 2 searches
    port = int(address.split(":")[1])
    args = [f"model.path={policy}", "warmstart.enabled=false", "rollout.engine=hf", "search.mode=simulate_prompt", f"search.ip={address}",
            "search.start_server=never", "search.simulation_llm=sim", "search.max_retries=1", "search.timeout_s=5",
            f"data.path={data}", "data.train_batch_size=2", "rollout.n=2", "rollout.max_turns=1",
            "rollout.max_response_length=16", "rollout.max_obs_length=32", "trainer.total_steps=2",
            f"trainer.output_dir={tmp_path / 'runs'}", "trainer.experiment_name=sim-dies", "trainer.save_freq=1",
            "trainer.test_freq=0", "trainer.logger=[jsonl]", "actor.micro_batch_size=2", "ray.num_cpus=2"]
    run_dir = tmp_path / "runs" / "sim-dies"

    def launch(log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "zerosearch.cli", "train", *args],
                                stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    first = launch("first.log")
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step_1").is_dir():
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        sim.kill()  # the simulator dies during the run
        sim.wait(timeout=10)
        assert first.wait(timeout=300) == 1, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    log = (tmp_path / "first.log").read_text()
    last = [line for line in log.splitlines() if line.startswith("error: ")]
    assert last and "searches of this batch failed" in last[-1] and "zerosearch serve-sim" in last[-1], log[-3000:]
    assert "Traceback" not in log.split(last[-1])[-1]
    assert [step for step, _ in checkpoint.list_checkpoints(run_dir)] == [1]

    sim, _ = _server_process(delay_s=0.0, port=port)  # the restart
    try:
        resumed = launch("resumed.log")
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        sim.kill()
        sim.wait(timeout=10)
    assert "resuming from" in (tmp_path / "resumed.log").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "reward/mean" in r]
    assert steps == [1, 2], steps  # each step once: none lost, none repeated
    assert all(r["rollout/searches_per_traj"] >= 1 for r in rows if "reward/mean" in r)
