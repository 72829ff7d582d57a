"""Call rules: who starts, answers and ends a call, ringing or pushing, signalling through the SFU, and the keeper
that ends calls nobody answered (missed) or whose SFU node died (failed).

A call is `ringing` from its start until the patient's side accepts (`active`) or it ends. Every change is one
conditional UPDATE on the call's state, so two devices answering, or an answer racing the ring timeout on another
instance, leave exactly one winner; one live call per consultation is the database's partial unique index. Each
change writes its `call.*` events into the people's streams in the same transaction (published once committed)
and a ringing call that no foreground socket shows is pushed through the outbox (`call.incoming`). No HTTP here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app import outbox
from app.access import Viewer
from app.accounts.service import AccountService
from app.chat import streams
from app.chat.hub import Bus, Presence
from app.chat.service import ChatService, Party
from app.consultations.schemas import Format, Status
from app.consultations.service import ConsultationService
from app.db import Database
from app.errors import Conflict, DomainError, Forbidden, Invalid, NotVisible, Unavailable
from app.rtc.models import Call
from app.rtc.schemas import CallState, DeliveredVia, EndReason
from app.settings import Settings

if TYPE_CHECKING:
    from app.rtc.placement import SfuDirectory

log = logging.getLogger("app.rtc")
LIVE_STATES = (CallState.RINGING.value, CallState.ACTIVE.value)
MISSED_TEXT = "Пропущенный звонок"  # the chat's system message (the clinic speaks Russian): no name, no content
SWEEP_SECONDS = 60.0  # besides a node going missing, the calls of dead nodes are looked for this often


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def call_data(call: Call, **extra: Any) -> dict[str, Any]:
    """What every call.* event carries: ids, state and times (in UTC: an event has many readers)."""
    return {"call_id": str(call.id), "consultation_id": str(call.consultation_id),
            "conversation_id": str(call.conversation_id), "specialist_id": str(call.specialist_id),
            "patient_id": str(call.patient_id), "state": call.state, "end_reason": call.end_reason,
            "ring_until": call.ring_deadline.isoformat(),
            "started_at": call.started_at.isoformat() if call.started_at else None,
            "ended_at": call.ended_at.isoformat() if call.ended_at else None,
            "accepted_by": str(call.accepted_by) if call.accepted_by else None, **extra}


@dataclass(frozen=True, slots=True)
class Started:
    call: Call
    delivered_via: DeliveredVia


def patient_side(party: Party) -> set[UUID]:
    """Who answers: the patient with a login and a dependent's guardian."""
    return party.people - {party.specialist_id}


