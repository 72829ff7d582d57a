"""The payment ledger: desk payments, online payments through a provider, refunds due.

Below the consultation rules: it knows payments by the consultation they are for, never the visit
itself (who may pay, what it costs and what a payment changes are app/consultations/service.py's).
A provider's word on a payment counts only as fetched back from the provider, never as notified.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Callable
from decimal import Decimal
from uuid import UUID

from sqlalchemy import event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database
from app.errors import Conflict, NotVisible, Unavailable
from app.payments.models import (
    CANCELED,
    DUE,
    DUPLICATE,
    FAILED,
    PENDING,
    REFUND_PENDING,
    REFUNDED,
    SUCCEEDED,
    Payment,
    Refund,
)
from app.payments.provider import PaymentProvider, ProviderError, ProviderPayment, ProviderRefund
from app.settings import Settings

log = logging.getLogger("app.payments")
# online attempts get ids derived from the consultation and their number: a repeated request (a lost answer,
# two taps, two instances) sends the provider the same Idempotence-Key and so meets the same payment
ATTEMPTS = uuid.UUID("5b0f3a52-6f7e-4d0c-9a43-3f1c7b2e8d11")
CURRENCY = "RUB"
MAX_BACKOFF = dt.timedelta(hours=6)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def provider_from(settings: Settings) -> PaymentProvider | None:
    if settings.payment_provider == "none":
        return None
    if settings.payment_provider == "yookassa":
        from app.payments.yookassa import YooKassa
        if not settings.payment_return_url:
            raise ValueError("PAYMENT_PROVIDER=yookassa needs PAYMENT_RETURN_URL (where payers come back to)")
        return YooKassa(settings)
    raise ValueError(f"PAYMENT_PROVIDER must be none or yookassa, not {settings.payment_provider!r}")


class PaymentService:
    def __init__(self, session: AsyncSession, settings: Settings, provider: PaymentProvider | None,
                 refunds_due: Callable[[], None] | None = None) -> None:
        self.session = session
        self.settings = settings
        self.provider = provider
        self._refunds_due = refunds_due  # wakes the refund worker once the refund is committed

    # --- reading -------------------------------------------------------------------------------

    async def of_consultation(self, consultation_id: UUID) -> list[Payment]:
        return list((await self.session.scalars(select(Payment).where(Payment.consultation_id == consultation_id)
                                                .order_by(Payment.created_at, Payment.id).limit(100))).all())

    async def succeeded(self, consultation_id: UUID) -> Payment | None:
        return await self.session.scalar(select(Payment).where(Payment.consultation_id == consultation_id,
                                                               Payment.status == SUCCEEDED))

    # --- at the desk ---------------------------------------------------------------------------

    async def desk_replay(self, consultation_id: UUID, amount: Decimal, method: str, reference: str) -> bool:
        """Whether this payment was recorded already (the same one reported again); refuses a clash."""
        known = await self.session.scalar(select(Payment).where(Payment.reference == reference))
        if known is None:
            return False
        if known.consultation_id != consultation_id:
            raise Conflict("this payment reference belongs to another consultation", "payment_reference_used")
        if (known.amount, known.method) != (amount, method):
            raise Conflict("this payment reference was recorded with another amount or method",
                           "payment_reference_used")
        return True

    async def record_desk(self, consultation_id: UUID, amount: Decimal, method: str, reference: str,
                          recorded_by: UUID) -> Payment:
        if await self.succeeded(consultation_id) is not None:
            raise Conflict("this consultation is already paid", "already_paid")
        payment = Payment(consultation_id=consultation_id, amount=amount, currency=CURRENCY, method=method,
                          reference=reference, recorded_by=recorded_by, status=SUCCEEDED)
        self.session.add(payment)
        try:
            async with self.session.begin_nested():
                await self.session.flush()
        except IntegrityError as exc:  # recorded in parallel: the same reference, or another payment
            raise Conflict("this consultation was paid meanwhile", "already_paid") from exc
        return payment

    # --- online --------------------------------------------------------------------------------

    def online(self) -> PaymentProvider:
        """The provider, or the refusal when online payment is not offered."""
        if self.provider is None:
            raise Conflict("online payment is not offered here: pay at the front desk", "online_payment_unavailable")
        return self.provider

    async def _idle(self) -> None:
        """Ends the request's transaction before a call to the provider (up to PAYMENT_TIMEOUT_SECONDS): a slow
        provider must not hold pooled connections and row locks. Called only before this request's first write;
        what the provider answers is recorded in a short transaction after, by compare-and-set."""
        if self.session.in_transaction():
            await self.session.commit()

    async def pending(self, consultation_id: UUID) -> Payment | None:
        return await self.session.scalar(select(Payment).where(Payment.consultation_id == consultation_id,
                                                               Payment.status == PENDING))

    async def start_online(self, consultation_id: UUID, amount: Decimal, payer_id: UUID) -> Payment:
        """A new provider payment for the consultation (the caller answers an open one instead)."""
        provider = self.online()
        tried = await self.session.scalar(select(func.count()).select_from(Payment).where(
            Payment.consultation_id == consultation_id, Payment.provider.is_not(None))) or 0
        attempt_id = uuid.uuid5(ATTEMPTS, f"{consultation_id}:{tried}")
        await self._idle()
        try:
            got = await provider.create_payment(str(attempt_id), amount, CURRENCY, self.settings.payment_description,
                                                {"consultation_id": str(consultation_id)},
                                                self.settings.payment_return_url)
        except ProviderError as exc:
            log.warning("creating an online payment failed", extra={"error": str(exc)})
            raise Unavailable("the payment provider is not answering; try again in a minute",
                              "payment_provider_unavailable") from exc
        if got.confirmation_url is None:
            raise Unavailable("the payment provider gave no page to pay on; try again",
                              "payment_provider_unavailable")
        payment = Payment(id=attempt_id, consultation_id=consultation_id, amount=amount, currency=CURRENCY,
                          method="online", reference=f"{provider.name}:{got.id}", recorded_by=payer_id,
                          status=PENDING, provider=provider.name, provider_payment_id=got.id,
                          confirmation_url=got.confirmation_url)
        self.session.add(payment)
        try:
            async with self.session.begin_nested():
                await self.session.flush()
        except IntegrityError as exc:  # the same attempt started in parallel: answer that one
            if payment in self.session:
                self.session.expunge(payment)
            other = await self.pending(consultation_id)
            if other is None:
                raise Conflict("a payment for this consultation was started meanwhile; try again",
                               "payment_in_progress") from exc
            return other
        return payment

    async def find_online(self, provider_name: str, provider_payment_id: str) -> Payment | None:
        return await self.session.scalar(select(Payment).where(Payment.provider == provider_name,
                                                               Payment.provider_payment_id == provider_payment_id))

    async def confirm(self, payment: Payment) -> bool:
        """Ask the provider about a pending payment and record what it says; True: it has just succeeded.

        It succeeds only as the provider states it: succeeded and paid, for the amount and currency we
        asked, for this consultation. A payment that succeeds for a visit paid otherwise meanwhile is a
        duplicate and is given back."""
        if payment.status != PENDING or self.provider is None or payment.provider != self.provider.name:
            return False
        assert payment.provider_payment_id is not None  # every online payment has one
        await self._idle()
        try:
            got = await self.provider.get_payment(payment.provider_payment_id)
        except ProviderError as exc:  # the provider repeats its notification later
            raise Unavailable("the payment provider is not answering", "payment_provider_unavailable") from exc
        if got is None:
            log.warning("the provider does not know one of our payments", extra={"payment_id": str(payment.id)})
            return False
        if got.status == "canceled":
            await self._move(payment, CANCELED)
            return False
        if got.status != "succeeded":
            return False
        if not self._matches(payment, got):
            log.warning("a provider payment disagrees with our record", extra={"payment_id": str(payment.id)})
            return False
        if await self.succeeded(payment.consultation_id) is not None:  # paid otherwise meanwhile
            if await self._move(payment, DUPLICATE):
                await self._refund(payment)
            return False
        return await self._move(payment, SUCCEEDED)  # False: a repeated notification got there first

    async def _move(self, payment: Payment, status: str) -> bool:
        """Compare-and-set from pending, so two notifications racing settle a payment once."""
        changed = await self.session.execute(
            update(Payment).where(Payment.id == payment.id, Payment.status == PENDING)
            .values(status=status, updated_at=utcnow()).returning(Payment.id))
        moved = changed.one_or_none() is not None
        await self.session.refresh(payment)
        return moved

    @staticmethod
    def _matches(payment: Payment, got: ProviderPayment) -> bool:
        return (got.id == payment.provider_payment_id and got.paid and got.amount == payment.amount
                and got.currency == payment.currency
                and got.metadata.get("consultation_id") == str(payment.consultation_id))

    # --- refunds -------------------------------------------------------------------------------

    async def refund_due(self, consultation_id: UUID) -> Refund | None:
        """The consultation's successful payment is owed back (its visit was cancelled)."""
        payment = await self.succeeded(consultation_id)
        return await self._refund(payment) if payment is not None else None

    async def _refund(self, payment: Payment) -> Refund:
        known = await self.session.scalar(select(Refund).where(Refund.payment_id == payment.id))
        if known is not None:
            return known
        refund = Refund(consultation_id=payment.consultation_id, payment_id=payment.id, amount=payment.amount,
                        currency=payment.currency, status=DUE, provider=payment.provider,
                        next_attempt_at=utcnow() if payment.provider else None)
        self.session.add(refund)
        await self.session.flush()
        if payment.provider and self._refunds_due is not None:
            wake = self._refunds_due
            event.listen(self.session.sync_session, "after_commit", lambda _: wake(), once=True)
        return refund

    async def refunds(self, status: str | None, limit: int, cursor: UUID | None) -> list[Refund]:
        query = select(Refund).order_by(Refund.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(Refund.status == status)
        if cursor is not None:
            query = query.where(Refund.id < cursor)
        return list((await self.session.scalars(query)).all())

    async def refunded_at_desk(self, refund_id: UUID, by: UUID) -> Refund:
        """The front desk gave the money back by hand (a desk payment, or one the provider would not return).

        A provider's refund is settled by hand only once the provider, asked again with the same key, still
        has none: a refund whose answer was lost must not be paid back a second time."""
        refund = await self.session.get(Refund, refund_id)
        if refund is None:
            raise NotVisible("refund not found")
        if refund.status == REFUNDED:
            return refund
        if refund.provider is not None:
            if refund.status != FAILED:
                raise Conflict("this refund goes back through the payment provider", "refund_by_provider")
            await self._refund_at_provider(refund)
        changed = await self.session.execute(
            update(Refund).where(Refund.id == refund.id, Refund.status == refund.status)
            .values(status=REFUNDED, resolved_by=by, resolved_at=utcnow(), updated_at=utcnow()).returning(Refund.id))
        if changed.one_or_none() is None:
            raise Conflict("this refund changed meanwhile; look at it again", "refund_changed")
        await self.session.refresh(refund)
        return refund

    async def _refund_at_provider(self, refund: Refund) -> None:
        """Refuses (409) a refund the provider has made or is making; returns when it definitely has none."""
        if self.provider is None or refund.provider != self.provider.name:
            raise Unavailable("the payment provider of this refund is not configured", "payment_provider_unavailable")
        payment_id = await self.session.scalar(select(Payment.provider_payment_id)
                                               .where(Payment.id == refund.payment_id))
        assert payment_id is not None  # every online payment has one
        status, known_id = refund.status, refund.provider_refund_id
        await self._idle()
        unsure = Unavailable("the payment provider is not answering: try again before giving the money back",
                             "payment_provider_unavailable")
        try:  # a refund the provider gave an id exists there: any error asking about it leaves us unsure
            got = await self.provider.get_refund(known_id) if known_id else None
        except ProviderError as exc:
            raise unsure from exc
        try:
            if got is None or got.status == "canceled":  # the same key answers the refund made, if any
                got = await self.provider.create_refund(str(refund.id), payment_id, refund.amount, refund.currency)
        except ProviderError as exc:
            if not exc.retryable:
                return  # refused again: none was made
            raise unsure from exc
        if got.status == "canceled":
            return
        done = got.status == "succeeded"
        await self.session.execute(
            update(Refund).where(Refund.id == refund.id, Refund.status == status)
            .values(status=REFUNDED if done else REFUND_PENDING, provider_refund_id=got.id, last_error=None,
                    resolved_at=utcnow() if done else None, next_attempt_at=None if done else utcnow(),
                    updated_at=utcnow()))
        await self.session.commit()  # kept, though the answer is a refusal
        if done:
            raise Conflict("the payment provider has given this money back: do not pay it by hand",
                           "refunded_by_provider")
        raise Conflict("the payment provider is giving this money back: do not pay it by hand",
                       "refund_by_provider")

    async def refund_notified(self, provider_refund_id: str) -> bool:
        """A provider says a refund moved on: ask it, and record what it says."""
        if self.provider is None:
            return False
        refund = await self.session.scalar(select(Refund).where(Refund.provider == self.provider.name,
                                                                Refund.provider_refund_id == provider_refund_id))
        if refund is None or refund.status not in (DUE, REFUND_PENDING):
            return False
        known = refund.status
        await self._idle()
        try:
            got = await self.provider.get_refund(provider_refund_id)
        except ProviderError as exc:
            raise Unavailable("the payment provider is not answering", "payment_provider_unavailable") from exc
        if got is None:
            return False
        status = {"succeeded": REFUNDED, "canceled": FAILED}.get(got.status)
        if status is None:
            return False
        changed = await self.session.execute(
            update(Refund).where(Refund.id == refund.id, Refund.status == known)
            .values(status=status, resolved_at=utcnow(), updated_at=utcnow()).returning(Refund.id))
        return changed.one_or_none() is not None


class RefundWorker:
    """Sends refunds due to the provider after their commit, retrying with backoff.

    The Idempotence-Key of a refund is its id, so a retry (or a second instance doing the same) never gives
    the money back twice."""

    def __init__(self, database: Database, settings: Settings, provider: PaymentProvider | None) -> None:
        self.database = database
        self.settings = settings
        self.provider = provider
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.drain()
            except Exception:  # a passing database hiccup must not end the loop
                log.exception("sending refunds failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.refund_retry_seconds)
            self._wake.clear()

    async def drain(self) -> int:
        """Send every refund due now; answers how many were settled."""
        if self.provider is None:
            return 0
        async with self._lock:
            async with self.database.reader() as session:
                rows = (await session.execute(
                    select(Refund, Payment.provider_payment_id).join(Payment, Payment.id == Refund.payment_id)
                    .where(Refund.provider == self.provider.name, Refund.status.in_((DUE, REFUND_PENDING)),
                           Refund.next_attempt_at <= utcnow())
                    .order_by(Refund.next_attempt_at).limit(100))).all()
            settled = 0
            for refund, payment_id in rows:
                settled += await self._send(refund, payment_id)
            return settled

    async def _send(self, refund: Refund, provider_payment_id: str | None) -> int:
        assert self.provider is not None
        assert provider_payment_id is not None  # every online payment has one
        values: dict[str, object]
        try:
            got: ProviderRefund | None
            if refund.provider_refund_id:
                got = await self.provider.get_refund(refund.provider_refund_id)
            else:
                got = await self.provider.create_refund(str(refund.id), provider_payment_id, refund.amount,
                                                        refund.currency)
        except ProviderError as exc:
            attempts = refund.attempts + 1
            # only a refusal to make it is final: a timeout or a 5xx may hide a refund the provider made (the
            # answer lost), and one it gave an id exists; both are asked again (with the same key) until answered,
            # never left to the desk to pay twice
            final = not exc.retryable and not refund.provider_refund_id
            values = {"attempts": attempts, "last_error": str(exc)[:300],
                      "status": FAILED if final else refund.status,
                      "next_attempt_at": None if final else utcnow() + self._backoff(attempts)}
            if final:
                log.warning("the provider refused a refund: the front desk settles it",
                            extra={"refund_id": str(refund.id)})
            elif attempts >= self.settings.refund_max_attempts:
                log.warning("a refund is still not through the provider", extra={"refund_id": str(refund.id),
                                                                                 "attempts": attempts})
        else:
            values = self._outcome(refund, got)
        async with self.database.writer() as session:
            await session.execute(update(Refund).where(Refund.id == refund.id, Refund.status == refund.status)
                                  .values(**values, updated_at=utcnow()))
            await session.commit()
        return int(values.get("status") in (REFUNDED, FAILED))

    def _outcome(self, refund: Refund, got: ProviderRefund | None) -> dict[str, object]:
        attempts = refund.attempts + 1
        if got is None:  # not known under its id (yet): asked again, never taken as refused
            return {"attempts": attempts, "last_error": "the provider does not know this refund",
                    "provider_refund_id": None, "next_attempt_at": utcnow() + self._backoff(attempts)}
        if got.status == "succeeded":
            return {"status": REFUNDED, "provider_refund_id": got.id, "resolved_at": utcnow()}
        if got.status == "canceled":
            return {"status": FAILED, "provider_refund_id": got.id, "last_error": "the provider cancelled it"}
        # pending: ask again later
        return {"status": REFUND_PENDING, "provider_refund_id": got.id, "attempts": attempts,
                "next_attempt_at": utcnow() + self._backoff(attempts)}

    def _backoff(self, attempts: int) -> dt.timedelta:
        return min(dt.timedelta(seconds=self.settings.refund_retry_seconds * 2 ** min(attempts, 20)), MAX_BACKOFF)
