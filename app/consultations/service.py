"""Consultation rules: booking, the lifecycle, payments, conclusions, ratings, calendars, my-patients."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app import access, outbox, writes
from app.access import Role, Viewer
from app.accounts.service import AccountService, age_on, check_birth_date, initials
from app.audit.service import AuditTrail
from app.chat import streams
from app.chat.service import ChatService, Window, window_of
from app.consultations import booking
from app.consultations.lifecycle import ENDED, OPEN_FOR_CHAT, STATUS_PHRASES, TIMING_DETAILS, TRANSITIONS, Party
from app.consultations.models import AnalysisOrder, Conclusion, Consultation, Rating
from app.consultations.schemas import AnalysisStatus, BookIn, ConclusionIn, Format, PayIn, RatingIn, Status
from app.errors import Conflict, Forbidden, Invalid, NotVisible, Unavailable
from app.notifications import reminders
from app.payments.models import Payment
from app.payments.service import PaymentService
from app.scheduling.service import SchedulingService, refuse_unless_served
from app.schemas import money_ok
from app.settings import Settings

# ICD-10: a letter (U is reserved), two digits (or digit + A/B), an optional dot and up to four more
ICD10 = re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-Z]{1,4})?$")
LIVE = (Status.PENDING_CONFIRMATION, Status.CONFIRMED, Status.IN_PROGRESS)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Who is in whose care, the one rule (cards, conclusions): care starts when a consultation is confirmed (a mere
# request grants nothing), holds while it is confirmed or under way and for CARE_AFTER_DAYS after it completes.
# A no-show is a consultation that did not happen: the care its confirmation gave ends with it.
CARING = (Status.CONFIRMED, Status.IN_PROGRESS)


def caring(care_after_days: int) -> Any:
    """SQL: this consultation puts its patient in its specialist's care now."""
    return caring_since(utcnow() - dt.timedelta(days=care_after_days))


def caring_since(since: Any) -> Any:
    """SQL: `caring`, with the moment care lapses before given (a value, or a bind parameter of a statement
    built once)."""
    return or_(and_(Consultation.status.in_(CARING), Consultation.ends_at >= since),  # a visit never closed lapses
               and_(Consultation.status == Status.COMPLETED,
                    func.coalesce(Consultation.completed_at, Consultation.ends_at) >= since))


# a call rings and goes on only while its consultation is confirmed or under way (app/rtc reads this)
CALLABLE = (Status.CONFIRMED, Status.IN_PROGRESS)


def callable_now(consultation_id: Any) -> Any:
    """SQL: the consultation of this id (a column of the caller's query) is one a call may go on in."""
    return exists().where(Consultation.id == consultation_id, Consultation.status.in_(CALLABLE))


async def in_care(session: AsyncSession, specialist_id: UUID, patient_id: UUID, care_after_days: int) -> bool:
    return bool(await session.scalar(select(exists().where(
        Consultation.specialist_id == specialist_id, Consultation.patient_id == patient_id,
        caring(care_after_days)))))


def announcement(visit: Any, change: str) -> dict[str, Any]:
    """What consultation.updated says (the outbox's payload and the live event alike)."""
    return {"consultation_id": str(visit.id), "status": visit.status, "change": change, "paid": visit.paid,
            "starts_at": visit.starts_at.isoformat(), "specialist_id": str(visit.specialist_id),
            "patient_id": str(visit.patient_id)}


def tx_dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


def slot_free(slot: Mapping[str, Any], viewer_id: UUID, hold_id: UUID | None, now: dt.datetime) -> bool:
    """What the claim asks of a slot (booking.CLAIM, CLAIM_HELD): not booked, and not held, or held by the
    caller under this hold."""
    if slot["consultation_id"] is not None:
        return False
    held = slot["held_until"] is not None and slot["held_until"] > now
    return not held or (hold_id is not None and slot["hold_id"] == hold_id and slot["held_by"] == viewer_id)


