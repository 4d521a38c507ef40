"""Issue 12 item 1: the SerpAPI key never reaches a log line, an exception, or the console."""

from __future__ import annotations

import logging
import socket
import traceback
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import http_server, reply

from zerosearch.search.base import SearchError, SearchRequest
from zerosearch.search.google import GoogleSearch, redact

KEY = "sk-test-0123456789abcdef"


def _fake_serpapi(status: int, body: bytes) -> tuple[type[BaseHTTPRequestHandler], list[str]]:
    """A SerpAPI stand-in answering every GET with `status` and `body`, and the paths it was asked for."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            reply(self, status, body)

    return Handler, seen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fault", ["http_500", "html_200", "refused"])
def test_serpapi_key_in_no_output(fault: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    """A failing SerpAPI (server error, a non-JSON page, nothing listening) with a known key: the key is in no log
    record (any logger, DEBUG up), nothing printed, neither the error's message nor its whole traceback."""
    seen: list[str] = []
    with ExitStack() as stack:
        if fault == "refused":
            url = f"http://127.0.0.1:{_free_port()}/search"
        else:
            handler, seen = _fake_serpapi(500, b"boom") if fault == "http_500" else _fake_serpapi(200, b"<html>hi</html>")
            url = f"http://127.0.0.1:{stack.enter_context(http_server(handler)).server_address[1]}/search"
        caplog.set_level(logging.DEBUG)
        caplog.set_level(logging.DEBUG, logger="httpx")  # other code may have quietened httpx's request lines
        backend = GoogleSearch(topk=2, api_key=KEY, url=url, max_retries=1, backoff_s=0.01, timeout_s=5)
        try:
            with pytest.raises(SearchError) as info:
                backend.search([SearchRequest("who wrote hamlet")])
        finally:
            backend.close()
    if fault != "refused":
        assert seen and all(f"api_key={KEY}" in p for p in seen)  # the key did go to the server
    text = "".join(traceback.format_exception(info.value))
    out, err = capsys.readouterr()
    logged = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records)
    assert "failed after 2 attempt(s)" in str(info.value)
    assert fault != "http_500" or "HTTP 500" in str(info.value)
    for where in (text, out, err, logged, repr(backend), str(backend.stats())):
        assert KEY not in where
    if fault != "refused":
        assert "api_key=***" in logged  # httpx's request line, redacted
    assert "retrying" in logged


def test_redact_hides_the_key_anywhere() -> None:
    assert redact("GET https://serpapi.com/search?q=x&api_key=abc&num=5") == \
        "GET https://serpapi.com/search?q=x&api_key=***&num=5"
    assert redact("key abc in text", "abc") == "key *** in text"


def test_a_serpapi_reply_that_is_not_a_json_object_is_a_search_error() -> None:
    handler, _ = _fake_serpapi(200, b"[1, 2]")
    with http_server(handler) as httpd:
        backend = GoogleSearch(topk=2, api_key=KEY, url=f"http://127.0.0.1:{httpd.server_address[1]}/search",
                               max_retries=0, backoff_s=0.01, timeout_s=5)
        try:
            with pytest.raises(SearchError, match="not an object"):
                backend.search([SearchRequest("who wrote hamlet")])
        finally:
            backend.close()