class CallService:
    def __init__(self, session: AsyncSession, settings: Settings, consultations: ConsultationService,
                 chat: ChatService, accounts: AccountService, presence: Presence, directory: SfuDirectory,
                 ringing: Callable[[], None] = lambda: None) -> None:
        self.session = session
        self.settings = settings
        self.consultations = consultations
        self.chat = chat
        self.accounts = accounts
        self.presence = presence
        self.directory = directory
        self.ringing = ringing  # wakes the ring timeout: a new deadline

    @property
    def staged(self) -> streams.Staged:
        return streams.staged_for(self.session)

    # --- starting ----------------------------------------------------------------------------------

    async def start(self, viewer: Viewer, consultation_id: UUID) -> Started:
        visit, party = await self.consultations.visible(viewer, consultation_id)  # a stranger: 404
        if not party.is_specialist:
            if party.for_patient:
                raise Forbidden("only the consultation's specialist starts a call", "not_allowed")
            raise NotVisible("consultation not found")  # the front desk sees it, but a call is not theirs
        if visit.status == Status.PENDING_CONFIRMATION:
            raise Invalid("a call follows the consultation's confirmation", "consultation_not_confirmed",
                          status=visit.status)
        if visit.status not in (Status.CONFIRMED, Status.IN_PROGRESS) or visit.conversation_id is None:
            raise Invalid("the consultation is over", "consultation_over", status=visit.status)
        if visit.format != Format.ONLINE:
            raise Invalid("an in-person consultation has no call", "consultation_in_person")
        people = await self.chat.visible(viewer, visit.conversation_id)
        if await self.session.scalar(select(Call.id).where(Call.consultation_id == visit.id,
                                                           Call.state.in_(LIVE_STATES))) is not None:
            raise Conflict("a call of this consultation is in progress", "call_in_progress")  # before placing a room
        call_id = uuid7()
        node = await self.directory.place(str(call_id))
        now = utcnow()
        call = Call(id=call_id, consultation_id=visit.id, conversation_id=visit.conversation_id,
                    specialist_id=visit.specialist_id, patient_id=visit.patient_id, state=CallState.RINGING.value,
                    ring_deadline=now + dt.timedelta(seconds=self.settings.call_ring_seconds), node=node,
                    created_at=now, updated_at=now)
        self.session.add(call)
        try:  # the check above misses a start racing this one: the partial unique index does not
            async with self.session.begin_nested():
                await self.session.flush()
        except IntegrityError as exc:
            raise Conflict("a call of this consultation is in progress", "call_in_progress") from exc
        answering = sorted(patient_side(people))
        try:
            shown, connected = await asyncio.gather(self.presence.foreground(answering),
                                                    self.presence.online(answering))
        except Exception:  # presence unknown (Redis down): the sockets still ring, and so do the phones
            log.warning("presence unknown for a call; pushing too", exc_info=True)
            shown, connected = set(), set(answering)
        via = DeliveredVia.WEBSOCKET
        if not shown:  # nobody sees it ring in the app: the phones ring too
            phones = await self.accounts.with_devices(answering)
            if phones:  # pushed through the outbox; the worker checks the call still rings before it sends
                outbox.stage(self.session, "call.incoming", call.id, [str(u) for u in answering],
                             {"ref": str(call.id), "ring_until": call.ring_deadline.isoformat()})
            via = ((DeliveredVia.BOTH if phones else DeliveredVia.WEBSOCKET) if connected
                   else DeliveredVia.PUSH if phones else DeliveredVia.NONE)
        await streams.append(self.session, self.staged, set(answering), "call.incoming",
                             call_data(call, delivered_via=via.value))
        await self.session.commit()  # the ring timeout reads it from the database: committed before it wakes
        self.ringing()
        return Started(call, via)

    # --- answering and ending ----------------------------------------------------------------------

    async def _visible(self, viewer: Viewer, call_id: UUID) -> tuple[Call, Party]:
        """The call and its people if the viewer is one of them (the specialist, the patient, the guardian)."""
        call = await self.session.get(Call, call_id)
        if call is None:
            raise NotVisible("call not found")
        try:
            party = await self.chat.visible(viewer, call.conversation_id)
        except NotVisible:
            raise NotVisible("call not found") from None
        return call, party

    async def get(self, viewer: Viewer, call_id: UUID) -> Call:
        return (await self._visible(viewer, call_id))[0]

    async def _move(self, call: Call, sources: Sequence[str], **values: Any) -> bool:
        """Compare-and-set on the state: False when the call left `sources` meanwhile (another device, instance)."""
        values["updated_at"] = utcnow()
        moved = await self.session.execute(
            update(Call).where(Call.id == call.id, Call.state.in_(sources)).values(**values).returning(Call.id)
            .execution_options(synchronize_session=False))
        changed = moved.one_or_none() is not None
        await self.session.refresh(call)
        return changed

    async def accept(self, viewer: Viewer, call_id: UUID) -> Call:
        call, party = await self._visible(viewer, call_id)
        if viewer.id not in patient_side(party):
            raise Forbidden("the patient's side answers a call", "not_allowed")
        now = utcnow()
        if call.state != CallState.RINGING or call.ring_deadline <= now or not await self._move(
                call, [CallState.RINGING.value], state=CallState.ACTIVE.value, started_at=now, accepted_by=viewer.id):
            raise Conflict("the call is no longer ringing", "call_not_ringing", state=call.state)
        # to both sides: the specialist learns it was answered, the patient's other devices stop ringing
        await streams.append(self.session, self.staged, party.people, "call.accepted", call_data(call))
        return call

    async def decline(self, viewer: Viewer, call_id: UUID) -> Call:
        call, party = await self._visible(viewer, call_id)
        if viewer.id not in patient_side(party):
            raise Forbidden("the patient's side declines a call; the specialist ends it", "not_allowed")
        if call.state != CallState.RINGING or not await self._move(
                call, [CallState.RINGING.value], state=CallState.ENDED.value, end_reason=EndReason.DECLINED.value,
                ended_at=utcnow()):
            raise Conflict("the call is no longer ringing", "call_not_ringing", state=call.state)
        await self._ended(call, party, declined=True)
        return call

    async def end(self, viewer: Viewer, call_id: UUID) -> Call:
        """Either side hangs up: a ringing call the specialist ends is cancelled (the patient's side declines
        it), an answered one is completed."""
        call, party = await self._visible(viewer, call_id)
        for _ in range(3):  # the state may move under us once (answered while hanging up): decide again
            if call.state == CallState.ENDED:
                raise Conflict("the call has ended", "call_ended", end_reason=call.end_reason)
            if call.state == CallState.ACTIVE:
                reason = EndReason.COMPLETED
            else:
                reason = EndReason.CANCELLED if viewer.id == call.specialist_id else EndReason.DECLINED
            if await self._move(call, [call.state], state=CallState.ENDED.value, end_reason=reason.value,
                                ended_at=utcnow()):
                await self._ended(call, party, declined=reason is EndReason.DECLINED)
                return call
        raise Conflict("the call changed meanwhile; try again", "call_changed")

    async def _ended(self, call: Call, party: Party, *, declined: bool = False) -> None:
        events: list[tuple[set[UUID], str, dict[str, Any]]] = []
        if declined:
            events.append((party.people, "call.declined", call_data(call)))
        events.append((party.people, "call.ended", call_data(call)))
        await streams.append_many(self.session, self.staged, events)
        await self.session.commit()  # the room is closed once the end is stored
        await self.close_rooms([call])

    async def close_rooms(self, calls: Sequence[Call]) -> None:
        """End the calls' media on their nodes; a node that does not answer has lost the room anyway."""
        async def close(call: Call) -> None:
            try:
                await self.directory.close_room(call.node, str(call.id))
            except Exception:  # the call is over whatever the node says
                log.warning("closing a call's room failed", exc_info=True, extra={"call_id": str(call.id)})
        await asyncio.gather(*(close(c) for c in calls))

    # --- in the call -------------------------------------------------------------------------------

    async def media(self, viewer: Viewer, call_id: UUID, audio: bool, video: bool) -> Call:
        """A side turned its sound or picture on or off: the other side hears of it (call.media)."""
        call, party = await self._visible(viewer, call_id)
        if call.state == CallState.ENDED:
            raise Conflict("the call has ended", "call_ended", end_reason=call.end_reason)
        other = patient_side(party) if viewer.id == call.specialist_id else {call.specialist_id}
        await streams.append(self.session, self.staged, other, "call.media",
                             {"call_id": str(call.id), "user_id": str(viewer.id), "audio": audio, "video": video})
        return call

    async def offer(self, viewer: Viewer, call_id: UUID, sdp: str, type_: str) -> tuple[str, str]:
        """A participant's SDP offer, answered by the SFU node holding the call's room. Either side may offer while
        it rings and again after a network change (the new peer connection replaces the old)."""
        call, _ = await self._visible(viewer, call_id)
        if call.state == CallState.ENDED:
            raise Conflict("the call has ended", "call_ended", end_reason=call.end_reason)
        if call.accepted_by is not None and viewer.id not in (call.accepted_by, call.specialist_id):
            raise Conflict("the call was answered by someone else", "answered_elsewhere")
        node, room = call.node, str(call.id)
        await self.session.commit()  # nothing was written: no transaction waits on the node's answer
        try:
            return await self.directory.offer(node, room, str(viewer.id), sdp, type_)
        except DomainError:  # a full room, a refused offer, an unreachable node: each has its reason
            raise
        except Exception as exc:
            log.exception("an offer failed", extra={"call_id": room})
            raise Unavailable("the call's media server did not answer; try again", "sfu_unavailable") from exc

    # --- what the keeper ends ----------------------------------------------------------------------

    async def nearest_deadline(self) -> dt.datetime | None:
        deadline: dt.datetime | None = await self.session.scalar(
            select(func.min(Call.ring_deadline)).where(Call.state == CallState.RINGING.value))
        return deadline

    async def expire_missed(self, now: dt.datetime) -> list[Call]:
        """Ringing calls past their deadline end `missed`: the chat shows a missed call and the patient's side gets
        a notice. The conditional UPDATE is the claim: of instances expiring at once, each call goes to one."""
        rows = await self.session.scalars(
            update(Call).where(Call.state == CallState.RINGING.value, Call.ring_deadline <= now)
            .values(state=CallState.ENDED.value, end_reason=EndReason.MISSED.value, ended_at=now, updated_at=now)
            .returning(Call).execution_options(synchronize_session=False))
        missed = list(rows.all())
        for call in missed:
            await self.chat.post_system(call.conversation_id, MISSED_TEXT, "missed_call")
            await self.chat.announce(call.conversation_id, "call.ended", call_data(call))
            notice = {"kind": "missed_call", "call_id": str(call.id), "consultation_id": str(call.consultation_id)}
            await self.chat.announce(call.conversation_id, "notice", notice, patient_side=True)
            outbox.stage(self.session, "notice", call.id, [str(call.patient_id)], notice)  # a push when away
        return missed

    async def fail_off(self, live_nodes: set[str]) -> list[Call]:
        """Live calls whose room is on a node no longer alive end `failed`."""
        now = utcnow()
        rows = await self.session.scalars(
            update(Call).where(Call.state.in_(LIVE_STATES), Call.node.not_in(sorted(live_nodes)))
            .values(state=CallState.ENDED.value, end_reason=EndReason.FAILED.value, ended_at=now, updated_at=now)
            .returning(Call).execution_options(synchronize_session=False))
        failed = list(rows.all())
        for call in failed:
            await self.chat.announce(call.conversation_id, "call.ended", call_data(call))
        return failed


