"""Call rules: who starts, answers and ends a call, ringing or pushing, signalling through the SFU, and the keeper
that ends calls nobody answered (missed), whose SFU node died (failed) or whose consultation is over.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app import outbox
from app.access import Viewer
from app.accounts.service import AccountService
from app.chat import streams
from app.chat.hub import Bus, Presence
from app.chat.models import Conversation
from app.chat.service import ChatService, Party
from app.consultations.schemas import Format, Status
from app.consultations.service import CALLABLE, ConsultationService, callable_now
from app.db import Database
from app.errors import Conflict, DomainError, Forbidden, Invalid, NotVisible, Unavailable
from app.observability import count_after_commit
from app.rtc.models import Call
from app.rtc.schemas import CallState, DeliveredVia, EndReason
from app.settings import Settings
from app.tasks import set_event_from_any_thread

if TYPE_CHECKING:
    from app.rtc.placement import SfuDirectory

log = logging.getLogger("app.rtc")
LIVE_STATES = (CallState.RINGING.value, CallState.ACTIVE.value)
MISSED_TEXT = "Пропущенный звонок"  # the chat's system message (the clinic speaks Russian): no name, no content
SWEEP_SECONDS = 60.0  # this often the keeper ends the live calls of consultations that are over
Room = tuple[str, str]  # (node, room id): what closing a call's media needs

STARTED = Counter("clinic_calls_started_total", "Calls started (ringing), on this process")
ENDED = Counter("clinic_calls_ended_total", "Calls ended, by end_reason, on this process", ["end_reason"])
for _reason in EndReason:
    ENDED.labels(_reason.value)  # every reason from zero, so a rate over it exists before its first call
# start to answer: what the state machine records (created_at → started_at); a call rings CALL_RING_SECONDS at most
SETUP = Histogram("clinic_call_setup_seconds", "From a call's start to its answer by the patient's side",
                  buckets=(1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0))


class LiveCalls(Collector):
    """`clinic_calls_live{state}`: the clinic's ringing and active calls, whichever API process holds them.

    Counted by the statement the keeper's node watch runs anyway every CALL_NODE_CHECK_SECONDS (the live calls'
    nodes, grouped by state too): no statement is added, no call path waits on it, a scrape never waits on the
    database, and the figure is the database's, so every API process reports the same one, at most a check old
    (aggregate with max, not sum). A gauge each process moved as its own calls start and end would be its share
    only, and wrong whenever another process's keeper ends one. Not known (the read failed, the keeper stopped):
    no series, rather than a stale figure. A process runs one keeper; where several run in one process (apps of a
    test on databases of their own), the one started last is counted."""

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None
        self.keepers: list[CallKeeper] = []  # running, in the order they started

    def started(self, keeper: CallKeeper) -> None:
        self.keepers.append(keeper)

    def stopped(self, keeper: CallKeeper) -> None:
        if keeper in self.keepers:
            self.keepers.remove(keeper)
        self.counts = None  # until the keeper counted now (if any) reads its own

    def record(self, keeper: CallKeeper, live: dict[tuple[str, str], int] | None) -> None:
        if not self.keepers or self.keepers[-1] is not keeper:
            return
        self.counts = None if live is None else {
            state: sum(n for (_, in_state), n in live.items() if in_state == state) for state in LIVE_STATES}

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family, counts = self._family(), self.counts
        for state, count in (counts or {}).items():
            family.add_metric([state], count)
        yield family

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("clinic_calls_live", "Calls ringing and active in the clinic (from the database)",
                                 labels=["state"])


LIVE_CALLS = LiveCalls()
REGISTRY.register(LIVE_CALLS)


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


def room_of(call: Call) -> Room:
    return call.node, str(call.id)


async def close_rooms(directory: SfuDirectory, rooms: Sequence[Room]) -> None:
    """End these rooms' media on their nodes; a node that does not answer has lost the room anyway."""
    async def close(node: str, room: str) -> None:
        try:
            await directory.close_room(node, room)
        except Exception:  # the call is over whatever the node says
            log.warning("closing a call's room failed", exc_info=True, extra={"call_id": room})
    await asyncio.gather(*(close(node, room) for node, room in rooms))


