"""What a message on /converseg/query means: the query conventions, parsed and validated without ROS.

Conventions (docs/ROS.md):

- plain text, e.g. ``the red mug``: replace every active query with this one;
- a JSON list of strings, e.g. ``["the red mug", "the knife"]``: replace the active queries with these;
  ``[]`` clears them;
- a JSON object with an ``op``: ``{"op": "add", "queries": [...]}`` appends (a query already active is
  kept once), ``{"op": "remove", "queries": [...]}`` removes, ``{"op": "set", "queries": [...]}``
  replaces, ``{"op": "clear"}`` clears.

Text starting with ``[`` or ``{`` is always read as JSON; an object must name its ``op`` or its ``queries``
(``{}`` is refused, not read as "clear"). Each query is stripped of surrounding white space and must be
non-empty, at most ``max_chars`` characters long, valid UTF-8 (no lone surrogates from a JSON ``\\ud800``)
and free of control characters (a NUL would cut the text short in every C layer below the node).

Labels: each active query has a label, its pixel value in the label image. A query keeps its label while it
stays active. ``set`` (plain text, a list) numbers its queries 1..n in order; ``add`` gives each new query the
smallest free label; ``remove`` leaves the other labels unchanged.
"""

from __future__ import annotations

import json
import struct
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field

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
        return tuple(self.apply_labelled(dict.fromkeys(active, 0), max_queries=max_queries))

    def apply_labelled(self, active: dict[str, int], *, max_queries: int) -> dict[str, int]:
        """``active`` (query -> label, in order) after this command, with the labelling rule of the module
        docstring; raises QueryRejected if more than max_queries result."""
        if self.op == "clear":
            result: tuple[str, ...] = ()
        elif self.op == "set":
            result = tuple(dict.fromkeys(self.queries))
        elif self.op == "add":
            result = tuple(dict.fromkeys(tuple(active) + self.queries))
        else:  # remove
            result = tuple(q for q in active if q not in self.queries)
        if len(result) > max_queries:
            raise QueryRejected(
                "too_many_queries", f"{len(result)} active queries would exceed max_queries={max_queries}"
            )
        if self.op == "set":
            return {q: i + 1 for i, q in enumerate(result)}
        labels = {q: active[q] for q in result if active.get(q)}
        free = (n for n in range(1, max_queries + 2) if n not in labels.values())
        return {q: labels.get(q) or next(free) for q in result}


def parse_query_message(text: str, *, max_chars: int) -> QueryCommand:
    """Parse the text of a std_msgs/String on /converseg/query into a QueryCommand.

    rclpy decodes bytes that are not UTF-8 into U+FFFD replacement characters, so their presence is how a
    non-UTF-8 payload shows here; such messages are refused rather than segmented for "\\ufffd".
    """
    if "\ufffd" in text:
        raise QueryRejected("query_not_utf8", "query is not valid UTF-8 (contains U+FFFD)")
    if "\x00" in text:
        raise QueryRejected("query_control_character", "query contains a NUL character")
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
    if "queries" not in payload:  # {} or {"op": "set"}: most likely a mistake, never a silent clear
        raise QueryRejected(
            "bad_query_json", f'op {op!r} needs \'queries\'; clear with {{"op": "clear"}} or []'
        )
    queries = _check_list(payload["queries"], max_chars)
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
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from JSON "\ud800": no tokenizer takes it
        raise QueryRejected("query_not_utf8", f"query is not valid Unicode text: {exc.reason}") from exc
    control = next((c for c in query if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if control is not None:
        raise QueryRejected(
            "query_control_character", f"query contains the control character U+{ord(control):04X}"
        )
    if len(query) > max_chars:
        raise QueryRejected(
            "query_too_long", f"query of {len(query)} characters exceeds max_query_chars={max_chars}"
        )
    return query


def decode_string_message(raw: bytes) -> str:
    """The text of a serialized std_msgs/String (CDR: 4-byte encapsulation header, uint32 length including
    the terminating NUL, the bytes), checked as the typed message cannot be: rclpy's conversion stops at the
    first NUL ("ok\\x00\\xff" reads as "ok") and replaces bytes that are not UTF-8 with U+FFFD."""
    if len(raw) < 8 or raw[0] != 0 or raw[1] not in (0, 1):
        raise QueryRejected("bad_query_json", f"not a serialized std_msgs/String ({len(raw)} bytes)")
    (length,) = struct.unpack("<I" if raw[1] == 1 else ">I", raw[4:8])
    body = raw[8 : 8 + length]
    if length == 0 or len(body) != length:
        raise QueryRejected("bad_query_json", f"serialized string length {length} does not fit the message")
    body = body[:-1] if body.endswith(b"\x00") else body
    if b"\x00" in body:
        raise QueryRejected("query_control_character", "query contains a NUL character")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QueryRejected("query_not_utf8", f"query is not valid UTF-8: {exc}") from exc


@dataclass
class RequestDeduplicator:
    """Whether a /converseg/query message is new, when two subscriptions can deliver the same one.

    The node listens on the query topic twice (docs/ROS.md, "Query QoS"): a volatile subscription matches every
    publisher, a transient-local one also receives what a latched publisher sent before the node started. A
    message from a transient-local publisher therefore arrives twice. Where rclpy gives the publisher's gid
    and publication sequence number (Iron and later), each publisher's messages are applied once, in order.
    Otherwise (Humble) a message is a copy when the same bytes came through the other subscription within
    ``window_s``; commands are idempotent, so a repeated command that slips through changes nothing.
    """

    window_s: float = 2.0
    max_publishers: int = 256
    _last_sequence: OrderedDict = field(default_factory=OrderedDict)  # publisher gid -> highest sequence
    _recent: OrderedDict = field(default_factory=OrderedDict)  # (payload, path) -> arrival time

    def first_time(
        self,
        payload: bytes,
        *,
        path: str,
        publisher: bytes | None = None,
        sequence: int | None = None,
        now: float | None = None,
    ) -> bool:
        if publisher and sequence:
            last = self._last_sequence.pop(publisher, 0)
            self._last_sequence[publisher] = max(last, sequence)
            while len(self._last_sequence) > self.max_publishers:
                self._last_sequence.popitem(last=False)
            return sequence > last
        now = time.monotonic() if now is None else now
        while self._recent and next(iter(self._recent.values())) < now - self.window_s:
            self._recent.popitem(last=False)
        copy = any(p == payload and other != path for (p, other) in self._recent)
        self._recent.pop((payload, path), None)
        self._recent[(payload, path)] = now
        return not copy
