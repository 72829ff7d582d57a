"""Where a call's room lives: the in-process SFU (embedded profile, `SFU_URLS` unset) or one of the SFU nodes,
chosen by load; offers are proxied to the room's node over its control interface (shared secret).

Nodes write their load to Redis every `SFU_HEARTBEAT_SECONDS` under a key that lives three heartbeats
(`sfu:node:<url>`); a node that stops heartbeating (killed, hung, cut off) drops out by itself, one that stops
cleanly deletes its key. Without Redis the nodes are asked directly (`GET /health`) each time.

A node's name is its URL and an id of the running process (`http://10.0.0.5:8100#3fa2c1d0`): a node restarted on
the same address is another node, so the calls whose rooms died with the old process end `failed`. The SFU inside an
API process is `local#<id>` (per process, so a restarted API's old rooms end `failed` too, and a room in another
API instance's SFU is refused with a clear reason, not offered into this one); with Redis it heartbeats like a node.
Every registration is also listed in the index `sfu:nodes`, so any instance can tell which nodes live, even those
missing from its own SFU_URLS (a rolling deploy).

`gone()` decides which calls' nodes died: a node is gone only when it has been missing for HEARTBEAT_LIVES
heartbeats over at least two checks (a Redis restart without persistence or a late heartbeat is a gap, not a
death) and, when its URL is known, does not answer `GET /health` either.

INTERFACE: `SfuDirectory`, `sfu_directory`, `LOCAL_NODE` keep these names and signatures (add freely).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import quote

import httpx
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import Conflict, DomainError, Invalid, Unavailable
from app.rtc.sfu.engine import RoomFull, Sfu
from app.rtc.sfu.metrics import SFU_METRICS
from app.settings import Settings
from app.tasks import cancel_until_done

log = logging.getLogger("app.rtc.placement")

LOCAL_NODE = "local"  # INTERFACE: what the in-process SFU's node name starts with (`local#<id>`, one per process)
REGISTRY_PREFIX = "sfu:node:"  # + a node's URL (an in-process SFU: its name): its NodeStatus, expiring
#                                HEARTBEAT_LIVES heartbeats after writing
REGISTRY_INDEX = "sfu:nodes"  # sorted set of registry keys, scored by their last write (unix seconds)
INDEX_FORGET_SECONDS = 3600.0  # an index entry not rewritten for this long is dropped (its key expired long ago)
PLACED_PREFIX = "sfu:placed:"  # + a node's name: rooms placed on it since its last heartbeat
HEARTBEAT_LIVES = 3  # heartbeats a registration outlives its last write by


# a node's refusals that mean the same to a client as they say (else: sfu_unavailable, ours to fix)
PASSED_REASONS = frozenset({"rtc_ports_exhausted", "room_full", "invalid_offer", "not_an_offer", "codec_unsupported",
                            "call_ended", "invalid_candidate"})


class SfuUnavailable(Unavailable):
    """No node to place a room on, or the room's node did not answer (503)."""

    default_reason = "sfu_unavailable"


def is_local(node: str) -> bool:
    """An in-process SFU's name (`local#<id>`; a bare `local` from before names were per process)."""
    return node == LOCAL_NODE or node.startswith(LOCAL_NODE + "#")


def local_node_name() -> str:
    return f"{LOCAL_NODE}#{secrets.token_hex(4)}"


def registry_key(node: str) -> str:
    """Where a node registers: under its URL (a successor on the address overwrites it), an in-process SFU under its
    name."""
    return REGISTRY_PREFIX + (node if is_local(node) else url_of(node))


async def register(redis: Redis, node: str, status: bytes, heartbeat: float) -> None:
    """One heartbeat: the registration for HEARTBEAT_LIVES heartbeats, listed in the index, and the placements
    counted since the last one cleared (they are in the load now, or never came)."""
    key = registry_key(node)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(key, status, px=int(heartbeat * HEARTBEAT_LIVES * 1000))
        pipe.zadd(REGISTRY_INDEX, {key: time.time()})
        pipe.delete(PLACED_PREFIX + node)
        await pipe.execute()


async def deregister(redis: Redis, node: str) -> None:
    """Remove the node's registration if it is still this node's (a successor may have written its own)."""
    key = registry_key(node)
    current = await redis.get(key)
    if current is not None and msgspec.json.decode(current, type=NodeStatus).node == node:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.zrem(REGISTRY_INDEX, key)
            await pipe.execute()