class CallService:
    def __init__(self, session: AsyncSession, settings: Settings, consultations: ConsultationService,
                 chat: ChatService, accounts: AccountService, presence: Presence, directory: SfuDirectory,
                 ringing: Callable[[], None] = lambda: None,
                 closing: Callable[[Sequence[Room]], None] | None = None) -> None:
        self.session = session
        self.settings = settings
        self.consultations = consultations
        self.chat = chat
        self.accounts = accounts
        self.presence = presence
        self.directory = directory
        self.ringing = ringing  # wakes the ring timeout: a new deadline
        # closes ended calls' rooms in the background (the keeper's), so no answer or event waits on a node
        self.closing = closing

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
        if visit.status not in CALLABLE or visit.conversation_id is None:
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
        STARTED.inc()
        self.ringing()
        return Started(call, via)

    # --- answering and ending ----------------------------------------------------------------------

    async def _visible(self, viewer: Viewer, call_id: UUID, *, live: bool = False) -> tuple[Call, Party]:
        """The call and its people if the viewer is one of them (the specialist, the patient, the guardian).
        `live`: a call still live whose consultation is over (cancelled, no-show, completed) is refused, 409
        `consultation_over` (the keeper's sweep ends it); an ended call is left to the caller's own refusal."""
        found = (await self.session.execute(select(Call, callable_now(Call.consultation_id))
                                            .where(Call.id == call_id))).one_or_none()
        if found is None:
            raise NotVisible("call not found")
        call, consultation_live = found
        try:
            party = await self.chat.visible(viewer, call.conversation_id)
        except NotVisible:
            raise NotVisible("call not found") from None
        if live and call.state != CallState.ENDED and not consultation_live:
            raise Conflict("the consultation is over", "consultation_over")
        return call, party

    async def _participant(self, viewer: Viewer, call_id: UUID) -> Call:
        """A call the viewer may send media into (offers, candidates): not ended, its consultation live; while it
        rings only the specialist (the patient's side joins by accepting), once answered only the specialist and
        the one who answered (a guardian beside the patient does not take over their media)."""
        call, _ = await self._visible(viewer, call_id, live=True)
        if call.state == CallState.ENDED:
            raise Conflict("the call has ended", "call_ended", end_reason=call.end_reason)
        if viewer.id != call.specialist_id:
            if call.state == CallState.RINGING:
                raise Conflict("the call is answered before the patient's side joins it", "call_not_active")
            if viewer.id != call.accepted_by:
                raise Forbidden("the call was answered by someone else", "not_allowed")
        return call

    async def get(self, viewer: Viewer, call_id: UUID) -> Call:
        return (await self._visible(viewer, call_id))[0]

    async def live_of(self, viewer: Viewer, limit: int, before: UUID | None = None) -> list[Call]:
        """The ringing and active calls whose conversation the viewer is in (its specialist, its patient with a
        login, a dependent's guardian: the chat's own rule), newest first, one more than `limit` (a next page):
        one statement, so a page opened after the ring started shows it. Nobody sees anyone else's calls."""
        people = or_(Conversation.specialist_id == viewer.id, Conversation.guardian_id == viewer.id,
                     and_(Conversation.patient_id == viewer.id, Conversation.patient_has_login))
        query = (select(Call).join(Conversation, Conversation.id == Call.conversation_id)
                 .where(Call.state.in_(LIVE_STATES), people).order_by(Call.id.desc()).limit(limit + 1))
        if before is not None:
            query = query.where(Call.id < before)
        return list((await self.session.scalars(query)).all())

    async def _move(self, call: Call, sources: Sequence[str], *also: Any, **values: Any) -> bool:
        """Compare-and-set on the state: False when the call left `sources` meanwhile (another device, instance)
        or a condition of `also` does not hold."""
        values["updated_at"] = utcnow()
        moved = await self.session.execute(
            update(Call).where(Call.id == call.id, Call.state.in_(sources), *also).values(**values)
            .returning(Call.id).execution_options(synchronize_session=False))
        changed = moved.one_or_none() is not None
        await self.session.refresh(call)
        return changed

    async def accept(self, viewer: Viewer, call_id: UUID) -> Call:
        call, party = await self._visible(viewer, call_id, live=True)
        if viewer.id not in patient_side(party):
            raise Forbidden("the patient's side answers a call", "not_allowed")
        now = utcnow()
        if call.state != CallState.RINGING or call.ring_deadline <= now or not await self._move(
                call, [CallState.RINGING.value], callable_now(Call.consultation_id),  # not over meanwhile
                state=CallState.ACTIVE.value, started_at=now, accepted_by=viewer.id):
            if call.state == CallState.RINGING and call.ring_deadline > now:  # ringing still: the consultation ended
                raise Conflict("the consultation is over", "consultation_over")
            raise Conflict("the call is no longer ringing", "call_not_ringing", state=call.state)
        setup = (now - call.created_at).total_seconds()
        count_after_commit(self.session, lambda: SETUP.observe(setup))  # the request's commit comes after
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
        ENDED.labels(call.end_reason).inc()
        await self.close_rooms([call])

    async def close_rooms(self, calls: Sequence[Call]) -> None:
        """End the calls' media: in the keeper's background (the events go out without waiting on a node that
        may hang for SFU_TIMEOUT_SECONDS), or here when there is no keeper."""
        rooms = [room_of(call) for call in calls]
        if self.closing is not None:
            self.closing(rooms)
        else:
            await close_rooms(self.directory, rooms)

    # --- in the call -------------------------------------------------------------------------------

    async def media(self, viewer: Viewer, call_id: UUID, audio: bool, video: bool) -> Call:
        """A side turned its sound or picture on or off: the other side hears of it (call.media)."""
        call, party = await self._visible(viewer, call_id, live=True)
        if call.state == CallState.ENDED:
            raise Conflict("the call has ended", "call_ended", end_reason=call.end_reason)
        other = patient_side(party) if viewer.id == call.specialist_id else {call.specialist_id}
        await streams.append(self.session, self.staged, other, "call.media",
                             {"call_id": str(call.id), "user_id": str(viewer.id), "audio": audio, "video": video})
        return call

    async def offer(self, viewer: Viewer, call_id: UUID, sdp: str, type_: str) -> tuple[str, str]:
        """A participant's SDP offer, answered by the SFU node holding the call's room. The specialist may offer
        while it rings, the one who answered once it is active; either again after a network change (the new peer
        connection replaces the old)."""
        call = await self._participant(viewer, call_id)
        node, room = room_of(call)
        await self.session.commit()  # nothing was written: no transaction waits on the node's answer
        try:
            answer = await self.directory.offer(node, room, str(viewer.id), sdp, type_)
        except DomainError:  # a full room, a refused offer, an unreachable node: each has its reason
            raise
        except Exception as exc:
            log.exception("an offer failed", extra={"call_id": room})
            raise Unavailable("the call's media server did not answer; try again", "sfu_unavailable") from exc
        # the call may have ended while the node answered, and the offer re-created its room there: close it again
        state = await self.session.scalar(select(Call.state).where(Call.id == call.id))
        await self.session.commit()
        if state not in LIVE_STATES:
            await close_rooms(self.directory, [(node, room)])
            raise Conflict("the call has ended", "call_ended")
        return answer

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
        if not missed:
            return []
        # the whole batch in a few statements: one read of the people, one insert of messages, one of events
        parties = await self.chat.parties({call.conversation_id for call in missed})
        await self.chat.post_system_many([(call.conversation_id, MISSED_TEXT, "missed_call") for call in missed],
                                         parties)
        events: list[tuple[set[UUID], str, dict[str, Any]]] = []
        for call in missed:
            party = parties.get(call.conversation_id)
            notice = {"kind": "missed_call", "call_id": str(call.id), "consultation_id": str(call.consultation_id)}
            if party is not None:
                events += [(party.people, "call.ended", call_data(call)), (patient_side(party), "notice", notice)]
            outbox.stage(self.session, "notice", call.id, [str(call.patient_id)], notice)  # a push when away
        await streams.append_many(self.session, self.staged, events)
        return missed

    async def fail_on(self, gone: set[str]) -> list[Call]:
        """Live calls whose room is on a node gone for good end `failed`."""
        now = utcnow()
        rows = await self.session.scalars(
            update(Call).where(Call.state.in_(LIVE_STATES), Call.node.in_(sorted(gone)))
            .values(state=CallState.ENDED.value, end_reason=EndReason.FAILED.value, ended_at=now, updated_at=now)
            .returning(Call).execution_options(synchronize_session=False))
        failed = list(rows.all())
        await self._announce_ended(failed)
        return failed

    async def end_over(self) -> list[Call]:
        """Live calls whose consultation is over (cancelled, no-show, completed) end: `cancelled` while they ring,
        `completed` once answered. One statement: the consultation's own rule joined to the live calls."""
        now = utcnow()
        rows = await self.session.scalars(
            update(Call).where(Call.state.in_(LIVE_STATES), ~callable_now(Call.consultation_id))
            .values(state=CallState.ENDED.value, ended_at=now, updated_at=now,
                    end_reason=case((Call.state == CallState.RINGING.value, EndReason.CANCELLED.value),
                                    else_=EndReason.COMPLETED.value))
            .returning(Call).execution_options(synchronize_session=False))
        ended = list(rows.all())
        await self._announce_ended(ended)
        return ended

    async def _announce_ended(self, calls: Sequence[Call]) -> None:
        """`call.ended` to each call's people: one read of them and one append for the batch."""
        if not calls:
            return
        parties = await self.chat.parties({call.conversation_id for call in calls})
        await streams.append_many(self.session, self.staged, [
            (parties[call.conversation_id].people, "call.ended", call_data(call)) for call in calls
            if call.conversation_id in parties])

    async def live_calls(self) -> dict[tuple[str, str], int]:
        """The live calls by (node, state): the nodes holding their rooms and the live-calls gauge in one read (the
        partial index on live calls' nodes finds them)."""
        rows = await self.session.execute(select(Call.node, Call.state, func.count())
                                          .where(Call.state.in_(LIVE_STATES)).group_by(Call.node, Call.state))
        return {(node, state): count for node, state, count in rows.all()}

    async def candidate(self, viewer: Viewer, call_id: UUID, line: str | None) -> None:
        """A participant's trickled ICE candidate (None: no more), passed to the room's node; the same checks as
        `offer`."""
        call = await self._participant(viewer, call_id)
        node, room = call.node, str(call.id)
        await self.session.commit()  # nothing was written: no transaction waits on the node
        await self.directory.candidate(node, room, str(viewer.id), line)