@dataclass(frozen=True, slots=True)
class Booked:
    """A consultation just booked, with the short card of its patient as the caller may see it."""

    id: UUID
    patient_id: UUID
    specialist_id: UUID
    service_id: UUID
    slot_id: UUID
    specialty: str
    starts_at: dt.datetime
    ends_at: dt.datetime
    format: str
    status: str
    paid: bool
    conversation_id: UUID | None
    patient: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PatientRow:
    patient: dict[str, Any]  # the masked card
    next: Consultation | None
    last_at: dt.datetime
    tz_offset_minutes: int | None


class ConsultationService:
    def __init__(self, session: AsyncSession, settings: Settings, accounts: AccountService,
                 scheduling: SchedulingService, chat: ChatService, payments: PaymentService) -> None:
        self.session = session
        self.settings = settings
        self.accounts = accounts
        self.scheduling = scheduling
        self.chat = chat
        self.payments = payments

    # --- booking -------------------------------------------------------------------------------

    async def book(self, viewer: Viewer, data: BookIn) -> Booked:
        """Book a slot. Bookers of one slot in this process take turns (booking.TURNS): those behind one that
        books it are answered 409 without a statement. A turn looks at the slot first, with no transaction (a
        slot already gone is answered 409 at once), then books in one transaction whose first write is the
        claim, so a loser writes nothing. Committed here, before the answer: the bookers waiting for this
        slot learn that it is gone."""
        front_desk = viewer.has_any(access.BOOKERS_FOR_OTHERS)
        if front_desk:
            patient_id = await self.accounts.patient_for_front_desk(data.patient_id, data.patient_phone,
                                                                    data.patient_name, data.dependent_name)
        else:
            patient_id = await self.accounts.acting_patient(viewer, data.patient_id)
        # the front desk may have written a new card through the session: its booking joins that transaction
        async with booking.TURNS.turn(data.slot_id), writes.connection(self.session, own=not front_desk) as conn:
            slot_now = await conn.each.one(booking.SLOT_NOW, slot_id=data.slot_id)  # no transaction yet
            if slot_now is not None and not slot_free(slot_now, viewer.id, data.hold_id, utcnow()):
                raise Conflict("the slot is already taken", "slot_taken")  # as the claim would
            async with conn.transaction() as tx:
                visit = await self._book_in(tx, viewer, data, patient_id, front_desk)
        outbox.committed()  # its outbox row is in: wake the workers
        return visit

    async def _book_in(self, tx: writes.Tx, viewer: Viewer, data: BookIn, patient_id: UUID,
                       front_desk: bool) -> Booked:
        now = utcnow()
        facts = await tx.one(booking.FACTS, patient_id=patient_id, slot_id=data.slot_id, service_id=data.service_id)
        if facts is None:
            raise NotVisible("patient not found")
        birth_date, sex = facts["birth_date"], facts["sex"]
        told_birth_date = data.patient_birth_date if birth_date is None else None
        told_sex = data.patient_sex.value if data.patient_sex is not None and sex is None else None
        if told_birth_date is not None:  # a birth date or sex the card lacks is recorded (told at booking)
            check_birth_date(told_birth_date)
            birth_date = told_birth_date
        sex = told_sex or sex
        if facts["slot_id"] is None:
            raise NotVisible("slot not found")
        if facts["slot_taken_by"] is not None:
            raise Conflict("the slot is already taken", "slot_taken")
        if facts["service_id"] is None or not facts["service_active"]:
            raise Invalid("no such service", "service_unknown")
        specialties = facts["specialist_specialties"] or []
        if not specialties or not set(facts["specialist_roles"] or []) & access.SPECIALIST_ROLES:
            raise NotVisible("specialist not found")
        specialty, starts_at, ends_at = facts["specialty"], facts["starts_at"], facts["ends_at"]
        if specialty not in specialties:
            raise Invalid("this specialist does not offer this service", "service_not_offered")
        if starts_at <= now:
            raise Invalid("the slot has already begun", "slot_in_past")
        if facts["rule_id"] is not None:
            refuse_unless_served(specialty, facts["min_age"], facts["max_age"], facts["rule_sex"], birth_date, sex,
                                 starts_at, self.settings.clinic_timezone)
        if data.format is Format.ONLINE:
            if facts["in_person_only"]:
                raise Invalid("this service is only given in person", "service_in_person_only")
            if not facts["completed_in_person"]:
                raise Invalid("the first visit must be in person", "first_visit_in_person")
        status = Status.PENDING_CONFIRMATION if not facts["completed_any"] and not front_desk else Status.CONFIRMED
        visit_id, specialist_id = uuid7(), facts["specialist_id"]
        if data.hold_id is None:
            claimed = await tx.one(booking.CLAIM, claim_slot=data.slot_id, claim_for=visit_id, now=now)
        else:
            claimed = await tx.one(booking.CLAIM_HELD, claim_slot=data.slot_id, claim_for=visit_id, now=now,
                                   hold=data.hold_id, holder=viewer.id)
        if claimed is None:
            raise Conflict("the slot is already taken", "slot_taken")
        # after the claim: on SQLite its write lock is what orders two bookings of one patient (a refusal
        # rolls the claim back with the transaction)
        mine = await tx.one(booking.AFTER_CLAIM, patient_id=patient_id, now=now, starts_at=starts_at,
                            ends_at=ends_at, specialist_id=specialist_id)
        assert mine is not None
        if (mine["upcoming"] or 0) >= self.settings.live_bookings_per_patient:
            raise Conflict(f"a patient holds at most {self.settings.live_bookings_per_patient} upcoming visits",
                           "too_many_bookings", limit=self.settings.live_bookings_per_patient)
        if mine["busy"]:
            raise Conflict("the patient has another consultation at this time", "patient_busy")
        if told_birth_date is not None or told_sex is not None:
            await tx.run(booking.FILL_CARD, card_of=patient_id, told_birth_date=told_birth_date, told_sex=told_sex,
                         at=now)
        conversation_id = mine["conversation_id"] or await self._new_conversation(tx, facts, specialist_id, now)
        try:
            await tx.run(booking.NEW_VISIT, id=visit_id, patient_id=patient_id, specialist_id=specialist_id,
                         service_id=facts["service_id"], slot_id=data.slot_id, specialty=specialty,
                         starts_at=starts_at, ends_at=ends_at, format=data.format.value, status=status.value,
                         paid=False, booked_by=viewer.id, cancel_reason=None, started_at=None, completed_at=None,
                         conversation_id=conversation_id, created_at=now, updated_at=now)
        except writes.UNIQUE_VIOLATIONS as exc:  # the partial unique index, should the slot row ever disagree
            raise Conflict("the slot is already taken", "slot_taken") from exc
        dialect = booking.DIALECTS[tx_dialect(self.session)]
        # the conversation's people (app/chat/service.py Party), as its row has them
        has_login, guardian_id = ((mine["patient_has_login"], mine["conversation_guardian_id"])
                                  if mine["conversation_id"] else (bool(facts["phone"]), facts["guardian_id"]))
        people = {specialist_id, *([patient_id] if has_login else []), *([guardian_id] if guardian_id else [])}
        events: list[tuple[set[UUID], str, dict[str, Any]]] = []
        if status is Status.CONFIRMED and await tx.run(dialect.new_window, id=uuid7(), conversation_id=conversation_id,
                                                       consultation_id=visit_id, ends_at=ends_at, created_at=now,
                                                       updated_at=now):
            party = await tx.one(booking.PARTY_WINDOW, conversation_id=conversation_id)
            assert party is not None
            window = window_of(party["extended_until"], party["planned_end"], now)
            events.append((people, "conversation.opened", {
                "conversation_id": str(conversation_id), "writable": window.writable,
                "writable_until": window.until.isoformat() if window.until else None}))
        await tx.run_many(dialect.new_reminders, booking.reminder_rows(visit_id, starts_at,
                                                                       reminders.offsets(self.settings), now, uuid7))
        visit = Booked(id=visit_id, patient_id=patient_id, specialist_id=specialist_id,
                       service_id=facts["service_id"], slot_id=data.slot_id, specialty=specialty, starts_at=starts_at,
                       ends_at=ends_at, format=data.format.value, status=status.value, paid=False,
                       conversation_id=conversation_id,
                       patient=self._booked_card(viewer, patient_id, facts["full_name"], birth_date,
                                                 facts["guardian_id"]))
        announced = announcement(visit, "booked")
        await tx.run(booking.NEW_OUTBOX_EVENT, id=uuid7(), type="consultation.updated", aggregate_id=visit_id,
                     recipients=[str(patient_id), str(specialist_id)], payload=announced, attempts=0,
                     next_attempt_at=now, dispatched_at=None, lease_until=None, lease_owner=None, failed_at=None,
                     last_error=None, created_at=now, updated_at=now)
        events.append((people, "consultation.updated", announced))
        await self._append_events(tx, events, now)
        return visit

    async def _new_conversation(self, tx: writes.Tx, facts: writes.Row, specialist_id: UUID,
                                now: dt.datetime) -> UUID:
        """The pair's conversation, made at its first booking (two at once: one insert wins, both read it)."""
        dialect = booking.DIALECTS[tx_dialect(self.session)]
        made = await tx.one(dialect.new_conversation, id=uuid7(), patient_id=facts["patient_id"],
                            specialist_id=specialist_id, guardian_id=facts["guardian_id"],
                            patient_has_login=bool(facts["phone"]), extended_until=None, created_at=now,
                            updated_at=now)
        if made is None:
            made = await tx.one(booking.CONVERSATION_OF_PAIR, patient_id=facts["patient_id"],
                                specialist_id=specialist_id)
        assert made is not None
        conversation_id: UUID = made["id"]
        return conversation_id

    async def _append_events(self, tx: writes.Tx, events: list[tuple[set[UUID], str, dict[str, Any]]],
                             now: dt.datetime) -> None:
        """Into the recipients' streams in list order (app/chat/streams.py), published once committed."""
        counts = streams.tally(events)
        users = sorted(counts)  # stream rows are taken in user order: two writers never deadlock
        rows = await tx.all(booking.numbering(tx_dialect(self.session), len(users)),
                            **{f"user_{i}": u for i, u in enumerate(users)},
                            **{f"n_{i}": counts[u] for i, u in enumerate(users)})
        numbered = streams.lay_out(events, counts, {r["user_id"]: r["last_seq"] for r in rows},
                                   streams.staged_for(self.session))
        await tx.run_many(booking.NEW_EVENTS, [
            {"recipient_id": e.recipient_id, "seq": e.seq, "type": e.type, "data": e.data, "created_at": now}
            for e in numbered])

    @staticmethod
    def _booked_card(viewer: Viewer, patient_id: UUID, full_name: str, birth_date: dt.date | None,
                     guardian_id: UUID | None) -> dict[str, Any]:
        """The short card a booking answers with, through the masks (as AccountService.briefs)."""
        acts_for = [patient_id] if guardian_id == viewer.id else []
        card = {"id": patient_id, "full_name": full_name, "initials": initials(full_name),
                "age": age_on(birth_date, dt.date.today()) if birth_date else None,
                "is_dependent": guardian_id is not None}
        return access.mask_patient(card, access.visible_card_fields(viewer, patient_id, acts_for))

    # --- reading -------------------------------------------------------------------------------

    async def in_care(self, viewer: Viewer, patient_id: UUID) -> bool:
        """Whether the caller, a clinician, is in care of the patient now (the rule: `in_care` above)."""
        return access.is_clinician(viewer) and await in_care(self.session, viewer.id, patient_id,
                                                             self.settings.care_after_days)

    async def _party(self, viewer: Viewer, visit: Consultation) -> Party:
        for_patient = visit.patient_id == viewer.id or (
            Role.PATIENT in viewer.roles and visit.patient_id in await self.accounts.patients_acted_for(viewer))
        return Party(viewer=viewer, is_specialist=visit.specialist_id == viewer.id, for_patient=for_patient)

    async def visible(self, viewer: Viewer, consultation_id: UUID) -> tuple[Consultation, Party]:
        visit = await self.session.get(Consultation, consultation_id)
        if visit is None:
            raise NotVisible("consultation not found")
        party = await self._party(viewer, visit)
        if not (party.for_patient or party.is_specialist or party.is_front_desk):
            raise NotVisible("consultation not found")
        return visit, party

    # --- lifecycle -----------------------------------------------------------------------------

    async def transition(self, viewer: Viewer, consultation_id: UUID, command: str,
                         reason: str | None = None) -> Consultation:
        visit, party = await self.visible(viewer, consultation_id)
        rule = TRANSITIONS[command]
        if not rule.may(party):
            raise Forbidden(f"you may not {rule.verb}", "not_allowed")
        now = utcnow()
        if visit.status not in rule.sources:
            raise Conflict(f"a consultation {STATUS_PHRASES.get(visit.status, visit.status)} cannot be {rule.past}",
                           "transition_not_allowed", status=visit.status)
        if (untimely := rule.timing(visit, now, self.settings)) is not None:
            raise Conflict(TIMING_DETAILS[untimely].format(early=self.settings.start_early_minutes), untimely)
        if (rule.target is Status.IN_PROGRESS and visit.format == Format.ONLINE and self.settings.online_prepaid
                and not visit.paid):  # the clinic takes online visits prepaid: no call before the money
            raise Conflict("an online consultation starts once it is paid", "payment_required")
        values: dict[str, Any] = {"status": rule.target.value, "updated_at": now}
        if rule.target is Status.IN_PROGRESS:
            values["started_at"] = now
        if rule.target is Status.COMPLETED:
            values["completed_at"] = now
        if rule.target is Status.CANCELLED:
            values["cancel_reason"] = reason
        # compare-and-set on the status, so two racing commands cannot both apply
        changed = await self.session.execute(
            update(Consultation).where(Consultation.id == visit.id, Consultation.status.in_(rule.sources))
            .values(**values).returning(Consultation.id))
        if changed.one_or_none() is None:
            raise Conflict("the consultation changed meanwhile", "transition_not_allowed")
        await self.session.refresh(visit)
        if rule.target in OPEN_FOR_CHAT and visit.conversation_id is not None:
            await self.chat.open_window(visit.conversation_id, visit.id, visit.ends_at)
        elif rule.target in ENDED:
            await self.chat.close_window(visit.id)
        if rule.target in ENDED:
            await reminders.drop(self.session, visit.id)
        if rule.target is Status.CANCELLED:
            await self.scheduling.release(visit.slot_id, visit.id)
            if visit.paid:  # given back: by the provider after the commit, or by the front desk
                await self.payments.refund_due(visit.id)
            await self.scheduling.announce_free(await self.accounts.specialist(visit.specialist_id), visit.slot_id,
                                                visit.starts_at)
        await self._announce(visit, command)
        return visit

    # --- payments (the ledger and the provider: app/payments) -----------------------------------

    async def pay(self, viewer: Viewer, consultation_id: UUID, data: PayIn) -> Consultation:
        """A payment taken at the front desk; a patient pays online, and only the provider's word makes it paid."""
        visit, party = await self.visible(viewer, consultation_id)
        if not party.is_front_desk:
            raise Forbidden("the front desk records payments; a patient pays online", "not_allowed")
        price = (await self.scheduling.service(visit.service_id)).price
        amount = price if data.amount is None else data.amount
        if not money_ok(amount, allow_zero=False):
            raise Invalid("an amount is above 0, at most 10,000,000, with at most two decimals", "amount_invalid")
        if amount != price:
            raise Invalid(f"the amount is the service's price, {price:.2f}", "amount_mismatch", price=f"{price:.2f}")
        if await self.payments.desk_replay(visit.id, amount, data.method, data.reference):
            return visit  # the same payment reported again: answer as before
        if visit.status in (Status.CANCELLED, Status.NO_SHOW):
            raise Conflict(f"a {visit.status} consultation takes no payment", "transition_not_allowed")
        await self.payments.record_desk(visit.id, amount, data.method, data.reference, viewer.id)
        await self._mark_paid(visit)
        return visit

    async def pay_online(self, viewer: Viewer, consultation_id: UUID) -> Payment:
        """The patient's (or guardian's) online payment: a page of the provider to pay on."""
        visit, party = await self.visible(viewer, consultation_id)
        if not party.for_patient:
            raise NotVisible("consultation not found")
        self.payments.online()  # refused before anything else when there is no provider
        if visit.paid:
            raise Conflict("this consultation is already paid", "already_paid")
        if visit.status in (Status.CANCELLED, Status.NO_SHOW):
            raise Conflict(f"a {visit.status} consultation takes no payment", "transition_not_allowed")
        if (open_ := await self.payments.pending(visit.id)) is not None:
            try:  # the patient asks again: the same page, unless the provider has settled it meanwhile
                if await self.payments.confirm(open_):
                    await self._settled(open_)
            except Unavailable:
                return open_
            if open_.status != "canceled":
                return open_
        price = (await self.scheduling.service(visit.service_id)).price
        return await self.payments.start_online(visit.id, price, viewer.id)

    async def payments_of(self, viewer: Viewer, consultation_id: UUID) -> list[Payment]:
        visit, party = await self.visible(viewer, consultation_id)
        if not (party.for_patient or party.is_front_desk):
            raise Forbidden("a consultation's payments are its patient's and the front desk's", "not_allowed")
        return await self.payments.of_consultation(visit.id)

    async def payment_notified(self, provider: str, event: str, object_id: str) -> bool:
        """A provider's notification: only a hint to ask the provider; False when nothing changed."""
        if event.startswith("refund."):
            return await self.payments.refund_notified(object_id)
        payment = await self.payments.find_online(provider, object_id)
        if payment is None or not await self.payments.confirm(payment):
            return False
        await self._settled(payment)
        return True

    async def _settled(self, payment: Payment) -> None:
        visit = await self.session.get(Consultation, payment.consultation_id)
        assert visit is not None  # a payment's consultation is never deleted
        await self._mark_paid(visit)

    async def _mark_paid(self, visit: Consultation) -> None:
        """Paid, and owed back at once if the visit is cancelled. The UPDATE waits on the row lock of a cancel
        under way and answers the status it committed: a cancel that saw the visit unpaid is caught here."""
        status = await self.session.scalar(update(Consultation).where(Consultation.id == visit.id)
                                           .values(paid=True, updated_at=utcnow()).returning(Consultation.status))
        await self.session.refresh(visit)
        if status == Status.CANCELLED:
            await self.payments.refund_due(visit.id)
        await self._announce(visit, "paid")

    async def _announce(self, visit: Consultation, change: str) -> None:
        """consultation.updated: into the outbox for notifications, and live to the people of its chat."""
        data = announcement(visit, change)
        outbox.stage(self.session, "consultation.updated", visit.id,
                     [str(visit.patient_id), str(visit.specialist_id)], data)
        if visit.conversation_id is not None:
            await self.chat.announce(visit.conversation_id, "consultation.updated", data)

    async def extend_chat(self, viewer: Viewer, consultation_id: UUID,
                          until: dt.datetime) -> tuple[Consultation, Window]:
        visit, party = await self.visible(viewer, consultation_id)
        if not party.is_specialist or visit.conversation_id is None:
            raise Forbidden("only the consultation's specialist extends its chat", "not_allowed")
        return visit, await self.chat.extend(visit.conversation_id, until)

    # --- conclusions ---------------------------------------------------------------------------

    async def write_conclusion(self, viewer: Viewer, consultation_id: UUID,
                               data: ConclusionIn) -> tuple[Conclusion, list[AnalysisOrder]]:
        visit, party = await self.visible(viewer, consultation_id)
        if not party.is_specialist:
            raise Forbidden("only the consultation's specialist writes its conclusion", "not_allowed")
        if visit.status not in (Status.IN_PROGRESS, Status.COMPLETED):
            raise Conflict("a conclusion follows the start of the consultation", "consultation_not_started")
        for diagnosis in data.diagnoses:
            if not ICD10.fullmatch(diagnosis.code.strip().upper()):
                raise Invalid(f"diagnosis code {diagnosis.code} is not an ICD-10 code such as E11.9", "icd10_invalid")
        if data.diagnoses and sum(d.main for d in data.diagnoses) != 1:
            raise Invalid("exactly one diagnosis is the main one", "main_diagnosis_required")
        if data.follow_up and data.follow_up.service_id:
            await self.scheduling.service(data.follow_up.service_id)
        role = next((r for r in (Role.DOCTOR, Role.PSYCHOLOGIST, Role.SONOGRAPHER, Role.MASSAGE_THERAPIST)
                     if r in viewer.roles), Role.DOCTOR)
        conclusion = Conclusion(
            id=uuid7(), consultation_id=visit.id, patient_id=visit.patient_id, author_id=viewer.id,
            author_role=role.value,
            diagnoses=[{"code": d.code.strip().upper(), "title": d.title.strip(), "main": d.main}
                       for d in data.diagnoses],
            recommendations=data.recommendations, treatment=data.treatment,
            follow_up={"service_id": str(data.follow_up.service_id) if data.follow_up.service_id else None,
                       "after_days": data.follow_up.after_days, "note": data.follow_up.note}
            if data.follow_up else None)
        orders = [AnalysisOrder(conclusion_id=conclusion.id, patient_id=visit.patient_id, name=o.name.strip(),
                                status=o.status.value, expected_ready_on=o.expected_ready_on)
                  for o in data.analysis_orders]
        self.session.add(conclusion)
        try:
            async with self.session.begin_nested():
                await self.session.flush()
        except IntegrityError as exc:
            raise Conflict("this consultation already has a conclusion", "conclusion_exists") from exc
        self.session.add_all(orders)
        await self.session.flush()
        notice = {"kind": "conclusion_ready", "consultation_id": str(visit.id)}
        outbox.stage(self.session, "notice", conclusion.id, [str(visit.patient_id)], notice)
        if visit.conversation_id is not None:
            await self.chat.announce(visit.conversation_id, "notice", notice, patient_side=True)
        return conclusion, orders

    async def read_conclusion(self, viewer: Viewer, consultation_id: UUID, *, audit: AuditTrail | None = None,
                              ) -> tuple[Conclusion, list[AnalysisOrder]]:
        visit = await self.session.get(Consultation, consultation_id)
        conclusion = await self.session.scalar(select(Conclusion).where(Conclusion.consultation_id == consultation_id))
        if visit is None or conclusion is None:
            raise NotVisible("conclusion not found")
        party = await self._party(viewer, visit)
        care = await self.in_care(viewer, visit.patient_id)
        if not access.conclusion_visible(viewer, author_id=conclusion.author_id, author_role=conclusion.author_role,
                                         own_patient=party.for_patient, in_care=care):
            raise NotVisible("conclusion not found")
        if audit is not None:
            audit.read("conclusion.read", "conclusion", conclusion.id, visit.patient_id, own=party.for_patient)
        orders = (await self.session.scalars(select(AnalysisOrder).where(
            AnalysisOrder.conclusion_id == conclusion.id).order_by(AnalysisOrder.id))).all()
        return conclusion, list(orders)

    async def set_analysis_status(self, viewer: Viewer, order_id: UUID, status: AnalysisStatus) -> AnalysisOrder:
        order = await self.session.get(AnalysisOrder, order_id)
        conclusion = await self.session.get(Conclusion, order.conclusion_id) if order else None
        if order is None or conclusion is None or conclusion.author_id != viewer.id:
            raise NotVisible("analysis order not found")
        order.status = status.value
        await self.session.flush()
        return order

    # --- ratings -------------------------------------------------------------------------------

    async def rate(self, viewer: Viewer, consultation_id: UUID, data: RatingIn) -> Rating:
        visit, party = await self.visible(viewer, consultation_id)
        if not party.for_patient:
            raise Forbidden("only the patient rates a consultation", "not_allowed")
        if visit.status != Status.COMPLETED:
            raise Conflict("only a completed consultation can be rated", "not_completed")
        rating = Rating(consultation_id=visit.id, specialist_id=visit.specialist_id, score=data.score,
                        comment=data.comment.strip() if data.comment else None)
        self.session.add(rating)
        try:
            async with self.session.begin_nested():
                await self.session.flush()
        except IntegrityError as exc:
            raise Conflict("this consultation was already rated", "already_rated") from exc
        if data.score <= 2:  # a poor visit alerts the responsible staff at once: live, and by the outbox
            notice = {"kind": "low_rating", "consultation_id": str(visit.id), "score": data.score}
            outbox.stage(self.session, "notice", rating.id, ["role:admin"], notice)
            await self.chat.notify(await self.accounts.staff_with_role(Role.ADMIN), notice)
        return rating

    async def low_ratings(self, limit: int, cursor: UUID | None) -> list[Rating]:
        query = select(Rating).where(Rating.score <= 2).order_by(Rating.id.desc()).limit(limit + 1)
        if cursor is not None:
            query = query.where(Rating.id < cursor)
        return list((await self.session.scalars(query)).all())

    # --- a specialist's patients ---------------------------------------------------------------

    async def my_patients(self, viewer: Viewer, tab: str, q: str | None) -> list[PatientRow]:
        """The patients in the specialist's care (the one rule, `caring`): "actual" those with a visit ahead or
        paid, the archive those whose visits are over; a patient whose care lapsed is in neither."""
        now = utcnow()
        cared_for = select(Consultation.patient_id).where(Consultation.specialist_id == viewer.id,
                                                          caring(self.settings.care_after_days))
        visits = (await self.session.scalars(
            select(Consultation).where(Consultation.specialist_id == viewer.id,
                                       Consultation.status != Status.CANCELLED,
                                       Consultation.patient_id.in_(cared_for))
            .order_by(Consultation.starts_at).limit(20_000))).all()
        by_patient: dict[UUID, list[Consultation]] = {}
        for visit in visits:
            by_patient.setdefault(visit.patient_id, []).append(visit)
        briefs = await self.accounts.briefs(viewer, list(by_patient))
        clinic = ZoneInfo(self.settings.clinic_timezone)
        zones = await self.accounts.timezones(list(by_patient))
        needle = (q or "").strip().casefold()
        rows = []
        for patient_id, own in by_patient.items():
            upcoming = [v for v in own if v.status in LIVE and v.ends_at > now]
            actual = bool(upcoming) or any(v.paid and v.status in LIVE for v in own)
            if (tab == "actual") != actual:
                continue
            brief = briefs[patient_id]
            if needle and not any(needle in str(brief.get(f) or "").casefold() for f in ("full_name", "phone")):
                continue
            zone = zones.get(patient_id)
            offset = None
            if zone:
                offset = int(((now.astimezone(ZoneInfo(zone)).utcoffset() or dt.timedelta())
                              - (now.astimezone(clinic).utcoffset() or dt.timedelta())).total_seconds() // 60)
            rows.append(PatientRow(brief, upcoming[0] if upcoming else None, max(v.starts_at for v in own), offset))
        never = dt.datetime.max.replace(tzinfo=dt.UTC)
        rows.sort(key=lambda r: (r.next.starts_at if r.next else never, str(r.patient.get("full_name") or "")))
        return rows
