"""Real web search through SerpAPI (``SEARCH_MODE google``), for evaluation against a live engine.

Needs an API key in the environment variable ``SER_API_KEY`` (the name upstream ZeroSearch uses):
``export SER_API_KEY=...`` (get one at https://serpapi.com/manage-api-key). Organic results become
``Doc k(Title: <title>) <snippet>`` lines.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import httpx

from zerosearch.search.base import SearchError, SearchRequest, SearchResult, format_docs, register_backend
from zerosearch.search.http import HttpBackend

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


class GoogleSearch(HttpBackend):
    """Google results via SerpAPI; all requests of a call in flight at once (at most ``concurrency``)."""

    name = "google"
    failures = "Google searches"

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
        super().__init__(timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
                         concurrency=concurrency, thread_name="google")
        self._client = httpx.AsyncClient(timeout=timeout_s)
        _install_log_redaction()

    def __repr__(self) -> str:  # never the key
        return f"GoogleSearch(url={self.url!r}, topk={self.topk})"

    async def _aclose(self) -> None:
        await self._client.aclose()

    async def _search_one(self, request: SearchRequest) -> SearchResult:
        params = {"engine": "google", "q": request.query, "api_key": self.api_key, "num": self.topk}
        self._stats.add("search/queries")
        body = await self._request(
            lambda _: self._get(params),
            target=lambda _: f"SerpAPI ({self.url})",
            hint=f"Check the key in {API_KEY_ENV}, your SerpAPI quota, and that this machine can reach serpapi.com.",
            retryable=_retryable,
        )
        if body.get("error") and not body.get("organic_results"):
            # SerpAPI reports "no results" as an error string; that is an answer, not a failure
            return SearchResult(text=format_docs([]), noisy=None, engine=self.name)
        return SearchResult(text=format_organic_results(body.get("organic_results") or [], self.topk), noisy=None, engine=self.name)

    async def _get(self, params: dict[str, Any]) -> dict[str, Any]:
        """One SerpAPI call: its JSON object, or a SerpAPIError without the key."""
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


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, SerpAPIError) and exc.status is not None:
        return exc.status == 429 or exc.status >= 500
    return True


@register_backend("google")
def _build_google(**options: Any) -> GoogleSearch:
    return GoogleSearch(**options)