async def registered_nodes(redis: Redis, also: Iterable[str] = ()) -> dict[str, NodeStatus]:
    """Every node registered now (by the index, plus the registry keys in `also`), by name; RedisError/OSError
    when Redis cannot be reached."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(REGISTRY_INDEX, "-inf", now - INDEX_FORGET_SECONDS)
        pipe.zrange(REGISTRY_INDEX, 0, -1)
        _, listed = await pipe.execute()
    keys = sorted({k.decode() if isinstance(k, bytes) else str(k) for k in listed} | set(also))
    values = await redis.mget(keys) if keys else []
    found: dict[str, NodeStatus] = {}
    for key, value in zip(keys, values, strict=True):
        if value is None:
            continue
        try:
            status = msgspec.json.decode(value, type=NodeStatus)
        except msgspec.DecodeError:
            log.warning("unreadable SFU registration", extra={"key": key})
            continue
        if registry_key(status.node) == key:  # a node listed under another's address is not trusted
            found[status.node] = status
    return found


class Missing:
    """Which nodes have been missing long enough to be gone: since a first check at least `gap` seconds ago, and
    in every check since."""

    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.since: dict[str, float] = {}

    def confirm(self, missing_now: set[str]) -> set[str]:
        now = time.monotonic()
        self.since = {node: self.since.get(node, now) for node in missing_now}  # back or no longer asked: forgotten
        return {node for node, since in self.since.items() if now - since >= self.gap}


class NodeStatus(msgspec.Struct):
    """A node's `GET /health` answer and its registration in Redis: the engine's load under the node's name."""

    node: str
    rooms: int
    participants: int
    streams: int


class OfferBody(msgspec.Struct):
    sdp: str
    type: str = "offer"


class AnswerBody(msgspec.Struct):
    sdp: str
    type: str = "answer"


class CandidateBody(msgspec.Struct):
    """A trickled ICE candidate: its SDP line, or null for the end of candidates."""

    candidate: str | None = None


class Refusal(msgspec.Struct):
    """A node's error body: `{"reason", "detail"}`."""

    reason: str = "unknown"
    detail: str = ""


def node_urls(settings: Settings) -> list[str]:
    """SFU_URLS as a list of base URLs (no trailing slash), in the order given."""
    return [url.strip().rstrip("/") for url in settings.sfu_urls.split(",") if url.strip()]


def offer_path(room_id: str, participant_id: str) -> str:
    return f"/rooms/{quote(room_id, safe='')}/participants/{quote(participant_id, safe='')}/offer"


def candidate_path(room_id: str, participant_id: str) -> str:
    return f"/rooms/{quote(room_id, safe='')}/participants/{quote(participant_id, safe='')}/candidates"


def url_of(node: str) -> str:
    """The base URL in a node's name."""
    return node.partition("#")[0]


def weight(status: NodeStatus, placed: int) -> int:
    """What placement minimises: participants now, plus two for each room placed that has not reported yet (its
    two participants are on their way)."""
    return status.participants + 2 * placed


def least_loaded(weights: dict[str, int]) -> str:
    """The node of least weight; among equals, any of them (so an idle cluster spreads its first calls)."""
    least = min(weights.values())
    return random.choice([node for node, w in weights.items() if w == least])


class SfuDirectory(Protocol):  # INTERFACE
    async def place(self, room_id: str) -> str:
        """The node (its name, stored on the call) for a new call's room: the least-loaded live node."""
        ...

    async def offer(self, node: str, room_id: str, participant_id: str, sdp: str, type_: str) -> tuple[str, str]:
        """Proxy a participant's offer to the room's node → (answer sdp, "answer")."""
        ...

    async def close_room(self, node: str, room_id: str) -> None:
        """End the room's media on its node (idempotent; a node that is gone counts as done)."""
        ...

    async def live_nodes(self) -> set[str]:
        """The nodes alive now (their heartbeat is fresh); raises when that cannot be known (Redis down)."""
        ...

    async def gone(self, nodes: set[str]) -> set[str]:
        """Of these nodes (those of live calls), the ones gone for good: missing from the registry (or, without
        one, from this directory's knowledge) over two checks HEARTBEAT_LIVES heartbeats apart and, where the URL
        is known, not answering `GET /health`; a name nobody can judge is not gone. Raises when nothing can be
        known (Redis down and no node to probe)."""
        ...

    async def candidate(self, node: str, room_id: str, participant_id: str, candidate: str | None) -> None:
        """Pass a participant's trickled ICE candidate (its SDP line; None: no more) to the room's node."""
        ...

    async def aclose(self) -> None: ...


