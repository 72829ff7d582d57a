"""The one place services are assembled from a session and the app's shared state (providers call these)."""

from __future__ import annotations

from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.service import AccountService
from app.audit.service import AuditQueries
from app.chat.service import ChatService
from app.consultations.service import ConsultationService
from app.documents.service import DocumentService
from app.payments.service import PaymentService
from app.rtc.service import CallService
from app.scheduling.service import SchedulingService


def accounts_for(session: AsyncSession, state: State) -> AccountService:
    return AccountService(session, state.settings, state.tokens, state.limiter, state.sms)


def scheduling_for(session: AsyncSession, state: State) -> SchedulingService:
    return SchedulingService(session, state.settings)


def chat_for(session: AsyncSession, state: State, accounts: AccountService | None = None) -> ChatService:
    return ChatService(session, state.settings, accounts or accounts_for(session, state), state.limiter,
                       state.presence)


def payments_for(session: AsyncSession, state: State) -> PaymentService:
    return PaymentService(session, state.settings, state.payment_provider, state.refunds.kick)


def consultations_for(session: AsyncSession, state: State) -> ConsultationService:
    accounts = accounts_for(session, state)
    return ConsultationService(session, state.settings, accounts, scheduling_for(session, state),
                               chat_for(session, state, accounts), payments_for(session, state))


def calls_for(session: AsyncSession, state: State) -> CallService:
    consultations = consultations_for(session, state)
    return CallService(session, state.settings, consultations, consultations.chat, consultations.accounts,
                       state.presence, state.sfu_directory, state.call_keeper.wake, state.call_keeper.close_later)


def documents_for(session: AsyncSession, state: State) -> DocumentService:
    return DocumentService(session, state.settings, accounts_for(session, state))


def audit_queries_for(session: AsyncSession) -> AuditQueries:
    return AuditQueries(session)
