"""Thin HTTP handlers: a consultation's online payments, the provider's notifications, refunds due."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app import params
from app.access import PATIENTS, PUBLIC, STAFF_READERS, Viewer, only_roles
from app.accounts.controllers import parse_cursor
from app.consultations.controllers import provide_consultations
from app.consultations.service import ConsultationService
from app.payments.models import Payment, Refund
from app.payments.schemas import NotificationIn, NotificationOut, PaymentOut, RefundOut
from app.payments.service import PaymentService
from app.schemas import Page
from app.services import payments_for


async def provide_payments(db_session: NamedDependency[AsyncSession], state: State) -> PaymentService:
    return payments_for(db_session, state)


def payment_out(p: Payment) -> PaymentOut:
    return PaymentOut(id=p.id, consultation_id=p.consultation_id, status=p.status, amount=p.amount,
                      currency=p.currency, method=p.method, provider=p.provider,
                      confirmation_url=p.confirmation_url if p.status == "pending" else None,
                      created_at=p.created_at)


def refund_out(r: Refund) -> RefundOut:
    return RefundOut(id=r.id, consultation_id=r.consultation_id, payment_id=r.payment_id, amount=r.amount,
                     currency=r.currency, status=r.status, provider=r.provider, attempts=r.attempts,
                     last_error=r.last_error, resolved_at=r.resolved_at, created_at=r.created_at)


class PaymentController(Controller):
    path = "/api/v1"
    tags = ["payments"]
    dependencies = {"consultations": Provide(provide_consultations), "payments": Provide(provide_payments)}

    @post("/consultations/{consultation_id:uuid}/payments", status_code=201, opt=only_roles(*PATIENTS))
    async def pay_online(self, request: Request[Viewer, Any, Any], consultations: NamedDependency[ConsultationService],
                         consultation_id: FromPath[UUID]) -> PaymentOut:
        """Pay for a consultation online: answers the provider's page to confirm on (`confirmation_url`).
        Asked again while that payment is open, it answers the same one."""
        return payment_out(await consultations.pay_online(request.user, consultation_id))

    @get("/consultations/{consultation_id:uuid}/payments")
    async def list_payments(self, request: Request[Viewer, Any, Any],
                            consultations: NamedDependency[ConsultationService],
                            consultation_id: FromPath[UUID]) -> Page[PaymentOut]:
        return Page(items=[payment_out(p) for p in await consultations.payments_of(request.user, consultation_id)])

    @post("/payments/yookassa/notifications", status_code=200, opt=PUBLIC)
    async def yookassa_notification(self, consultations: NamedDependency[ConsultationService],
                                    data: JSONBody[NotificationIn]) -> NotificationOut:
        """YooKassa's HTTP notifications. The body is only a hint: the payment is fetched back from YooKassa
        and counts as it says there. Unknown ids are ignored with 200, so the provider stops repeating them."""
        changed = await consultations.payment_notified("yookassa", data.event, data.object.id)
        return NotificationOut(outcome="processed" if changed else "ignored")

    @get("/refunds", opt=only_roles(*STAFF_READERS))
    async def list_refunds(self, payments: NamedDependency[PaymentService],
                           status: FromQuery[Literal["due", "pending", "succeeded", "failed"] | None] = None,
                           limit: FromQuery[Annotated[int, Parameter(ge=1, le=200)]] = 50,
                           cursor: params.Cursor = None) -> Page[RefundOut]:
        """Refunds owed for cancelled paid visits; the front desk gives back those taken at the desk."""
        rows = await payments.refunds(status, limit, parse_cursor(cursor))
        return Page(items=[refund_out(r) for r in rows[:limit]],
                    next_cursor=str(rows[limit - 1].id) if len(rows) > limit else None)

    @post("/refunds/{refund_id:uuid}/done", status_code=200, opt=only_roles(*STAFF_READERS))
    async def refund_done(self, request: Request[Viewer, Any, Any], payments: NamedDependency[PaymentService],
                          refund_id: FromPath[UUID]) -> RefundOut:
        """The front desk gave the money back by hand."""
        return refund_out(await payments.refunded_at_desk(refund_id, request.user.id))
