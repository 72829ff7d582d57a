"""Thin HTTP handlers for consultations, their lifecycle, payments, conclusions, ratings and my-patients."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Controller, Request, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app import params, timeparams
from app.access import ADMINS, BOOKERS_FOR_OTHERS, PATIENTS, SPECIALIST_ROLES, Viewer, only_roles
from app.accounts import reads as account_reads
from app.accounts.controllers import parse_cursor
from app.audit.service import audit_trail
from app.chat.schemas import ConversationOut, ExtendIn
from app.consultations import reads
from app.consultations.models import AnalysisOrder, Conclusion, Consultation, Rating
from app.consultations.schemas import (
    AnalysisOrderOut,
    AnalysisStatusIn,
    BookIn,
    CancelIn,
    ConclusionIn,
    ConclusionOut,
    ConsultationOut,
    MyPatientOut,
    PatientBrief,
    PayIn,
    RatingIn,
    RatingOut,
    Status,
)
from app.consultations.service import ConsultationService
from app.errors import Invalid
from app.schemas import Page
from app.services import consultations_for

Limit = Annotated[int, Parameter(ge=1, le=500)]
BRIEF_FIELDS = ("id", "full_name", "initials", "age", "is_dependent")


async def provide_consultations(db_session: NamedDependency[AsyncSession], state: State) -> ConsultationService:
    return consultations_for(db_session, state)


def brief(card: dict[str, Any] | None) -> PatientBrief | None:
    return PatientBrief(**{f: card.get(f) for f in BRIEF_FIELDS}) if card else None  # type: ignore[arg-type]


def consultation_out(c: Any, card: dict[str, Any] | None = None) -> ConsultationOut:
    """From a Consultation or a row of its columns."""
    return ConsultationOut(id=c.id, patient_id=c.patient_id, specialist_id=c.specialist_id, service_id=c.service_id,
                           slot_id=c.slot_id, specialty=c.specialty, starts_at=c.starts_at, ends_at=c.ends_at,
                           format=c.format, status=c.status, paid=c.paid, conversation_id=c.conversation_id,
                           patient=brief(card))


def conclusion_out(c: Conclusion, orders: list[AnalysisOrder]) -> ConclusionOut:
    return ConclusionOut(id=c.id, consultation_id=c.consultation_id, patient_id=c.patient_id, author_id=c.author_id,
                         diagnoses=c.diagnoses, recommendations=c.recommendations, treatment=c.treatment,
                         analysis_orders=[order_out(o) for o in orders], follow_up=c.follow_up,
                         created_at=c.created_at)


def order_out(o: AnalysisOrder) -> AnalysisOrderOut:
    return AnalysisOrderOut(id=o.id, name=o.name, status=o.status, expected_ready_on=o.expected_ready_on)


def rating_out(r: Rating) -> RatingOut:
    return RatingOut(consultation_id=r.consultation_id, specialist_id=r.specialist_id, score=r.score,
                     comment=r.comment, created_at=r.created_at)


def parse_calendar_cursor(cursor: str | None) -> tuple[dt.datetime, UUID] | None:
    if cursor is None:
        return None
    at, _, ident = cursor.partition("|")
    try:
        return timeparams.parse_aware(at), UUID(ident)
    except (Invalid, ValueError) as exc:  # only ever one of our next_cursor values
        raise Invalid("the cursor is not one this list gave out", "cursor_invalid") from exc


class ConsultationController(Controller):
    path = "/api/v1/consultations"
    tags = ["consultations"]
    dependencies = {"consultations": Provide(provide_consultations)}

    async def _shaped(self, consultations: ConsultationService, viewer: Viewer, c: Consultation) -> ConsultationOut:
        cards = await consultations.accounts.briefs(viewer, [c.patient_id])
        return consultation_out(c, cards.get(c.patient_id))

    @post("/", status_code=201, opt=only_roles(*PATIENTS, *BOOKERS_FOR_OTHERS))
    async def book_consultation(self, request: Request[Viewer, Any, Any],
                                consultations: NamedDependency[ConsultationService],
                                data: JSONBody[BookIn]) -> ConsultationOut:
        booked = await consultations.book(request.user, data)
        return consultation_out(booked, booked.patient)

    @get("/")
    async def list_consultations(self, request: Request[Viewer, Any, Any], from_: params.From = None,
                                 to: params.To = None, status: FromQuery[Status | None] = None,
                                 specialist_id: FromQuery[UUID | None] = None, tz: params.Zone = None,
                                 limit: FromQuery[Limit] = 200, cursor: params.Cursor = None,
                                 ) -> Page[ConsultationOut]:
        state = request.app.state
        start = end = None
        if from_ or to:
            zone = timeparams.zone(tz or await account_reads.timezone_of(state.database.reads, request.user.id,
                                                                 state.settings.clinic_timezone))
            timeparams.answer_in(zone)  # the days asked for and the answer in one zone
            start, end = timeparams.time_range(from_, to, zone)
        return await reads.calendar(state.database.reads, request.user, start, end, status, specialist_id, limit,
                                    parse_calendar_cursor(cursor))

    @get("/{consultation_id:uuid}")
    async def get_consultation(self, request: Request[Viewer, Any, Any],
                               consultations: NamedDependency[ConsultationService],
                               consultation_id: FromPath[UUID]) -> ConsultationOut:
        visit, _ = await consultations.visible(request.user, consultation_id)
        return await self._shaped(consultations, request.user, visit)

    async def _command(self, request: Request[Viewer, Any, Any], consultations: ConsultationService,
                       consultation_id: UUID, command: str, reason: str | None = None) -> ConsultationOut:
        visit = await consultations.transition(request.user, consultation_id, command, reason)
        return await self._shaped(consultations, request.user, visit)

    @post("/{consultation_id:uuid}/confirm", status_code=200, opt=only_roles(*BOOKERS_FOR_OTHERS))
    async def confirm_consultation(self, request: Request[Viewer, Any, Any],
                                   consultations: NamedDependency[ConsultationService],
                                   consultation_id: FromPath[UUID]) -> ConsultationOut:
        return await self._command(request, consultations, consultation_id, "confirm")

    @post("/{consultation_id:uuid}/start", status_code=200, opt=only_roles(*SPECIALIST_ROLES))
    async def start_consultation(self, request: Request[Viewer, Any, Any],
                                 consultations: NamedDependency[ConsultationService],
                                 consultation_id: FromPath[UUID]) -> ConsultationOut:
        return await self._command(request, consultations, consultation_id, "start")

    @post("/{consultation_id:uuid}/complete", status_code=200, opt=only_roles(*SPECIALIST_ROLES))
    async def complete_consultation(self, request: Request[Viewer, Any, Any],
                                    consultations: NamedDependency[ConsultationService],
                                    consultation_id: FromPath[UUID]) -> ConsultationOut:
        return await self._command(request, consultations, consultation_id, "complete")

    @post("/{consultation_id:uuid}/cancel", status_code=200, opt=only_roles(*PATIENTS, *BOOKERS_FOR_OTHERS))
    async def cancel_consultation(self, request: Request[Viewer, Any, Any],
                                  consultations: NamedDependency[ConsultationService],
                                  consultation_id: FromPath[UUID],
                                  data: JSONBody[CancelIn | None] = None) -> ConsultationOut:
        return await self._command(request, consultations, consultation_id, "cancel", data.reason if data else None)

    @post("/{consultation_id:uuid}/no-show", status_code=200,
          opt=only_roles(*SPECIALIST_ROLES, *BOOKERS_FOR_OTHERS))
    async def mark_no_show(self, request: Request[Viewer, Any, Any],
                           consultations: NamedDependency[ConsultationService],
                           consultation_id: FromPath[UUID]) -> ConsultationOut:
        return await self._command(request, consultations, consultation_id, "no_show")

    @post("/{consultation_id:uuid}/pay", status_code=200, opt=only_roles(*PATIENTS, *BOOKERS_FOR_OTHERS))
    async def pay_consultation(self, request: Request[Viewer, Any, Any],
                               consultations: NamedDependency[ConsultationService], consultation_id: FromPath[UUID],
                               data: JSONBody[PayIn]) -> ConsultationOut:
        """A payment taken at the front desk (registrar, admin): the service's price, once. Patients pay online:
        `POST /api/v1/consultations/{id}/payments`."""
        visit = await consultations.pay(request.user, consultation_id, data)
        return await self._shaped(consultations, request.user, visit)

    @post("/{consultation_id:uuid}/conclusion", status_code=201, opt=only_roles(*SPECIALIST_ROLES))
    async def write_conclusion(self, request: Request[Viewer, Any, Any],
                               consultations: NamedDependency[ConsultationService], consultation_id: FromPath[UUID],
                               data: JSONBody[ConclusionIn]) -> ConclusionOut:
        return conclusion_out(*await consultations.write_conclusion(request.user, consultation_id, data))

    @get("/{consultation_id:uuid}/conclusion")
    async def read_conclusion(self, request: Request[Viewer, Any, Any],
                              consultations: NamedDependency[ConsultationService],
                              consultation_id: FromPath[UUID]) -> ConclusionOut:
        return conclusion_out(*await consultations.read_conclusion(request.user, consultation_id,
                                                                   audit=audit_trail(request)))

    @post("/{consultation_id:uuid}/chat/extend", status_code=200, opt=only_roles(*SPECIALIST_ROLES))
    async def extend_chat(self, request: Request[Viewer, Any, Any], consultations: NamedDependency[ConsultationService],
                          consultation_id: FromPath[UUID], data: JSONBody[ExtendIn]) -> ConversationOut:
        visit, window = await consultations.extend_chat(request.user, consultation_id, data.until)
        assert visit.conversation_id is not None  # the service refuses a consultation without one
        return ConversationOut(id=visit.conversation_id, patient_id=visit.patient_id,
                               specialist_id=visit.specialist_id, writable=window.writable,
                               writable_until=window.until)

    @post("/{consultation_id:uuid}/rating", status_code=201, opt=only_roles(*PATIENTS))
    async def rate_consultation(self, request: Request[Viewer, Any, Any],
                                consultations: NamedDependency[ConsultationService], consultation_id: FromPath[UUID],
                                data: JSONBody[RatingIn]) -> RatingOut:
        return rating_out(await consultations.rate(request.user, consultation_id, data))


class CareController(Controller):
    path = "/api/v1"
    tags = ["consultations"]
    dependencies = {"consultations": Provide(provide_consultations)}

    @get("/my-patients", opt=only_roles(*SPECIALIST_ROLES))
    async def list_my_patients(self, request: Request[Viewer, Any, Any],
                               consultations: NamedDependency[ConsultationService],
                               tab: FromQuery[Literal["actual", "archive"]] = "actual",
                               q: params.Search = None,
                               ) -> Page[MyPatientOut]:
        rows = await consultations.my_patients(request.user, tab, q)
        return Page(items=[MyPatientOut(patient=brief(r.patient),  # type: ignore[arg-type]
                                        next_consultation=consultation_out(r.next) if r.next else None,
                                        last_consultation_at=r.last_at, tz_offset_minutes=r.tz_offset_minutes)
                           for r in rows])

    @patch("/analysis-orders/{order_id:uuid}", opt=only_roles(*SPECIALIST_ROLES))
    async def update_analysis_order(self, request: Request[Viewer, Any, Any],
                                    consultations: NamedDependency[ConsultationService], order_id: FromPath[UUID],
                                    data: JSONBody[AnalysisStatusIn]) -> AnalysisOrderOut:
        return order_out(await consultations.set_analysis_status(request.user, order_id, data.status))

    @get("/alerts/ratings", opt=only_roles(*ADMINS))
    async def list_low_ratings(self, consultations: NamedDependency[ConsultationService],
                               limit: FromQuery[Annotated[int, Parameter(ge=1, le=100)]] = 50,
                               cursor: params.Cursor = None) -> Page[RatingOut]:
        rows = await consultations.low_ratings(limit, parse_cursor(cursor))
        return Page(items=[rating_out(r) for r in rows[:limit]],
                    next_cursor=str(rows[limit - 1].id) if len(rows) > limit else None)
