"""What a message on /converseg/query means: the query conventions, parsed and validated without ROS.

Conventions (docs/ROS.md):

- plain text, e.g. ``the red mug``: replace every active query with this one;
- a JSON list of strings, e.g. ``["the red mug", "the knife"]``: replace the active queries with these;
  ``[]`` clears them;
- a JSON object with an ``op``: ``{"op": "add", "queries": [...]}`` appends (a query already active is
  kept once), ``{"op": "remove", "queries": [...]}`` removes, ``{"op": "set", "queries": [...]}``
  replaces, ``{"op": "clear"}`` clears.

Text starting with ``[`` or ``{`` is always read as JSON. Each query is stripped of surrounding white
space and must be non-empty, at most ``max_chars`` characters long, and valid UTF-8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

OPS = ("set", "add", "remove", "clear")


class QueryRejected(ValueError):
    """A query message that changes nothing. ``reason`` is a short stable key counted in diagnostics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class QueryCommand:
    """A parsed /converseg/query message: ``op`` is one of OPS, ``queries`` the stripped texts."""

    op: str
    queries: tuple[str, ...] = ()

    def apply(self, active: tuple[str, ...], *, max_queries: int) -> tuple[str, ...]:
        """The active queries after this command; raises QueryRejected if more than max_queries result."""
        if self.op == "clear":
            result: tuple[str, ...] = ()
        elif self.op == "set":
            result = tuple(dict.fromkeys(self.queries))
        elif self.op == "add":
            result = tuple(dict.fromkeys(active + self.queries))
        else:  # remove
            result = tuple(q for q in active if q not in self.queries)
        if len(result) > max_queries:
            raise QueryRejected(
                "too_many_queries", f"{len(result)} active queries would exceed max_queries={max_queries}"
            )
        return result


def parse_query_message(text: str, *, max_chars: int) -> QueryCommand:
    """Parse the text of a std_msgs/String on /converseg/query into a QueryCommand.

    rclpy decodes bytes that are not UTF-8 into U+FFFD replacement characters, so their presence is how a
    non-UTF-8 payload shows here; such messages are refused rather than segmented for "\\ufffd".
    """
    if "\ufffd" in text:
        raise QueryRejected("query_not_utf8", "query is not valid UTF-8 (contains U+FFFD)")
    # Bound the work before parsing: a 10 kB JSON list must not cost more than a 10 kB plain query.
    if len(text) > 4 * max_chars + 64:
        raise QueryRejected("query_too_long", f"query message of {len(text)} characters is too long")
    stripped = text.strip()
    if not stripped:
        raise QueryRejected("empty_query", "query is empty or white space only")
    if stripped[0] not in "[{":
        return QueryCommand("set", (_check_text(stripped, max_chars),))
    try:
        payload = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise QueryRejected(
            "bad_query_json", f"query starts with {stripped[0]!r} but is not JSON: {exc}"
        ) from exc
    if isinstance(payload, list):
        return QueryCommand("set", _check_list(payload, max_chars))
    if not isinstance(payload, dict):
        raise QueryRejected("bad_query_json", "JSON query must be a list of strings or an object with 'op'")
    op = payload.get("op", "set")
    if op not in OPS:
        raise QueryRejected("bad_query_json", f"unknown op {op!r}; use one of {', '.join(OPS)}")
    unknown = sorted(set(payload) - {"op", "queries"})
    if unknown:
        raise QueryRejected(
            "bad_query_json", f"unknown keys {unknown}; a query object has 'op' and 'queries'"
        )
    if op == "clear":
        return QueryCommand("clear")
    queries = _check_list(payload.get("queries", []), max_chars)
    if op in ("add", "remove") and not queries:
        raise QueryRejected("empty_query", f"op {op!r} needs at least one query")
    return QueryCommand(op, queries)


def _check_list(items: object, max_chars: int) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(q, str) for q in items):
        raise QueryRejected("bad_query_json", "'queries' must be a list of strings")
    return tuple(_check_text(q.strip(), max_chars) for q in items)


def _check_text(query: str, max_chars: int) -> str:
    if not query:
        raise QueryRejected("empty_query", "query is empty or white space only")
    if len(query) > max_chars:
        raise QueryRejected(
            "query_too_long", f"query of {len(query)} characters exceeds max_query_chars={max_chars}"
        )
    return query
