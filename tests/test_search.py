"""Search backends: BM25 and the /retrieve protocol, SerpAPI config errors, simulator templates and
Doc parsing, and the simulated client against an in-test OpenAI-like server (retries, counters,
round-robin, all requests in flight at once, a server that is down). No model, no network."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from zerosearch.rewards import retrieval_hit
from zerosearch.search import (
    NO_INFORMATION,
    SearchBackend,
    SearchError,
    SearchRequest,
    build_search_backend,
    canonical_mode,
    search_modes,
)
from zerosearch.search.bm25 import BM25Search, CorpusError, passages_to_string
from zerosearch.search.google import GoogleSearch, format_organic_results
from zerosearch.search.retriever import RetrieverClient, start_retriever_server
from zerosearch.search.simulated import (
    SimulatedSearch,
    fill_template,
    load_bridge_template,
    load_templates,
    normalize_docs,
    parse_servers,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS_2WIKI = SHARED / "data" / "qa" / "corpus" / "hipporag_2wiki_corpus_6119.jsonl"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "corpus.jsonl", [
        {"id": "0", "contents": '"Eiffel Tower"\nThe Eiffel Tower is a wrought-iron lattice tower in Paris, finished in 1889.'},
        {"id": "1", "title": "Big Ben", "contents": "Big Ben is the nickname of the Great Bell of the clock in London."},
        {"title": "Colosseum", "text": "The Colosseum is an ancient amphitheatre in the centre of Rome."},
        {"id": "3", "contents": "Mount Fuji\nMount Fuji is the highest mountain in Japan, near Tokyo."},
    ])


# --------------------------------------------------------------------------------------------
# registry


def test_registry_accepts_upstream_spellings_and_lists_modes() -> None:
    assert search_modes() == ["google", "hybrid", "oracle_wiki", "simulate_prompt", "simulate_self", "simulate_sft", "wiki"]
    assert canonical_mode("simulate_prompt") == "simulate_prompt"
    assert canonical_mode("SIMULATE-SFT") == "simulate_sft"
    assert canonical_mode(" Wiki ") == "wiki"
    assert canonical_mode("google") == "google"
    with pytest.raises(ValueError, match="valid modes: google, hybrid, oracle_wiki, simulate_prompt, simulate_self, simulate_sft, wiki"):
        build_search_backend("bing")
    with pytest.raises(ValueError, match="corpus=PATH"):
        build_search_backend("wiki")


# --------------------------------------------------------------------------------------------
# BM25 and the corpus


def test_bm25_finds_the_passage_of_a_title_in_the_2wiki_corpus() -> None:
    if not CORPUS_2WIKI.is_file():
        pytest.skip(f"shared corpus {CORPUS_2WIKI} is absent (it lives in ../shared beside the repo)")
    t0 = time.perf_counter()
    backend = build_search_backend("wiki", corpus=CORPUS_2WIKI, topk=5)
    build_s = time.perf_counter() - t0
    assert isinstance(backend, BM25Search) and isinstance(backend, SearchBackend)
    assert len(backend.docs) == 6119
    assert build_s < 30, f"indexing 6119 passages took {build_s:.1f}s"
    titles = ["Teutberga", "Theodred II (Bishop of Elmham)", "Kaoru Hatoyama", "George Howard (footballer)"]
    results = backend.search([SearchRequest(query=t) for t in titles])
    for title, result in zip(titles, results):
        first = result.text.split("\n")[0]
        assert first.startswith(f"Doc 1(Title: {title}) "), first
        assert 1 <= len(re.findall(r"^Doc \d+\(Title: ", result.text, flags=re.MULTILINE)) <= 5
        assert result.noisy is None
    stats = backend.stats()
    assert stats["search/queries"] == 4 and stats["search/max_in_flight"] == 4


def test_oracle_wiki_puts_an_answer_passage_first_when_useful_and_none_when_noisy(tmp_path: Path) -> None:
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [
        {"id": "0", "contents": "Paris towers\nParis has many towers; the tallest tower in Paris is famous."},
        {"id": "1", "contents": "Gustave Eiffel\nGustave Eiffel was a French engineer whose company built a tower."},
        {"id": "2", "contents": "Towers\nA tower is tall: the tallest tower in Paris, the tallest in London."},
        {"id": "3", "contents": "Rome\nThe Colosseum is an amphitheatre in Rome."},
    ])
    oracle = build_search_backend("oracle_wiki", corpus=corpus, topk=2)
    plain = build_search_backend("wiki", corpus=corpus, topk=2)
    query = "tallest tower in Paris"
    gold = ["Gustave Eiffel"]
    useful, noisy, no_answer = oracle.search([
        SearchRequest(query=query, golden_answers=gold, noisy=False),
        SearchRequest(query=query, golden_answers=gold, noisy=True),
        SearchRequest(query=query, golden_answers=["Napoleon"], noisy=False),
    ])
    real = plain.search([SearchRequest(query=query)])[0]
    assert not retrieval_hit([real.text], gold)  # BM25 alone ranks the answer passage below the top 2
    assert useful.text.startswith("Doc 1(Title: Gustave Eiffel) ") and retrieval_hit([useful.text], gold)
    assert useful.text.count("\nDoc ") == 1 and useful.noisy is False and useful.engine == "oracle_wiki"
    assert not retrieval_hit([noisy.text], gold) and noisy.noisy is True and noisy.text.count("Doc ") == 2
    assert no_answer.text == real.text  # nothing in the corpus holds the answer: the query's own top 2
    # a query whose own top 2 holds the answer: noisy documents leave that passage out
    direct = SearchRequest(query="Gustave Eiffel tower", golden_answers=gold)
    assert retrieval_hit([plain.search([direct])[0].text], gold)
    direct.noisy = True
    assert not retrieval_hit([oracle.search([direct])[0].text], gold)
    assert oracle.stats()["search/queries"] == 4


def test_bm25_reads_all_corpus_formats(small_corpus: Path) -> None:
    backend = BM25Search(small_corpus, topk=2)
    [fuji, ben, colosseum, eiffel, nothing] = backend.search([
        SearchRequest("highest mountain Japan"), SearchRequest("Great Bell clock London"),
        SearchRequest("amphitheatre Rome"), SearchRequest("wrought-iron lattice Paris"),
        SearchRequest("the of and"),
    ])
    assert fuji.text.startswith("Doc 1(Title: Mount Fuji) Mount Fuji is the highest mountain")
    assert ben.text.startswith("Doc 1(Title: Big Ben) Big Ben is the nickname")
    assert colosseum.text.startswith("Doc 1(Title: Colosseum) The Colosseum is")
    assert eiffel.text.startswith('Doc 1(Title: "Eiffel Tower") The Eiffel Tower is')
    assert nothing.text == NO_INFORMATION  # no query term in any passage: no hits, not random ones


def test_malformed_corpus_row_names_file_and_line(tmp_path: Path) -> None:
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", [{"id": "0", "contents": "A\nb"}, '{"id": "1", "contents": '])
    with pytest.raises(CorpusError, match=rf"{re.escape(str(bad_json))}:2: not valid JSON"):
        BM25Search(bad_json)
    no_text = _write_jsonl(tmp_path / "notext.jsonl", [{"id": "0", "contents": "A\nb"}, "", {"id": "2", "body": "x"}])
    with pytest.raises(CorpusError, match=rf"{re.escape(str(no_text))}:3: corpus row has keys \['body', 'id'\]"):
        BM25Search(no_text)
    not_object = _write_jsonl(tmp_path / "list.jsonl", [["a", "b"]])
    with pytest.raises(CorpusError, match=r"list.jsonl:1: a corpus row must be a JSON object"):
        BM25Search(not_object)
    assert issubclass(CorpusError, ValueError)


def test_missing_corpus_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"corpus file .*nope.jsonl not found; pass corpus=PATH"):
        build_search_backend("wiki", corpus=tmp_path / "nope.jsonl")


def test_passages_to_string_matches_search_r1() -> None:
    docs = [{"id": "1", "contents": "Title A\nline one\nline two"}, {"title": "B", "text": "body"}]
    assert passages_to_string(docs) == "Doc 1(Title: Title A) line one line two\nDoc 2(Title: B) body"
    assert passages_to_string([]) == NO_INFORMATION


# --------------------------------------------------------------------------------------------
# Search-R1 /retrieve server and client


def test_retriever_server_and_client_round_trip(small_corpus: Path) -> None:
    with start_retriever_server(small_corpus, host="127.0.0.1", port=0, topk=3) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        with httpx.Client(trust_env=False, timeout=10) as http:
            scored = http.post(server.url, json={"queries": ["Big Ben clock", "Mount Fuji"], "topk": 2,
                                                 "return_scores": True}).json()
            plain = http.post(server.url, json={"queries": ["Colosseum Rome"], "topk": 1}).json()
            single = http.post(server.url, json={"query": "Eiffel Tower", "topk": 1}).json()
            bad = http.post(server.url, json={"queries": "not a list"})
            health = http.get(server.url.replace("/retrieve", "/health")).json()
        assert len(scored["result"]) == 2
        top = scored["result"][0][0]
        assert top["document"] == {"id": "1", "contents": "Big Ben\nBig Ben is the nickname of the Great Bell "
                                                          "of the clock in London."}
        assert top["score"] > 0
        assert plain["result"][0][0]["contents"].startswith("Colosseum\n")  # bare documents, as Search-R1
        assert single["result"][0][0]["contents"].startswith('"Eiffel Tower"\n')
        assert bad.status_code == 400 and "queries" in bad.json()["error"]
        assert health == {"status": "ok", "documents": 4}

        client = build_search_backend("wiki", retriever_url=f"127.0.0.1:{server.port}", topk=2)
        try:
            assert isinstance(client, RetrieverClient)
            results = client.search([SearchRequest("Big Ben clock"), SearchRequest("highest mountain Japan")])
            assert results[0].text.startswith("Doc 1(Title: Big Ben) Big Ben is")
            assert results[1].text.startswith("Doc 1(Title: Mount Fuji) Mount Fuji is")
            assert client.stats()["search/queries"] == 2
        finally:
            client.close()


def test_retriever_client_down_gives_search_error() -> None:
    port = _closed_port()
    client = RetrieverClient(f"http://127.0.0.1:{port}/retrieve", max_retries=1, backoff_s=0.01, timeout_s=2)
    try:
        with pytest.raises(SearchError, match=rf"retriever http://127.0.0.1:{port}/retrieve failed after 2 attempt"):
            client.search([SearchRequest("x")])
        assert client.stats()["search/errors"] == 1
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Google


def test_google_without_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SER_API_KEY", raising=False)
    with pytest.raises(SearchError, match=r"SER_API_KEY.*export SER_API_KEY="):
        build_search_backend("google", topk=3)
    monkeypatch.setenv("SER_API_KEY", "test-key")
    backend = build_search_backend("google", topk=3)
    try:
        assert isinstance(backend, GoogleSearch) and backend.api_key == "test-key"
    finally:
        backend.close()


def test_google_queries_serpapi_and_formats_results(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            organic = [{"title": f"Result {i}", "snippet": f"snippet {i}"} for i in range(1, 4)]
            body = {"organic_results": organic} if "q=ok" in self.path else {"error": "no results"}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("SER_API_KEY", "k123")
    backend = GoogleSearch(topk=2, url=f"http://127.0.0.1:{httpd.server_address[1]}/search")
    try:
        ok, empty = backend.search([SearchRequest("ok"), SearchRequest("nothing")])
    finally:
        backend.close()
        httpd.shutdown()
        httpd.server_close()
    assert ok.text == "Doc 1(Title: Result 1) snippet 1\nDoc 2(Title: Result 2) snippet 2"
    assert empty.text == NO_INFORMATION
    assert all("engine=google" in p and "api_key=k123" in p and "num=2" in p for p in seen)


def test_google_formats_organic_results() -> None:
    organic = [{"title": "Paris - Wikipedia", "snippet": "Paris is the capital\nof France."}, {"title": "x"},
               {"snippet": "only a snippet"}, {"title": "fourth", "snippet": "dropped by topk"}]
    assert format_organic_results(organic, topk=3) == (
        "Doc 1(Title: Paris - Wikipedia) Paris is the capital of France.\nDoc 2(Title: x) \nDoc 3: only a snippet"
    )


# --------------------------------------------------------------------------------------------
# simulator templates and Doc parsing


@pytest.mark.parametrize("mode", ["prompt", "sft"])
def test_templates_fill_every_field(mode: str) -> None:
    templates = load_templates(mode)
    request = SearchRequest(query="Eiffel tower height", question="How tall is the Eiffel Tower?",
                            golden_answers=["330 m", "1,083 ft"], noisy=True)
    useful, noisy = (fill_template(templates[flag], request, topk=5, mode=mode) for flag in (False, True))
    for prompt in (useful, noisy):
        assert "{" not in prompt and "}" not in prompt
        assert prompt.rstrip().endswith("Output:")
        assert "Query: Eiffel tower height\n" in prompt
        assert "five" in prompt  # upstream spells topk=5 as "five"
    assert "Useful Output:" in useful and "Noisy Output:" in noisy
    if mode == "prompt":  # the few-shot simulator is told every gold answer
        assert 'question: "How tall is the Eiffel Tower?" whose answer is 330 m or 1,083 ft.' in useful
    else:  # the fine-tuned simulator sees the first gold answer, in both kinds, exactly as it was trained
        for prompt in (useful, noisy):
            assert 'question: "How tall is the Eiffel Tower?" whose answer is 330 m.' in prompt
            assert "1,083 ft" not in prompt
    assert "three" in fill_template(templates[False], request, topk=3, mode=mode)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Useful Output:\nDoc 1: a b\n\nDoc 2: c\nd\nDoc 3: e\nDoc 4: f\nDoc 5: g\nDoc 6: h",
         "Doc 1: a b\nDoc 2: c d\nDoc 3: e\nDoc 4: f\nDoc 5: g"),
        ("**Doc 1:** alpha\n**Doc 2**: beta", "Doc 1: alpha\nDoc 2: beta"),
        ("Doc 1 (Title: Paris) The capital\nDoc 2 - x", "Doc 1(Title: Paris) The capital\nDoc 2: x"),
        ("Doc 3: renumbered\nDoc 7: too", "Doc 1: renumbered\nDoc 2: too"),
        ("1. Doc 1: a Doc 2: b", "Doc 1: a\nDoc 2: b"),
        ("Document 1: a\nDocument 2: b\nQuery: next\nUseful Output:\nDoc 1: z", "Doc 1: a\nDoc 2: b"),
        ("Just free text\nover two lines", "Doc 1: Just free text over two lines"),
        ("see Doc 2 for details", "Doc 1: see Doc 2 for details"),
        ("Doc 1:\nDoc 2: only the second has text", "Doc 1: only the second has text"),
        ("", NO_INFORMATION),
        ("  \n", NO_INFORMATION),
    ],
)
def test_normalize_docs(raw: str, expected: str) -> None:
    assert normalize_docs(raw, topk=5) == expected


def test_normalize_docs_truncates_to_topk() -> None:
    raw = "\n".join(f"Doc {i}: text {i}" for i in range(1, 9))
    assert normalize_docs(raw, topk=3) == "Doc 1: text 1\nDoc 2: text 2\nDoc 3: text 3"


def test_parse_servers_like_upstream_ip_argument() -> None:
    assert parse_servers("10.0.0.1,10.0.0.2:7000") == ["http://10.0.0.1:6001/v1", "http://10.0.0.2:7000/v1"]
    assert parse_servers(["http://h:1/v1/", "[::1]:5"]) == ["http://h:1/v1", "http://[::1]:5/v1"]
    with pytest.raises(ValueError, match="no simulation server"):
        parse_servers(" , ")


# --------------------------------------------------------------------------------------------
# the simulated client against a fake OpenAI server


class FakeChatServer:
    """Mimics /v1/chat/completions: fails the first ``fail_first`` requests with ``fail_status``, then
    answers seven docs that echo the query; records how many requests were in flight at once."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500, delay_s: float | tuple[float, float] = 0.0,
                 served: tuple[str, ...] = ("m", "sim")):
        self.fail_first, self.fail_status, self.delay_s = fail_first, fail_status, delay_s
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self.models: list[str] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # /v1/models, as vLLM and sglang list what they serve
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"} for name in served]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    n = fake.requests
                    fake.requests += 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.prompts.append(body["messages"][-1]["content"])
                    fake.models.append(body["model"])
                    fake.bodies.append(body)
                try:
                    delay = fake.delay_s if isinstance(fake.delay_s, float) else random.uniform(*fake.delay_s)
                    time.sleep(delay)
                    if n < fake.fail_first:
                        self._send(fake.fail_status, {"error": {"message": f"planned failure {n}"}})
                        return
                    query = re.findall(r"^Query: (.*)$", body["messages"][-1]["content"], flags=re.MULTILINE)[-1]
                    content = "Useful Output:\n" + "\n".join(f"Doc {i}: about {query} #{i}" for i in range(1, 8))
                    # log-probs when asked (OpenAI's shape): -2.0 per token for an "unsure" query, else -0.1
                    lp = -2.0 if "unsure" in query else -0.1
                    logprobs = {"content": [{"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                                            for t in ("Doc", " 1", ":")]} if body.get("logprobs") else None
                    self._send(200, {
                        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
                    })
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_servers():
    made: list[FakeChatServer] = []

    def make(**kwargs) -> FakeChatServer:
        made.append(FakeChatServer(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(n: int, noisy: bool | None = None) -> list[SearchRequest]:
    return [SearchRequest(query=f"query {i}", question=f"question {i}?", golden_answers=[f"answer {i}"], noisy=noisy)
            for i in range(n)]


def test_simulated_search_bounded_retries_and_counters(fake_servers, caplog: pytest.LogCaptureFixture) -> None:
    server = fake_servers(fail_first=2)
    with SimulatedSearch(server.address, model="sim", mode="sft", max_retries=3, backoff_s=0.01, timeout_s=10) as sim:
        with caplog.at_level(logging.WARNING, logger="zerosearch.search"):
            results = sim.search(_requests(3, noisy=False))
        stats = sim.stats()
    assert [r.text.split("\n")[0] for r in results] == [f"Doc 1: about query {i} #1" for i in range(3)]
    assert all(r.text.count("\n") == 4 for r in results)  # 7 docs written, topk=5 kept
    assert all(r.noisy is False and r.prompt_tokens == 11 and r.completion_tokens == 7 for r in results)
    assert server.requests == 5
    assert stats["search/queries"] == 3
    assert stats["search/retries"] == 2
    assert stats["search/errors"] == 0
    assert stats["search/prompt_tokens"] == 33 and stats["search/completion_tokens"] == 21
    retry_logs = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retry_logs) == 2
    assert f"http://{server.address}/v1" in retry_logs[0] and "attempt 1/4" in retry_logs[0]
    assert "500" in retry_logs[0]
    assert set(server.models) == {"sim"}


def test_simulated_search_reports_its_confidence_engine_and_ledger_counters(fake_servers) -> None:
    server = fake_servers()
    with SimulatedSearch(server.address, model="sim", with_confidence=True, timeout_s=10) as sim:
        sure, unsure = sim.search([SearchRequest(query="capital of France"), SearchRequest(query="unsure thing")])
        stats = sim.stats()
    assert all(body["logprobs"] is True for body in server.bodies)
    assert sure.confidence == pytest.approx(math.exp(-0.1)) and unsure.confidence == pytest.approx(math.exp(-2.0))
    assert sure.engine == unsure.engine == "simulate_prompt"
    # the cost ledger's keys: simulated queries and the wall time with one in flight
    assert stats["search/simulated_queries"] == 2 and stats["search/simulator_s"] > 0
    assert not any(key.startswith("search/real_queries") for key in stats)

    with SimulatedSearch(server.address, model="sim", timeout_s=10) as sim:  # not asked: none requested
        (plain,) = sim.search([SearchRequest(query="capital of France")])
    assert plain.confidence is None and "logprobs" not in server.bodies[-1]


def test_simulated_search_round_robin_and_request_order(fake_servers) -> None:
    a, b = fake_servers(delay_s=(0.0, 0.1)), fake_servers(delay_s=(0.0, 0.1))
    with SimulatedSearch([a.address, b.address], model="sim", backoff_s=0.01) as sim:
        results = sim.search(_requests(6))
        results += sim.search(_requests(1))
    assert (a.requests, b.requests) == (4, 3)  # 0,2,4 | 1,3,5 | then the 7th continues the rotation
    assert [r.text.split("\n")[0] for r in results] == [f"Doc 1: about query {i} #1" for i in (0, 1, 2, 3, 4, 5, 0)]


def test_simulated_search_comma_separated_servers_like_upstream_ip(fake_servers) -> None:
    a, b = fake_servers(), fake_servers()
    sim = build_search_backend("simulate_prompt", servers=f"{a.address},{b.address}", model="sim")
    try:
        assert sim.name == "simulate_prompt"
        sim.search(_requests(4))
    finally:
        sim.close()
    assert (a.requests, b.requests) == (2, 2)


def test_all_requests_of_a_call_are_in_flight_at_once(fake_servers) -> None:
    server = fake_servers(delay_s=0.4)
    with SimulatedSearch(server.address, model="sim") as sim:
        t0 = time.perf_counter()
        sim.search(_requests(12))
        elapsed = time.perf_counter() - t0
        stats = sim.stats()
    assert server.max_in_flight == 12
    assert stats["search/max_in_flight"] == 12
    assert elapsed < 12 * 0.4 / 3, f"12 requests of 0.4s took {elapsed:.2f}s: not concurrent"


def test_batches_from_many_threads_share_one_limit(fake_servers) -> None:
    """The limit is the backend's, not the caller's: 12 threads of one request each, 3 in flight at most;
    `submit` returns a Future of the same results without blocking."""
    from concurrent.futures import ThreadPoolExecutor

    server = fake_servers(delay_s=0.1)
    with SimulatedSearch(server.address, model="sim", concurrency=3) as sim:
        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(lambda r: sim.search([r])[0], _requests(12)))
        pending = sim.submit(_requests(2))
        submitted = pending.result(timeout=30)
    assert server.max_in_flight == 3
    assert [r.text.split("\n")[0] for r in results] == [f"Doc 1: about query {i} #1" for i in range(12)]
    assert [r.text.split("\n")[0] for r in submitted] == [f"Doc 1: about query {i} #1" for i in range(2)]


def test_concurrency_limit_bounds_requests_in_flight(fake_servers) -> None:
    server = fake_servers(delay_s=0.1)
    with SimulatedSearch(server.address, model="sim", concurrency=3) as sim:
        sim.search(_requests(9))
    assert server.max_in_flight == 3


def test_useful_and_noisy_requests_use_their_templates(fake_servers) -> None:
    server = fake_servers()
    with SimulatedSearch(server.address, model="sim", mode="prompt") as sim:
        results = sim.search([SearchRequest("q useful", "Q?", ["A"], noisy=False),
                              SearchRequest("q noisy", "Q?", ["A"], noisy=True),
                              SearchRequest("q default", "Q?", ["A"])])
    by_query = {re.findall(r"^Query: (.*)$", p, flags=re.MULTILINE)[-1]: p for p in server.prompts}
    assert "Useful Output:" in by_query["q useful"].splitlines()[-1]
    assert "Noisy Output:" in by_query["q noisy"].splitlines()[-1]
    assert "Useful Output:" in by_query["q default"].splitlines()[-1]
    assert [r.noisy for r in results] == [False, True, False]


@pytest.mark.parametrize(("mode", "answer"), [("prompt", "Paris or City of Light"), ("sft", "Paris")])
def test_simulator_prompt_names_all_gold_answers_sft_only_the_first(fake_servers, mode: str, answer: str) -> None:
    server = fake_servers()
    with SimulatedSearch(server.address, model="sim", mode=mode) as sim:
        sim.search([SearchRequest("q", "Capital of France?", ["Paris", "City of Light"], noisy=False)])
    (prompt,) = server.prompts
    assert f'"Capital of France?" whose answer is {answer}.' in prompt


def test_a_held_answer_request_uses_the_bridge_template_without_the_answer(fake_servers) -> None:
    bridge = load_bridge_template("prompt")
    assert bridge is not None and load_bridge_template("sft") is None
    request = SearchRequest("Bess Taffel", "Where was the husband of Bess Taffel born?", ["Los Angeles"], noisy=False,
                            hold_answer=True)
    prompt = fill_template(bridge, request, topk=5)
    assert "{" not in prompt and "Los Angeles" not in prompt and prompt.rstrip().endswith("Query: Bess Taffel\nUseful Output:")

    server = fake_servers()
    with SimulatedSearch(server.address, model="sim", mode="prompt") as sim:
        sim.search([request, SearchRequest("Robert Boyle", request.question, ["Los Angeles"], noisy=False),
                    dataclasses.replace(request, query="noisy one", noisy=True)])
    by_query = {re.findall(r"^Query: (.*)$", p, flags=re.MULTILINE)[-1]: p for p in server.prompts}
    assert "Los Angeles" not in by_query["Bess Taffel"] and by_query["Bess Taffel"] == prompt
    assert "whose answer is Los Angeles" in by_query["Robert Boyle"]
    assert "Noisy Output:" in by_query["noisy one"]  # a noisy draw stays noisy
    with SimulatedSearch(server.address, model="sim", mode="sft") as sim, pytest.raises(ValueError, match="bridge"):
        sim.search([request])


def test_sim_replay_sorts_a_runs_searches_and_counts_answers_per_kind(fake_servers, tmp_path, monkeypatch,
                                                                       capsys) -> None:
    """`scripts/sim_replay.py`: useful searches sorted as the two-hop loop does (follow-up / named / held), noisy and
    real-engine searches left out, each kind's answer share counted over what the server wrote."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("sim_replay", Path(__file__).parents[1] / "scripts" / "sim_replay.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    mayor, larger = "Who is the mayor of the capital of France?", "Which is larger, Paris or Lyon?"
    rows = [
        {"question": mayor, "golden_answers": ["Anne Hidalgo"], "queries": ["mayor capital of France", "Paris", "Lyon"],
         "noisy_flags": [False, False, True], "documents": ["Doc 1: Paris is the capital.", "Doc 1: x", "Doc 1: y"]},
        {"question": larger, "golden_answers": ["Paris"], "queries": ["Paris or Lyon"], "noisy_flags": [False],
         "documents": ["Doc 1: about Paris"]},
        {"question": larger, "golden_answers": ["Paris"], "queries": ["Paris size"], "noisy_flags": [None],
         "documents": ["Doc 1: Paris (real engine)"]},
    ]
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "step_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = replay.searches([str(tmp_path)])
    assert pool == {"follow": {("Paris", mayor): ["Anne Hidalgo"]}, "named": {("Paris or Lyon", larger): ["Paris"]},
                    "held": {("mayor capital of France", mayor): ["Anne Hidalgo"]}}

    server = fake_servers()  # its documents echo the query: only "Paris or Lyon" gets documents with its answer
    out = tmp_path / "replay.json"
    monkeypatch.setattr(sys, "argv", ["sim_replay.py", "--runs", str(tmp_path), "--server", server.address,
                                      "--model", "sim", "--reps", "2", "--out", str(out)])
    assert replay.main() == 0
    assert "| sim | 0.8 | 0% of 2 | 100% of 2 | 0% of 2 |" in capsys.readouterr().out
    assert len(json.loads(out.read_text())) == 6 and server.requests == 6
    by_query: dict[str, list[str]] = {}
    for prompt in server.prompts:
        by_query.setdefault(re.findall(r"^Query: (.*)$", prompt, flags=re.MULTILINE)[-1], []).append(prompt)
    assert sorted(by_query) == ["Paris", "Paris or Lyon", "mayor capital of France"]
    assert not any("Anne Hidalgo" in p for p in by_query["mayor capital of France"])  # the bridge prompt
    assert all("Anne Hidalgo" in p for p in by_query["Paris"])  # a follow-up is told the answer


def test_client_errors_are_not_retried(fake_servers) -> None:
    server = fake_servers(fail_first=10, fail_status=404)
    expected = r"failed after 1 attempt\(s\).*NotFoundError.*model name 'wrong-name'"
    with (
        SimulatedSearch(server.address, model="wrong-name", max_retries=3, backoff_s=0.01) as sim,
        pytest.raises(SearchError, match=expected),
    ):
        sim.search(_requests(1))
    assert server.requests == 1


def test_simulator_down_fails_within_the_retry_budget() -> None:
    port = _closed_port()
    timeout_s, max_retries, backoff_s = 2.0, 2, 0.05
    with SimulatedSearch(f"127.0.0.1:{port}", model="sim", max_retries=max_retries, backoff_s=backoff_s,
                         timeout_s=timeout_s) as sim:
        t0 = time.perf_counter()
        with pytest.raises(SearchError) as info:
            sim.search(_requests(2))
        elapsed = time.perf_counter() - t0
        stats = sim.stats()
    budget = (max_retries + 1) * timeout_s + sum(backoff_s * 2**k for k in range(max_retries))
    assert elapsed < budget + 1.0, f"took {elapsed:.1f}s, budget {budget:.1f}s"
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1" in message
    assert "after 3 attempt(s)" in message
    assert f"zerosearch serve-sim --model sim --port {port}" in message
    assert "2 of 2 simulated searches failed" in message
    assert stats["search/errors"] == 2 and stats["search/retries"] == 4


def test_slow_simulator_times_out_per_request(fake_servers) -> None:
    server = fake_servers(delay_s=2.0)
    with SimulatedSearch(server.address, model="sim", timeout_s=0.3, max_retries=1, backoff_s=0.01) as sim:
        t0 = time.perf_counter()
        with pytest.raises(SearchError, match=r"failed after 2 attempt\(s\) \(last error: TimeoutError: no answer within 0.3s"):
            sim.search(_requests(1))
        elapsed = time.perf_counter() - t0
    assert elapsed < 2 * 0.3 + 0.01 + 1.0


def test_closed_backend_refuses_to_search(fake_servers) -> None:
    server = fake_servers()
    sim = SimulatedSearch(server.address, model="sim")
    sim.close()
    sim.close()  # idempotent
    with pytest.raises(SearchError, match="closed"):
        sim.search(_requests(1))


# --------------------------------------------------------------------------------------------
# the simulation-server launcher, with a stand-in process instead of an engine


_FAKE_ENGINE = r"""
import json, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
port, ignore_term = int(sys.argv[1]), sys.argv[2] == "1"
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
time.sleep(0.3)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        data = json.dumps({"data": [{"id": "fake"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
print("fake engine up", flush=True)
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _fake_engine_server(tmp_path: Path, script: str, ignore_term: bool = False, **kwargs):
    """A SimulationServer whose command is ``script`` (a tiny HTTP server with a child) instead of an engine."""
    import sys

    from zerosearch.search.server import SimulationServer

    class Fake(SimulationServer):
        def command(self, model_path: str) -> list[str]:
            return [sys.executable, "-c", script, str(self.port), "1" if ignore_term else "0"]

    return Fake("fake-model", port=_closed_port(), log_dir=tmp_path, gpu=False, **kwargs)


@pytest.fixture
def no_model_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import zerosearch.search.server as server_module

    monkeypatch.setattr(server_module, "resolve_model", lambda name: name)


def test_server_commands_per_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from zerosearch.search.server import SimulationServer

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu = SimulationServer("smollm2-135m-instruct", port=6001, gpu=False)
    cmd = cpu.command("/models/smol")
    assert cpu.engine == "vllm"
    assert cmd[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/smol",
                       "--served-model-name", "smollm2-135m-instruct", "--host", "127.0.0.1", "--port", "6001",
                       "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "4096"]
    assert cpu._env()["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    half = SimulationServer("smollm2-135m-instruct", gpu=False, kv_cache_gib=0.5)
    assert half.command("/m")[-6:-4] == ["--kv-cache-memory-bytes", str(2**29)]  # the env var takes whole GiB
    assert "VLLM_CPU_KVCACHE_SPACE" not in half._env()
    one = SimulationServer("smollm2-135m-instruct", gpu=False, kv_cache_gib=1.0)
    assert one._env()["VLLM_CPU_KVCACHE_SPACE"] == "1" and "--kv-cache-memory-bytes" not in one.command("/m")
    gpu = SimulationServer("sim-14b", port=6002, host="0.0.0.0", tp=2, dp=2, gpu=True)
    assert gpu.engine == "sglang"
    assert gpu.command("/m")[1:] == ["-m", "sglang.launch_server", "--model-path", "/m", "--served-model-name",
                                     "sim-14b", "--host", "0.0.0.0", "--port", "6002", "--tp", "2", "--dp", "2"]
    assert gpu.url == "http://127.0.0.1:6002/v1"
    vllm_gpu = SimulationServer("m", engine="vllm", tp=2, gpu=True).command("/m")
    assert "--tensor-parallel-size" in vllm_gpu and "--enforce-eager" not in vllm_gpu
    with pytest.raises(SearchError, match="sglang has no CPU kernels"):
        SimulationServer("m", engine="sglang", gpu=False)



def test_the_quantization_flag_reaches_the_server_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import ExitStack

    from zerosearch.config import load_config
    from zerosearch.search import server as server_module
    from zerosearch.search.server import SimulationServer, add_serve_sim_args

    for engine, gpu in (("vllm", False), ("vllm", True), ("sglang", True)):
        cmd = SimulationServer("m", engine=engine, gpu=gpu, quantization="awq").command("/m")
        assert cmd[cmd.index("--quantization") + 1] == "awq"
        assert "--quantization" not in SimulationServer("m", engine=engine, gpu=gpu).command("/m")
    # serve-sim --quantization, and search.server_quantization for the servers a run starts
    args = add_serve_sim_args(argparse.ArgumentParser()).parse_args(["--quantization", "gptq"])
    assert args.quantization == "gptq"
    seen = {}

    def fake_ensure(ip, model, **options):
        seen.update(options)
        return []

    monkeypatch.setattr(server_module, "ensure_simulation_server", fake_ensure)
    cfg = load_config("cpu", ["search.server_quantization=fp8"])
    with ExitStack() as stack:
        server_module.start_simulation_servers(cfg, stack)
    assert seen["quantization"] == "fp8"


def test_server_that_dies_during_start_quotes_its_log(tmp_path: Path, no_model_resolution: None) -> None:
    crash = "import sys; print('RuntimeError: fake engine could not allocate the KV cache'); sys.exit(3)"
    server = _fake_engine_server(tmp_path, crash, start_timeout_s=30)
    with pytest.raises(SearchError, match=r"(?s)exited with code 3 during start-up.*fake engine could not allocate"):
        server.start()
    assert server.proc is None


def test_server_start_health_and_stop_kills_the_group(tmp_path: Path, no_model_resolution: None) -> None:
    import psutil

    from zerosearch.search.server import SimulationServer

    server = _fake_engine_server(tmp_path, _FAKE_ENGINE, ignore_term=True, stop_grace_s=1.0)
    with server:
        assert server.startup_s is not None and server.startup_s < 20
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert len(tree) == 2
        with pytest.raises(SearchError, match="already listens"):
            SimulationServer("x", port=server.port, gpu=False).start()
    # the leader ignores SIGTERM: stop() escalates to SIGKILL after the grace period
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert "fake engine up" in server.log_path.read_text()


def test_ensure_simulation_server_leaves_remote_and_busy_addresses_alone(fake_servers) -> None:
    from zerosearch.search.server import ensure_simulation_server

    busy = fake_servers()
    assert ensure_simulation_server(["192.0.2.1:6001", "example.org", busy.address], "m", gpu=False) == []


def test_a_server_already_on_the_port_must_serve_the_configured_model(fake_servers) -> None:
    from zerosearch.search.server import ensure_simulation_server

    other = fake_servers(served=("Qwen2.5-14B-Instruct",))
    with pytest.raises(SearchError, match=r"serves \['Qwen2.5-14B-Instruct'\], not search.simulation_llm='m'"):
        ensure_simulation_server([other.address], "m", gpu=False)
    not_openai = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # answers every GET with 501
    threading.Thread(target=not_openai.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SearchError, match="does not answer GET .*/v1/models as an OpenAI server"):
            ensure_simulation_server([f"127.0.0.1:{not_openai.server_address[1]}"], "m", gpu=False)
    finally:
        not_openai.shutdown()
        not_openai.server_close()
