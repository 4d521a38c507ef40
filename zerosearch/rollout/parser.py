"""Parse the policy's action from the text it generated in one turn.

The action is the first complete `<search>…</search>` or `<answer>…</answer>` block; anything else
(no block, an unclosed tag, an empty or nested query) is invalid and gets upstream's feedback text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_KINDS = ("search", "answer")
_NESTED = re.compile(r"</?(search|answer|information|think)>")
MAX_QUERY_CHARS = 1000


@dataclass(frozen=True)
class Action:
    kind: str
    """`search`, `answer` or `invalid`."""
    content: str = ""
    """The query or the answer, stripped; empty for `invalid`."""


def parse_action(text: str) -> Action:
    """The first complete `<search>` or `<answer>` block of one turn's text."""
    found = _first_block(text)
    if found is None:
        return Action("invalid")
    kind, content = found[0], found[1].strip()
    if _NESTED.search(content):
        return Action("invalid")
    if kind == "search":
        if not content:
            return Action("invalid")
        content = content[:MAX_QUERY_CHARS]
    return Action(kind, content)


def _first_block(text: str) -> tuple[str, str] | None:
    """`(kind, content)` of the block that `<(search|answer)>(.*?)</\\1>` would find, in linear time.

    The regex retries its lazy scan from every opening tag, which is quadratic: 200,000 characters of
    repeated `<search>` took ~100 s. Here: an opening tag starts a complete block exactly when a closing
    tag of its kind comes after it, so only the first opening of each kind matters, and the earlier
    of those that close wins.
    """
    best: tuple[int, str, str] | None = None
    for kind in _KINDS:
        opening, closing = f"<{kind}>", f"</{kind}>"
        start = text.find(opening)
        if start < 0 or (best is not None and start > best[0]):
            continue
        end = text.find(closing, start + len(opening))
        if end >= 0:
            best = (start, kind, text[start + len(opening) : end])
    return None if best is None else (best[1], best[2])
