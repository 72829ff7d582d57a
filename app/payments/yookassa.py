"""YooKassa API v3 over httpx: payments confirmed by redirect, and refunds.

Every creating call carries an Idempotence-Key, so repeating it (after a timeout, by another instance)
answers the same payment or refund instead of charging or refunding twice.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from app.payments.provider import ProviderError, ProviderPayment, ProviderRefund
from app.settings import Settings


class _Amount(msgspec.Struct):
    value: str
    currency: str


class _Confirmation(msgspec.Struct):
    type: str
    confirmation_url: str | None = None


class _Payment(msgspec.Struct):
    id: str
    status: str
    amount: _Amount
    paid: bool = False
    metadata: dict[str, Any] | None = None
    confirmation: _Confirmation | None = None


class _Refund(msgspec.Struct):
    id: str
    status: str


def _money(value: str) -> Decimal:
    try:
        return Decimal(value)
    except InvalidOperation as exc:
        raise ProviderError("the provider answered an amount that is not a number", retryable=False) from exc


class YooKassa:
    name = "yookassa"

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not (settings.yookassa_shop_id and settings.yookassa_secret_key):
            raise ValueError("PAYMENT_PROVIDER=yookassa needs YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY")
        self._client = httpx.AsyncClient(
            base_url=settings.yookassa_api_url.rstrip("/"),
            auth=httpx.BasicAuth(settings.yookassa_shop_id, settings.yookassa_secret_key),
            timeout=httpx.Timeout(settings.payment_timeout_seconds), transport=transport)

    async def _call(self, method: str, path: str, *, key: str | None = None,
                    body: dict[str, Any] | None = None) -> bytes | None:
        headers = {"Idempotence-Key": key} if key else {}
        try:
            answer = await self._client.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:  # timeouts and refused connections: the same key may be sent again
            raise ProviderError(f"the payment provider did not answer: {type(exc).__name__}", retryable=True) from exc
        if answer.status_code == 404:
            return None
        if answer.status_code >= 500 or answer.status_code == 429:
            raise ProviderError(f"the payment provider answered {answer.status_code}", retryable=True)
        if answer.status_code >= 400:
            raise ProviderError(f"the payment provider refused the request ({answer.status_code})", retryable=False)
        return answer.content

    @staticmethod
    def _payment(raw: bytes) -> ProviderPayment:
        try:
            p = msgspec.json.decode(raw, type=_Payment)
        except msgspec.DecodeError as exc:
            raise ProviderError("the payment provider answered an unreadable payment", retryable=True) from exc
        return ProviderPayment(
            id=p.id, status=p.status, paid=p.paid, amount=_money(p.amount.value), currency=p.amount.currency,
            metadata={str(k): str(v) for k, v in (p.metadata or {}).items()},
            confirmation_url=p.confirmation.confirmation_url if p.confirmation else None)

    @staticmethod
    def _refund(raw: bytes) -> ProviderRefund:
        try:
            r = msgspec.json.decode(raw, type=_Refund)
        except msgspec.DecodeError as exc:
            raise ProviderError("the payment provider answered an unreadable refund", retryable=True) from exc
        return ProviderRefund(id=r.id, status=r.status)

    async def create_payment(self, key: str, amount: Decimal, currency: str, description: str,
                             metadata: dict[str, str], return_url: str) -> ProviderPayment:
        raw = await self._call("POST", "/payments", key=key, body={
            "amount": {"value": f"{amount:.2f}", "currency": currency},
            "capture": True,  # one step: the money is taken when the payer confirms
            "confirmation": {"type": "redirect", "return_url": return_url},
            "description": description,
            "metadata": metadata,
        })
        if raw is None:
            raise ProviderError("the payment provider does not know its payments route", retryable=False)
        return self._payment(raw)

    async def get_payment(self, payment_id: str) -> ProviderPayment | None:
        raw = await self._call("GET", f"/payments/{quote(payment_id, safe='')}")
        return None if raw is None else self._payment(raw)

    async def create_refund(self, key: str, payment_id: str, amount: Decimal, currency: str) -> ProviderRefund:
        raw = await self._call("POST", "/refunds", key=key, body={
            "payment_id": payment_id, "amount": {"value": f"{amount:.2f}", "currency": currency}})
        if raw is None:
            raise ProviderError("the payment provider does not know this payment", retryable=False)
        return self._refund(raw)

    async def get_refund(self, refund_id: str) -> ProviderRefund | None:
        raw = await self._call("GET", f"/refunds/{quote(refund_id, safe='')}")
        return None if raw is None else self._refund(raw)

    async def aclose(self) -> None:
        await self._client.aclose()
