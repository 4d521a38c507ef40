"""Real web search through SerpAPI (``SEARCH_MODE google``), for evaluation against a live engine.

Needs an API key in the environment variable ``SER_API_KEY`` (the name upstream ZeroSearch uses):
``export SER_API_KEY=...`` (get one at https://serpapi.com/manage-api-key). Organic results become
``Doc k(Title: <title>) <snippet>`` lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Any

import httpx

from zerosearch.search.base import (
    BackgroundLoop,
    SearchError,
    SearchRequest,
    SearchResult,
    SearchStats,
    call_with_retries,
    format_docs,
    register_backend,
)

SERPAPI_URL = "https://serpapi.com/search"
API_KEY_ENV = "SER_API_KEY"
# SerpAPI takes the key only as the `api_key` query parameter, so every URL we could print carries it.
_KEY_PARAM = re.compile(r"(api_key=)[^&\s'\"]*", re.IGNORECASE)


def redact(text: str, secret: str = "") -> str:
    """`text` with every `api_key=...` value (and `secret` itself, wherever it appears) replaced by `***`."""
    text = _KEY_PARAM.sub(r"\1***", text)
    return text.replace(secret, "***") if secret else text


class _RedactKeys(logging.Filter):
    """On httpx's logger: its INFO line `HTTP Request: GET <url>` would print the key in the URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "api_key=" in message.lower():
            record.msg, record.args = redact(message), None
        return True


def _install_log_redaction() -> None:
    for name in ("httpx", "httpcore"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _RedactKeys) for f in log.filters):
            log.addFilter(_RedactKeys())


class SerpAPIError(RuntimeError):
    """A failed SerpAPI request, its message built from the URL without the key (httpx's would print it)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def format_organic_results(organic: list[dict[str, Any]], topk: int) -> str:
    docs = []
    for item in organic:
        title = " ".join(str(item.get("title", "")).split())
        snippet = " ".join(str(item.get("snippet", "")).split())
        if title or snippet:
            docs.append((title, snippet))
        if len(docs) == topk:
            break
    return format_docs(docs)


class GoogleSearch:
    """Google results via SerpAPI; all requests of a call in flight at once (at most ``concurrency``)."""

    name = "google"

    def __init__(
        self,
        topk: int = 5,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 16,
        url: str = SERPAPI_URL,
    ) -> None:
        self.api_key = api_key or os.environ.get(API_KEY_ENV, "")
        if not self.api_key:
            raise SearchError(
                f"google search needs a SerpAPI key in the environment variable {API_KEY_ENV}: "
                f"`export {API_KEY_ENV}=<your key>` (https://serpapi.com/manage-api-key), or pass api_key=...; "
                "without one, train against the simulator (SEARCH_MODE simulate_prompt|simulate_sft) "
                "or a local corpus (SEARCH_ENGINE wiki)"
            )
        self.topk = topk
        self.url = url
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self._stats = SearchStats()
        self._semaphore: asyncio.Semaphore | None = None
        self._loop = BackgroundLoop(name="zerosearch-google")
        self._client = httpx.AsyncClient(timeout=timeout_s)
        _install_log_redaction()

    def __repr__(self) -> str:  # never the key
        return f"GoogleSearch(url={self.url!r}, topk={self.topk})"

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        if not requests:
            return []
        return self._loop.run(self._search_all(requests))

    async def _search_all(self, requests: list[SearchRequest]) -> list[SearchResult]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        outcomes = await asyncio.gather(*(self._search_one(r) for r in requests), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes  # type: ignore[return-value]

    async def _search_one(self, request: SearchRequest) -> SearchResult:
        params = {"engine": "google", "q": request.query, "api_key": self.api_key, "num": self.topk}
        self._stats.add("search/queries")

        async def attempt(_: int) -> dict[str, Any]:
            # httpx's errors print the request URL, key included: re-raise them with the key redacted and
            # without their cause (a traceback would print the original message too)
            try:
                with self._stats.in_flight():
                    response = await self._client.get(self.url, params=params)
            except httpx.HTTPError as exc:
                raise SerpAPIError(redact(f"{type(exc).__name__}: {exc}", self.api_key)) from None
            if response.is_error:
                raise SerpAPIError(f"HTTP {response.status_code} {response.reason_phrase} from {self.url}",
                                   status=response.status_code)
            try:
                body = response.json()
            except ValueError:
                raise SerpAPIError(f"{self.url} answered with status {response.status_code} but not JSON") from None
            if not isinstance(body, dict):  # a JSON array or string is no SerpAPI answer either
                raise SerpAPIError(f"{self.url} answered with JSON that is not an object ({type(body).__name__})")
            return body

        assert self._semaphore is not None
        async with self._semaphore:
            body = await call_with_retries(
                attempt,
                target=lambda _: f"SerpAPI ({self.url})",
                max_retries=self.max_retries,
                backoff_s=self.backoff_s,
                timeout_s=self.timeout_s,
                stats=self._stats,
                hint=f"Check the key in {API_KEY_ENV}, your SerpAPI quota, and that this machine can reach serpapi.com.",
                retryable=_retryable,
            )
        if body.get("error") and not body.get("organic_results"):
            # SerpAPI reports "no results" as an error string; that is an answer, not a failure
            return SearchResult(text=format_docs([]), noisy=None)
        return SearchResult(text=format_organic_results(body.get("organic_results") or [], self.topk), noisy=None)

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._client.aclose())
        finally:
            self._loop.close()


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, SerpAPIError) and exc.status is not None:
        return exc.status == 429 or exc.status >= 500
    return True


@register_backend("google")
def _build_google(**options: Any) -> GoogleSearch:
    return GoogleSearch(**options)
