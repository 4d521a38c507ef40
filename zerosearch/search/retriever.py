"""Search-R1's retriever protocol (``POST /retrieve``): its client, its server, and the ``wiki`` backend.

* :class:`RetrieverClient` — a client of a Search-R1 retriever server, so an existing dense or BM25
  retriever stands in (``SEARCH_ENGINE wiki`` with ``retriever_url=URL``);
* :func:`start_retriever_server` / :func:`serve_retriever` — a small stdlib HTTP server that puts a
  :class:`~zerosearch.search.bm25.BM25Search` behind the same ``/retrieve`` JSON as Search-R1's
  ``retrieval_server.py``::

      POST /retrieve {"queries": ["q1", …], "topk": 3, "return_scores": true}
        -> {"result": [[{"document": {"id": "7", "contents": "Title\\ntext"}, "score": 12.3}, …], …]}
      (with "return_scores": false each hit is the bare document, as in Search-R1;
       the single form {"query": "q1", "topk": 3} is answered like {"queries": ["q1"], …})

* the ``wiki`` backend: in-process BM25 over ``corpus=PATH``, or this client for ``retriever_url=URL``;
* ``python -m zerosearch.search.retriever --corpus CORPUS.jsonl --port PORT`` serves a corpus.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from zerosearch.search.base import SearchError, SearchRequest, SearchResult, is_loopback, register_backend
from zerosearch.search.bm25 import BM25Search, passages_to_string
from zerosearch.search.http import HttpBackend

logger = logging.getLogger("zerosearch.search")


# ---------------------------------------------------------------------------------------------
# Search-R1 /retrieve protocol: client


def retriever_url(url: str) -> str:
    """``host:port`` / ``http://host:port`` / ``…/retrieve`` -> ``http://host:port/retrieve``."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if not parts.hostname:
        raise ValueError(f"cannot read a host from retriever address {url!r}; use http://HOST:PORT/retrieve")
    path = parts.path.rstrip("/") or "/retrieve"
    netloc = parts.netloc
    return f"{parts.scheme or 'http'}://{netloc}{path}"


class RetrieverClient(HttpBackend):
    """Searches through a running Search-R1 retriever server; one batched ``/retrieve`` call per ``search``
    (at most ``concurrency`` calls in flight together)."""

    name = "wiki"

    def __init__(
        self,
        url: str,
        topk: int = 5,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 64,
    ) -> None:
        import httpx

        self.url = retriever_url(url)
        self.topk = topk
        super().__init__(timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
                         concurrency=concurrency, thread_name="retriever")
        # a retriever on this machine is reached directly, never through HTTP_PROXY
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=not is_loopback(self.url))

    async def _aclose(self) -> None:
        await self._client.aclose()

    async def _search_batch(self, requests: list[SearchRequest]) -> list[SearchResult]:
        self._stats.add("search/queries", len(requests))
        with self._stats.in_flight(len(requests)):
            result = await self._retrieve([r.query for r in requests])
        return [SearchResult(text=passages_to_string(docs), noisy=None, engine=self.name) for docs in result]

    async def _retrieve(self, queries: list[str]) -> list[list[dict[str, Any]]]:
        payload = {"queries": queries, "topk": self.topk, "return_scores": True}

        async def attempt(_: int) -> Any:
            response = await self._client.post(self.url, json=payload)
            response.raise_for_status()
            return response.json()

        body = await self._request(
            attempt,
            target=lambda _: f"retriever {self.url}",
            hint=(
                "Start one with `python -m zerosearch.search.retriever --corpus CORPUS.jsonl --port PORT` "
                "(or Search-R1's retrieval_server.py), or search in-process with corpus=PATH instead of "
                "retriever_url."
            ),
        )
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise SearchError(
                f"retriever {self.url} answered {str(body)[:200]!r}; expected "
                f'{{"result": [[...] x {len(queries)}]}} as Search-R1\'s /retrieve returns'
            )
        return [self._documents(hits) for hits in result]

    def _documents(self, hits: Any) -> list[dict[str, Any]]:
        """One query's hits as documents, at most `topk`; anything that is not a Search-R1 document is an error
        naming the server (not an AttributeError deep inside the rollout)."""
        if not isinstance(hits, list):
            raise SearchError(f"retriever {self.url} answered {str(hits)[:200]!r} for a query; expected a list of hits")
        docs = []
        for hit in hits[: self.topk]:
            doc = hit.get("document", hit) if isinstance(hit, dict) else hit
            if not (isinstance(doc, dict) and (isinstance(doc.get("contents"), str)
                                               or isinstance(doc.get("title", doc.get("text")), str))):
                raise SearchError(
                    f"retriever {self.url} answered a malformed hit {str(hit)[:200]!r}; expected "
                    '{"document": {"contents": "Title\\ntext"}, "score": s} as Search-R1\'s /retrieve returns')
            docs.append(doc)
        return docs


# ---------------------------------------------------------------------------------------------
# Search-R1 /retrieve protocol: server