class _Judge:
    """The part of `gone()` both directories share."""

    redis: Redis | None
    heartbeat: float
    missing: Missing
    own: str | None = None  # this process's in-process SFU

    def registry_also(self) -> list[str]:
        return []

    def probe_urls(self, registered: dict[str, NodeStatus]) -> set[str]:
        """URLs this directory may ask directly."""
        return set()

    async def probe(self, url: str) -> NodeStatus | None:
        return None

    async def gone(self, nodes: set[str]) -> set[str]:
        asked = set(nodes) - ({self.own} if self.own else set())
        if not asked:
            self.missing.confirm(set())
            return set()
        registered: dict[str, NodeStatus] | None = None
        registry_down = False
        if self.redis is not None:
            try:
                registered = await registered_nodes(self.redis, self.registry_also())
            except (RedisError, OSError) as exc:
                log.warning("the SFU registry cannot be read", extra={"error": repr(exc)})
                registry_down = True
        unregistered = asked - set(registered or ())
        urls = self.probe_urls(registered or {})
        to_probe = sorted({url_of(n) for n in unregistered if not is_local(n) and url_of(n) in urls})
        answers = await asyncio.gather(*(self.probe(url) for url in to_probe))
        answering = {status.node for status in answers if status is not None}
        if registry_down and not to_probe:
            raise SfuUnavailable("the SFU registry (Redis) cannot be reached and no node can be asked",
                                 reason="sfu_registry_unavailable")
        missing = set()
        for node in unregistered - answering:
            if not is_local(node) and url_of(node) in to_probe:
                missing.add(node)  # its address answered with another name, or not at all
            elif registered is not None:
                missing.add(node)  # the registry has every live node: not there
            # else: nobody can judge it now (Redis down, a URL not known here): not gone
        return self.missing.confirm(missing)


def _elsewhere(node: str) -> SfuUnavailable:
    if is_local(node):
        return SfuUnavailable("the call's room lives in another API process's SFU; that process must take the offer")
    return SfuUnavailable("the call's SFU node is not known to this server")


class LocalDirectory(_Judge):
    """SFU_URLS unset: every room on the SFU in this process (`local#<id>`), alive as long as the process is; with
    Redis it heartbeats into the registry, so other instances know its calls live."""

    def __init__(self, sfu: Sfu, owned: bool, redis: Redis | None = None, heartbeat: float = 1.0) -> None:
        self.sfu, self.owned = sfu, owned
        self.name = self.own = local_node_name()
        SFU_METRICS.watch(sfu, self.name)  # served with the API process's metrics
        self.redis, self.heartbeat = redis, heartbeat
        self.missing = Missing(heartbeat * HEARTBEAT_LIVES)
        self.beating: asyncio.Task[None] | None = None
        if redis is not None:
            try:
                self.beating = asyncio.get_running_loop().create_task(self._keep_beating())
            except RuntimeError:  # made outside a loop (a script): no registration
                self.beating = None

    def _status(self) -> bytes:
        load = self.sfu.load()
        return msgspec.json.encode(NodeStatus(node=self.name, rooms=load.rooms, participants=load.participants,
                                              streams=load.streams))

    async def _keep_beating(self) -> None:
        assert self.redis is not None
        while True:
            try:
                await register(self.redis, self.name, self._status(), self.heartbeat)
            except (RedisError, OSError) as exc:  # the calls go on; other instances may miss it for a while
                log.warning("in-process SFU heartbeat failed", extra={"error": repr(exc)})
            except Exception:
                log.exception("in-process SFU heartbeat failed")
            await asyncio.sleep(self.heartbeat)

    async def place(self, room_id: str) -> str:
        return self.name

    async def offer(self, node: str, room_id: str, participant_id: str, sdp: str, type_: str) -> tuple[str, str]:
        if node != self.name:  # another process's SFU, or a node of SFU_URLS from before a restart without it
            raise _elsewhere(node)
        return await self.sfu.offer(room_id, participant_id, sdp, type_)

    async def candidate(self, node: str, room_id: str, participant_id: str, candidate: str | None) -> None:
        if node != self.name:
            raise _elsewhere(node)
        await self.sfu.candidate(room_id, participant_id, candidate)

    async def close_room(self, node: str, room_id: str) -> None:
        if node == self.name:
            await self.sfu.close_room(room_id)

    async def live_nodes(self) -> set[str]:
        return {self.name}

    async def aclose(self) -> None:
        if self.beating is not None:
            await cancel_until_done(self.beating)  # a Redis call can swallow one cancel (app/tasks.py)
            if self.redis is not None:
                try:
                    await asyncio.wait_for(deregister(self.redis, self.name), 5.0)
                except (RedisError, OSError, TimeoutError, msgspec.DecodeError) as exc:  # it expires by itself
                    log.warning("in-process SFU deregistration failed", extra={"error": repr(exc)})
        SFU_METRICS.unwatch(self.sfu)
        if self.owned:
            await self.sfu.close()


