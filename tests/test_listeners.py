"""Issue 12 item 8: what listens. A one-node process group binds loopback only; the BM25 `/retrieve` server
bounds each request; its client refuses malformed hits."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
from conftest import http_server, reply

from zerosearch.search.base import SearchError, SearchRequest
from zerosearch.search.retriever import MAX_BODY_BYTES, MAX_TOPK, RetrieverClient, start_retriever_server

CORPUS = [{"id": str(i), "contents": f"Title {i}\nPassage {i} about towers and bells."} for i in range(150)]


def test_rendezvous_address_is_loopback_on_one_node() -> None:
    from zerosearch.training.group import _rendezvous_address

    host, port = _rendezvous_address(False)
    assert host == "127.0.0.1" and port > 0


def _rank(rank: int, store: str, queue) -> None:
    import psutil
    import torch

    from zerosearch.training.distributed import DistInfo, init_distributed

    init_distributed(DistInfo(rank, 2, store=store), torch.device("cpu"))
    import torch.distributed as dist

    t = torch.ones(1) * (rank + 1)
    dist.all_reduce(t)
    listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == "LISTEN"]
    queue.put((rank, float(t), listening))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_node_process_group_listens_only_on_loopback(tmp_path: Path) -> None:
    """Two Gloo ranks through `init_distributed` as the driver sets them up on one node: they reduce, and no
    socket of theirs listens on anything but 127.0.0.1 (torch's TCPStore would listen on every interface)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = str(tmp_path / "rdzv")
    procs = [ctx.Process(target=_rank, args=(r, store, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert sorted(r[1] for r in results) == [3.0, 3.0]
    for _, _, listening in results:
        assert listening and all(ip == "127.0.0.1" for ip in listening), listening


@pytest.fixture
def server(tmp_path: Path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in CORPUS))
    with start_retriever_server(corpus, host="127.0.0.1", port=0, topk=3) as srv:
        yield srv


@pytest.mark.parametrize("topk", [0, -1, MAX_TOPK + 1, 10**9, "5", 2.5, True])
def test_retrieve_server_bounds_topk(server, topk) -> None:
    response = httpx.post(server.url, json={"queries": ["towers"], "topk": topk}, timeout=10)
    if topk == 0:  # 0 means "the server's default", as Search-R1's
        assert response.status_code == 200 and len(response.json()["result"][0]) == 3
        return
    assert response.status_code == 400 and "topk" in response.json()["error"]


def test_retrieve_server_bounds_the_request(server) -> None:
    big = httpx.post(server.url, content=b" " * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"},
                     timeout=10)
    assert big.status_code == 413
    many = httpx.post(server.url, json={"queries": ["x"] * 2000}, timeout=10)
    assert many.status_code == 400 and "at most" in many.json()["error"]
    deep = httpx.post(server.url, content=b"[" * 100_000 + b"]" * 100_000, timeout=10)
    assert deep.status_code == 400
    ok = httpx.post(server.url, json={"queries": ["towers"], "topk": MAX_TOPK}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == MAX_TOPK


@pytest.mark.parametrize("result", [
    [[1, 2]],
    [["just a string"]],
    [[{"document": {"contents": 5}}]],
    ["not a list"],
])
def test_retriever_client_rejects_malformed_hits(result) -> None:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            reply(self, 200, json.dumps({"result": result}).encode())

    with http_server(Handler) as httpd:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/retrieve"
        client = RetrieverClient(url, topk=2, max_retries=0, timeout_s=5)
        try:
            with pytest.raises(SearchError, match=f"retriever {url} answered"):
                client.search([SearchRequest("q")])
        finally:
            client.close()