class CallKeeper:
    """Ends what nobody else will: calls unanswered past their stored deadline (missed), calls whose SFU node
    died (failed) and calls whose consultation is over (cancelled or completed). Every API instance runs one; any of
    them may end a call, each call once (the UPDATE's claim), and a restarted instance finds the deadlines in the
    database. It also closes ended calls' rooms in the background, and its `run` returns once those are done.

    The ring timeout sleeps until the nearest deadline: woken when a call starts here, and otherwise looking again
    every CALL_RING_SECONDS (a call started on an instance that died meanwhile ends at most that late). The node
    watch asks the directory every CALL_NODE_CHECK_SECONDS which of the live calls' nodes are gone for good (it
    judges grace periods, unknown names and asks the nodes themselves); when that cannot be known it changes
    nothing. Every SWEEP_SECONDS it ends the calls of consultations that are over."""

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
        self._closing: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """A call started: its deadline may be the nearest. Callable from any thread."""
        set_event_from_any_thread(self._loop, self._wake)

    def close_later(self, rooms: Sequence[Room]) -> None:
        """Close these rooms' media in the background (tracked: `run` and `closed` await them). Any thread."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or running is self._loop:
            self._spawn(list(rooms))
        else:
            try:
                self._loop.call_soon_threadsafe(self._spawn, list(rooms))
            except RuntimeError:  # that loop has closed: its nodes' rooms with it, or they time out there
                log.warning("a call's room was left to its node", extra={"rooms": len(rooms)})

    def _spawn(self, rooms: list[Room]) -> None:
        task = asyncio.create_task(close_rooms(self.directory, rooms))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def closed(self) -> None:
        """Until the rooms handed to `close_later` so far are closed (or their nodes did not answer)."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def run(self) -> None:
        """Until `stop`: a pass under way is finished, never cut off mid-transaction; then the rooms being closed."""
        self._loop = asyncio.get_running_loop()
        LIVE_CALLS.started(self)
        try:
            await asyncio.gather(self._ring(), self._watch_nodes())
        finally:
            LIVE_CALLS.stopped(self)
            await self.closed()

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
        swept_at: float | None = None
        while not self._stopping.is_set():
            try:
                await self.fail_gone()
            except asyncio.CancelledError:
                raise
            except Exception:  # not knowable now (Redis down): no call is failed on a guess
                log.warning("the SFU nodes' state is not known; calls left as they are", exc_info=True)
            if swept_at is None or loop.time() - swept_at >= SWEEP_SECONDS:
                try:
                    await self.end_over()
                    swept_at = loop.time()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("ending the calls of consultations that are over failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.call_node_check_seconds)

    async def expire_due(self) -> list[Call]:
        return await self._end(lambda calls: calls.expire_missed(utcnow()))

    async def fail_gone(self) -> list[Call]:
        """The live calls on the nodes the directory says are gone end `failed`; if it cannot say, none do. The
        live calls read here are also the live-calls gauge."""
        try:
            async with self.database.reader() as session:
                live = await self.services(session).live_calls()
        except BaseException:
            LIVE_CALLS.record(self, None)
            raise
        LIVE_CALLS.record(self, live)
        nodes = {node for node, _ in live}
        if not nodes:
            return []
        gone = await self.directory.gone(nodes)
        if not gone:
            return []
        return await self._end(lambda calls: calls.fail_on(gone))

    async def end_over(self) -> list[Call]:
        """The sweep: live calls whose consultation is over end."""
        return await self._end(lambda calls: calls.end_over())

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
        self.close_later([room_of(call) for call in ended])  # no node holds up the next pass
        for call in ended:
            ENDED.labels(call.end_reason).inc()
            log.info("call ended", extra={"call_id": str(call.id), "end_reason": call.end_reason})
        return ended