class RemoteDirectory(_Judge):
    """Rooms on the SFU nodes of SFU_URLS: their liveness and load from the Redis registry, or, without Redis,
    from asking each node; offers and closes over their control interface."""

    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        if not settings.sfu_secret:
            raise ValueError("SFU_URLS needs SFU_SECRET: the nodes answer only requests carrying it")
        self.urls = node_urls(settings)
        self.redis = redis
        self.heartbeat = settings.sfu_heartbeat_seconds
        self.http = httpx.AsyncClient(timeout=settings.sfu_timeout_seconds,
                                      headers={"Authorization": f"Bearer {settings.sfu_secret}"})
        # without Redis: rooms this process placed lately, per node, so a burst of calls is spread before the
        # nodes' own counts show them (the registry keeps the same count in Redis, across API instances)
        self.placed_here: dict[str, list[float]] = {}
        self.missing = Missing(self.heartbeat * HEARTBEAT_LIVES)

    def registry_also(self) -> list[str]:
        return [REGISTRY_PREFIX + url for url in self.urls]

    def probe_urls(self, registered: dict[str, NodeStatus]) -> set[str]:
        return set(self.urls)

    async def _statuses(self) -> list[NodeStatus]:
        """The live nodes' statuses, one per URL of SFU_URLS that has one."""
        if self.redis is None:
            found = await asyncio.gather(*(self._probe(url) for url in self.urls))
            return [status for status in found if status is not None]
        try:
            values = await self.redis.mget([REGISTRY_PREFIX + url for url in self.urls])
        except (RedisError, OSError) as exc:
            raise SfuUnavailable("the SFU registry (Redis) cannot be reached",
                                 reason="sfu_registry_unavailable") from exc
        statuses = []
        for url, value in zip(self.urls, values, strict=True):
            if value is None:
                continue
            try:
                status = msgspec.json.decode(value, type=NodeStatus)
            except msgspec.DecodeError:
                log.warning("unreadable SFU registration", extra={"url": url})
                continue
            if url_of(status.node) == url:  # a node listed under another's address is not trusted with rooms
                statuses.append(status)
        return statuses

    async def _probe(self, url: str) -> NodeStatus | None:
        try:
            answer = await self.http.get(f"{url}/health")
            if answer.status_code == 200:
                status = msgspec.json.decode(answer.content, type=NodeStatus)
                if url_of(status.node) == url:
                    return status
            log.warning("an SFU node answered its health probe with an error",
                        extra={"url": url, "status_code": answer.status_code})
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            log.info("an SFU node did not answer its health probe", extra={"url": url, "error": repr(exc)})
        return None

    async def probe(self, url: str) -> NodeStatus | None:
        return await self._probe(url)

    async def _placed(self, nodes: list[str]) -> dict[str, int]:
        """Rooms placed on each node since its load was last reported."""
        if self.redis is None:
            since = time.monotonic() - self.heartbeat
            return {node: sum(1 for at in self.placed_here.get(node, ()) if at > since) for node in nodes}
        try:
            counts = await self.redis.mget([PLACED_PREFIX + node for node in nodes])
        except (RedisError, OSError) as exc:
            raise SfuUnavailable("the SFU registry (Redis) cannot be reached",
                                 reason="sfu_registry_unavailable") from exc
        return {node: int(count or 0) for node, count in zip(nodes, counts, strict=True)}

    async def _note_placed(self, node: str) -> None:
        if self.redis is None:
            now = time.monotonic()
            self.placed_here[node] = [at for at in self.placed_here.get(node, ()) if at > now - self.heartbeat]
            self.placed_here[node].append(now)
            return
        try:  # the node resets it with each heartbeat; the expiry covers a node that died meanwhile
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(PLACED_PREFIX + node)
                pipe.pexpire(PLACED_PREFIX + node, int(self.heartbeat * HEARTBEAT_LIVES * 1000))
                await pipe.execute()
        except (RedisError, OSError):  # only the spreading of a burst suffers
            log.warning("could not count a placement", extra={"node": node})

    async def place(self, room_id: str) -> str:
        statuses = await self._statuses()
        if not statuses:
            raise SfuUnavailable("no SFU node is available for the call")
        placed = await self._placed([status.node for status in statuses])
        node = least_loaded({status.node: weight(status, placed[status.node]) for status in statuses})
        await self._note_placed(node)
        return node

    def _url(self, node: str) -> str:
        if is_local(node):
            raise _elsewhere(node)
        url = url_of(node)
        if url not in self.urls:
            raise SfuUnavailable("the call's SFU node is not one of SFU_URLS")
        return url

    async def offer(self, node: str, room_id: str, participant_id: str, sdp: str, type_: str) -> tuple[str, str]:
        url = self._url(node)
        try:
            answer = await self.http.post(f"{url}{offer_path(room_id, participant_id)}",
                                          content=msgspec.json.encode(OfferBody(sdp=sdp, type=type_)),
                                          headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:  # refused, reset or too slow: never left hanging
            log.warning("an SFU node did not answer an offer", extra={"node": node, "error": repr(exc)})
            raise SfuUnavailable("the call's media server did not answer; try again") from exc
        if answer.status_code == 200:
            try:
                body = msgspec.json.decode(answer.content, type=AnswerBody)
            except msgspec.DecodeError as exc:
                raise SfuUnavailable("the call's media server gave an unreadable answer") from exc
            return body.sdp, body.type
        raise self._refusal(node, answer)

    @staticmethod
    def _refusal(node: str, answer: httpx.Response) -> DomainError:
        try:
            refusal = msgspec.json.decode(answer.content, type=Refusal)
        except msgspec.DecodeError:
            refusal = Refusal()
        known = refusal.reason in PASSED_REASONS
        if answer.status_code == 409 and refusal.reason == RoomFull.default_reason:
            return RoomFull(refusal.detail or "the call already has two participants")
        if answer.status_code == 409 and known:
            return Conflict(refusal.detail or "the media server refused the offer", reason=refusal.reason)
        if answer.status_code in (400, 422) and known:  # the offer itself is wrong: the client's to fix
            return Invalid(refusal.detail or "the offer was refused", reason=refusal.reason)
        if answer.status_code == 503 and known:  # e.g. the node's UDP ports are all taken: the client may retry
            return SfuUnavailable(refusal.detail or "the media server is busy; try again", reason=refusal.reason)
        # 401 (SFU_SECRET differs between the API and the node), 5xx, a reason we do not know: ours to fix, the
        # client can only retry
        log.error("an SFU node refused an offer", extra={"node": node, "status_code": answer.status_code,
                                                         "reason": refusal.reason})
        return SfuUnavailable("the call's media server refused the offer; try again")

    async def candidate(self, node: str, room_id: str, participant_id: str, candidate: str | None) -> None:
        url = self._url(node)
        try:
            answer = await self.http.post(f"{url}{candidate_path(room_id, participant_id)}",
                                          content=msgspec.json.encode(CandidateBody(candidate=candidate)),
                                          headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            log.warning("an SFU node did not take a candidate", extra={"node": node, "error": repr(exc)})
            raise SfuUnavailable("the call's media server did not answer; try again") from exc
        if answer.status_code != 204:
            raise self._refusal(node, answer)

    async def close_room(self, node: str, room_id: str) -> None:
        url = url_of(node)
        if is_local(node) or url not in self.urls:
            return
        try:
            answer = await self.http.delete(f"{url}/rooms/{quote(room_id, safe='')}")
        except httpx.HTTPError as exc:  # a node that is gone took its rooms with it
            log.info("an SFU node did not answer a room's close", extra={"node": node, "error": repr(exc)})
            return
        if answer.status_code != 204:
            log.warning("an SFU node refused a room's close", extra={"node": node, "status_code": answer.status_code})

    async def live_nodes(self) -> set[str]:
        return {status.node for status in await self._statuses()}

    async def aclose(self) -> None:
        await self.http.aclose()


def sfu_directory(settings: Settings, redis: Redis | None, local: Sfu | None) -> SfuDirectory:  # INTERFACE
    """SFU_URLS unset: the SFU in this process (`local`, or one made here and closed with the directory);
    set: the nodes it lists (needs SFU_SECRET), known from the registry when Redis is there."""
    if node_urls(settings):
        return RemoteDirectory(settings, redis)
    owned = local is None
    return LocalDirectory(local or Sfu(settings), owned, redis, settings.sfu_heartbeat_seconds)