class CallKeeper:
    """Ends what nobody else will: calls unanswered past their stored deadline (missed) and calls whose SFU node
    died (failed). Every API instance runs one; any of them may end a call, each call once (the UPDATE's claim),
    and a restarted instance finds the deadlines in the database.

    The ring timeout sleeps until the nearest deadline: woken when a call starts here, and otherwise looking again
    every CALL_RING_SECONDS (a call started on an instance that died meanwhile ends at most that late). The node
    watch reads the live nodes every CALL_NODE_CHECK_SECONDS (Redis) and the calls table only when a node went
    missing, at its start, and every SWEEP_SECONDS; when the live nodes cannot be known it changes nothing."""

    def __init__(self, database: Database, settings: Settings, directory: SfuDirectory, bus: Bus,
                 services: Callable[[AsyncSession], CallService]) -> None:
        self.database = database
        self.settings = settings
        self.directory = directory
        self.bus = bus
        self.services = services
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """A call started: its deadline may be the nearest. Callable from any thread."""
        if self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Until `stop`: a pass under way is finished, never cut off mid-transaction."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(self._ring(), self._watch_nodes())

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def _ring(self) -> None:
        idle = float(self.settings.call_ring_seconds)
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await self.expire_due()
                async with self.database.reader() as session:
                    nearest = await self.services(session).nearest_deadline()
                wait = idle if nearest is None else min(idle, (nearest - utcnow()).total_seconds())
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the loop
                log.exception("expiring missed calls failed")
                wait = 1.0
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def _watch_nodes(self) -> None:
        loop = asyncio.get_running_loop()
        known: set[str] | None = None
        swept_at = 0.0
        while not self._stopping.is_set():
            try:
                live = await self.directory.live_nodes()
            except asyncio.CancelledError:
                raise
            except Exception:  # not knowable now (Redis down): no call is failed on a guess
                log.warning("the live SFU nodes are not known; calls left as they are", exc_info=True)
            else:
                if known is None or known - live or loop.time() - swept_at >= SWEEP_SECONDS:
                    try:
                        await self.fail_dead(live)
                        swept_at = loop.time()
                        known = live
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("ending the calls of dead SFU nodes failed")
                else:
                    known = live
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.call_node_check_seconds)

    async def expire_due(self) -> list[Call]:
        return await self._end(lambda calls: calls.expire_missed(utcnow()))

    async def fail_dead(self, live: set[str]) -> list[Call]:
        return await self._end(lambda calls: calls.fail_off(live))

    async def _end(self, ending: Callable[[CallService], Any]) -> list[Call]:
        async with self.database.writer() as session:
            calls = self.services(session)
            ended: list[Call] = await ending(calls)
            if not ended:
                await session.rollback()
                return []
            await session.commit()
            staged = streams.staged_for(session)
            if staged.events:  # persisted first, published now
                await self.bus.publish(staged.encode())
            await calls.close_rooms(ended)
        for call in ended:
            log.info("call ended", extra={"call_id": str(call.id), "end_reason": call.end_reason})
        return ended
