"""Simulated search: a simulation LLM behind an OpenAI-compatible server writes the documents.

Two modes, as in ZeroSearch:

* ``prompt`` (``SEARCH_MODE simulate_prompt``): a general instruct model, steered by a few-shot
  prompt to write useful or noisy documents;
* ``sft`` (``SEARCH_MODE simulate_sft``): a model fine-tuned to write them from a short
  instruction (upstream's SearchSimulation models); its prompt must keep the format it was trained on.

Both talk ``/v1/chat/completions`` with an empty system message and the filled template as the user
message, exactly as upstream's simulator client does, so sglang (GPU) and vLLM (CPU or GPU) servers
both work. The templates are data, in ``templates/simulate_{prompt,sft}_{useful,noisy}.txt``, filled
with ``{query}``, ``{question}``, ``{answer}``, ``{topk}`` and ``{topk_word}`` ("five" for 5, as upstream's
prompts spell it). ``{answer}`` is the first gold answer in ``sft`` mode, exactly as upstream's fine-tuned
simulators were trained (its ``_search`` passes ``ground_truth[index][0]``); ``prompt`` mode joins all of
them with " or ".

Upstream retries a failed call forever and hides the error; here each request has a timeout and at
most ``max_retries`` logged retries with exponential backoff (rotating to the next server), after
which a SearchError names the server, the attempts and the last error.
"""

from __future__ import annotations

import itertools
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai

from zerosearch.search.base import (
    NO_INFORMATION,
    MalformedReply,
    SearchRequest,
    SearchResult,
    format_docs,
    is_loopback,
    register_backend,
)
from zerosearch.search.http import HttpBackend

DEFAULT_SIM_PORT = 6001
MODES = ("prompt", "sft")
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# These run over text a model wrote, so each must take linear time on any input: adjacent quantifiers that
# can match the same characters (`\s*#?\s*`, `[ \t]*(…)?[ \t]*`, a `^\s*` that spans lines) backtrack
# quadratically on a long run of spaces or blank lines, hence the possessive `*+` and a line-bound `^`.
# A "Doc N" marker: at the start of a line (after bullets / markdown), or inline after whitespace,
# and followed by a separator (":", "(Title: …)", ".", "-", "]") or the end of the line.
_DOC_MARKER = re.compile(
    r"(?:^[ \t*#>\[\-]*+|(?<=\s))\**+Doc(?:ument)?\s*+#?\s*+(\d+)\**\s*(?=[:(.\]\-–—*]|$)",
    re.IGNORECASE | re.MULTILINE,
)
_TITLE = re.compile(r"^\(\s*+Title:\s*+(.*?)\)", re.IGNORECASE)
# The model sometimes goes on to write the next demo turn; nothing after such a line is a document.
_STOP_LINE = re.compile(r"^[^\S\n]*+(?:Query:|Useful Output:|Noisy Output:|Demo:)", re.IGNORECASE | re.MULTILINE)
_PREAMBLE = re.compile(r"(?:[ \t]*+(?:Useful|Noisy)?[ \t]*+Output:[ \t]*+(?:\n|$))*", re.IGNORECASE)
_LEADING_SEPARATORS = re.compile(r"^[\s:.\]\-–—*)]+")


# ---------------------------------------------------------------------------------------------
# addresses


def parse_servers(servers: list[str] | tuple[str, ...] | str, default_port: int = DEFAULT_SIM_PORT) -> list[str]:
    """``"h1:6001,h2"`` or ``["h1:6001", "http://h2:6002/v1"]`` -> ``["http://h1:6001/v1", "http://h2:6001/v1"]``.

    A bare host gets ``default_port`` (upstream's simulation servers listen on 6001).
    """
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    urls = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        parts = urlsplit(item if "//" in item else f"http://{item}")
        if not parts.hostname:
            raise ValueError(f"cannot read a host from simulation server address {item!r}; use HOST:PORT")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        path = parts.path.rstrip("/")
        urls.append(f"{parts.scheme or 'http'}://{host}:{parts.port or default_port}{path or '/v1'}")
    if not urls:
        raise ValueError(
            "no simulation server given; pass servers='127.0.0.1:6001' (upstream's IP argument, "
            "comma-separated for several)"
        )
    return urls


def server_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or DEFAULT_SIM_PORT


# ---------------------------------------------------------------------------------------------
# templates and parsing


