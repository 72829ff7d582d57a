"""The seam to a payment provider: what the payment rules need of one, whichever it is."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol


class ProviderError(Exception):
    """The provider refused or did not answer; `retryable`: the same call may succeed later."""

    def __init__(self, detail: str, *, retryable: bool) -> None:
        super().__init__(detail)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class ProviderPayment:
    """A payment as the provider states it (fetched from the provider, never taken from a notification)."""

    id: str
    status: str  # pending | waiting_for_capture | succeeded | canceled
    paid: bool
    amount: Decimal
    currency: str
    metadata: dict[str, str]
    confirmation_url: str | None


@dataclass(frozen=True, slots=True)
class ProviderRefund:
    id: str
    status: str  # pending | succeeded | canceled


class PaymentProvider(Protocol):
    name: str

    async def create_payment(self, key: str, amount: Decimal, currency: str, description: str,
                             metadata: dict[str, str], return_url: str) -> ProviderPayment:
        """Create (or, for a key already used, answer again) a payment the payer confirms by redirect."""
        ...

    async def get_payment(self, payment_id: str) -> ProviderPayment | None:
        """The provider's current view of a payment; None when it knows no such payment."""
        ...

    async def create_refund(self, key: str, payment_id: str, amount: Decimal, currency: str) -> ProviderRefund:
        ...

    async def get_refund(self, refund_id: str) -> ProviderRefund | None:
        ...

    async def aclose(self) -> None:
        ...
