"""Hybrid search: routing by a drawn share and by the simulator's confidence, within real-query budgets."""

import pytest

from zerosearch.search import SearchRequest, SearchResult
from zerosearch.search.hybrid import HybridSearch


class FakeEngine:
    def __init__(self, name, confidence=None):
        self.name, self.confidence, self.requests = name, confidence, []

    def search(self, requests):
        self.requests += requests
        conf = self.confidence or {}
        return [SearchResult(text=f"{self.name}: {r.query}", noisy=None if self.name == "wiki" else bool(r.noisy),
                             engine=self.name, confidence=conf.get(r.query)) for r in requests]

    def stats(self):
        key = "search/simulated_queries" if self.name.startswith("simulate") else f"search/real_queries/{self.name}"
        return {"search/queries": float(len(self.requests)), key: float(len(self.requests)), "search/max_in_flight": 2.0}

    def close(self):
        self.closed = True


def requests(n, noisy=False):
    return [SearchRequest(query=f"q{i}", question="Q", golden_answers=["a"], noisy=noisy) for i in range(n)]


def test_without_a_share_or_a_threshold_every_query_is_simulated():
    sim, real = FakeEngine("simulate_prompt"), FakeEngine("wiki")
    results = HybridSearch(sim, real).search(requests(5))
    assert [r.engine for r in results] == ["simulate_prompt"] * 5 and not real.requests


def test_a_drawn_share_goes_to_the_real_engine_reproducibly():
    def route(seed):
        sim, real = FakeEngine("simulate_prompt"), FakeEngine("wiki")
        results = HybridSearch(sim, real, real_share=0.3, seed=seed).search(requests(200, noisy=True))
        # results stay in request order, each from the engine that wrote it; the real engine gets no noise flag
        assert [r.text.split(": ")[1] for r in results] == [f"q{i}" for i in range(200)]
        assert all(r.noisy is None for r in real.requests) and all(r.noisy for r in sim.requests)
        return [r.engine for r in results]

    engines = route(1)
    assert 40 <= engines.count("wiki") <= 80
    assert route(1) == engines and route(2) != engines


def test_a_low_confidence_result_is_replaced_by_the_real_engines():
    sim = FakeEngine("simulate_prompt", confidence={"q0": 0.9, "q1": 0.2, "q2": 0.49, "q3": 0.5})
    real = FakeEngine("wiki")
    hybrid = HybridSearch(sim, real, min_confidence=0.5)
    results = hybrid.search(requests(4))
    assert [r.engine for r in results] == ["simulate_prompt", "wiki", "wiki", "simulate_prompt"]
    assert [r.query for r in real.requests] == ["q1", "q2"] and len(sim.requests) == 4
    stats = hybrid.stats()
    assert stats["search/hybrid_low_confidence"] == 2 and stats["search/real_queries/wiki"] == 2
    assert stats["search/simulated_queries"] == 4 and stats["search/max_in_flight"] == 2.0


def test_budgets_per_step_and_per_run_cap_the_real_queries():
    sim, real = FakeEngine("simulate_prompt"), FakeEngine("wiki")
    hybrid = HybridSearch(sim, real, real_share=1.0, max_real_per_step=3, max_real_per_run=5)
    first = hybrid.search(requests(4))
    assert [r.engine for r in first].count("wiki") == 3  # the 4th keeps the simulator's documents
    assert [r.engine for r in hybrid.search(requests(2))].count("wiki") == 0  # same step: budget spent
    hybrid.begin_step()
    assert [r.engine for r in hybrid.search(requests(4))].count("wiki") == 2  # the run's budget of 5 ends it
    hybrid.begin_step()
    assert [r.engine for r in hybrid.search(requests(4))].count("wiki") == 0
    assert hybrid.stats()["search/hybrid_refused"] == 1 + 2 + 2 + 4 and len(real.requests) == 5


def test_shares_out_of_range_are_refused():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        HybridSearch(FakeEngine("simulate_prompt"), FakeEngine("wiki"), real_share=1.5)


# --- the configured stack: SEARCH_MODE hybrid and simulate_self through the factory -----------------------