def load_templates(mode: str, template_dir: str | Path | None = None) -> dict[bool, str]:
    """``{False: useful_template, True: noisy_template}`` for ``mode`` ("prompt" or "sft")."""
    if mode not in MODES:
        raise ValueError(f"simulation mode must be one of {MODES}, got {mode!r}")
    base = Path(template_dir) if template_dir else resources.files("zerosearch.search") / "templates"
    out = {}
    for noisy, kind in ((False, "useful"), (True, "noisy")):
        path = base / f"simulate_{mode}_{kind}.txt"
        try:
            out[noisy] = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"simulation template {path} is missing; it must exist next to the others "
                "(simulate_{prompt,sft}_{useful,noisy}.txt)"
            ) from None
    return out


def load_bridge_template(mode: str, template_dir: str | Path | None = None) -> str | None:
    """``simulate_{mode}_bridge.txt``, the useful-documents prompt without the gold answer that two-hop simulation
    (``SearchRequest.hold_answer``) uses, or None where there is none (``sft`` mode)."""
    base = Path(template_dir) if template_dir else resources.files("zerosearch.search") / "templates"
    path = base / f"simulate_{mode}_bridge.txt"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def fill_template(template: str, request: SearchRequest, topk: int, mode: str = "prompt") -> str:
    """The simulator's prompt for one request; ``mode`` "sft" names only the first gold answer (see above)."""
    answers = request.golden_answers
    if isinstance(answers, str):
        answers = [answers]
    if mode == "sft":
        answers = list(answers)[:1]  # the input format the SFT simulators were fine-tuned on
    answer = " or ".join(str(a) for a in answers)
    topk_word = _NUMBER_WORDS[topk] if 0 <= topk < len(_NUMBER_WORDS) else str(topk)
    return template.format(
        query=request.query.strip(), question=request.question.strip(), answer=answer,
        topk=topk, topk_word=topk_word,
    )


def _clean(text: str) -> str:
    return " ".join(text.split()).strip("* ")


def _document_span(text: str) -> str:
    """Drop an echoed "Useful Output:" preamble and everything from the next demo-turn line on."""
    first = _DOC_MARKER.search(text)
    start = first.start() if first else _PREAMBLE.match(text).end()  # type: ignore[union-attr]
    stop = _STOP_LINE.search(text, start)
    return text[start : stop.start() if stop else len(text)]


def parse_docs(text: str, topk: int) -> list[tuple[str, str]]:
    """Split what the simulation LLM wrote into at most ``topk`` ``(title, body)`` documents.

    ``Doc N`` markers (any numbering, optional ``(Title: …)``) start documents; text before the first
    marker, and from a line that starts a new demo turn ("Query:", "Useful Output:") on, is dropped;
    text without any marker becomes one document.
    """
    text = _document_span(text)
    markers = list(_DOC_MARKER.finditer(text))
    if not markers:
        body = _clean(text)
        return [("", body)] if body else []
    docs = []
    for marker, following in zip(markers, markers[1:] + [None]):
        chunk = text[marker.end() : following.start() if following else len(text)].lstrip()
        title = ""
        found = _TITLE.match(chunk)
        if found:
            title, chunk = found.group(1).strip(), chunk[found.end() :]
        body = _clean(_LEADING_SEPARATORS.sub("", chunk))
        if body:
            docs.append((title, body))
        if len(docs) == topk:
            break
    return docs


def normalize_docs(text: str, topk: int) -> str:
    """The simulator's free text -> ``Doc 1: …\\nDoc 2: …`` (at most ``topk``; a no-doc reply -> NO_INFORMATION)."""
    return format_docs(parse_docs(text, topk)) if text.strip() else NO_INFORMATION


# ---------------------------------------------------------------------------------------------
# the backend


