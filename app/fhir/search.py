"""FHIR search parameters as the API takes them: references, date prefixes, `_count` and the opaque page cursor.

Anything malformed is a `BadSearch` (400 OperationOutcome). Search parameters a resource does not support are
refused too, as FHIR allows a server to do (handling=strict), so a client never mistakes an ignored filter for
an applied one.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from app.errors import DomainError

DEFAULT_COUNT = 20
MAX_COUNT = 100
PAGING = frozenset({"_count", "_cursor"})
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
SUPPORTED_PREFIXES = ("eq", "gt", "lt", "ge", "le")


class BadSearch(DomainError):
    """A search or read the request spelled wrongly: FHIR answers 400."""

    status_code = 400
    default_reason = "bad_parameter"


@dataclass(frozen=True, slots=True)
class DateBound:
    """One `date=` value as a half-open range test on an instant: `op` is >=, >, < or <=."""

    op: str
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class Search:
    """The parsed query of a search: the resource's own parameters, the page size and where the page starts."""

    params: dict[str, list[str]]
    count: int
    cursor: str | None

    def one(self, name: str) -> str | None:
        values = self.params.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise BadSearch(f"{name} is given more than once", "parameter_repeated")
        return values[0]


def parse(query: Mapping[str, list[str]], allowed: Iterable[str]) -> Search:
    known = frozenset(allowed)
    unknown = sorted(set(query) - known - PAGING)
    if unknown:
        raise BadSearch(f"unsupported search parameter: {', '.join(unknown)}", "parameter_unsupported")
    count = DEFAULT_COUNT
    raw_count = query.get("_count")
    if raw_count:
        try:
            count = int(raw_count[-1])
        except ValueError:
            raise BadSearch("_count is a whole number", "count_invalid") from None
        if not 1 <= count <= MAX_COUNT:
            raise BadSearch(f"_count is between 1 and {MAX_COUNT}", "count_invalid")
    cursor = query.get("_cursor")
    return Search(params={k: v for k, v in query.items() if k in known}, count=count,
                  cursor=cursor[-1] if cursor else None)


def reference_id(value: str, resource_type: str) -> UUID:
    """`Patient/{id}` or a bare id, as FHIR reference search parameters take them."""
    raw = value.removeprefix(f"{resource_type}/")
    try:
        return UUID(raw)
    except ValueError:
        raise BadSearch(f"not a {resource_type} reference: {value}", "reference_invalid") from None


def date_bounds(values: Iterable[str], zone: dt.tzinfo) -> list[DateBound]:
    """`date=ge2026-01-01&date=lt2026-02-01`: each value a prefix and a date, a date and time, or a month or
    year, in the clinic's zone when it names no offset. A date stands for its whole day (FHIR's implicit range):
    ge/lt compare with its start, gt/le with its end, eq is the range itself. However many values are given, what
    they mean together is one range: the latest lower bound and the earliest upper bound (so a statement has at
    most four shapes, however a client writes its dates)."""
    bounds: list[DateBound] = []
    for value in values:
        prefix, text = (value[:2], value[2:]) if value[:2] in PREFIXES else ("eq", value)
        if prefix not in SUPPORTED_PREFIXES:
            raise BadSearch(f"the date prefix {prefix} is not supported (eq, gt, lt, ge, le are)", "date_invalid")
        start, end = _range(text, zone)
        if prefix == "eq":
            bounds += [DateBound(">=", start), DateBound("<", end)]
        elif prefix == "ge":
            bounds.append(DateBound(">=", start))
        elif prefix == "gt":
            bounds.append(DateBound(">=", end))
        elif prefix == "lt":
            bounds.append(DateBound("<", start))
        else:  # le
            bounds.append(DateBound("<", end))
    lower = max((b.at for b in bounds if b.op == ">="), default=None)
    upper = min((b.at for b in bounds if b.op == "<"), default=None)
    return [*([DateBound(">=", lower)] if lower else []), *([DateBound("<", upper)] if upper else [])]


def _range(text: str, zone: dt.tzinfo) -> tuple[dt.datetime, dt.datetime]:
    if text[:4].isdigit() and not 2 <= int(text[:4]) <= 9998:  # the range and its conversion to UTC must exist
        raise BadSearch(f"a FHIR date between the years 2 and 9998: {text}", "date_invalid")
    try:
        if len(text) == 4:
            start = dt.datetime(int(text), 1, 1, tzinfo=zone)
            return start, start.replace(year=start.year + 1)
        if len(text) == 7:
            start = dt.datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=zone)
            return start, (start + dt.timedelta(days=32)).replace(day=1)
        if len(text) == 10:
            start = dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), tzinfo=zone)
            return start, start + dt.timedelta(days=1)
        instant = dt.datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise BadSearch(f"not a FHIR date: {text}", "date_invalid") from None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=zone)
    return instant, instant + dt.timedelta(microseconds=1)


# --- the page cursor -----------------------------------------------------------------------------

def encode_cursor(*parts: Any) -> str:
    """An opaque cursor: the keyset position of the last entry of a page (what the client hands back)."""
    text = "|".join(p.isoformat() if isinstance(p, dt.datetime) else str(p) for p in parts)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, parts: int) -> list[str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadSearch("the cursor is not one this server gave out", "cursor_invalid") from None
    pieces = text.split("|")
    if len(pieces) != parts:
        raise BadSearch("the cursor is not one this server gave out", "cursor_invalid")
    return pieces


def time_and_id(cursor: str | None) -> tuple[dt.datetime, UUID] | None:
    if cursor is None:
        return None
    at, ident = decode_cursor(cursor, 2)
    try:
        moment = dt.datetime.fromisoformat(at)
        if moment.tzinfo is None:
            raise ValueError(at)
        return moment, UUID(ident)
    except ValueError:
        raise BadSearch("the cursor is not one this server gave out", "cursor_invalid") from None


def only_id(cursor: str | None) -> UUID | None:
    if cursor is None:
        return None
    (ident,) = decode_cursor(cursor, 1)
    try:
        return UUID(ident)
    except ValueError:
        raise BadSearch("the cursor is not one this server gave out", "cursor_invalid") from None


def page_url(base: str, search: Search, cursor: str | None) -> str:
    """The search's own URL (its parameters as given), with this page's cursor."""
    pairs = [(name, value) for name, values in sorted(search.params.items()) for value in values]
    pairs.append(("_count", str(search.count)))
    if cursor is not None:
        pairs.append(("_cursor", cursor))
    return f"{base}?{urlencode(pairs)}"