class FakeRetriever:
    """A Search-R1 `/retrieve` server on 127.0.0.1 answering one document per query."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                result = [[{"document": {"contents": f'"Real"\n{q} is in the corpus'}}] for q in body["queries"]]
                data = json.dumps({"result": result}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/retrieve"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_search_mode_hybrid_builds_the_simulator_and_the_real_engine(fake_servers_for_hybrid):
    from contextlib import ExitStack

    from zerosearch.config import load_config
    from zerosearch.rollout.factory import describe_search, start_search
    from zerosearch.search.hybrid import HybridSearch
    from zerosearch.search.retriever import RetrieverClient
    from zerosearch.search.simulated import SimulatedSearch

    chat, retriever = fake_servers_for_hybrid
    cfg = load_config("cpu", [
        "search.mode=hybrid", f"search.ip={chat.address}", "search.start_server=never", "search.simulation_llm=sim",
        f"search.retriever_url={retriever.url}", "search.hybrid_real_share=1.0", "search.hybrid_min_confidence=0.5",
        "search.hybrid_max_real_per_step=1",
    ])
    with ExitStack() as stack:
        hybrid = start_search(cfg, stack)
        assert isinstance(hybrid, HybridSearch) and hybrid.min_confidence == 0.5 and hybrid.budget.per_step == 1
        assert isinstance(hybrid.simulated, SimulatedSearch) and hybrid.simulated.with_confidence
        assert isinstance(hybrid.real, RetrieverClient)
        first, second = hybrid.search([SearchRequest(query="capital of France"), SearchRequest(query="Peru")])
        stats = hybrid.stats()
    assert first.engine == "wiki" and "capital of France is in the corpus" in first.text
    assert second.engine == "simulate_prompt" and second.text.startswith("Doc 1: about Peru")  # the budget ran out
    assert stats["search/real_queries/wiki"] == 1 and stats["search/simulated_queries"] == 1
    assert "hybrid" in describe_search(cfg, "hybrid")


def test_search_mode_simulate_self_needs_no_server():
    from contextlib import ExitStack

    from zerosearch.config import load_config
    from zerosearch.rollout.factory import start_search
    from zerosearch.rollout.self_search import SelfSimulation

    cfg = load_config("cpu", ["search.mode=simulate_self", "search.ip=", "search.topk=3"])
    with ExitStack() as stack:
        backend = start_search(cfg, stack)
    assert isinstance(backend, SelfSimulation) and backend.topk == 3 and backend.max_tokens == cfg.search.max_tokens


@pytest.fixture
def fake_servers_for_hybrid():
    from test_search import FakeChatServer

    chat, retriever = FakeChatServer(), FakeRetriever()
    yield chat, retriever
    chat.close()
    retriever.close()


def test_merged_search_stats_sum_counters_and_keep_the_largest_peak():
    from zerosearch.search.base import merge_search_stats

    merged = merge_search_stats([{"search/queries": 3.0, "search/max_in_flight": 4.0},
                                 {"search/queries": 2.0, "search/max_in_flight": 2.0, "search/errors": 1.0}])
    assert merged == {"search/queries": 5.0, "search/max_in_flight": 4.0, "search/errors": 1.0}


def test_each_step_logs_why_queries_went_to_the_real_engine():
    from zerosearch.training.driver import search_step_metrics

    before = {"search/queries": 10.0, "search/hybrid_drawn": 2.0, "search/hybrid_low_confidence": 1.0}
    now = {"search/queries": 18.0, "search/hybrid_drawn": 3.0, "search/hybrid_low_confidence": 5.0,
           "search/hybrid_refused": 2.0}
    m = search_step_metrics(before, now)
    assert (m["search/queries_step"], m["search/queries_total"]) == (8.0, 18.0)
    assert (m["search/hybrid_drawn_step"], m["search/hybrid_low_confidence_step"],
            m["search/hybrid_refused_step"]) == (1.0, 4.0, 2.0)
    assert not any("hybrid" in k for k in search_step_metrics({}, {"search/queries": 1.0}))
