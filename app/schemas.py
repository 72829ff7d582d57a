"""Wire types shared by every domain: the strict base Struct and the one page shape."""

from __future__ import annotations

from decimal import Decimal
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


def money_ok(amount: Decimal, allow_zero: bool = True) -> bool:
    """A finite amount in roubles and kopecks within what a clinic charges."""
    if not amount.is_finite() or amount.as_tuple().exponent < -2:  # type: ignore[operator]
        return False
    return (amount >= 0 if allow_zero else amount > 0) and amount <= 10_000_000
