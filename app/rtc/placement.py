"""Where a call's room lives: the in-process SFU (embedded profile, `SFU_URLS` unset) or one of the SFU nodes,
chosen by load; offers are proxied to the room's node over its control interface (shared secret).

Nodes write their load to Redis every `SFU_HEARTBEAT_SECONDS` under a key that lives three heartbeats
(`sfu:node:<url>`); a node that stops heartbeating (killed, hung, cut off) drops out by itself, one that stops
cleanly deletes its key. Without Redis the nodes are asked directly (`GET /health`) each time.

A node's name is its URL and an id of the running process (`http://10.0.0.5:8100#3fa2c1d0`): a node restarted on
the same address is another node, so the calls whose rooms died with the old process end `failed`.

INTERFACE: `SfuDirectory`, `sfu_directory`, `LOCAL_NODE` keep these names and signatures (add freely).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Protocol
from urllib.parse import quote

import httpx
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import Conflict, DomainError, Invalid, Unavailable
from app.rtc.sfu.engine import RoomFull, Sfu
from app.settings import Settings

log = logging.getLogger("app.rtc.placement")

LOCAL_NODE = "local"  # INTERFACE: the node name of the SFU inside this API process
REGISTRY_PREFIX = "sfu:node:"  # + a node's URL: its NodeStatus, expiring HEARTBEAT_LIVES heartbeats after writing
PLACED_PREFIX = "sfu:placed:"  # + a node's name: rooms placed on it since its last heartbeat
HEARTBEAT_LIVES = 3  # heartbeats a registration outlives its last write by


class SfuUnavailable(Unavailable):
    """No node to place a room on, or the room's node did not answer (503)."""

    default_reason = "sfu_unavailable"


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


class Refusal(msgspec.Struct):
    """A node's error body: `{"reason", "detail"}`."""

    reason: str = "unknown"
    detail: str = ""


def node_urls(settings: Settings) -> list[str]:
    """SFU_URLS as a list of base URLs (no trailing slash), in the order given."""
    return [url.strip().rstrip("/") for url in settings.sfu_urls.split(",") if url.strip()]


def offer_path(room_id: str, participant_id: str) -> str:
    return f"/rooms/{quote(room_id, safe='')}/participants/{quote(participant_id, safe='')}/offer"


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

    async def aclose(self) -> None: ...


class LocalDirectory:
    """The embedded profile: every room on the SFU in this process, which is alive as long as the process is."""

    def __init__(self, sfu: Sfu, owned: bool) -> None:
        self.sfu, self.owned = sfu, owned

    async def place(self, room_id: str) -> str:
        return LOCAL_NODE

    async def offer(self, node: str, room_id: str, participant_id: str, sdp: str, type_: str) -> tuple[str, str]:
        if node != LOCAL_NODE:  # a room placed while SFU_URLS was set, before a restart without it
            raise SfuUnavailable("the call's SFU node is not known to this server")
        return await self.sfu.offer(room_id, participant_id, sdp, type_)

    async def close_room(self, node: str, room_id: str) -> None:
        if node == LOCAL_NODE:
            await self.sfu.close_room(room_id)

    async def live_nodes(self) -> set[str]:
        return {LOCAL_NODE}

    async def aclose(self) -> None:
        if self.owned:
            await self.sfu.close()


class RemoteDirectory:
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
        if answer.status_code == 409 and refusal.reason == RoomFull.default_reason:
            return RoomFull(refusal.detail or "the call already has two participants")
        if answer.status_code == 409:
            return Conflict(refusal.detail or "the media server refused the offer", reason=refusal.reason)
        if answer.status_code in (400, 422):  # the offer itself is wrong: the client's to fix
            return Invalid(refusal.detail or "the offer was refused", reason=refusal.reason)
        # 401 (SFU_SECRET differs between the API and the node), 5xx: ours to fix, the client can only retry
        log.error("an SFU node refused an offer", extra={"node": node, "status_code": answer.status_code,
                                                         "reason": refusal.reason})
        return SfuUnavailable("the call's media server refused the offer; try again")

    async def close_room(self, node: str, room_id: str) -> None:
        url = url_of(node)
        if url not in self.urls:
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
    return LocalDirectory(local, owned=False) if local is not None else LocalDirectory(Sfu(settings), owned=True)
