"""What every HTTP search client shares: one background event loop, one concurrency limit, the counters,
bounded retries, ``stats()``, ``close()`` and the context manager.

A client (:mod:`~zerosearch.search.simulated`, :mod:`~zerosearch.search.google`,
:mod:`~zerosearch.search.retriever`) subclasses :class:`HttpBackend` and implements its request only:

* ``async def _search_one(self, request) -> SearchResult``, which makes its HTTP call through
  ``await self._request(attempt, target=…, hint=…)`` (the limit, the timeout and the retries), or
  ``_search_batch`` instead for a protocol that answers a whole batch in one call (``/retrieve``);
* ``async def _aclose(self)``, which closes its HTTP client(s).

The per-request path: ``search(requests)`` may be called from any thread; it hands the batch to the
backend's one event loop and blocks until every request is answered. There each request is a task, and at
most ``concurrency`` of them hold the limit (a semaphore, held across a request's retries) at once, whichever
thread sent them. ``submit(requests)`` does the same without blocking and returns a
:class:`concurrent.futures.Future`, so a caller with many batches in flight needs no thread per batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Self, TypeVar

from zerosearch.search.base import SearchError, SearchRequest, SearchResult, SearchStats, check_timeout

logger = logging.getLogger("zerosearch.search")

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio event loop running in a daemon thread, reused for every call of one backend.

    ``run(coro)`` blocks the caller until the coroutine finishes, so a synchronous ``search`` can keep
    many HTTP requests in flight on one loop and one connection pool; ``submit(coro)`` does not block.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self.loop.is_closed():
            coro.close()
            raise SearchError("this search backend was closed; build a new one")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


async def call_with_retries(
    call: Callable[[int], Awaitable[T]],
    *,
    target: Callable[[int], str],
    max_retries: int,
    backoff_s: float,
    timeout_s: float,
    stats: SearchStats,
    hint: str | Callable[[int], str],
    retryable: Callable[[BaseException], bool] = lambda exc: True,
) -> T:
    """Run ``call(attempt)`` with a per-attempt timeout and at most ``max_retries`` retries.

    Retries wait ``backoff_s * 2**(attempt-1)`` and are logged (target, attempt, error). When the
    budget is spent, or the error is not ``retryable``, raises SearchError naming the target, the
    number of attempts and the last error, followed by ``hint`` (a string, or a function of the attempt).
    """
    check_timeout(timeout_s)
    attempts = max_retries + 1
    for attempt in range(attempts):
        try:
            return await asyncio.wait_for(call(attempt), timeout=timeout_s)
        except Exception as exc:  # every failure is counted, logged, re-raised below
            if isinstance(exc, TimeoutError):
                error = f"TimeoutError: no answer within {timeout_s:g}s"
            else:
                error = f"{type(exc).__name__}: {exc}"
            last = attempt + 1 == attempts or not retryable(exc)
            if last:
                stats.add("search/errors")
                raise SearchError(
                    f"{target(attempt)} failed after {attempt + 1} attempt(s) (last error: {error}). "
                    f"{hint(attempt) if callable(hint) else hint}"
                ) from exc
            delay = backoff_s * (2**attempt)
            stats.add("search/retries")
            logger.warning(
                "search request to %s failed (attempt %d/%d): %s; retrying in %.2fs",
                target(attempt), attempt + 1, attempts, error, delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class HttpBackend:
    """The skeleton of an HTTP search client (see the module docstring); subclasses add their request.

    ``failures`` names what failed when several requests of one batch fail ("3 of 8 simulated searches
    failed; first: …"); a single failure is raised as it is.
    """

    name: str
    failures = "searches"
    simulated = False
    """A simulator writes the documents (the cost ledger counts its queries and busy time apart)."""

    @property
    def ledger_role(self) -> str:
        return "simulated" if self.simulated else self.name

    def __init__(self, *, timeout_s: float, max_retries: int, backoff_s: float, concurrency: int,
                 thread_name: str) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.timeout_s = check_timeout(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self._stats = SearchStats(role=self.ledger_role)
        self._limit = asyncio.Semaphore(concurrency)  # bound to the background loop at its first use
        self._loop = BackgroundLoop(name=f"zerosearch-{thread_name}")

    # -- public API --------------------------------------------------------------------------

    def search(self, requests: list[SearchRequest]) -> list[SearchResult]:
        """Answer all requests (in flight together, within the limit); results in request order."""
        if not requests:
            return []
        return self._loop.run(self._search_batch(list(requests)))

    def submit(self, requests: list[SearchRequest]) -> Future[list[SearchResult]]:
        """``search`` without blocking: a Future of its results (or of its SearchError)."""
        return self._loop.submit(self._search_batch(list(requests)))

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()

    def close(self) -> None:
        """Close the HTTP client(s) and stop the loop; idempotent. A later ``search`` raises SearchError."""
        if self._loop.closed:
            return
        try:
            self._loop.run(self._aclose())
        finally:
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for subclasses ----------------------------------------------------------------------

    async def _search_batch(self, requests: list[SearchRequest]) -> list[SearchResult]:
        """Every request as its own task (``_search_one``); all answered, or the failure(s) raised."""
        outcomes = await asyncio.gather(*(self._search_one(r) for r in requests), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise SearchError(f"{len(errors)} of {len(requests)} {self.failures} failed; first: {errors[0]}") from errors[0]
        return outcomes  # type: ignore[return-value]

    async def _request(self, call: Callable[[int], Awaitable[T]], *, target: Callable[[int], str],
                       hint: str | Callable[[int], str],
                       retryable: Callable[[BaseException], bool] = lambda exc: True) -> T:
        """``call(attempt)`` within the concurrency limit, with this backend's timeout and bounded retries."""
        async with self._limit:
            return await call_with_retries(
                call, target=target, max_retries=self.max_retries, backoff_s=self.backoff_s,
                timeout_s=self.timeout_s, stats=self._stats, hint=hint, retryable=retryable,
            )

    async def _search_one(self, request: SearchRequest) -> SearchResult:
        raise NotImplementedError(f"{type(self).__name__} implements neither _search_one nor _search_batch")

    async def _aclose(self) -> None:
        """Close the HTTP client(s)."""
