"""Wire types shared by every domain: the strict base Struct and the one page shape."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

T = TypeVar("T")


class Wire(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What clients send: unknown fields are refused, so a typo is a 422, not a silent no-op."""


class Out(msgspec.Struct, kw_only=True):
    """What the service answers."""


class Page(Out, Generic[T]):
    items: list[T]
    next_cursor: str | None = None