class SimulatedSearch(HttpBackend):
    """Documents written by a simulation LLM served over the OpenAI API (sglang or vLLM).

    ``servers``: "host:port" strings, or one comma-separated string like upstream's ``IP``
    argument (a bare host gets port 6001); requests go round-robin across them. ``model`` is the
    served model name (``--served-model-name`` of the server; "" lets vLLM/sglang pick their only one).
    All requests of one ``search`` call are in flight at once, at most ``concurrency`` together.
    A reply that is not a chat completion with text content of at most ``max_reply_chars`` characters
    counts as a failed attempt. Servers on this machine are reached directly, never through ``HTTP_PROXY``.
    """

    failures = "simulated searches"

    simulated = True

    def __init__(
        self,
        servers: list[str] | str,
        model: str,
        mode: str = "prompt",
        topk: int = 5,
        temperature: float = 0.8,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 64,
        api_key: str = "EMPTY",
        template_dir: str | Path | None = None,
        max_reply_chars: int = 65_536,
        with_confidence: bool = False,
    ) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.mode = mode
        self.name = f"simulate_{mode}"
        self.urls = parse_servers(servers)
        self.model = model
        self.topk = topk
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_reply_chars = max_reply_chars
        self.with_confidence = with_confidence
        self.templates = load_templates(mode, template_dir)
        self.bridge_template = load_bridge_template(mode, template_dir)
        self._rr = itertools.count()  # the next server, advanced on the background loop only
        super().__init__(timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
                         concurrency=concurrency, thread_name=self.name)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._clients = [
            openai.AsyncOpenAI(
                base_url=url, api_key=api_key, max_retries=0, timeout=timeout_s,
                http_client=httpx.AsyncClient(limits=limits, timeout=timeout_s, trust_env=not is_loopback(url)),
            )
            for url in self.urls
        ]

    async def _aclose(self) -> None:
        for client in self._clients:
            await client.close()

    async def _search_one(self, request: SearchRequest) -> SearchResult:
        # Before any await: the tasks of a batch start in request order, so its requests take the servers in turn.
        start, n = next(self._rr) % len(self.urls), len(self.urls)
        noisy = bool(request.noisy)
        template = self.templates[noisy]
        if request.hold_answer and not noisy:  # two-hop simulation: a first hop, documents without the answer
            if self.bridge_template is None:
                raise ValueError(f"search.two_hop needs simulate_{self.mode}_bridge.txt next to the other templates; "
                                 "only prompt mode ships one")
            template = self.bridge_template
        prompt = fill_template(template, request, self.topk, self.mode)
        self._stats.add("search/queries")

        async def attempt(k: int) -> tuple[str, Any, float | None]:
            with self._stats.in_flight():
                response = await self._clients[(start + k) % n].chat.completions.create(
                    model=self.model,
                    messages=[{"role": "system", "content": ""}, {"role": "user", "content": prompt}],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    **({"logprobs": True} if self.with_confidence else {}),
                )
            content = _reply_content(response, self.max_reply_chars)
            return content, getattr(response, "usage", None), _confidence(response) if self.with_confidence else None

        content, usage, confidence = await self._request(
            attempt, target=lambda k: f"simulation server {self.urls[(start + k) % n]}",
            hint=lambda k: self._hint((start + k) % n), retryable=_retryable,
        )
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self._stats.add("search/prompt_tokens", prompt_tokens)
        self._stats.add("search/completion_tokens", completion_tokens)
        return SearchResult(
            text=normalize_docs(content, self.topk), noisy=noisy, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, engine=self.name, confidence=confidence,
        )

    def _hint(self, index: int) -> str:
        host, port = server_host_port(self.urls[index])
        model = self.model or "MODEL"
        return (
            f"Is the simulation server up? Start it with `zerosearch serve-sim --model {model} --port {port}` "
            f"on {host} (or `bash scripts/launch_simulation_server.sh MODEL {model} PORT {port}`), or fix the "
            f"server list (upstream's IP argument; now {','.join(self.urls)}). A 404 means the model name "
            f"{self.model!r} is not what the server serves: see GET {self.urls[index]}/models."
        )


def _reply_content(response: Any, max_chars: int) -> str:
    """The text of a chat completion, or MalformedReply saying what came instead."""
    if not isinstance(response, openai.types.chat.ChatCompletion):
        # the openai client hands back a non-JSON body (a proxy's or a web server's page) as a str
        raise MalformedReply(f"not a chat completion but {type(response).__name__} {str(response)[:120]!r}")
    if not response.choices:
        raise MalformedReply("a chat completion without choices")
    message = response.choices[0].message
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        raise MalformedReply(f"a chat completion whose message content is {content!r}, not text")
    if len(content) > max_chars:
        raise MalformedReply(f"a reply of {len(content)} characters, more than max_reply_chars={max_chars}")
    return content


def _confidence(response: Any) -> float | None:
    """The geometric mean of the reply's token probabilities, exp(mean token log-prob); None without log-probs."""
    logprobs = response.choices[0].logprobs
    tokens = getattr(logprobs, "content", None) or []
    if not tokens:
        return None
    return math.exp(sum(t.logprob for t in tokens) / len(tokens))


def _retryable(exc: BaseException) -> bool:
    """Client errors (bad request, unknown model, auth) do not heal by retrying; the rest may."""
    return not isinstance(
        exc,
        (
            openai.BadRequestError,
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
            openai.UnprocessableEntityError,
        ),
    )


@register_backend("simulate_prompt")
def _build_simulate_prompt(**options: Any) -> SimulatedSearch:
    return SimulatedSearch(mode="prompt", **options)


@register_backend("simulate_sft")
def _build_simulate_sft(**options: Any) -> SimulatedSearch:
    return SimulatedSearch(mode="sft", **options)