# Bounds of one /retrieve request: a larger body, topk or query list is refused (HTTP 413 / 400), so a single
# request cannot make the server read unbounded bytes or score the whole corpus.
MAX_BODY_BYTES = 1 << 20
MAX_TOPK = 100
MAX_QUERIES = 1024


class _RetrieveHandler(BaseHTTPRequestHandler):
    server: _RetrieverHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("retriever %s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "documents": len(self.server.bm25.docs)})
        else:
            self._send(404, {"error": f"unknown path {self.path}; POST /retrieve or GET /health"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/retrieve":
            self._send(404, {"error": f"unknown path {self.path}; POST /retrieve"})
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._send(413 if length > 0 else 400,
                       {"error": f"request body must have a Content-Length of at most {MAX_BODY_BYTES} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            queries, topk, return_scores = self._parse(body)
        except (ValueError, TypeError, RecursionError) as exc:
            self._send(400, {"error": str(exc)[:500]})
            return
        hits = self.server.bm25.retrieve(queries, topk)
        if return_scores:
            result = [[{"document": d, "score": s} for d, s in row] for row in hits]
        else:
            result = [[d for d, _ in row] for row in hits]
        self._send(200, {"result": result})

    def _parse(self, body: Any) -> tuple[list[str], int, bool]:
        if not isinstance(body, dict):
            raise TypeError('expected a JSON object {"queries": [...], "topk": k, "return_scores": bool}')
        queries = body.get("queries")
        if queries is None and "query" in body:
            queries = [body["query"]]
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise ValueError('"queries" must be a list of strings (or give one "query" string)')
        if len(queries) > MAX_QUERIES:
            raise ValueError(f"{len(queries)} queries in one request; send at most {MAX_QUERIES}")
        topk = body.get("topk") or body.get("top_k") or self.server.default_topk
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= MAX_TOPK:
            raise ValueError(f'"topk" must be an integer from 1 to {MAX_TOPK}, got {str(topk)[:50]}')
        return queries, topk, bool(body.get("return_scores", False))


class _RetrieverHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], bm25: BM25Search, default_topk: int) -> None:
        super().__init__(address, _RetrieveHandler)
        self.bm25 = bm25
        self.default_topk = default_topk


class RetrieverServer:
    """A running retriever server (background thread). ``url`` is its ``/retrieve`` address."""

    def __init__(self, httpd: _RetrieverHTTPServer) -> None:
        self.httpd = httpd
        host, port = httpd.server_address[:2]
        self.host, self.port = str(host), int(port)
        self.url = f"http://{self.host}:{self.port}/retrieve"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="zerosearch-retriever-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_bm25(corpus: str | Path | BM25Search, topk: int) -> BM25Search:
    return corpus if isinstance(corpus, BM25Search) else BM25Search(corpus, topk=topk)


def start_retriever_server(
    corpus: str | Path | BM25Search, host: str = "127.0.0.1", port: int = 8000, topk: int = 3
) -> RetrieverServer:
    """Serve ``/retrieve`` over ``corpus`` in a background thread; ``port=0`` picks a free port."""
    return RetrieverServer(_RetrieverHTTPServer((host, port), _as_bm25(corpus, topk), topk))


def serve_retriever(corpus: str | Path | BM25Search, host: str = "127.0.0.1", port: int = 8000, topk: int = 3) -> None:
    """Serve Search-R1's ``/retrieve`` over ``corpus`` until interrupted (Ctrl-C / SIGTERM ends it)."""
    httpd = _RetrieverHTTPServer((host, port), _as_bm25(corpus, topk), topk)
    print(f"retriever over {len(httpd.bm25.docs)} passages at http://{host}:{httpd.server_address[1]}/retrieve",
          flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


@register_backend("wiki")
def _build_wiki(
    corpus: str | Path | None = None, retriever_url: str | None = None, topk: int = 5, **options: Any
) -> BM25Search | RetrieverClient:
    if corpus and retriever_url:
        raise ValueError("wiki search takes corpus=PATH (in-process BM25) or retriever_url=URL, not both")
    if corpus:
        from zerosearch.data import resolve_corpus

        return BM25Search(resolve_corpus(corpus), topk=topk, **options)
    if retriever_url:
        return RetrieverClient(retriever_url, topk=topk, **options)
    raise ValueError(
        "wiki search needs corpus=PATH (a JSONL passage corpus, searched in-process with BM25) or "
        "retriever_url=URL (a running Search-R1 /retrieve server)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve Search-R1's /retrieve API with BM25 over a JSONL corpus.")
    parser.add_argument("--corpus", required=True,
                        help="JSONL passage corpus (.jsonl or .jsonl.gz; `default`: the bundled one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topk", type=int, default=3, help="default topk when a request gives none")
    args = parser.parse_args(argv)
    from zerosearch.data import resolve_corpus

    serve_retriever(resolve_corpus(args.corpus), host=args.host, port=args.port, topk=args.topk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
